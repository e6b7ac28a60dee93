"""Jobs: create (validated in full, committed, then enqueued), read, list, cancel, pause, resume, and what
jobs produce (events, metric series, checkpoints). Keyword-only functions over a session; 4xx cases raise
ServiceError."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.config import Settings
from core.db import utcnow
from core.distill.model_checks import ModelReferenceError, check_model_reference
from core.distill.spec import JobSpec
from core.errors import Conflict, InvalidRequest, NotFound, ServiceError, Unavailable
from core.files import service as files_service
from core.files.service import get_file
from core.jobs.lifecycle import add_event, reopen, transition
from core.jobs.models import Checkpoint, Job, JobEvent, Metric
from core.jobs.states import RESUMABLE_STATES, TERMINAL_STATES, JobStatus
from core.pagination import newest_first_page
from core.queue import enqueue_job, job_queues
from core.storage import open_storage, storage_errors

logger = logging.getLogger(__name__)

# A file detected as `instruction` also trains a `chat` job (each record becomes one user turn).
_COMPATIBLE_FORMATS = {"instruction": {"instruction"}, "chat": {"chat", "instruction"}, "text": {"text"}}

# A job's metadata: the user's labels, string to string. Keys are plain names (letters, digits and
# `_ . - : / @ +`): the list filter reads a key with SQLite's JSON path and PostgreSQL's `->>`, and only such
# keys are spelled alike in the stored JSON and in both (SQLite compares a path with the key as escaped).
MAX_METADATA_KEYS = 16
MAX_METADATA_VALUE_CHARS = 512
METADATA_KEY_PATTERN = r"^[A-Za-z0-9_.:/@+-]{1,64}$"
_METADATA_KEY = re.compile(METADATA_KEY_PATTERN)


def check_metadata(metadata: Mapping[str, object], *, query: bool = False) -> dict[str, str]:
    """`metadata` as stored, or 422 naming `metadata` (the whole, a bad key) or the value's own param:
    `metadata.<key>` in a body, `metadata[<key>]` in a query (`query=True`, the list filter)."""
    if len(metadata) > MAX_METADATA_KEYS:
        raise InvalidRequest(
            "invalid_metadata", f"metadata holds at most {MAX_METADATA_KEYS} keys", param="metadata"
        )
    checked: dict[str, str] = {}
    for key, value in metadata.items():
        param = f"metadata[{key}]" if query else f"metadata.{key}"
        if not isinstance(key, str) or not _METADATA_KEY.fullmatch(key):
            raise InvalidRequest(
                "invalid_metadata",
                f"metadata key {str(key)[:80]!r} must be 1 to 64 letters, digits or _ . - : / @ +",
                param=param if query else "metadata",
            )
        if not isinstance(value, str):
            raise InvalidRequest("invalid_metadata", "metadata values must be strings", param=param)
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise InvalidRequest(
                "invalid_metadata",
                f"a metadata value holds at most {MAX_METADATA_VALUE_CHARS} characters",
                param=param,
            )
        if any(ord(char) < 32 or ord(char) == 127 or 0xD800 <= ord(char) <= 0xDFFF for char in value):
            raise InvalidRequest(
                "invalid_metadata",
                "a metadata value must be text without control characters (NUL, newline, ...)",
                param=param,
            )
        checked[key] = value
    return checked


def _check_model(model: str, gguf_file: str | None, settings: Settings, param: str) -> str:
    """What `model` loads on this server (a path under the model roots, or a hub id); 422 if refused. The
    job keeps the reference as the tenant gave it: the worker resolves it again under its own roots."""
    try:
        return check_model_reference(
            model, gguf_file, model_roots=settings.model_roots, allow_hub=settings.allow_hub_models
        )
    except ModelReferenceError as exc:
        raise InvalidRequest("invalid_model", str(exc), param=param) from exc


def _teacher_layer_count(model: str) -> int | None:
    """num_hidden_layers from a local teacher's config.json (None when unknown, e.g. a hub id or GGUF)."""
    config_path = Path(model) / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for source in (config, config.get("text_config") or {}):
        if isinstance(source.get("num_hidden_layers"), int):
            return source["num_hidden_layers"]
    return None


def validate_spec(*, session: Session, settings: Settings, tenant_id: str, spec: JobSpec) -> None:
    """Check every reference in a spec (files, models, layers, queue) before a job is accepted."""
    queue = spec.resources.queue
    if queue is not None and queue not in job_queues(settings):
        known = ", ".join(job_queues(settings))
        raise InvalidRequest(
            "unknown_queue", f"no queue {queue!r}; this service's queues: {known}", param="resources.queue"
        )
    for field in ("train", "eval"):
        file_id = getattr(spec.data, field)
        if file_id is None:
            continue
        try:
            row = get_file(session=session, tenant_id=tenant_id, file_id=file_id)
        except NotFound as exc:
            raise InvalidRequest(
                "file_not_found", f"no uploaded file {file_id!r}", param=f"data.{field}"
            ) from exc
        if row.format is not None and row.format not in _COMPATIBLE_FORMATS[spec.data.format]:
            raise InvalidRequest(
                "incompatible_file",
                f"file {file_id!r} holds {row.format} records; data.format is {spec.data.format!r}",
                param=f"data.{field}",
            )
    teacher_path = _check_model(spec.teacher.model, spec.teacher.gguf_file, settings, "teacher.model")
    student = spec.student
    if student.model is not None:
        _check_model(student.model, student.gguf_file, settings, "student.model")
    if student.from_teacher_layers is not None and spec.teacher.gguf_file is None:
        count = _teacher_layer_count(teacher_path)
        if count is not None and max(student.from_teacher_layers) >= count:
            raise InvalidRequest(
                "invalid_layers",
                f"the teacher has {count} layers (0..{count - 1}); got {student.from_teacher_layers}",
                param="student.from_teacher_layers",
            )
    if spec.tracking is not None and spec.tracking.mlflow is not None and not settings.mlflow_tracking_uri:
        raise InvalidRequest(
            "tracking_unavailable",
            "this service has no MLflow tracking server (DISTILL_MLFLOW_TRACKING_URI is not set)",
            param="tracking.mlflow",
        )


def _existing_for_key(
    session: Session, tenant_id: str, key: str, spec: dict[str, Any], metadata: dict[str, str]
) -> Job | None:
    job = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))
    if job is not None and (job.spec != spec or (job.user_metadata or {}) != metadata):
        raise Conflict(
            "idempotency_key_reused",
            "this Idempotency-Key was used for a job with a different body",
            param="Idempotency-Key",
        )
    return job


def create_job(
    *,
    session: Session,
    settings: Settings,
    tenant_id: str,
    spec: JobSpec,
    idempotency_key: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> tuple[Job, bool]:
    """Check, store and enqueue a job; returns (job, created). A repeated Idempotency-Key returns the first."""
    labels = check_metadata(metadata or {})
    # Stored as given (`tiny-teacher`, not the server's path to it): what GET shows and a retry compares.
    requested = spec.model_dump(mode="json")
    if idempotency_key is not None:
        existing = _existing_for_key(session, tenant_id, idempotency_key, requested, labels)
        if existing is not None:
            return existing, False
    validate_spec(session=session, settings=settings, tenant_id=tenant_id, spec=spec)
    job = Job(
        tenant_id=tenant_id,
        status=JobStatus.QUEUED,
        spec=requested,
        idempotency_key=idempotency_key,
        user_metadata=labels,
        total_steps=spec.training.max_steps,
        max_attempts=settings.max_attempts,
        latest_metrics={},
        enqueued_at=utcnow(),  # its message is sent right after the commit
    )
    session.add(job)
    try:
        session.flush()
        add_event(session, job_id=job.id, kind="status", message="job queued", data={"status": "queued"})
        session.commit()
    except IntegrityError:
        session.rollback()
        if idempotency_key is None:
            raise
        # Lost the race with a concurrent request carrying the same key.
        existing = _existing_for_key(session, tenant_id, idempotency_key, requested, labels)
        if existing is None:
            raise
        return existing, False
    _enqueue(session=session, settings=settings, job=job)
    return job, True


def add_queued_job(
    *, session: Session, settings: Settings, tenant_id: str, spec: JobSpec, send: bool, **columns: Any
) -> Job:
    """Add a queued job and its event without committing, for a caller that creates several jobs in one
    transaction (a sweep). `spec` must have passed `validate_spec`. With `send`, `enqueued_at` is set and
    the caller sends its message after the commit (`enqueue_job`); without, the job is held (`enqueued_at`
    NULL, see `sent_to_queue`) until its caller sends it."""
    job = Job(
        tenant_id=tenant_id,
        status=JobStatus.QUEUED,
        spec=spec.model_dump(mode="json"),  # as given, like `create_job`
        total_steps=spec.training.max_steps,
        max_attempts=settings.max_attempts,
        latest_metrics={},
        enqueued_at=utcnow() if send else None,
        **columns,
    )
    session.add(job)
    session.flush()
    message = "job queued" if send else "job queued; its sweep sends it once a max_parallel slot frees"
    add_event(session, job_id=job.id, kind="status", message=message, data={"status": "queued"})
    return job


def sent_to_queue() -> ColumnElement[bool]:
    """Jobs whose message was sent to the broker: all but a sweep's children held back by its
    `max_parallel` (queued with `enqueued_at` NULL). Jobs from before `enqueued_at` existed have no sweep."""
    return or_(Job.enqueued_at.is_not(None), Job.sweep_id.is_(None))


def _enqueue(*, session: Session, settings: Settings, job: Job) -> None:
    try:
        enqueue_job(settings, job.id)
    except Exception as exc:
        logger.exception("could not enqueue job %s", job.id)
        message = f"the job could not be queued: {exc}"
        transition(
            session,
            job_id=job.id,
            target=JobStatus.FAILED,
            expected=[JobStatus.QUEUED],
            message=message,
            error_code="enqueue_failed",
            error_message=message,
            finished_at=utcnow(),
        )
        session.commit()
        raise Unavailable(
            "enqueue_failed", "the job queue is unavailable; the job was marked failed"
        ) from exc


def get_job(*, session: Session, tenant_id: str, job_id: str) -> Job:
    """One of the tenant's jobs (one indexed lookup); another tenant's id answers like a missing one."""
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))
    if job is None:
        raise NotFound("job_not_found", f"no job {job_id!r}", param="job_id")
    return job


def list_jobs(
    *,
    session: Session,
    tenant_id: str,
    limit: int,
    after: str | None = None,
    status: JobStatus | None = None,
    metadata: Mapping[str, str] | None = None,
) -> tuple[list[Job], bool]:
    """A page of the tenant's jobs, newest first, optionally of one status and holding every given metadata
    pair, and whether more follow."""
    query = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        query = query.where(Job.status == status)
    for key, value in check_metadata(metadata or {}, query=True).items():
        # JSON_EXTRACT on SQLite, ->> on PostgreSQL: the value as text (NULL when the key is missing).
        query = query.where(Job.user_metadata[key].as_string() == value)
    return newest_first_page(session, query, Job, tenant_id=tenant_id, after=after, limit=limit)


def cancel_job(*, session: Session, tenant_id: str, job_id: str) -> Job:
    """Cancel a queued or paused job at once, ask a running (or pausing) one to stop (`cancelling`); 409
    once it has ended."""
    for _ in range(3):  # the status may move under us (queued → running); retry against the new one
        job = get_job(session=session, tenant_id=tenant_id, job_id=job_id)
        if job.status == JobStatus.CANCELLING:
            return job
        if job.status.is_terminal:
            raise Conflict(
                "job_not_cancellable",
                f"job {job_id!r} has already ended ({job.status.value})",
                param="job_id",
            )
        now = utcnow()
        if job.status in (JobStatus.QUEUED, JobStatus.PAUSED):
            # No worker holds it: nothing to stop.
            changed = transition(
                session,
                job_id=job_id,
                target=JobStatus.CANCELLED,
                expected=[job.status],
                message=(
                    "job cancelled before it started"
                    if job.status == JobStatus.QUEUED
                    else "job cancelled while paused"
                ),
                cancel_requested_at=now,
                finished_at=now,
            )
        else:
            # Running, or pausing: its worker already stops it, and then records `cancelled`.
            changed = transition(
                session,
                job_id=job_id,
                target=JobStatus.CANCELLING,
                expected=[job.status],
                message="cancellation requested",
                cancel_requested_at=now,
            )
        session.commit()
        if changed:
            session.expire(job)
            return get_job(session=session, tenant_id=tenant_id, job_id=job_id)
    raise ServiceError("cancel_conflict", "the job kept changing state; retry", param="job_id", status=409)


def pause_job(*, session: Session, tenant_id: str, job_id: str) -> Job:
    """Pause a queued job at once, ask a running one to checkpoint and stop (`pausing`, then `paused`);
    409 `job_not_pausable` once it has ended or while it is being cancelled."""
    for _ in range(3):  # the status may move under us (queued → running); retry against the new one
        job = get_job(session=session, tenant_id=tenant_id, job_id=job_id)
        if job.status in (JobStatus.PAUSING, JobStatus.PAUSED):
            return job
        if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
            state = "is being cancelled" if job.status == JobStatus.CANCELLING else "has already ended"
            raise Conflict("job_not_pausable", f"job {job_id!r} {state} ({job.status.value})", param="job_id")
        if job.status == JobStatus.QUEUED:
            # Its message stays with the broker; a worker that gets it claims nothing (not `queued`).
            changed = transition(
                session,
                job_id=job_id,
                target=JobStatus.PAUSED,
                expected=[JobStatus.QUEUED],
                message="job paused before it started",
            )
        else:
            changed = transition(
                session,
                job_id=job_id,
                target=JobStatus.PAUSING,
                expected=[JobStatus.RUNNING],
                message="pause requested: the job checkpoints its current step and stops",
            )
        session.commit()
        if changed:
            session.expire(job)
            return get_job(session=session, tenant_id=tenant_id, job_id=job_id)
    raise ServiceError("pause_conflict", "the job kept changing state; retry", param="job_id", status=409)


def resume_job(*, session: Session, settings: Settings, tenant_id: str, job_id: str) -> Job:
    """Queue a paused job again, to continue where it stopped, or a failed or cancelled one, to resume from
    its last checkpoint with fresh attempts.

    A paused job keeps its attempts (a pause costs none) and needs no checkpoint (one paused before it
    started has none: it starts from the beginning). A job already queued or running is returned unchanged
    (a retried request does no harm); any other state (a pausing job included: resume it once it is
    paused), or an ended job without a checkpoint on disk, is refused with 409 `job_not_resumable`.
    """
    for _ in range(3):  # the status may move under us (another resume); retry against the new one
        job = get_job(session=session, tenant_id=tenant_id, job_id=job_id)
        if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            return job
        if job.status not in RESUMABLE_STATES:
            later = "; resume it once it is paused" if job.status == JobStatus.PAUSING else ""
            raise Conflict(
                "job_not_resumable",
                f"job {job_id!r} is {job.status.value}; only a paused, failed or cancelled job can be "
                f"resumed{later}",
                param="job_id",
            )
        step = _last_checkpoint_step(session=session, settings=settings, job_id=job_id)
        if step is None and job.status != JobStatus.PAUSED:
            raise Conflict(
                "job_not_resumable", f"job {job_id!r} has no checkpoint to resume from", param="job_id"
            )
        _check_files_remain(session=session, job=job)
        where = "from the start" if step is None else f"from the checkpoint of step {step}"
        fresh: dict[str, Any] = {}
        if job.status != JobStatus.PAUSED:  # an ended job starts its attempts afresh
            ended = ("error_code", "error_message", "finished_at", "cancel_requested_at")
            fresh = {"attempts": 0, **dict.fromkeys(ended)}
        changed = reopen(
            session,
            job_id=job_id,
            expected=[job.status],
            message=f"resumed by the user: queued to continue {where}",
            worker_id=None,
            heartbeat_at=None,
            enqueued_at=utcnow(),
            **fresh,
        )
        session.commit()
        if changed:
            session.expire(job)
            job = get_job(session=session, tenant_id=tenant_id, job_id=job_id)
            _enqueue(session=session, settings=settings, job=job)
            return job
    raise ServiceError("resume_conflict", "the job kept changing state; retry", param="job_id", status=409)


def _last_checkpoint_step(*, session: Session, settings: Settings, job_id: str) -> int | None:
    """The newest recorded checkpoint whose directory is still on disk (the trainer verifies it)."""
    storage = open_storage(settings)
    for checkpoint in reversed(list_checkpoints(session=session, job_id=job_id)):
        with storage_errors("looking for the job's checkpoints"):
            if storage.exists(checkpoint.storage_path):
                return checkpoint.step
    return None


def _check_files_remain(*, session: Session, job: Job) -> None:
    """A job's uploaded files may be deleted once it ended; resuming it needs them back."""
    data = job.spec.get("data", {})
    for field in ("train", "eval"):
        file_id = data.get(field)
        if file_id is None:
            continue
        try:
            get_file(session=session, tenant_id=job.tenant_id, file_id=file_id)
        except NotFound as exc:
            raise Conflict(
                "job_not_resumable",
                f"the job's data.{field} file {file_id!r} was deleted; the job cannot be resumed",
                param=f"data.{field}",
            ) from exc


def queued_jobs_waiting(*, session: Session, longer_than_s: float) -> int:
    """How many jobs were sent to the queue more than `longer_than_s` seconds ago and are still queued."""
    cutoff = utcnow() - timedelta(seconds=longer_than_s)
    since = func.coalesce(Job.enqueued_at, Job.created_at)  # jobs from before `enqueued_at` existed
    query = select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED, since < cutoff)
    return session.scalar(query.where(sent_to_queue())) or 0


def list_events(
    *, session: Session, job_id: str, after_id: int | None = None, limit: int = 100
) -> tuple[list[JobEvent], bool]:
    """A job's events in order, after event `after_id`, and whether more follow."""
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after_id is not None:
        query = query.where(JobEvent.id > after_id)
    rows = list(session.scalars(query.order_by(JobEvent.id).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def metric_series(
    *, session: Session, job_id: str, names: Sequence[str] | None = None, from_step: int = 0
) -> dict[str, list[tuple[int, float]]]:
    """Each metric's (step, value) points in step order, optionally only `names` and from `from_step` on."""
    query = select(Metric.name, Metric.step, Metric.value).where(
        Metric.job_id == job_id, Metric.step >= from_step
    )
    if names:
        query = query.where(Metric.name.in_(list(names)))
    series: dict[str, list[tuple[int, float]]] = {}
    for name, step, value in session.execute(query.order_by(Metric.name, Metric.step, Metric.id)):
        series.setdefault(name, []).append((step, value))
    return series


def list_checkpoints(*, session: Session, job_id: str) -> list[Checkpoint]:
    """A job's checkpoints, oldest step first."""
    return list(
        session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step))
    )


def get_checkpoint(*, session: Session, job_id: str, step: int) -> Checkpoint:
    """A job's checkpoint at `step`."""
    row = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step))
    if row is None:
        raise NotFound(
            "checkpoint_not_found", f"job {job_id!r} has no checkpoint at step {step}", param="step"
        )
    return row


def delete_unused_file(*, session: Session, settings: Settings, tenant_id: str, file_id: str) -> None:
    """Delete one of the tenant's uploaded files; refused (409) while a job that has not ended (a paused
    one included: it will resume) reads it."""
    get_file(session=session, tenant_id=tenant_id, file_id=file_id)
    active_specs = session.scalars(
        select(Job.spec).where(Job.tenant_id == tenant_id, Job.status.not_in(TERMINAL_STATES))
    )
    for spec in active_specs:
        data = spec.get("data", {})
        if file_id in (data.get("train"), data.get("eval")):
            raise Conflict("file_in_use", f"file {file_id!r} is used by an active job", param="file_id")
    files_service.delete_file(session=session, settings=settings, tenant_id=tenant_id, file_id=file_id)
