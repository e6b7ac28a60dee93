"""Sweeps: a job per point of a grid over spec fields, created together, run at most `max_parallel` at a
time, and ranked by a metric. Keyword-only functions over a session; 4xx cases raise ServiceError.

Children beyond `max_parallel` are created `queued` but held: their `enqueued_at` stays NULL and no message
is sent (core.jobs.service.sent_to_queue), so no worker can take them and the reaper's lost-message resend
ignores them. The reaper's pass calls `release_held_children`, which sends the next held children of each
sweep whose running or sent children are fewer than its `max_parallel`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.config import Settings
from core.db import session_scope, utcnow
from core.distill.spec import JobSpec
from core.errors import Conflict, InvalidRequest, NotFound, ServiceError
from core.jobs import service as jobs
from core.jobs.lifecycle import claim_send
from core.jobs.models import Job, Sweep
from core.jobs.states import ACTIVE_STATES, JobStatus
from core.pagination import newest_first_page
from core.queue import enqueue_job
from core.sweeps.grid import expand

log = logging.getLogger(__name__)

# Not yet handed to a worker by its sweep: queued, never sent.
HELD = (Job.sweep_id.is_not(None), Job.status == JobStatus.QUEUED, Job.enqueued_at.is_(None))


def _request(
    spec: JobSpec, grid: dict[str, list[Any]], metric: str, mode: str, max_parallel: int | None
) -> dict[str, Any]:
    """The request as stored, and as a retry with the same Idempotency-Key must repeat it."""
    return {
        "spec": spec.model_dump(mode="json", exclude_unset=True),
        "grid": grid,
        "metric": metric,
        "mode": mode,
        "max_parallel": max_parallel,
    }


def _existing_for_key(session: Session, tenant_id: str, key: str, request: dict[str, Any]) -> Sweep | None:
    sweep = session.scalar(select(Sweep).where(Sweep.tenant_id == tenant_id, Sweep.idempotency_key == key))
    if sweep is not None:
        stored = {name: getattr(sweep, name) for name in request}
        if json.dumps(stored, sort_keys=True) != json.dumps(request, sort_keys=True):
            raise Conflict(
                "idempotency_key_reused",
                "this Idempotency-Key was used for a sweep with a different body",
                param="Idempotency-Key",
            )
    return sweep


def _validate_references(
    session: Session, settings: Settings, tenant_id: str, specs: Sequence[JobSpec]
) -> None:
    for index, spec in enumerate(specs):
        try:
            jobs.validate_spec(session=session, settings=settings, tenant_id=tenant_id, spec=spec)
        except ServiceError as exc:
            field = f".{exc.param}" if exc.param else ""
            raise InvalidRequest(
                exc.code, f"child {index}: {exc.message}", param=f"children[{index}]{field}"
            ) from exc


def create_sweep(
    *,
    session: Session,
    settings: Settings,
    tenant_id: str,
    spec: JobSpec,
    grid: dict[str, list[Any]],
    metric: str = "eval_kd_loss",
    mode: str = "min",
    max_parallel: int | None = None,
    idempotency_key: str | None = None,
) -> tuple[Sweep, bool]:
    """Check every child, store the sweep and its jobs in one transaction, then send the first
    `max_parallel` (default: all); returns (sweep, created). A repeated Idempotency-Key returns the first."""
    request = _request(spec, grid, metric, mode, max_parallel)
    if idempotency_key is not None:
        existing = _existing_for_key(session, tenant_id, idempotency_key, request)
        if existing is not None:
            return existing, False
    children = expand(request["spec"], grid)
    _validate_references(session, settings, tenant_id, [child for _, child in children])
    sweep = Sweep(tenant_id=tenant_id, idempotency_key=idempotency_key, **request)
    session.add(sweep)
    try:
        session.flush()
        slots = max_parallel or len(children)
        now = utcnow()
        created = [
            jobs.add_queued_job(
                session=session,
                settings=settings,
                tenant_id=tenant_id,
                spec=child,
                send=index < slots,
                sweep_id=sweep.id,
                sweep_params=params,
                # One microsecond apart: the children keep the grid's order wherever jobs are listed.
                created_at=now + timedelta(microseconds=index),
            )
            for index, (params, child) in enumerate(children)
        ]
        session.commit()
    except IntegrityError:
        session.rollback()
        if idempotency_key is None:
            raise
        existing = _existing_for_key(session, tenant_id, idempotency_key, request)  # a concurrent twin
        if existing is None:
            raise
        return existing, False
    _send(settings, [job.id for job in created if job.enqueued_at is not None])
    return sweep, True


def _send(settings: Settings, job_ids: Sequence[str]) -> list[str]:
    """Send each job's message; a job whose send fails is held again, for the reaper's next release."""
    sent = []
    for job_id in job_ids:
        try:
            enqueue_job(settings, job_id)
        except Exception:
            log.exception("could not send sweep child %s; held until the reaper's next pass", job_id)
            with session_scope(settings.database_url) as session:
                session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
                    .values(enqueued_at=None)
                    .execution_options(synchronize_session=False)
                )
            continue
        sent.append(job_id)
    return sent


def get_sweep(*, session: Session, tenant_id: str, sweep_id: str) -> Sweep:
    """One of the tenant's sweeps; another tenant's id answers like a missing one."""
    sweep = session.scalar(select(Sweep).where(Sweep.id == sweep_id, Sweep.tenant_id == tenant_id))
    if sweep is None:
        raise NotFound("sweep_not_found", f"no sweep {sweep_id!r}", param="sweep_id")
    return sweep


def list_sweeps(
    *, session: Session, tenant_id: str, limit: int, after: str | None = None
) -> tuple[list[Sweep], bool]:
    """A page of the tenant's sweeps, newest first, and whether more follow."""
    query = select(Sweep).where(Sweep.tenant_id == tenant_id)
    return newest_first_page(session, query, Sweep, tenant_id=tenant_id, after=after, limit=limit)


def children_of(*, session: Session, sweep_ids: Sequence[str]) -> dict[str, list[Job]]:
    """Each sweep's jobs in grid order (one query for a whole page of sweeps)."""
    found: dict[str, list[Job]] = {sweep_id: [] for sweep_id in sweep_ids}
    if sweep_ids:
        query = select(Job).where(Job.sweep_id.in_(list(sweep_ids))).order_by(Job.created_at, Job.id)
        for job in session.scalars(query):
            found[job.sweep_id].append(job)  # type: ignore[index]
    return found


def cancel_sweep(*, session: Session, tenant_id: str, sweep_id: str) -> Sweep:
    """Cancel every child that has not ended (queued ones at once, running ones within a few steps) and
    release no more; 409 once every child has ended."""
    sweep = get_sweep(session=session, tenant_id=tenant_id, sweep_id=sweep_id)
    open_children = [
        job.id
        for job in children_of(session=session, sweep_ids=[sweep.id])[sweep.id]
        if not job.status.is_terminal
    ]
    if not open_children:
        raise Conflict(
            "sweep_not_cancellable", f"every job of sweep {sweep_id!r} has ended", param="sweep_id"
        )
    if sweep.cancelled_at is None:
        sweep.cancelled_at = utcnow()  # first, so that the reaper releases no held child meanwhile
        session.commit()
    for job_id in open_children:
        with contextlib.suppress(Conflict):  # it ended meanwhile
            jobs.cancel_job(session=session, tenant_id=tenant_id, job_id=job_id)
    session.expire_all()
    return get_sweep(session=session, tenant_id=tenant_id, sweep_id=sweep_id)


def release_held_children(settings: Settings, *, now: datetime | None = None) -> list[str]:
    """Send held children of every sweep that has free `max_parallel` slots (fewer children running,
    cancelling or sent than that); returns the ids sent. The sweep's row is locked while its slots are
    counted, so two reapers never release past the limit."""
    now = now or utcnow()
    with session_scope(settings.database_url) as session:
        sweep_ids = list(session.scalars(select(Job.sweep_id).where(*HELD).distinct()))
    released: list[str] = []
    for sweep_id in sweep_ids:
        with session_scope(settings.database_url) as session:
            taken = _take_free_slots(session, sweep_id, now)
        released += _send(settings, taken)
    if released:
        log.info("sweeps: released %d held jobs: %s", len(released), ", ".join(released))
    return released


def _take_free_slots(session: Session, sweep_id: str, now: datetime) -> list[str]:
    sweep = session.scalar(select(Sweep).where(Sweep.id == sweep_id).with_for_update())
    if sweep is None or sweep.cancelled_at is not None:
        return []
    children = session.execute(
        select(Job.id, Job.status, Job.enqueued_at)
        .where(Job.sweep_id == sweep_id)
        .order_by(Job.created_at, Job.id)
    ).all()
    busy = sum(
        1
        for _, status, enqueued_at in children
        if status in ACTIVE_STATES or (status == JobStatus.QUEUED and enqueued_at is not None)
    )
    held = [
        job_id
        for job_id, status, enqueued_at in children
        if status == JobStatus.QUEUED and enqueued_at is None
    ]
    limit = sweep.max_parallel or len(children)
    taken = []
    for job_id in held[: max(0, limit - busy)]:
        if claim_send(
            session,
            job_id=job_id,
            where=HELD,
            now=now,
            message=f"sent by its sweep {sweep_id}: fewer than max_parallel {limit} of its jobs run",
            data={"sweep_id": sweep_id, "max_parallel": limit, "busy": busy},
        ):
            taken.append(job_id)
    return taken
