"""The supervisor of one job, run inside the Celery task: claim it, train it in a trainer process, send
heartbeats, turn a cancellation or a pause into a stop request (then a kill), and record how it ended.

The trainer runs in its own process (`python -m worker.trainer_process`), so that a crash, a leak or GPU
memory never outlives the job, and a stuck trainer can be killed. They talk through the job directory
(`worker.job_files`). This module imports no torch (but after a crash, to verify the checkpoint a retry
would resume from).

How an attempt ends:
- the trainer exits 0 after training to the end → `succeeded` (also when a cancel or pause came too late);
- after a cancel's stop request (stopped at a step, terminated after ignoring it, or crashed) → `cancelled`;
- after a pause's stop request, likewise → `paused`: no worker holds the job, the attempt is not counted (a
  pause is no failure), and the user's resume queues it to continue from its last checkpoint (the trainer
  checkpoints the step it stopped at). A cancel that came while pausing wins;
- the trainer writes `error.json` (bad data, non-finite loss, a model that does not load) → `failed` with
  that code and message. Such errors would recur, so they are never retried;
- the trainer exits `EXIT_STORAGE_FULL` (the disk or the quota is so full that it could not even write
  `error.json`) → `failed` with code `storage_full`, as when it could write it, and not retried either: the
  next attempt would meet the same full disk. Freeing space needs an operator; then the job can be resumed
  from its last checkpoint;
- the trainer dies without a word (killed by a signal, e.g. the kernel's OOM killer, or a segfault) → with
  a usable checkpoint on disk and attempts left, the job is re-queued and its next attempt resumes from
  that checkpoint (a crash may be the machine's, not the job's); otherwise `failed` with code
  `trainer_crashed` (a job that crashes before its first checkpoint would most likely crash again);
- the worker itself vanishes (kill -9, machine lost) → its trainer dies with it (PR_SET_PDEATHSIG) and the
  reaper re-queues the job, whose next attempt resumes from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from core.config import Settings
from core.db import session_scope, utcnow
from core.distill.model_checks import ModelReferenceError, check_model_reference
from core.distill.spec import JobSpec, StudentSpec, TeacherSpec
from core.errors import NotFound
from core.files import service as files_service
from core.jobs.lifecycle import add_event, transition
from core.jobs.models import Job
from core.jobs.states import ACTIVE_STATES, STOPPING_STATES, JobStatus, sources_of
from core.queue import enqueue_job
from core.storage import Storage
from worker import process as process_control
from worker.job_files import EXIT_STORAGE_FULL, JobFiles
from worker.metrics import observe_job_end

log = logging.getLogger(__name__)

STORAGE_FULL_MESSAGE = (
    "the server's storage is full (disk or quota): the trainer could not even write its error report. "
    "Not retried; once space is freed the job can be resumed from its last checkpoint, if it has one"
)

Outcome = Literal["not_claimed", "succeeded", "failed", "cancelled", "paused", "requeued", "lost"]


class JobSetupError(Exception):
    """The job cannot start (a deleted file, a model outside MODEL_ROOTS): fails it with `code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Attempt:
    job_id: str
    worker_id: str
    number: int
    max_attempts: int
    files: JobFiles


def run_job(
    job_id: str, settings: Settings, worker_id: str, *, child_command: Sequence[str] | None = None
) -> Outcome:
    """Claim `job_id` and supervise one training attempt to its end; returns how it ended.

    `child_command` replaces `[python, -m, worker.trainer_process]` (tests use it to simulate crashes).
    """
    attempt = _claim(job_id, settings, worker_id)
    if attempt is None:
        log.info("job %s is not queued (a duplicate delivery or a cancelled job): skipped", job_id)
        return "not_claimed"
    try:
        spec_path = _prepare(attempt, settings)
        command = [*(child_command or _trainer_command(attempt.files.read_spec(spec_path)))]
    except JobSetupError as exc:
        return _finish_failed(attempt, settings, exc.code, exc.message)
    command += [job_id, "--spec", str(spec_path), "--worker-id", worker_id]
    return _supervise(attempt, settings, command)


def _trainer_command(spec: JobSpec) -> list[str]:
    """`python -m worker.trainer_process`; for a job on several devices, one rank per device under
    torch.distributed.run (its ranks die with it; a rank that dies ends them all and it exits non-zero)."""
    resources = spec.resources
    if resources.nnodes > 1:
        raise JobSetupError(
            "invalid_spec",
            "resources.nnodes > 1 is for distill train: the service trains a job on one machine",
        )
    trainer = ["-m", "worker.trainer_process"]
    if resources.devices == 1:
        return [sys.executable, *trainer]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={resources.devices}"]
    return [sys.executable, *launcher, *trainer]


# ------------------------------------------------------------------------------------------------ claim
def _claim(job_id: str, settings: Settings, worker_id: str) -> _Attempt | None:
    now = utcnow()
    with session_scope(settings.database_url) as session:
        claimed = transition(
            session,
            job_id=job_id,
            target=JobStatus.RUNNING,
            expected=[JobStatus.QUEUED],
            message=f"job is running on worker {worker_id}",
            worker_id=worker_id,
            attempts=Job.attempts + 1,
            started_at=func.coalesce(Job.started_at, now),
            heartbeat_at=now,
        )
        if not claimed:
            return None
        attempts, max_attempts = session.execute(
            select(Job.attempts, Job.max_attempts).where(Job.id == job_id)
        ).one()
        add_event(
            session,
            job_id=job_id,
            kind="attempt",
            message=f"attempt {attempts} of {max_attempts} started on worker {worker_id}",
            data={"attempt": attempts, "max_attempts": max_attempts, "worker_id": worker_id},
        )
    files = JobFiles(Storage(settings.artifacts).job_dir(job_id))
    return _Attempt(job_id, worker_id, attempts, max_attempts, files)


def _prepare(attempt: _Attempt, settings: Settings) -> Path:
    """Resolve the spec's file ids to storage paths and its model references (as the tenant gave them) to
    what this worker loads, clear the last attempt's files."""
    with session_scope(settings.database_url) as session:
        job = session.get(Job, attempt.job_id)
        assert job is not None
        try:
            spec = JobSpec.model_validate(job.spec)
        except ValidationError as exc:  # stored by a version with another JobSpec
            raise JobSetupError("invalid_spec", f"the stored job spec is no longer valid: {exc}") from exc
        data = {"train": _file_path(session, settings, job.tenant_id, spec.data.train, "data.train")}
        if spec.data.eval is not None:
            data["eval"] = _file_path(session, settings, job.tenant_id, spec.data.eval, "data.eval")
    # The API checked the models when the job was created; this worker may see other MODEL_ROOTS, and
    # resolves a bare name (`tiny-teacher`) under its own.
    teacher = spec.teacher.model_copy(update={"model": _model_path(settings, spec.teacher, "teacher.model")})
    student = spec.student
    if student.model is not None:
        student = student.model_copy(update={"model": _model_path(settings, student, "student.model")})
    data_paths = spec.data.model_copy(update=data)
    spec = spec.model_copy(update={"data": data_paths, "teacher": teacher, "student": student})
    return attempt.files.prepare_attempt(spec)


def _model_path(settings: Settings, model: TeacherSpec | StudentSpec, field: str) -> str:
    """What this worker loads for a model reference of the spec: its path under the model roots (or a hub
    id)."""
    assert model.model is not None
    try:
        return check_model_reference(
            model.model,
            model.gguf_file,
            model_roots=settings.model_roots,
            allow_hub=settings.allow_hub_models,
        )
    except ModelReferenceError as exc:
        raise JobSetupError("model_load_failed", f"{field}: {exc}") from exc


def _file_path(session: Session, settings: Settings, tenant_id: str, file_id: str, field: str) -> str:
    try:
        file = files_service.get_file(session=session, tenant_id=tenant_id, file_id=file_id)
    except NotFound as exc:
        raise JobSetupError("invalid_data", f"{field}: file {file_id!r} no longer exists") from exc
    path = files_service.file_path(settings=settings, file=file)
    if not path.is_file():
        raise JobSetupError("invalid_data", f"{field}: the stored content of file {file_id!r} is missing")
    return str(path)


# -------------------------------------------------------------------------------------------- supervise
def _supervise(attempt: _Attempt, settings: Settings, command: list[str]) -> Outcome:
    log_path = attempt.files.log_path(attempt.number)
    env = {
        **os.environ,
        # The child must see this process' settings even when they were not given by the environment.
        "DISTILL_DATABASE_URL": settings.database_url,
        "DISTILL_STORAGE_DIR": str(settings.artifacts),
        "DISTILL_STORAGE_URL": settings.storage_url,
        "DISTILL_TRAINER_THREADS": str(settings.trainer_threads),
        "DISTILL_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "PYTHONUNBUFFERED": "1",
    }
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: a kill reaches its helpers too
            preexec_fn=functools.partial(process_control.child_preexec, os.getpid(), settings.trainer_nice),
        )
    log.info("job %s attempt %d: trainer pid %d", attempt.job_id, attempt.number, process.pid)
    check_interval = min(1.0, settings.heartbeat_interval_s)
    next_heartbeat = 0.0
    next_check = 0.0
    stop_requested_at: float | None = None
    stop_kind = "cancel"
    killed_for_cancel = False
    lost = False
    try:
        while process.poll() is None:
            now = time.monotonic()
            if now >= next_check:
                heartbeat = now >= next_heartbeat
                status = _check_in(attempt, settings, heartbeat=heartbeat)
                next_check = now + check_interval
                if heartbeat:
                    next_heartbeat = now + settings.heartbeat_interval_s
                if status is None:
                    log.warning("job %s is no longer ours: stopping its trainer", attempt.job_id)
                    lost = True
                    process_control.kill_group(process)
                    break
                if status in STOPPING_STATES and stop_requested_at is None:
                    attempt.files.request_stop()  # cancelling or pausing: the trainer checkpoints and exits
                    stop_requested_at = now
                    stop_kind = "cancel" if status is JobStatus.CANCELLING else "pause"
                    log.info("job %s: stop requested (%s)", attempt.job_id, status.value)
            if (
                stop_requested_at is not None
                and not killed_for_cancel
                and time.monotonic() - stop_requested_at > settings.cancel_grace_s
            ):
                log.warning("job %s ignored its stop request: terminating it", attempt.job_id)
                _add_event(attempt, settings, stop_kind, "the trainer ignored the stop request: terminated")
                process_control.kill_group(process)
                killed_for_cancel = True
            time.sleep(0.1)
    finally:
        if process.poll() is None:  # the supervisor itself failed: never leave a trainer behind
            process_control.kill_group(process)
    if lost:
        return "lost"
    return _record_end(attempt, settings, process.returncode, log_path)


def _check_in(attempt: _Attempt, settings: Settings, *, heartbeat: bool) -> JobStatus | None:
    """Send a heartbeat (if due) and read the job's status; None when the job is no longer ours.

    A database error is logged and treated as "still running": a short outage must not kill a job (if it
    lasts, the reaper re-queues the job and the next check-in finds it is no longer ours).
    """
    owned = (Job.id == attempt.job_id, Job.worker_id == attempt.worker_id)
    active = Job.status.in_(ACTIVE_STATES)
    try:
        with session_scope(settings.database_url) as session:
            if heartbeat:
                session.execute(
                    update(Job)
                    .where(*owned, active)
                    .values(heartbeat_at=utcnow())
                    .execution_options(synchronize_session=False)
                )
            status = session.execute(select(Job.status).where(*owned, active)).scalar_one_or_none()
    except Exception:
        log.exception("job %s: heartbeat failed", attempt.job_id)
        return JobStatus.RUNNING
    return status


# ----------------------------------------------------------------------------------------------- finish
def _record_end(attempt: _Attempt, settings: Settings, returncode: int, log_path: Path) -> Outcome:
    result = attempt.files.read_result()
    error = attempt.files.read_error()
    status = _current_status(attempt, settings)
    if status is None:
        return "lost"
    if returncode == 0 and result is not None and not result.get("stopped"):
        if not attempt.files.has_student():
            return _finish_failed(
                attempt, settings, "training_error", "the trainer finished without saving the student"
            )
        return _finish(attempt, settings, JobStatus.SUCCEEDED, "job succeeded", current_step=result["step"])
    failed = error is not None or returncode == EXIT_STORAGE_FULL
    if status is JobStatus.CANCELLING or (status is JobStatus.PAUSING and not failed):
        # Whatever way the trainer ended after a stop request (stopped, terminated, crashed), the user asked
        # for the job to stop; a cancelled trainer's failure is moot too, a paused one's would recur (say,
        # a full disk that kept it from writing its stop checkpoint): `failed`.
        return _record_stop(attempt, settings, result.get("step") if result else None)
    if error is not None:
        code = str(error.get("code") or "training_error")
        message = str(error.get("message") or "the trainer failed")
        return _finish_failed(attempt, settings, code, message)
    if returncode == EXIT_STORAGE_FULL:
        return _finish_failed(attempt, settings, "storage_full", STORAGE_FULL_MESSAGE, log_path)
    if returncode == 0:
        return _finish_failed(
            attempt, settings, "training_error", "the trainer stopped early without a stop request"
        )
    return _crashed(attempt, settings, returncode, log_path)


def _record_stop(attempt: _Attempt, settings: Settings, step: int | None) -> Outcome:
    """End an attempt stopped at the user's request: `cancelled`, or `paused` (see the module note)."""
    at = f" at step {step}" if step is not None else ""
    for _ in range(2):  # a cancel may turn `pausing` into `cancelling` between the read and the change
        status = _current_status(attempt, settings)
        if status is JobStatus.CANCELLING:
            return _finish(attempt, settings, JobStatus.CANCELLED, f"job cancelled{at}")
        if status is not JobStatus.PAUSING:
            return "lost"
        with session_scope(settings.database_url) as session:
            paused = transition(
                session,
                job_id=attempt.job_id,
                target=JobStatus.PAUSED,
                expected=[JobStatus.PAUSING],
                where=[Job.worker_id == attempt.worker_id],
                message=f"job paused{at}; a resume continues from its last checkpoint",
                worker_id=None,
                heartbeat_at=None,
                attempts=Job.attempts - 1,  # claimed as an attempt, ended by no failure
                **({"current_step": step} if step is not None else {}),
            )
        if paused:
            log.info("job %s: paused%s", attempt.job_id, at)
            return "paused"
    return "lost"


def _crashed(attempt: _Attempt, settings: Settings, returncode: int, log_path: Path) -> Outcome:
    """The trainer died without a word: re-queue the job to resume from its last usable checkpoint while
    it has attempts left; fail it otherwise."""
    message = _crash_message(returncode)
    with _heartbeats(attempt, settings):  # verifying a large checkpoint takes a while
        step = _resumable_step(attempt.files.root)
    if step is None or attempt.number >= attempt.max_attempts:
        if step is not None:
            message += f" (on each of its {attempt.number} attempts)"
        return _finish_failed(attempt, settings, "trainer_crashed", message, log_path)
    _add_event(attempt, settings, "log", "the trainer's last output", {"tail": _tail(log_path)})
    with session_scope(settings.database_url) as session:
        requeued = transition(
            session,
            job_id=attempt.job_id,
            target=JobStatus.QUEUED,
            expected=[JobStatus.RUNNING],
            where=[Job.worker_id == attempt.worker_id],
            message=(
                f"{message}; re-queued to resume from the checkpoint of step {step} "
                f"(attempt {attempt.number + 1} of {attempt.max_attempts})"
            ),
            worker_id=None,
            heartbeat_at=None,
            enqueued_at=utcnow(),
        )
    if not requeued:  # cancelled or taken away in the meantime
        return "lost"
    log.warning("job %s: %s; re-queued from step %d", attempt.job_id, message, step)
    try:
        enqueue_job(settings, attempt.job_id)
    except Exception:
        # It stays queued; the reaper sends it again once it has waited `requeue_after_s`.
        log.exception("job %s: could not send the re-queued job", attempt.job_id)
    return "requeued"


@contextlib.contextmanager
def _heartbeats(attempt: _Attempt, settings: Settings) -> Iterator[None]:
    """Keep the job's heartbeat going from a thread while this one does something slow after the trainer
    ended, so that the reaper does not take the job away meanwhile."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            _check_in(attempt, settings, heartbeat=True)
            if stop.wait(settings.heartbeat_interval_s):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{attempt.job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _resumable_step(job_dir: Path) -> int | None:
    """The step of the newest checkpoint in `job_dir` that verifies, or None."""
    try:
        # Loads torch, which this process otherwise never needs: only after a crash.
        from core.distill.checkpoint import latest_checkpoint
        from core.distill.layout import checkpoint_step

        checkpoint = latest_checkpoint(job_dir)
        return None if checkpoint is None else checkpoint_step(checkpoint)
    except Exception:
        log.exception("could not look for a checkpoint in %s", job_dir)
        return None


def _crash_message(returncode: int) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"the trainer process was killed by {name}{hint}"
    return f"the trainer process exited with code {returncode} without reporting an error"


def _finish(attempt: _Attempt, settings: Settings, target: JobStatus, message: str, **values: Any) -> Outcome:
    with session_scope(settings.database_url) as session:
        done = transition(
            session,
            job_id=attempt.job_id,
            target=target,
            expected=sources_of(target) & ACTIVE_STATES,
            where=[Job.worker_id == attempt.worker_id],
            message=message,
            finished_at=utcnow(),
            **values,
        )
    log.info("job %s: %s", attempt.job_id, message)
    if done:
        observe_job_end(settings, attempt.job_id, target)
    return target.value if done else "lost"  # type: ignore[return-value]


def _finish_failed(
    attempt: _Attempt, settings: Settings, code: str, message: str, log_path: Path | None = None
) -> Outcome:
    if log_path is not None:
        _add_event(attempt, settings, "log", "the trainer's last output", {"tail": _tail(log_path)})
    return _finish(
        attempt,
        settings,
        JobStatus.FAILED,
        f"job failed: {message}",
        error_code=code,
        error_message=message,
    )


def _current_status(attempt: _Attempt, settings: Settings) -> JobStatus | None:
    with session_scope(settings.database_url) as session:
        return session.execute(
            select(Job.status).where(
                Job.id == attempt.job_id,
                Job.worker_id == attempt.worker_id,
                Job.status.in_(ACTIVE_STATES),
            )
        ).scalar_one_or_none()


def _add_event(
    attempt: _Attempt, settings: Settings, kind: str, message: str, data: dict[str, Any] | None = None
) -> None:
    with session_scope(settings.database_url) as session:
        add_event(session, job_id=attempt.job_id, kind=kind, message=message, data=data)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
