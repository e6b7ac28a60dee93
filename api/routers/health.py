"""Liveness (`/healthz`: the process answers) and readiness (`/readyz`: database, schema, broker, and a
broker that has not lost the queued jobs' messages)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import create_engine, text

from api.deps import SettingsDep
from api.errors import error_body
from api.schemas import CheckResult, ErrorResponse
from core.config import Settings
from core.db import get_engine, session_scope
from core.jobs.service import queued_jobs_waiting
from core.queue import queue_depth
from migrations.runner import current_revision, head_revision

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 2.0
# A message is in the broker's queue from the moment the job is sent until a worker takes it and claims the
# job, which takes milliseconds; jobs sent longer ago than this are the ones whose messages must be there.
LOST_QUEUE_AFTER_S = 30.0
_checks = ThreadPoolExecutor(max_workers=4, thread_name_prefix="readyz")


def _check_database(settings: Settings) -> str:
    with get_engine(settings.database_url).connect() as connection:
        connection.execute(text("SELECT 1"))
    revision, head = current_revision(settings.database_url), head_revision()
    if revision != head:
        return f"schema at {revision or 'none'}, expected {head}: run `distill db upgrade`"
    return "ok"


def _check_broker(settings: Settings) -> str:
    url = settings.broker_url
    if url.startswith("sqla+"):
        # kombu's SQLAlchemy transport connects lazily; test the database behind it instead.
        engine = create_engine(url.removeprefix("sqla+"))
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        finally:
            engine.dispose()
        return "ok"
    from kombu import Connection

    timeouts = {"socket_connect_timeout": CHECK_TIMEOUT_S, "socket_timeout": CHECK_TIMEOUT_S}
    with Connection(url, connect_timeout=CHECK_TIMEOUT_S, transport_options=timeouts) as connection:
        connection.ensure_connection(max_retries=0, timeout=CHECK_TIMEOUT_S)
    return "ok"


def _check_queue(settings: Settings) -> str:
    """Whether the broker still holds a message for every job that has waited a while.

    The queue's depth and the queued jobs are read one after the other, so a job claimed in between could
    look missing for that instant; a restarted broker that lost its queue (Redis without persistence) holds
    fewer messages for as long as nobody sends them again, which the reaper does after `requeue_after_s`.
    """
    grace = min(LOST_QUEUE_AFTER_S, settings.requeue_after_s)
    with session_scope(settings.database_url) as session:
        waiting = queued_jobs_waiting(session=session, longer_than_s=grace)
    if not waiting:
        return "ok"
    depth = queue_depth(settings, timeout_s=CHECK_TIMEOUT_S)
    if depth >= waiting:
        return "ok"
    return (
        f"{waiting} jobs queued for more than {grace:g} s but the broker holds {depth} messages: it lost "
        f"messages (a restart without persistence?); the reaper sends them again after "
        f"{settings.requeue_after_s:g} s"
    )


def _run_check(check: object, settings: Settings) -> str:
    future = _checks.submit(check, settings)  # type: ignore[arg-type]
    try:
        return future.result(timeout=CHECK_TIMEOUT_S + 1.0)
    except FutureTimeout:
        return f"no answer within {CHECK_TIMEOUT_S:.0f} s"
    except Exception as exc:
        return f"error: {type(exc).__name__}: {exc}"[:300]


@router.get("/healthz")
def healthz() -> CheckResult:
    """Liveness: 200 while the process answers."""
    return CheckResult(status="ok", checks={})


@router.get("/readyz", responses={503: {"model": ErrorResponse}})
def readyz(settings: SettingsDep) -> CheckResult:
    """Readiness: the database answers at the current schema, the broker accepts connections and holds
    the queued jobs' messages."""
    checks = {
        "database": _run_check(_check_database, settings),
        "broker": _run_check(_check_broker, settings),
    }
    if checks["database"] == "ok" and checks["broker"] == "ok":
        checks["broker"] = _run_check(_check_queue, settings)
    failed = {name: result for name, result in checks.items() if result != "ok"}
    if failed:
        message = "; ".join(f"{name}: {result}" for name, result in failed.items())
        body = error_body("not_ready", message) | {"checks": checks}
        return JSONResponse(body, status_code=503)  # type: ignore[return-value]
    return CheckResult(status="ok", checks=checks)
