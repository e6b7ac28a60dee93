"""The job supervisor (worker.supervisor) against a real database, with a stand-in trainer process that
speaks the child's file protocol: claims, outcomes, cancellation, lost jobs, dying with the worker, and
crashes retried from a usable checkpoint while attempts remain."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from core.config import Settings
from core.db import session_scope
from core.files.models import File
from core.jobs.lifecycle import transition
from core.jobs.models import Job, JobEvent
from core.jobs.states import JobStatus
from core.storage import Storage
from tests.support.services import (
    fresh_postgres_database,
    make_settings,
    seed_job,
    settings_env,
    tiny_spec,
    wait_for,
)
from tests.worker.test_process import niceness
from worker import job_files, supervisor
from worker import process as process_control

FAKE_TRAINER = Path(__file__).parents[1] / "support" / "fake_trainer.py"


def fake(mode: str) -> list[str]:
    return [sys.executable, str(FAKE_TRAINER), mode]


def load(settings: Settings, job_id: str) -> Job:
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def messages(settings: Settings, job_id: str) -> list[str]:
    with session_scope(settings.database_url) as session:
        return list(
            session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
        )


def started_pid(settings: Settings, job_id: str) -> int:
    marker = Storage(settings.artifacts).job_dir(job_id) / "fake-started"
    return int(
        wait_for(lambda: marker.is_file() and marker.read_text(), timeout=30, what="the trainer to start")
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_success_is_recorded_and_a_second_delivery_is_ignored(settings: Settings, job_id: str) -> None:
    assert supervisor.run_job(job_id, settings, "w1", child_command=fake("succeed")) == "succeeded"
    job = load(settings, job_id)
    assert (job.status, job.attempts, job.worker_id, job.current_step) == (JobStatus.SUCCEEDED, 1, "w1", 6)
    assert job.started_at is not None and job.finished_at is not None
    assert "attempt 1 of 3 started on worker w1" in messages(settings, job_id)
    # The trainer process sees this worker's settings, whatever way they were given.
    env = json.loads((Storage(settings.artifacts).job_dir(job_id) / "fake-env").read_text())
    assert env["DISTILL_DATABASE_URL"] == settings.database_url
    assert env["DISTILL_STORAGE_DIR"] == str(settings.artifacts) and env["DISTILL_TRAINER_THREADS"] == "1"

    # A duplicate delivery of the same task finds the job no longer queued and runs nothing.
    assert supervisor.run_job(job_id, settings, "w2", child_command=fake("succeed")) == "not_claimed"
    assert load(settings, job_id).attempts == 1
    assert sum("attempt" in m for m in messages(settings, job_id)) == 1


@pytest.mark.postgres
def test_concurrent_deliveries_claim_once_on_postgres(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    with fresh_postgres_database() as url:
        settings = make_settings(tmp_path, database_url=url, model_roots=[tiny_teacher_dir.parent])
        job_id = seed_job(settings, tiny_spec(tiny_teacher_dir, "placeholder"))
        barrier = threading.Barrier(4)
        claims: list[object] = []

        def claim(worker: str) -> None:
            barrier.wait()
            claims.append(supervisor._claim(job_id, settings, worker))

        threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sum(c is not None for c in claims) == 1
        job = load(settings, job_id)
        assert job.status is JobStatus.RUNNING and job.attempts == 1


def test_training_error_fails_the_job_with_the_childs_code(settings: Settings, job_id: str) -> None:
    assert supervisor.run_job(job_id, settings, "w1", child_command=fake("error")) == "failed"
    job = load(settings, job_id)
    assert (job.status, job.error_code, job.error_message) == (
        JobStatus.FAILED,
        "invalid_data",
        "line 3: bad",
    )


def test_a_disk_too_full_for_the_error_report_fails_the_job_as_storage_full(
    settings: Settings, job_id: str, tiny_student_dir: Path, sent: list[str]
) -> None:
    """Not `trainer_crashed`, and not retried even with a checkpoint and attempts left: the next attempt
    would meet the same full disk."""
    save_a_checkpoint(settings, job_id, tiny_student_dir)
    assert supervisor.run_job(job_id, settings, "w1", child_command=fake("storage_full")) == "failed"
    job = load(settings, job_id)
    assert (job.status, job.attempts, job.error_code) == (JobStatus.FAILED, 1, "storage_full")
    assert job.error_message == supervisor.STORAGE_FULL_MESSAGE and "storage is full" in job.error_message
    assert sent == []
    with session_scope(settings.database_url) as session:  # the trainer's last words, for the operator
        [tail] = session.scalars(
            select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.kind == "log")
        )
    assert "No space left on device" in tail["tail"]


def test_a_crashed_trainer_fails_the_job_and_not_the_worker(settings: Settings, job_id: str) -> None:
    assert supervisor.run_job(job_id, settings, "w1", child_command=fake("crash")) == "failed"
    job = load(settings, job_id)
    assert job.status is JobStatus.FAILED and job.error_code == "trainer_crashed"
    assert "SIGKILL" in (job.error_message or "")


def _cancel_when_started(settings: Settings, job_id: str) -> threading.Thread:
    def cancel() -> None:
        started_pid(settings, job_id)
        with session_scope(settings.database_url) as session:
            assert transition(
                session, job_id=job_id, target=JobStatus.CANCELLING, expected=[JobStatus.RUNNING]
            )

    thread = threading.Thread(target=cancel)
    thread.start()
    return thread


def test_cancellation_is_a_stop_request_the_trainer_obeys(settings: Settings, job_id: str) -> None:
    thread = _cancel_when_started(settings, job_id)
    assert supervisor.run_job(job_id, settings, "w1", child_command=fake("obey_stop")) == "cancelled"
    thread.join()
    assert load(settings, job_id).status is JobStatus.CANCELLED
    assert (Storage(settings.artifacts).job_dir(job_id) / job_files.STOP_FILE).exists()


def test_the_trainer_runs_at_the_configured_niceness(settings: Settings, job_id: str) -> None:
    """Every worker's trainers train at `trainer_nice`, however the worker was started (`distill serve`
    renices its worker; a plain Celery worker relies on the supervisor)."""
    own = os.getpriority(os.PRIO_PROCESS, 0)
    if own >= 19:
        pytest.skip("the tests already run at the lowest priority")
    settings.trainer_nice = min(19, own + 6)
    seen: list[int] = []

    def observe_then_cancel() -> None:
        seen.append(niceness(started_pid(settings, job_id)))
        with session_scope(settings.database_url) as session:
            assert transition(
                session, job_id=job_id, target=JobStatus.CANCELLING, expected=[JobStatus.RUNNING]
            )

    thread = threading.Thread(target=observe_then_cancel)
    thread.start()
    assert supervisor.run_job(job_id, settings, "w1", child_command=fake("obey_stop")) == "cancelled"
    thread.join()
    assert seen == [settings.trainer_nice]
    assert os.getpriority(os.PRIO_PROCESS, 0) == own  # the worker itself is left as it was


def test_a_trainer_ignoring_the_stop_request_is_killed(
    settings: Settings, job_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.cancel_grace_s = 0.5
    monkeypatch.setattr(process_control, "KILL_WAIT_S", 0.5)
    thread = _cancel_when_started(settings, job_id)
    assert supervisor.run_job(job_id, settings, "w1", child_command=fake("ignore_stop")) == "cancelled"
    thread.join()
    assert not pid_alive(started_pid(settings, job_id))
    assert load(settings, job_id).status is JobStatus.CANCELLED
    assert any("ignored the stop request" in m for m in messages(settings, job_id))


def test_a_job_taken_away_stops_its_trainer(settings: Settings, job_id: str) -> None:
    def take_away() -> None:
        started_pid(settings, job_id)
        with session_scope(settings.database_url) as session:  # what the reaper does to a stale job
            assert transition(
                session, job_id=job_id, target=JobStatus.QUEUED, expected=[JobStatus.RUNNING], worker_id=None
            )

    thread = threading.Thread(target=take_away)
    thread.start()
    assert supervisor.run_job(job_id, settings, "w1", child_command=fake("obey_stop")) == "lost"
    thread.join()
    assert not pid_alive(started_pid(settings, job_id))
    assert load(settings, job_id).status is JobStatus.QUEUED  # left for the next attempt


def test_a_deleted_training_file_fails_the_job_before_training(settings: Settings, job_id: str) -> None:
    with session_scope(settings.database_url) as session:
        file = session.scalars(select(File)).one()
        Storage(settings.artifacts).resolve(file.storage_path).unlink()
    assert supervisor.run_job(job_id, settings, "w1", child_command=fake("succeed")) == "failed"
    job = load(settings, job_id)
    assert job.error_code == "invalid_data" and "data.train" in (job.error_message or "")
    assert not (Storage(settings.artifacts).job_dir(job_id) / "fake-started").exists()


def test_a_bare_model_name_is_resolved_for_the_trainer_only(
    settings: Settings, tiny_teacher_dir: Path
) -> None:
    """The job keeps `tiny-teacher` as the tenant gave it; the trainer gets this worker's path to it."""
    job_id = seed_job(settings, tiny_spec(Path(tiny_teacher_dir.name), "placeholder"))
    assert supervisor.run_job(job_id, settings, "w1", child_command=fake("succeed")) == "succeeded"
    written = json.loads((Storage(settings.artifacts).job_dir(job_id) / job_files.SPEC_FILE).read_text())
    assert written["teacher"]["model"] == str(tiny_teacher_dir.resolve())
    assert load(settings, job_id).spec["teacher"]["model"] == tiny_teacher_dir.name


def test_a_model_outside_this_workers_model_roots_is_refused(
    settings: Settings, job_id: str, tmp_path: Path
) -> None:
    settings.model_roots = [tmp_path / "elsewhere"]
    assert supervisor.run_job(job_id, settings, "w1", child_command=fake("succeed")) == "failed"
    job = load(settings, job_id)
    assert job.error_code == "model_load_failed" and "teacher.model" in (job.error_message or "")


@pytest.fixture
def supervisor_process(settings: Settings, job_id: str) -> Iterator[subprocess.Popen[bytes]]:
    code = (
        "import sys; from core.config import Settings; from worker.supervisor import run_job; "
        f"run_job({job_id!r}, Settings(), 'w1', child_command=sys.argv[1:])"
    )
    process = subprocess.Popen([sys.executable, "-c", code, *fake("ignore_stop")], env=settings_env(settings))
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()


def test_the_trainer_dies_with_a_killed_supervisor(
    settings: Settings, job_id: str, supervisor_process: subprocess.Popen[bytes]
) -> None:
    child = started_pid(settings, job_id)
    assert pid_alive(child)
    supervisor_process.send_signal(signal.SIGKILL)  # kill -9 of the worker: nothing of it can clean up
    supervisor_process.wait()
    wait_for(lambda: not pid_alive(child), timeout=10, what="the orphaned trainer to die")
    assert load(settings, job_id).status is JobStatus.RUNNING  # the reaper's business now


# ------------------------------------------------------------------------------ crashes and retries
def save_a_checkpoint(settings: Settings, job_id: str, tiny_student_dir: Path, step: int = 3) -> Path:
    """A real, verifiable checkpoint in the job's directory (what the trainer would have left)."""
    from core.distill.checkpoint import save_checkpoint
    from core.distill.models import load_causal_lm, load_tokenizer
    from core.distill.spec import JobSpec

    with session_scope(settings.database_url) as session:
        spec = JobSpec.model_validate(session.get(Job, job_id).spec)  # type: ignore[union-attr]
    return save_checkpoint(
        Storage(settings.artifacts).job_dir(job_id),
        step,
        student=load_causal_lm(tiny_student_dir),
        tokenizer=load_tokenizer(tiny_student_dir),
        spec=spec,
        trainer_state={"step": step},
    )


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(supervisor, "enqueue_job", lambda settings, job_id: calls.append(job_id))
    return calls


def test_a_crash_with_a_checkpoint_is_retried_from_it(
    settings: Settings, job_id: str, tiny_student_dir: Path, sent: list[str]
) -> None:
    save_a_checkpoint(settings, job_id, tiny_student_dir)
    assert supervisor.run_job(job_id, settings, "w1", child_command=fake("crash")) == "requeued"
    job = load(settings, job_id)
    assert (job.status, job.worker_id, job.heartbeat_at, job.attempts) == (JobStatus.QUEUED, None, None, 1)
    assert job.error_code is None and job.enqueued_at is not None and sent == [job_id]
    assert any(
        "killed by SIGKILL" in m and "resume from the checkpoint of step 3 (attempt 2 of 3)" in m
        for m in messages(settings, job_id)
    ), messages(settings, job_id)


def test_a_job_crashing_on_every_attempt_still_fails(
    settings: Settings, job_id: str, tiny_student_dir: Path, sent: list[str]
) -> None:
    save_a_checkpoint(settings, job_id, tiny_student_dir)
    outcomes = [supervisor.run_job(job_id, settings, f"w{i}", child_command=fake("crash")) for i in range(3)]
    assert outcomes == ["requeued", "requeued", "failed"] and sent == [job_id, job_id]
    job = load(settings, job_id)
    assert (job.status, job.attempts, job.error_code) == (JobStatus.FAILED, 3, "trainer_crashed")
    assert "on each of its 3 attempts" in (job.error_message or "")


def test_a_crash_next_to_a_corrupt_checkpoint_fails(
    settings: Settings, job_id: str, tiny_student_dir: Path, sent: list[str]
) -> None:
    checkpoint = save_a_checkpoint(settings, job_id, tiny_student_dir)
    (checkpoint / "model.safetensors").write_bytes(b"torn")  # no longer matches its manifest
    assert supervisor.run_job(job_id, settings, "w1", child_command=fake("crash")) == "failed"
    assert load(settings, job_id).error_code == "trainer_crashed" and sent == []


def test_heartbeats_go_on_while_a_crash_is_examined(
    settings: Settings, job_id: str, sent: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Verifying a large checkpoint after a crash takes time: the reaper must not see a silent worker."""
    seen = []

    def slow_verification(job_dir: Path) -> int:
        before = load(settings, job_id).heartbeat_at
        time.sleep(1.0)  # five heartbeat intervals
        seen.append((before, load(settings, job_id).heartbeat_at))
        return 3

    monkeypatch.setattr(supervisor, "_resumable_step", slow_verification)
    assert supervisor.run_job(job_id, settings, "w1", child_command=fake("crash")) == "requeued"
    [(before, after)] = seen
    assert before is not None and after is not None and after > before
