"""The stale-job reaper: finds jobs whose worker stopped sending heartbeats (kill -9, a lost machine) and
re-queues them (their next attempt resumes from the last checkpoint) or, after `max_attempts`, fails them.

Every change is a conditional UPDATE that re-checks the heartbeat is still stale, so a worker that comes
back in the meantime keeps its job, and two reapers never act twice on one job. Re-queued jobs are sent to
the broker after the commit.

Not done: a job left `queued` because its message was lost (the broker was down when the API enqueued it)
is not re-sent; re-sending queued jobs by age would flood a long queue with duplicates.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select

from core.config import Settings
from core.db import session_scope, utcnow
from core.jobs.lifecycle import transition
from core.jobs.models import Job
from core.jobs.states import ACTIVE_STATES, JobStatus
from core.queue import enqueue_job

log = logging.getLogger(__name__)


@dataclass
class ReapCounts:
    requeued: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def total(self) -> int:
        return self.requeued + self.failed + self.cancelled


def reap_once(settings: Settings, *, now: datetime | None = None) -> ReapCounts:
    """Handle every running or cancelling job whose heartbeat is older than `stale_after_s`."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=settings.stale_after_s)
    stale = or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff)
    counts = ReapCounts()
    requeued: list[str] = []
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(Job.id, Job.status, Job.attempts, Job.max_attempts, Job.worker_id).where(
                Job.status.in_(ACTIVE_STATES), stale
            )
        ).all()
        for job_id, status, attempts, max_attempts, worker_id in rows:
            still_stale = [
                stale,
                Job.worker_id.is_(None) if worker_id is None else Job.worker_id == worker_id,
            ]
            lost = f"worker {worker_id} lost (no heartbeat for {settings.stale_after_s:g} s)"
            if status is JobStatus.CANCELLING:
                if transition(
                    session,
                    job_id=job_id,
                    target=JobStatus.CANCELLED,
                    expected=[JobStatus.CANCELLING],
                    where=still_stale,
                    message=f"{lost} while cancelling; job cancelled",
                    finished_at=now,
                ):
                    counts.cancelled += 1
            elif attempts < max_attempts:
                if transition(
                    session,
                    job_id=job_id,
                    target=JobStatus.QUEUED,
                    expected=[JobStatus.RUNNING],
                    where=still_stale,
                    message=f"{lost}, re-queued (attempt {attempts + 1} of {max_attempts})",
                    worker_id=None,
                    heartbeat_at=None,
                ):
                    counts.requeued += 1
                    requeued.append(job_id)
            else:
                message = (
                    f"the job's worker was lost on each of its {attempts} attempts (max_attempts "
                    f"{max_attempts}); its last checkpoint, if any, can still be downloaded"
                )
                if transition(
                    session,
                    job_id=job_id,
                    target=JobStatus.FAILED,
                    expected=[JobStatus.RUNNING],
                    where=still_stale,
                    message=f"{lost}; job failed: {message}",
                    error_code="max_attempts_exceeded",
                    error_message=message,
                    finished_at=now,
                ):
                    counts.failed += 1
    for job_id in requeued:
        try:
            enqueue_job(settings, job_id)
        except Exception:
            # The job stays queued; it runs when its message can be sent (see the module note).
            log.exception("could not enqueue re-queued job %s", job_id)
    if counts.total:
        log.info("reaper: %s", counts)
    return counts


def run_reaper(settings: Settings, stop: threading.Event | None = None) -> None:
    """Call `reap_once` every `reaper_interval_s` until `stop` is set (forever without one)."""
    stop = stop or threading.Event()
    log.info(
        "reaper started: stale after %g s, every %g s", settings.stale_after_s, settings.reaper_interval_s
    )
    while not stop.is_set():
        try:
            reap_once(settings)
        except Exception:
            log.exception("reaper pass failed")
        stop.wait(settings.reaper_interval_s)
