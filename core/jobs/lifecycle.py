"""Atomic job state changes and the event log, shared by the API, the worker and the reaper."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from core.db import utcnow
from core.jobs.models import Job, JobEvent
from core.jobs.states import JobStatus, check_resume, check_transition, sources_of
from core.jobs.views import job_document
from core.webhooks import service as webhooks


def add_event(
    session: Session,
    *,
    job_id: str,
    kind: str,
    message: str,
    data: dict[str, Any] | None = None,
    step: int | None = None,
) -> JobEvent:
    """Append one event to a job's log (flushed, not committed); `step` is the training step it reports.

    The job's row is locked first (PostgreSQL: the lock an UPDATE takes; SQLite has one writer anyway), so
    a job's events commit in the order of their ids: an event stream that resumes after event N
    (`Last-Event-ID`) can never miss an event with a smaller id that was still uncommitted when it read N.

    Every state change and every new checkpoint is recorded here, so this is where their webhook deliveries
    are added, in the same transaction (see `_notify_webhooks`).
    """
    session.execute(select(Job.id).where(Job.id == job_id).with_for_update(key_share=True))
    event = JobEvent(job_id=job_id, kind=kind, message=message, data=data, step=step)
    session.add(event)
    session.flush()
    if kind == "status":
        _notify_webhooks(session, job_id, f"job.{(data or {}).get('status')}")
    elif kind == "checkpoint":
        _notify_webhooks(session, job_id, "job.checkpoint")
    return event


def _notify_webhooks(session: Session, job_id: str, event_type: str) -> None:
    """Pending deliveries of `event_type` (`job.<status>`, `job.checkpoint`) to the webhooks of the job's
    tenant; their `data` is the job as `GET /v1/jobs/{id}` shows it after the change, in this transaction.

    core/webhooks knows nothing of jobs (it is handed the tenant and a payload builder): calling it from
    here keeps one direction, jobs → webhooks, and no process can change a job without its deliveries."""
    tenant_id = session.scalar(select(Job.tenant_id).where(Job.id == job_id))
    if tenant_id is None:
        return

    def document() -> dict[str, Any]:
        # The change was an UPDATE statement: refresh a copy of the row the session may already hold.
        query = select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
        return job_document(session.scalars(query).one())

    webhooks.record_event(session, tenant_id=tenant_id, event_type=event_type, job_id=job_id, data=document)


def transition(
    session: Session,
    *,
    job_id: str,
    target: JobStatus,
    expected: Iterable[JobStatus] | None = None,
    message: str | None = None,
    where: Iterable[ColumnElement[bool]] = (),
    **values: Any,
) -> bool:
    """Move a job to `target` only if it is still in one of `expected` (default: every legal source).

    A single conditional UPDATE, so two processes racing for the same job (a duplicate delivery, the reaper
    and a late worker) cannot both win. `where` adds conditions (e.g. the claiming worker still owns the job,
    the heartbeat is still stale). Returns whether this call made the change; records a status event.
    """
    sources = tuple(expected) if expected is not None else tuple(sources_of(target))
    for source in sources:
        check_transition(source, target)
    return _move(session, job_id, target, sources, message, where, values)


def reopen(
    session: Session, *, job_id: str, expected: Iterable[JobStatus], message: str, **values: Any
) -> bool:
    """The user's resume: move a failed, cancelled or paused job back to `queued` (one conditional UPDATE)."""
    sources = tuple(expected)
    for source in sources:
        check_resume(source)
    return _move(session, job_id, JobStatus.QUEUED, sources, message, (), values)


def _move(
    session: Session,
    job_id: str,
    target: JobStatus,
    sources: tuple[JobStatus, ...],
    message: str | None,
    where: Iterable[ColumnElement[bool]],
    values: dict[str, Any],
) -> bool:
    statement = (
        update(Job)
        .where(Job.id == job_id, Job.status.in_(sources), *where)
        .values(status=target, updated_at=utcnow(), **values)
        .execution_options(synchronize_session=False)
    )
    changed = session.execute(statement).rowcount == 1
    if changed:
        add_event(
            session,
            job_id=job_id,
            kind="status",
            message=message or f"job is {target.value}",
            data={"status": target.value},
        )
    return changed


def claim_send(
    session: Session,
    *,
    job_id: str,
    where: Iterable[ColumnElement[bool]],
    now: Any,
    message: str,
    data: dict[str, Any] | None = None,
) -> bool:
    """Stamp `enqueued_at` if the job still meets `where` (one conditional UPDATE, so of two processes only
    one sends it) and record why it is sent; the caller enqueues after the commit. Returns whether it won."""
    moved = session.execute(
        update(Job)
        .where(Job.id == job_id, *where)
        .values(enqueued_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount
    if moved == 1:
        add_event(session, job_id=job_id, kind="queue", message=message, data=data)
    return moved == 1
