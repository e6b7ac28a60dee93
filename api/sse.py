"""Server-sent events for a job's event log: poll the database, send what is new, stop after the end.

Each event carries its database id as the SSE `id:`, so a reconnecting client that sends `Last-Event-ID`
resumes exactly where it stopped. Comments (`: ...`) keep idle connections alive through proxies.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from anyio import to_thread
from sqlalchemy import select

from api.errors import error_body
from api.schemas import EventOut
from core.db import get_sessionmaker
from core.jobs.models import Job, JobEvent
from core.jobs.service import list_events
from core.jobs.states import TERMINAL_STATES

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5
HEARTBEAT_S = 15.0
BATCH = 500


def _poll(database_url: str, job_id: str, after_id: int | None) -> tuple[list[JobEvent], bool]:
    """New events and whether the job has ended with nothing left to send.

    The status is read first: the events written with (or before) a final status are then among those
    read next. The stream ends on the job's current status, not on a final status event, since a failed
    or cancelled job may be resumed after it.
    """
    with get_sessionmaker(database_url)() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        events, _ = list_events(session=session, job_id=job_id, after_id=after_id, limit=BATCH)
        return events, not events and (status is None or status in TERMINAL_STATES)


def format_event(event: JobEvent) -> str:
    payload = EventOut.of(event).model_dump(mode="json")
    return f"id: {event.id}\nevent: {event.kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"


def format_error(code: str, message: str) -> str:
    """An `error` event in the API's error shape: the stream ends cleanly and the client may reconnect."""
    return f"event: error\ndata: {json.dumps(error_body(code, message), separators=(',', ':'))}\n\n"


async def job_event_stream(
    database_url: str, job_id: str, after_id: int | None, poll_interval_s: float = POLL_INTERVAL_S
) -> AsyncIterator[str]:
    """The SSE body: events after `after_id` as they are written, until the job has ended and all are sent."""
    yield "retry: 2000\n: connected\n\n"
    loop = asyncio.get_running_loop()
    last_sent = loop.time()
    while True:
        try:
            events, ended = await to_thread.run_sync(_poll, database_url, job_id, after_id)
        except Exception:
            # The status line went out long ago: end the stream in order instead of cutting the connection.
            logger.exception("event stream of job %s failed after event %s", job_id, after_id)
            yield format_error("stream_failed", "the event stream failed; reconnect with Last-Event-ID")
            return
        for event in events:
            yield format_event(event)
            after_id = event.id
            last_sent = loop.time()
        if ended:
            return
        if events:
            continue  # a full batch may mean more are waiting
        if loop.time() - last_sent >= HEARTBEAT_S:
            yield ": keep-alive\n\n"
            last_sent = loop.time()
        await asyncio.sleep(poll_interval_s)
