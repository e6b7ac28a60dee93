"""The reaper: recovers jobs that nobody is working on.

- Stale jobs: a running job whose worker stopped sending heartbeats (kill -9, a lost machine) is
  re-queued (its next attempt resumes from the last checkpoint) or, after `max_attempts`, failed; a
  cancelling one is cancelled, a pausing one paused. Every change is a conditional UPDATE that re-checks
  the heartbeat is still stale, so a worker that comes back in the meantime keeps its job, and two reapers
  never act twice on one job. `reap_worker` applies the same rules at once to the jobs of a worker known
  to be gone (`distill serve` saw it die).
- Lost messages: a job `queued` for longer than `requeue_after_s` whose message the broker no longer holds
  (Redis restarted without persistence, a delivery acked by a worker that could not reach the database)
  is sent again. Which messages are gone cannot be told, only how many wait: when the queue holds fewer
  messages than there are queued jobs, every job that has waited that long is sent again. A duplicate is
  harmless, since a worker's claim is atomic and a second delivery of a claimed job is a no-op; a long
  queue that lost nothing is never flooded with duplicates. `enqueued_at` is moved forward by a
  conditional UPDATE first, so of two reapers only one sends.
- Sweeps: a sweep's children beyond its `max_parallel` wait queued but unsent (`enqueued_at` NULL); each
  pass sends the next ones of every sweep with a free slot (core.sweeps.service.release_held_children).
- Webhook deliveries: a thread sends the due ones to the webhook queue every `webhook_dispatch_interval_s`
  (core.webhooks.delivery.dispatch_due).

Messages are sent after the commit. A send that fails leaves the job queued: it is sent again
`requeue_after_s` later.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import ColumnElement, Row, func, or_, select
from sqlalchemy.orm import Session

from core.config import Settings
from core.db import session_scope, utcnow
from core.jobs.lifecycle import claim_send, transition
from core.jobs.models import Job
from core.jobs.service import sent_to_queue
from core.jobs.states import ACTIVE_STATES, JobStatus
from core.queue import enqueue_job, queue_depth
from core.sweeps.service import release_held_children
from core.webhooks.delivery import dispatch_due

log = logging.getLogger(__name__)


@dataclass
class ReapCounts:
    requeued: int = 0
    failed: int = 0
    cancelled: int = 0
    paused: int = 0
    resent: int = 0
    released: int = 0

    @property
    def total(self) -> int:
        return self.requeued + self.failed + self.cancelled + self.paused + self.resent + self.released


def reap_once(settings: Settings, *, now: datetime | None = None) -> ReapCounts:
    """Handle every active (running, cancelling, pausing) job whose heartbeat is older than
    `stale_after_s`, send again the messages of queued jobs the broker lost, then send the sweeps' held jobs
    that now have a slot."""
    now = now or utcnow()
    counts = _reap_stale(settings, now)
    counts.resent = len(resend_lost(settings, now=now))
    counts.released = len(release_held_children(settings, now=now))
    if counts.total:
        log.info("reaper: %s", counts)
    return counts


# What `_release` reads of a job to decide.
_RELEASE_COLUMNS = (Job.id, Job.status, Job.attempts, Job.max_attempts, Job.worker_id)


def _reap_stale(settings: Settings, now: datetime) -> ReapCounts:
    cutoff = now - timedelta(seconds=settings.stale_after_s)
    stale = or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff)
    counts = ReapCounts()
    requeued: list[str] = []
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(*_RELEASE_COLUMNS)
            .where(Job.status.in_(ACTIVE_STATES), stale)
            .order_by(Job.id)  # two reapers lock the rows they change in the same order
        ).all()
        for row in rows:
            worker = Job.worker_id.is_(None) if row.worker_id is None else Job.worker_id == row.worker_id
            lost = f"worker {row.worker_id} lost (no heartbeat for {settings.stale_after_s:g} s)"
            done = _release(session, row, gone=lost, still=[stale, worker], now=now)
            if done is not None:
                setattr(counts, done, getattr(counts, done) + 1)
            if done == "requeued":
                requeued.append(row.id)
    _send_requeued(settings, requeued)
    return counts


def reap_worker(settings: Settings, node: str, how: str) -> list[str]:
    """Release the active jobs of the Celery worker `node`, which is gone (`how`: "was killed by SIGKILL"),
    by the reaper's rules but at once, without waiting for their heartbeats to go stale; returns the ids
    re-queued. Used by `distill serve` when its worker dies.

    Only jobs whose `worker_id` ("<node>:<pid>") names this node are touched, and each change re-checks
    it, so a job another worker has claimed since is left alone. Node names are unique per start.
    """
    now = utcnow()
    requeued: list[str] = []
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(*_RELEASE_COLUMNS)
            .where(Job.worker_id.startswith(f"{node}:", autoescape=True), Job.status.in_(ACTIVE_STATES))
            .order_by(Job.id)  # rows locked in the stale jobs' order
        ).all()
        for row in rows:
            owned = [Job.worker_id == row.worker_id]
            done = _release(session, row, gone=f"worker {row.worker_id} {how}", still=owned, now=now)
            if done == "requeued":
                requeued.append(row.id)
    _send_requeued(settings, requeued)
    if rows:
        log.info("released %d job(s) of worker %s, which %s", len(rows), node, how)
    return requeued


def _release(
    session: Session, row: Row[Any], *, gone: str, still: list[ColumnElement[bool]], now: datetime
) -> Literal["requeued", "failed", "cancelled", "paused"] | None:
    """Decide and apply what becomes of one active job (`row`: `_RELEASE_COLUMNS`) whose worker is gone
    (`gone` says which and how): a cancelling job is cancelled; a pausing one is paused; a running one is
    re-queued while it has attempts left (its next attempt resumes from the last checkpoint), failed after
    `max_attempts`.

    A pausing job ends `paused` as its worker would have left it, its attempt not counted, whether or not a
    checkpoint exists: the user's resume continues from the last checkpoint, or from the start without one.
    Re-queueing it would run a job its user paused; failing it would end a job that can simply go on.

    The UPDATE re-checks `still` (the worker, the stale heartbeat), so a job that changed hands since it was
    read is left alone: returns what was done, or None.
    """
    if row.status is JobStatus.CANCELLING:
        cancelled = transition(
            session,
            job_id=row.id,
            target=JobStatus.CANCELLED,
            expected=[JobStatus.CANCELLING],
            where=still,
            message=f"{gone} while cancelling; job cancelled",
            finished_at=now,
        )
        return "cancelled" if cancelled else None
    if row.status is JobStatus.PAUSING:
        paused = transition(
            session,
            job_id=row.id,
            target=JobStatus.PAUSED,
            expected=[JobStatus.PAUSING],
            where=still,
            message=f"{gone} while pausing; job paused (a resume continues from its last checkpoint)",
            worker_id=None,
            heartbeat_at=None,
            attempts=Job.attempts - 1,  # as after a clean pause: a pause costs no attempt
        )
        return "paused" if paused else None
    if row.attempts < row.max_attempts:
        requeued = transition(
            session,
            job_id=row.id,
            target=JobStatus.QUEUED,
            expected=[JobStatus.RUNNING],
            where=still,
            message=f"{gone}; re-queued (attempt {row.attempts + 1} of {row.max_attempts})",
            worker_id=None,
            heartbeat_at=None,
            enqueued_at=now,  # its message is sent right after the commit
        )
        return "requeued" if requeued else None
    message = (
        f"the job's worker was lost on each of its {row.attempts} attempts (max_attempts "
        f"{row.max_attempts}); its last checkpoint, if any, can still be downloaded"
    )
    failed = transition(
        session,
        job_id=row.id,
        target=JobStatus.FAILED,
        expected=[JobStatus.RUNNING],
        where=still,
        message=f"{gone}; job failed: {message}",
        error_code="max_attempts_exceeded",
        error_message=message,
        finished_at=now,
    )
    return "failed" if failed else None


def _send_requeued(settings: Settings, job_ids: list[str]) -> None:
    for job_id in job_ids:
        try:
            enqueue_job(settings, job_id)
        except Exception:
            # The job stays queued; its message is sent again later (see the module note).
            log.exception("could not enqueue re-queued job %s", job_id)


def resend_lost(settings: Settings, *, now: datetime | None = None) -> list[str]:
    """Send again the jobs queued for more than `requeue_after_s` when the broker's queue holds fewer
    messages than there are queued jobs; returns the ids sent."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=settings.requeue_after_s)
    # Jobs queued before `enqueued_at` existed count from their creation; a sweep's held children were
    # never sent (the sweep's release step sends them).
    since = func.coalesce(Job.enqueued_at, Job.created_at)
    waiting = (Job.status == JobStatus.QUEUED, since < cutoff, sent_to_queue())
    with session_scope(settings.database_url) as session:
        candidates = list(session.scalars(select(Job.id).where(*waiting).order_by(Job.created_at, Job.id)))
        if not candidates:
            return []
        queued = session.scalar(
            select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED, sent_to_queue())
        )
    try:
        depth = queue_depth(settings)
    except Exception as exc:  # nothing could be sent either
        log.warning("reaper: the broker's queue cannot be read (%s); nothing re-sent", exc)
        return []
    if depth >= (queued or 0):
        return []  # every queued job's message may still be waiting: a long queue, not a lost one
    waited = f"{settings.requeue_after_s:g} s"
    taken: list[str] = []
    with session_scope(settings.database_url) as session:
        for job_id in candidates:
            if claim_send(
                session,
                job_id=job_id,
                where=waiting,
                now=now,
                message=(
                    f"still queued after {waited}, and the broker holds fewer messages ({depth}) than "
                    f"there are queued jobs ({queued}): its message was sent again"
                ),
                data={"queue_depth": depth, "queued_jobs": queued},
            ):
                taken.append(job_id)
    sent = []
    for job_id in taken:
        try:
            enqueue_job(settings, job_id)
        except Exception:
            log.exception("could not send queued job %s again", job_id)
            continue
        sent.append(job_id)
    if sent:
        log.warning(
            "reaper: the broker held %d messages for %d queued jobs; sent %d again", depth, queued, len(sent)
        )
    return sent


def run_reaper(settings: Settings, stop: threading.Event | None = None) -> None:
    """Call `reap_once` every `reaper_interval_s` until `stop` is set (forever without one)."""
    stop = stop or threading.Event()
    log.info(
        "reaper started: stale after %g s, lost messages re-sent after %g s, every %g s",
        settings.stale_after_s,
        settings.requeue_after_s,
        settings.reaper_interval_s,
    )
    webhooks = threading.Thread(target=run_webhook_dispatcher, args=(settings, stop), name="webhooks")
    webhooks.start()
    while not stop.is_set():
        try:
            reap_once(settings)
        except Exception:
            log.exception("reaper pass failed")
        stop.wait(settings.reaper_interval_s)
    webhooks.join()


def run_webhook_dispatcher(settings: Settings, stop: threading.Event) -> None:
    """Send due webhook deliveries to their queue every `webhook_dispatch_interval_s` until `stop` is set
    (core.webhooks.delivery: new ones, retries whose time has come, and messages the broker lost)."""
    while not stop.is_set():
        try:
            dispatch_due(settings)
        except Exception:
            log.exception("webhook dispatch failed")
        stop.wait(settings.webhook_dispatch_interval_s)
