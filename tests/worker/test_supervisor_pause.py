"""The job supervisor (worker.supervisor) and a pause, against a real database (SQLite) with the stand-in
trainer of tests/worker/test_supervisor.py: a pause is a stop request like a cancel's, and the job ends
`paused` (held by no worker, its attempt not counted) however its trainer stopped; a cancel while pausing
wins. The real trainer's pause and resume run end to end in tests/e2e/test_pause_resume.py."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from core.config import Settings
from core.db import session_scope
from core.distill.layout import student_dir
from core.distill.spec import JobSpec
from core.jobs.lifecycle import reopen, transition
from core.jobs.models import JobEvent
from core.jobs.states import JobStatus
from core.storage import Storage
from tests.support.services import wait_for
from tests.worker.test_supervisor import (  # the same supervisor fixtures: a fresh SQLite job each
    fake,
    load,
    pid_alive,
    started_pid,
)
from worker import job_files, supervisor
from worker import process as process_control


def events(settings: Settings, job_id: str) -> list[tuple[str, str]]:
    with session_scope(settings.database_url) as session:
        query = select(JobEvent.kind, JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        return [(kind, message) for kind, message in session.execute(query)]


def move(settings: Settings, job_id: str, source: JobStatus, target: JobStatus) -> None:
    with session_scope(settings.database_url) as session:
        assert transition(session, job_id=job_id, target=target, expected=[source])


def in_thread(target: object) -> threading.Thread:
    thread = threading.Thread(target=target)  # type: ignore[arg-type]
    thread.start()
    return thread


def stop_file(settings: Settings, job_id: str) -> Path:
    return Storage(settings.artifacts).job_dir(job_id) / job_files.STOP_FILE


def test_a_pause_stops_the_trainer_and_leaves_the_job_paused_for_a_resume(
    settings: Settings, job_id: str
) -> None:
    def pause() -> None:
        started_pid(settings, job_id)
        move(settings, job_id, JobStatus.RUNNING, JobStatus.PAUSING)

    thread = in_thread(pause)
    assert supervisor.run_job(job_id, settings, "w1", child_command=fake("obey_stop")) == "paused"
    thread.join()
    assert stop_file(settings, job_id).exists()
    job = load(settings, job_id)
    assert job.status is JobStatus.PAUSED
    assert (job.worker_id, job.heartbeat_at, job.finished_at) == (None, None, None)
    assert (job.attempts, job.current_step) == (0, 2)  # the stopped attempt is not counted
    assert events(settings, job_id)[-1] == (
        "status",
        "job paused at step 2; a resume continues from its last checkpoint",
    )

    # A paused job's message claims nothing; once resumed, a worker takes it again as attempt 1.
    assert supervisor.run_job(job_id, settings, "w2", child_command=fake("succeed")) == "not_claimed"
    with session_scope(settings.database_url) as session:
        assert reopen(session, job_id=job_id, expected=[JobStatus.PAUSED], message="resumed")
    assert supervisor.run_job(job_id, settings, "w2", child_command=fake("succeed")) == "succeeded"
    assert not stop_file(settings, job_id).exists()  # a new attempt starts without the old request
    job = load(settings, job_id)
    assert (job.status, job.attempts, job.worker_id) == (JobStatus.SUCCEEDED, 1, "w2")


def test_a_trainer_ignoring_a_pause_is_killed_and_the_job_paused(
    settings: Settings, job_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.cancel_grace_s = 0.5
    monkeypatch.setattr(process_control, "KILL_WAIT_S", 0.5)

    def pause() -> None:
        started_pid(settings, job_id)
        move(settings, job_id, JobStatus.RUNNING, JobStatus.PAUSING)

    thread = in_thread(pause)
    assert supervisor.run_job(job_id, settings, "w1", child_command=fake("ignore_stop")) == "paused"
    thread.join()
    assert not pid_alive(started_pid(settings, job_id))
    job = load(settings, job_id)
    assert (job.status, job.worker_id, job.attempts) == (JobStatus.PAUSED, None, 0)
    log = events(settings, job_id)
    assert ("pause", "the trainer ignored the stop request: terminated") in log
    # It stopped at no known step: the resume continues from the last checkpoint there is.
    assert log[-1] == ("status", "job paused; a resume continues from its last checkpoint")


def test_a_cancel_while_pausing_wins(
    settings: Settings, job_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.cancel_grace_s = 2.0
    monkeypatch.setattr(process_control, "KILL_WAIT_S", 0.5)

    def pause_then_cancel() -> None:
        started_pid(settings, job_id)
        move(settings, job_id, JobStatus.RUNNING, JobStatus.PAUSING)
        wait_for(stop_file(settings, job_id).exists, timeout=30, what="the stop request")
        move(settings, job_id, JobStatus.PAUSING, JobStatus.CANCELLING)

    thread = in_thread(pause_then_cancel)
    # The trainer ignores the stop until it is killed, so the cancel surely lands while it is pausing.
    assert supervisor.run_job(job_id, settings, "w1", child_command=fake("ignore_stop")) == "cancelled"
    thread.join()
    job = load(settings, job_id)
    assert job.status is JobStatus.CANCELLED and job.finished_at is not None
    statuses = [message for kind, message in events(settings, job_id) if kind == "status"]
    assert statuses[-3:] == ["job is pausing", "job is cancelling", "job cancelled"]


@pytest.mark.parametrize(
    ("ending", "outcome", "code"),
    [
        ("finished", "succeeded", None),  # the last step came before the stop request
        ("error", "failed", "invalid_data"),  # a failure would recur on resume: not hidden behind a pause
        ("storage_full", "failed", "storage_full"),  # not even its stop checkpoint could be written
        ("stopped", "paused", None),
    ],
)
def test_how_a_pausing_job_ends_follows_how_its_trainer_ended(
    settings: Settings, job_id: str, ending: str, outcome: str, code: str | None
) -> None:
    """The supervisor's decision once the trainer of a pausing job has exited, from what it left behind."""
    attempt = supervisor._claim(job_id, settings, "w1")
    assert attempt is not None
    attempt.files.prepare_attempt(JobSpec.model_validate(load(settings, job_id).spec))
    move(settings, job_id, JobStatus.RUNNING, JobStatus.PAUSING)
    returncode = 0
    if ending == "finished":
        student_dir(attempt.files.root).mkdir(parents=True)
        attempt.files.write_result(step=6, stopped=False)
    elif ending == "stopped":
        attempt.files.write_result(step=4, stopped=True)
    elif ending == "error":
        attempt.files.write_error(code="invalid_data", message="line 3: bad")
        returncode = job_files.EXIT_TRAINING_FAILED
    else:
        returncode = job_files.EXIT_STORAGE_FULL
    log_path = attempt.files.log_path(attempt.number)
    assert supervisor._record_end(attempt, settings, returncode, log_path) == outcome
    job = load(settings, job_id)
    assert (job.status.value, job.error_code) == (outcome, code)
    assert job.attempts == (0 if outcome == "paused" else 1)
