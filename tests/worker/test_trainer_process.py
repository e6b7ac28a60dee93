"""The training child: its database callbacks (batched metrics, resume, checkpoints, stop requests,
ownership), its error codes, and a real child whose teacher does not load. (Real successful runs are in
the end-to-end tests.)"""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import func, select, update

from core.config import Settings
from core.db import session_scope
from core.distill.data_formats import DataError
from core.distill.model_checks import ModelReferenceError, TokenizerMismatchError
from core.jobs.models import Checkpoint, Job, JobEvent, Metric
from core.jobs.states import JobStatus
from core.storage import Storage
from tests.support.services import make_settings, seed_job, settings_env, sqlite_database, tiny_spec
from worker import job_files, supervisor, trainer_process
from worker.progress import DatabaseCallbacks
from worker.trainer_process import error_code


@pytest.fixture
def settings(tmp_path: Path, tiny_teacher_dir: Path) -> Settings:
    return make_settings(
        tmp_path, database_url=sqlite_database(tmp_path / "db"), model_roots=[tiny_teacher_dir.parent]
    )


@pytest.fixture
def job_id(settings: Settings, tiny_teacher_dir: Path) -> str:
    job_id = seed_job(settings, tiny_spec(tiny_teacher_dir, "placeholder"))
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.RUNNING, worker_id="w1"))
    return job_id


def callbacks(settings: Settings, job_id: str, **kwargs: float) -> DatabaseCallbacks:
    return DatabaseCallbacks(
        database_url=settings.database_url,
        storage=Storage(settings.artifacts),
        job_id=job_id,
        worker_id="w1",
        **kwargs,
    )


def metric_steps(settings: Settings, job_id: str, name: str = "loss") -> list[int]:
    with session_scope(settings.database_url) as session:
        query = select(Metric.step).where(Metric.job_id == job_id, Metric.name == name).order_by(Metric.step)
        return list(session.scalars(query))


def load(settings: Settings, job_id: str) -> Job:
    with session_scope(settings.database_url) as session:
        return session.get(Job, job_id)  # type: ignore[return-value]


def test_step_metrics_are_buffered_then_written_with_progress(settings: Settings, job_id: str) -> None:
    cb = callbacks(settings, job_id, flush_interval_s=3600)
    cb.on_start(total_steps=6, start_step=0)
    cb.on_step(1, {"loss": 2.0, "lr": 1e-3})
    cb.on_step(2, {"loss": 1.5, "lr": 1e-3, "grad_norm": float("nan")})
    assert metric_steps(settings, job_id) == []  # nothing written between flushes
    cb.flush()
    assert metric_steps(settings, job_id) == [1, 2]
    assert metric_steps(settings, job_id, "grad_norm") == []  # non-finite values are not stored
    job = load(settings, job_id)
    assert job.current_step == 2 and job.latest_metrics == {"loss": 1.5, "lr": 1e-3}


def test_a_checkpoint_steps_metrics_are_written_before_the_checkpoint(
    settings: Settings, job_id: str
) -> None:
    cb = callbacks(settings, job_id, flush_interval_s=3600, checkpoint_every=2)
    cb.on_step(1, {"loss": 2.0})
    assert metric_steps(settings, job_id) == []
    cb.on_step(2, {"loss": 1.0})  # the trainer saves the checkpoint of step 2 next
    assert metric_steps(settings, job_id) == [1, 2]


def test_resuming_drops_the_metrics_logged_after_the_checkpoint(settings: Settings, job_id: str) -> None:
    first = callbacks(settings, job_id, flush_interval_s=0)
    first.on_start(total_steps=6, start_step=0)
    for step in range(1, 6):
        first.on_step(step, {"loss": float(step)})
    # The lost attempt got to step 5; its checkpoint is at step 3.
    second = callbacks(settings, job_id, flush_interval_s=0)
    second.on_start(total_steps=6, start_step=3)
    second.on_step(4, {"loss": 0.4})
    assert metric_steps(settings, job_id) == [1, 2, 3, 4]
    with session_scope(settings.database_url) as session:
        events = list(session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id)))
    assert "resumed from step 3 of 6" in events


def test_checkpoints_are_recorded_relative_and_pruned_when_deleted(settings: Settings, job_id: str) -> None:
    storage = Storage(settings.artifacts)
    cb = callbacks(settings, job_id)
    first = storage.job_dir(job_id) / "checkpoints" / "step-00000003"
    first.mkdir(parents=True)
    (first / "model.safetensors").write_bytes(b"x" * 100)
    cb.on_checkpoint(3, first, {"loss": 1.0})
    second = first.with_name("step-00000006")
    second.mkdir()
    (second / "model.safetensors").write_bytes(b"y" * 50)
    first.joinpath("model.safetensors").unlink()
    first.rmdir()  # keep_checkpoints removed the older one
    cb.on_checkpoint(6, second, {"loss": 0.5})
    cb.on_checkpoint(6, second, {"loss": 0.5})  # a re-run of the same step replaces its row
    with session_scope(settings.database_url) as session:
        rows = list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)))
    assert [(r.step, r.storage_path, r.size_bytes) for r in rows] == [
        (6, f"jobs/{job_id}/checkpoints/step-00000006", 50)
    ]


def test_a_stop_file_or_a_cancelling_status_stops_training(settings: Settings, job_id: str) -> None:
    cb = callbacks(settings, job_id, stop_check_interval_s=0)
    assert not cb.should_stop()
    Storage(settings.artifacts).job_dir(job_id).mkdir(parents=True, exist_ok=True)
    (Storage(settings.artifacts).job_dir(job_id) / job_files.STOP_FILE).touch()
    assert cb.should_stop()

    other = callbacks(settings, "job_other", stop_check_interval_s=3600)
    other._job_id = job_id
    other._stop_file = Path("/nonexistent/STOP")
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.CANCELLING))
    assert not other.should_stop()
    other.flush()  # the status is read with each write
    assert other.should_stop()


@pytest.mark.parametrize("status", [JobStatus.CANCELLING, JobStatus.PAUSING])
def test_a_cancel_or_a_pause_read_with_a_write_stops_training(
    settings: Settings, job_id: str, status: JobStatus
) -> None:
    cb = callbacks(settings, job_id, stop_check_interval_s=3600)  # the STOP file is not looked at
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status=status))
    assert not cb.should_stop()
    cb.flush()
    assert cb.should_stop()


def test_a_job_that_is_no_longer_ours_gets_no_writes(settings: Settings, job_id: str) -> None:
    cb = callbacks(settings, job_id, flush_interval_s=0)
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.QUEUED, worker_id=None))
    cb.on_step(1, {"loss": 1.0})
    assert cb.should_stop()
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(func.count()).select_from(Metric)) == 0


def test_error_codes() -> None:
    from core.distill.trainer import TrainingError

    assert error_code(DataError("bad line"), started=False) == "invalid_data"
    assert error_code(TokenizerMismatchError("vocab"), started=False) == "tokenizer_mismatch"
    assert error_code(ModelReferenceError("missing"), started=False) == "model_load_failed"
    assert error_code(TrainingError("non-finite loss (nan) at step 3"), started=True) == "non_finite_loss"
    assert error_code(TrainingError("no example fits"), started=False) == "training_error"
    assert error_code(RuntimeError("boom"), started=True) == "training_error"


def test_a_model_that_does_not_load_fails_with_model_load_failed(
    settings: Settings, tiny_teacher_dir: Path
) -> None:
    broken = tiny_teacher_dir.parent / "broken-teacher"
    if not broken.exists():
        broken.mkdir()
        for item in tiny_teacher_dir.iterdir():
            (broken / item.name).write_bytes(item.read_bytes())
        (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    job_id = seed_job(settings, tiny_spec(broken, "placeholder"))
    assert supervisor.run_job(job_id, settings, "w1") == "failed", _log(settings, job_id)
    job = load(settings, job_id)
    assert job.error_code == "model_load_failed", job.error_message


def _log(settings: Settings, job_id: str) -> str:
    logs = Storage(settings.artifacts).job_dir(job_id) / job_files.LOG_DIR
    return "\n".join(p.read_text()[-3000:] for p in sorted(logs.glob("*.log")))


# ------------------------------------------------------------------------ a disk too full to report on
@pytest.fixture
def trainer_main(settings: Settings, job_id: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`trainer_process.main` run here, as the supervisor would start it, with `train` replaced."""
    from core.distill.spec import JobSpec

    for key, value in settings_env(settings).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DISTILL_TRAINER_THREADS", "0")  # leave this test process' torch threads alone
    spec_path = job_files.JobFiles(Storage(settings.artifacts).job_dir(job_id)).prepare_attempt(
        JobSpec.model_validate(load(settings, job_id).spec)
    )
    return lambda: trainer_process.main([job_id, "--spec", str(spec_path), "--worker-id", "w1"])


def fill_the_disk(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """Writes of the job directory's protocol files fail with `code` half-way (a torn temporary file)."""
    write_text = Path.write_text

    def failing(path: Path, data: str, *args: Any, **kwargs: Any) -> int:
        if path.suffix != ".tmp":
            return write_text(path, data, *args, **kwargs)
        write_text(path, data[: len(data) // 2], *args, **kwargs)
        raise OSError(code, errno.errorcode[code])

    monkeypatch.setattr(Path, "write_text", failing)


def failing_training(*args: Any, **kwargs: Any) -> None:
    raise DataError("line 3: bad")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["enospc", "edquot"])
def test_an_error_report_the_full_disk_refuses_exits_storage_full(
    settings: Settings, job_id: str, trainer_main: Any, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    import core.distill.trainer

    monkeypatch.setattr(core.distill.trainer, "train", failing_training)
    fill_the_disk(monkeypatch, code)
    assert trainer_main() == job_files.EXIT_STORAGE_FULL
    job_dir = Storage(settings.artifacts).job_dir(job_id)
    assert not (job_dir / job_files.ERROR_FILE).exists()
    assert not list(job_dir.glob("*.tmp"))  # the torn file's blocks given back


def test_a_result_the_full_disk_refuses_exits_storage_full(
    settings: Settings, job_id: str, trainer_main: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import core.distill.trainer

    result = SimpleNamespace(step=6, stopped=False, student_dir=None, metrics={}, checkpoint=None)
    monkeypatch.setattr(core.distill.trainer, "train", lambda *args, **kwargs: result)
    fill_the_disk(monkeypatch, errno.ENOSPC)
    assert trainer_main() == job_files.EXIT_STORAGE_FULL
    assert not (Storage(settings.artifacts).job_dir(job_id) / job_files.RESULT_FILE).exists()


def test_other_write_errors_are_not_storage_full(
    settings: Settings, trainer_main: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import core.distill.trainer

    monkeypatch.setattr(core.distill.trainer, "train", failing_training)
    fill_the_disk(monkeypatch, errno.EACCES)
    with pytest.raises(PermissionError):  # the process dies with it: the supervisor's trainer_crashed
        trainer_main()


def test_an_error_report_that_could_be_written_still_exits_3(
    settings: Settings, job_id: str, trainer_main: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import core.distill.trainer

    monkeypatch.setattr(core.distill.trainer, "train", failing_training)
    assert trainer_main() == job_files.EXIT_TRAINING_FAILED
    error = job_files.JobFiles(Storage(settings.artifacts).job_dir(job_id)).read_error()
    assert error == {"code": "invalid_data", "message": "line 3: bad"}
