"""The Celery configuration shared by the worker (which consumes) and the API (which only sends tasks by
name). Building a Celery app imports no task code, so the API never imports `worker/`."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence
from typing import Any

from celery import Celery
from sqlalchemy import select

from core.config import Settings

RUN_JOB_TASK = "distill.run_job"


def celery_config(settings: Settings) -> dict[str, object]:
    config: dict[str, object] = {
        "broker_url": settings.broker_url,
        "task_ignore_result": True,
        "task_default_queue": settings.task_queue,
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "task_track_started": False,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "task_serializer": "json",
        "accept_content": ["json"],
    }
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # Jobs run for hours; the reaper, not Redis' redelivery, recovers jobs of lost workers, so the
        # visibility timeout only has to outlast the longest job to avoid a needless duplicate delivery
        # (which the atomic claim would ignore anyway).
        config["broker_transport_options"] = {"visibility_timeout": 7 * 24 * 3600}
    elif settings.broker_url.startswith("sqla+sqlite:///"):
        # kombu opens the broker file in SQLite's default rollback-journal mode: every publish fsyncs
        # several times and blocks readers, so concurrent job creations stalled each other for seconds.
        path = settings.broker_url.removeprefix("sqla+sqlite:///")
        config["broker_transport_options"] = {"creator": functools.partial(_sqlite_broker_connection, path)}
    return config


def _sqlite_broker_connection(path: str) -> sqlite3.Connection:
    """A connection to the embedded broker's SQLite file in WAL mode with a generous busy timeout."""
    connection = sqlite3.connect(path, timeout=30, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    return connection


# The client's configuration depends on the broker URL and the queue only; one app per pair is kept so that
# each enqueue reuses its broker connection pool.
_clients: dict[tuple[str, str], Celery] = {}


def celery_client(settings: Settings) -> Celery:
    """A Celery app used only to send tasks by name (no task modules imported)."""
    key = (settings.broker_url, settings.task_queue)
    app = _clients.get(key)
    if app is None:  # a race builds two equal apps and keeps one: harmless
        app = Celery("distill-client")
        app.conf.update(celery_config(settings))
        app = _clients.setdefault(key, app)
    return app


def job_queues(settings: Settings) -> list[str]:
    """Every queue jobs are sent to: the default one, then the configured device classes (`queues`)."""
    return list(dict.fromkeys([settings.task_queue, *settings.queues]))


def queue_of(spec: dict[str, Any] | None, settings: Settings) -> str:
    """The queue of a job with the stored `spec`: its `resources.queue`, else the default queue."""
    resources = (spec or {}).get("resources") or {}
    return resources.get("queue") or settings.task_queue


def job_queue(settings: Settings, job_id: str) -> str:
    """The queue `job_id` is sent to (read from its stored spec; a missing job: the default queue)."""
    from core.db import session_scope
    from core.jobs.models import Job

    with session_scope(settings.database_url) as session:
        spec = session.scalar(select(Job.spec).where(Job.id == job_id))
    return queue_of(spec, settings)


def enqueue_job(settings: Settings, job_id: str, *, queue: str | None = None) -> None:
    """Send the run-job task to the job's queue (`resources.queue`, read from the database unless given);
    call only after the job row is committed (with its `enqueued_at` set). Every sender (creation, resume,
    the reaper, a crashed trainer's re-queue, a worker handing back a job too big for it) goes through here,
    so a job never leaves its device class."""
    queue = queue or job_queue(settings, job_id)
    celery_client(settings).send_task(RUN_JOB_TASK, args=[job_id], queue=queue, routing_key=queue)


def queue_depth(settings: Settings, *, timeout_s: float = 5.0, queues: Sequence[str] | None = None) -> int:
    """How many messages wait in `queues` (default: every job queue, see `job_queues`), not counting those a
    worker holds; raises when the broker does not answer within about `timeout_s`.

    A passive declare reads the depth the same way on every kombu transport (Redis: the list's length;
    the SQL broker: its visible rows). Redis deletes an empty list, which a passive declare reports as a
    missing queue: that is a depth of 0.
    """
    from kombu import Connection
    from kombu.exceptions import ChannelError

    options = dict(celery_config(settings).get("broker_transport_options") or {})  # type: ignore[call-overload]
    if settings.broker_url.startswith(("redis://", "rediss://")):
        options |= {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s}
    with Connection(settings.broker_url, connect_timeout=timeout_s, transport_options=options) as connection:
        connection.ensure_connection(max_retries=0, timeout=timeout_s)
        depth = 0
        for queue in queues if queues is not None else job_queues(settings):
            try:
                declared = connection.default_channel.queue_declare(queue=queue, passive=True)
            except ChannelError:
                continue
            depth += int(declared.message_count)
        return depth
