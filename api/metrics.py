"""Prometheus metrics at `GET /metrics`: the API's requests, and the jobs as the database sees them.

- Requests: `distill_http_requests_total` and `distill_http_request_duration_seconds`, labelled by method,
  route template (`/v1/jobs/{job_id}`, never the raw path, whose ids would make every job a new series;
  an unknown path is `unmatched`) and status. A pure ASGI middleware counts a request when its response
  starts (the status line and headers), and its duration is the time to that start: an event stream or a
  download is counted once its headers leave, however long its body then takes. `/metrics` itself is
  counted like any route (the scrapers' own load shows). Under several uvicorn workers
  (`PROMETHEUS_MULTIPROC_DIR` set, as `distill api --workers N` does) each process writes its counts to
  files there and a scrape adds up every process' files (`MultiProcessCollector`).
- Jobs: read from the database at scrape time by `JobsCollector` (indexed queries, cached a few seconds
  per process), so every API process reports the same numbers and no worker needs to be reachable:
  jobs by status, queue depth, the oldest queued job's age, each worker's heartbeat age, and the running
  jobs' training throughput and step time (from each job's latest step metrics). Ended jobs' durations
  are a histogram observed by the worker that finished them (worker/metrics.py).

Only counts, ages, job ids and worker names leave here: no tenant, file or model names. The endpoint needs
no API key (scrapers have none); `DISTILL_METRICS_TOKEN` makes it require that bearer token, and
`DISTILL_METRICS_ENABLED=false` removes it.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.config import Settings
from core.db import get_sessionmaker, utcnow
from core.errors import ServiceError
from core.jobs.models import Job
from core.jobs.service import sent_to_queue
from core.jobs.states import ACTIVE_STATES, JobStatus

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
UNMATCHED_ROUTE = "unmatched"
# Seconds: JSON answers take milliseconds, an upload or an archive being built up to tens of seconds.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# latest_metrics keys the trainer writes each step (core/distill/trainer.py `_train_step`).
_STEP_TIME_KEY = "step_time_s"
_STEP_PART_KEYS = ("teacher_time_s", "student_time_s", "generation_time_s")


# ----------------------------------------------------------------------------------------- requests
@dataclass
class RequestMetrics:
    requests: Counter
    duration: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry | None) -> RequestMetrics:
        """The request metrics, registered in `registry` (None: kept only in the multiprocess files)."""
        labels = ("method", "route", "status")
        return cls(
            requests=Counter(
                "distill_http_requests",
                "HTTP requests answered, by route template and status.",
                labels,
                registry=registry,
            ),
            duration=Histogram(
                "distill_http_request_duration_seconds",
                "Time from a request's arrival to the start of its response (headers sent), by route "
                "template and status; a stream's or download's body is not included.",
                labels,
                buckets=REQUEST_BUCKETS,
                registry=registry,
            ),
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        labels = (method if method in _METHODS else "other", route, str(status))
        self.requests.labels(*labels).inc()
        self.duration.labels(*labels).observe(seconds)


def route_template(scope: Scope) -> str:
    """The matched route's path template (`/v1/jobs/{job_id}`), or `unmatched`."""
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return template if isinstance(template, str) else UNMATCHED_ROUTE


class RequestMetricsMiddleware:
    """Counts and times every HTTP request (pure ASGI: streaming responses pass through unbuffered)."""

    def __init__(self, app: ASGIApp, metrics: RequestMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        recorded = False

        def record(status: int) -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                elapsed = time.perf_counter() - started
                self.metrics.observe(scope["method"], route_template(scope), status, elapsed)

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                record(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except Exception:
            record(500)  # the outer middleware answers it with a 500 (or cuts a stream that had begun)
            raise


# ------------------------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class _RunningJob:
    job_id: str
    worker_id: str | None
    heartbeat_at: datetime | None
    latest_metrics: dict[str, Any]


@dataclass(frozen=True)
class _JobsSnapshot:
    by_status: dict[str, int]
    oldest_queued_at: datetime | None
    running: list[_RunningJob]


def _number(value: object) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None  # type: ignore[arg-type]


def step_seconds(latest: dict[str, Any]) -> float | None:
    """A step's wall time from the trainer's step metrics: `step_time_s` when it reports one, else the sum
    of the timed parts of the step (teacher and student passes, generation)."""
    total = _number(latest.get(_STEP_TIME_KEY))
    if total is not None:
        return total
    parts = [_number(latest.get(key)) for key in _STEP_PART_KEYS]
    known = [part for part in parts if part is not None]
    return sum(known) if known else None


class JobsCollector(Collector):
    """Job gauges read from the database at scrape time; the rows are cached `ttl_s` seconds (ages are
    computed at each scrape from the cached timestamps, so they keep moving)."""

    def __init__(self, database_url: str, ttl_s: float = 5.0) -> None:
        self.database_url, self.ttl_s = database_url, ttl_s
        self._lock = threading.Lock()
        self._cached: tuple[float, _JobsSnapshot] | None = None

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not query the database

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot()
        up = GaugeMetricFamily(
            "distill_job_metrics_up", "1 if the job metrics were read from the database, 0 if that failed."
        )
        up.add_metric([], 0 if snapshot is None else 1)
        yield up
        if snapshot is not None:
            yield from self._families(snapshot, utcnow())

    def _snapshot(self) -> _JobsSnapshot | None:
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self.ttl_s:
                return self._cached[1]
            try:
                snapshot = self._read()
            except Exception:
                log.exception("could not read the job metrics from the database")
                return None
            self._cached = (now, snapshot)
            return snapshot

    def _read(self) -> _JobsSnapshot:
        with get_sessionmaker(self.database_url)() as session:
            counts = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
            # Since the job was last sent to the queue (created, re-queued, resumed); index (status, enqueued_at).
            # A sweep's children held back by its max_parallel were never sent: no worker is late for them.
            oldest = session.scalar(
                select(func.min(func.coalesce(Job.enqueued_at, Job.created_at))).where(
                    Job.status == JobStatus.QUEUED, sent_to_queue()
                )
            )
            running = session.execute(
                select(Job.id, Job.worker_id, Job.heartbeat_at, Job.latest_metrics).where(
                    Job.status.in_(ACTIVE_STATES)
                )
            ).all()
        return _JobsSnapshot(
            by_status={JobStatus(status).value: count for status, count in counts},
            oldest_queued_at=oldest,
            running=[_RunningJob(row[0], row[1], row[2], row[3] or {}) for row in running],
        )

    @staticmethod
    def _families(snapshot: _JobsSnapshot, now: datetime) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("distill_jobs", "Jobs by status.", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], snapshot.by_status.get(status.value, 0))
        yield jobs
        yield GaugeMetricFamily(
            "distill_queue_depth",
            "Jobs queued, waiting for a worker.",
            value=snapshot.by_status.get(JobStatus.QUEUED.value, 0),
        )
        oldest = snapshot.oldest_queued_at
        yield GaugeMetricFamily(
            "distill_oldest_queued_job_age_seconds",
            "Seconds the longest-waiting queued job has waited since it was last sent to the queue (0: none).",
            value=max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0,
        )

        heartbeats: dict[str, datetime] = {}
        for job in snapshot.running:
            if job.worker_id and job.heartbeat_at is not None:
                seen = heartbeats.get(job.worker_id)
                heartbeats[job.worker_id] = job.heartbeat_at if seen is None else max(seen, job.heartbeat_at)
        ages = GaugeMetricFamily(
            "distill_worker_heartbeat_age_seconds",
            "Seconds since the last heartbeat of each worker process holding a running job.",
            labels=["worker"],
        )
        for worker, beat in sorted(heartbeats.items()):
            ages.add_metric([worker], max(0.0, (now - beat).total_seconds()))
        yield ages

        throughput = GaugeMetricFamily(
            "distill_training_tokens_per_second",
            "Tokens per second of each running job's latest training step.",
            labels=["job_id"],
        )
        step_time = GaugeMetricFamily(
            "distill_training_step_seconds",
            "Wall time of each running job's latest training step, in seconds.",
            labels=["job_id"],
        )
        for job in snapshot.running:
            tokens = _number(job.latest_metrics.get("tokens_per_s"))
            if tokens is not None:
                throughput.add_metric([job.job_id], tokens)
            seconds = step_seconds(job.latest_metrics)
            if seconds is not None:
                step_time.add_metric([job.job_id], seconds)
        yield throughput
        yield step_time


# ----------------------------------------------------------------------------------------- endpoint
_bearer = HTTPBearer(auto_error=False)


def _check_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    token = request.app.state.settings.metrics_token
    if not token:
        return
    given = credentials.credentials if credentials is not None else ""
    if not secrets.compare_digest(given.encode(), token.encode()):
        raise ServiceError(
            "unauthorized",
            "send the metrics token as 'Authorization: Bearer <token>'",
            param="Authorization",
            status=401,
        )


router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(_check_token)])
def metrics(request: Request) -> Response:
    """This API's metrics in the Prometheus text format, or OpenMetrics when the scraper asks for it (a sync
    route: the job queries block)."""
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(request.app.state.metrics_registry), headers={"Content-Type": content_type})


def install_metrics(app: FastAPI, settings: Settings) -> None:
    """Add the request middleware and `GET /metrics` (nothing when `metrics_enabled` is off).

    Each app gets its own registry: several apps in one process (tests) never share counts.
    """
    if not settings.metrics_enabled:
        return
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        # Counts live in per-process files; the scrape adds up every process' files, this one's included.
        requests = RequestMetrics.create(registry=None)
        MultiProcessCollector(registry)
    else:
        requests = RequestMetrics.create(registry=registry)
    registry.register(JobsCollector(settings.database_url))
    app.state.metrics_registry = registry
    app.include_router(router)
    app.add_middleware(RequestMetricsMiddleware, metrics=requests)


def fresh_multiprocess_dir(root: Path) -> Path:
    """An empty folder for this process' uvicorn workers' metric files, `root/api-<pid>`: the pid is the
    uvicorn master's (`distill api` execs it). Folders of processes that are gone are removed."""
    root.mkdir(parents=True, exist_ok=True)
    for folder in root.glob("api-*"):
        pid = folder.name.removeprefix("api-")
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
    path = root / f"api-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
