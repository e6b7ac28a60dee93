"""Celery tasks: thin wrappers that take ids and call core. A task never raises: whatever happens to a
job is recorded on the job, and nothing in a job can take the worker down.

A message may arrive more than once (the reaper sends a queued job's message again when the broker seems to
have lost it): the claim is one conditional UPDATE, so a second delivery of a job that is running or has
ended costs one query and runs nothing.

No Celery time limits (`time_limit`, `soft_time_limit`): a job trains for minutes or days depending on its
spec, so no single limit fits; the solo pool `distill worker` uses does not enforce them anyway; and a hard
limit kills the process that supervises the trainer, losing the progress since the last checkpoint. Our
own supervision covers what they would: a cancel is a stop request, then a kill after `cancel_grace_s`;
a worker that stops sending heartbeats is reaped after `stale_after_s`.
"""

from __future__ import annotations

import logging
import os

from core.config import get_settings
from core.queue import RUN_JOB_TASK
from worker.celery_app import app
from worker.routing import hand_back_if_too_big
from worker.supervisor import run_job as supervise_job

log = logging.getLogger(__name__)


@app.task(name=RUN_JOB_TASK, bind=True, acks_late=True, ignore_result=True)
def run_job(self: object, job_id: str) -> str:
    """Claim and run one distillation job (a no-op if another delivery already claimed it)."""
    worker_id = f"{self.request.hostname or 'worker'}:{os.getpid()}"  # type: ignore[attr-defined]
    try:
        if hand_back_if_too_big(get_settings(), job_id, worker_id):
            return "handed_back"
        return supervise_job(job_id, get_settings(), worker_id)
    except Exception:
        # Typically the database is unreachable. The job is either still queued (retried on the next
        # delivery or by an operator) or running with no heartbeat (the reaper re-queues it).
        log.exception("job %s: the supervisor failed", job_id)
        return "error"
