"""A worker's own Prometheus metrics: how long the jobs it finished took, served on
`DISTILL_WORKER_METRICS_PORT` (0 = off) by the Celery worker process.

Job durations are a histogram, so they are observed where a job ends (the supervisor, when it records the
end) rather than read from the database: the API's /metrics covers what the database holds (jobs by status,
queue, heartbeats, throughput). The server starts in the worker's main process; `distill worker` runs one
job at a time in that process (the solo pool), which is where the durations are observed. A prefork pool
(`--concurrency` > 1) observes them in its child processes: set `PROMETHEUS_MULTIPROC_DIR` to an empty
folder for the worker, and the server adds up every process' files.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import REGISTRY, CollectorRegistry, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import select

from core.config import Settings
from core.db import session_scope
from core.jobs.models import Job
from core.jobs.states import JobStatus

log = logging.getLogger(__name__)

# Seconds: a job that fails at set-up ends in seconds, a real distillation takes minutes to days.
JOB_BUCKETS = (1, 10, 30, 60, 300, 600, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 86400, 2 * 86400, 7 * 86400)

JOB_DURATION = Histogram(
    "distill_job_duration_seconds",
    "Seconds from a job's first start on a worker to its end (all its attempts), by final status; "
    "observed by the worker that ended it.",
    ["status"],
    buckets=JOB_BUCKETS,
)


def observe_job_end(settings: Settings, job_id: str, status: JobStatus) -> None:
    """Add the job's duration (`started_at` → `finished_at`) to the histogram; never raises."""
    try:
        with session_scope(settings.database_url) as session:
            row = session.execute(select(Job.started_at, Job.finished_at).where(Job.id == job_id)).one()
        started, finished = row
        if started is not None and finished is not None:
            JOB_DURATION.labels(status.value).observe(max(0.0, (finished - started).total_seconds()))
    except Exception:
        log.exception("job %s: could not record its duration", job_id)


def start_metrics_server(settings: Settings) -> None:
    """Serve this worker's metrics on `worker_metrics_port` (all interfaces), if it is set."""
    port = settings.worker_metrics_port
    if not port:
        return
    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    start_http_server(port, registry=registry)
    log.info("worker metrics on port %d", port)
