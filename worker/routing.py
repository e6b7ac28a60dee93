"""Which jobs a worker takes: a worker pinned to some GPUs (`CUDA_VISIBLE_DEVICES`, or an explicit
`DISTILL_WORKER_DEVICES`) hands back a job whose `resources.devices` it does not have.

Queues route jobs to device classes (`resources.queue`, see `core.queue`); within a class, workers may still
differ in how many devices they hold. A worker that receives a job needing more leaves it queued and sends
its message again to the job's queue, after a short pause, for a worker with enough devices to claim; it
records why in the job's events (once, not at every round). A worker that does not know its devices (no
CUDA_VISIBLE_DEVICES, no DISTILL_WORKER_DEVICES) takes every job of its queues.
"""

from __future__ import annotations

import logging
import os
import time

from sqlalchemy import select

from core.config import Settings
from core.db import session_scope
from core.jobs.lifecycle import add_event
from core.jobs.models import Job, JobEvent
from core.jobs.states import JobStatus
from core.queue import enqueue_job, queue_of

log = logging.getLogger(__name__)

# How long a worker holds a job it hands back before sending it again: other workers of the queue get it
# first, and one lone small worker does not spin on it.
HAND_BACK_PAUSE_S = 2.0


def worker_devices(settings: Settings, environ: dict[str, str] | None = None) -> int | None:
    """How many devices this worker has: DISTILL_WORKER_DEVICES, else CUDA_VISIBLE_DEVICES' count (CUDA
    stops at the first negative id: `-1` hides them all), else None (unknown: no limit)."""
    if settings.worker_devices is not None:
        return settings.worker_devices
    visible = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    count = 0
    for device in (part.strip() for part in visible.split(",")):
        if not device or device.startswith("-"):
            break
        count += 1
    return count


def hand_back_if_too_big(settings: Settings, job_id: str, worker_id: str) -> bool:
    """True when the queued job `job_id` needs more devices than this worker has: its message was sent
    again to its queue and the job stays queued. False otherwise (the caller claims and runs it)."""
    available = worker_devices(settings)
    if available is None:
        return False
    with session_scope(settings.database_url) as session:
        row = session.execute(select(Job.status, Job.spec).where(Job.id == job_id)).one_or_none()
        if row is None or row.status != JobStatus.QUEUED:
            return False  # the claim skips it as it would any duplicate message
        needed = int(((row.spec or {}).get("resources") or {}).get("devices") or 1)
        if needed <= available:
            return False
        queue = queue_of(row.spec, settings)
        message = (
            f"worker {worker_id} has {available} device(s) and the job needs {needed}: "
            f"left in queue {queue} for a worker with enough"
        )
        last = session.scalar(
            select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc()).limit(1)
        )
        if last != message:
            add_event(
                session,
                job_id=job_id,
                kind="queue",
                message=message,
                data={"worker_id": worker_id, "devices": available, "needed": needed, "queue": queue},
            )
    log.info(
        "job %s needs %d devices, this worker has %d: handed back to %s", job_id, needed, available, queue
    )
    time.sleep(HAND_BACK_PAUSE_S)
    enqueue_job(settings, job_id, queue=queue)
    return True
