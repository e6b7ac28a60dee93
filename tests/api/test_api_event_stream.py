"""The live event stream (SSE) through a real uvicorn server, on SQLite and PostgreSQL: a log longer than
the stream's batch arrives whole and in order, and a job resumed after it failed keeps its stream open past
the old final status. (A reconnect in the middle of a real worker's run is in tests/e2e/test_faults.py.)"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from api import sse
from core.db import utcnow
from core.jobs.lifecycle import add_event, reopen, transition
from core.jobs.states import JobStatus
from tests.support.api import dolly_lines, job_spec, upload
from tests.support.live_api import LiveApi

STREAM_TIMEOUT_S = 60.0


@pytest.fixture
def tenant_job(live_api: LiveApi, tiny_teacher_dir: Path) -> tuple[str, str]:
    """(api key, id of a new queued job)."""
    _, key = live_api.new_tenant("stream")
    with live_api.client(key) as client:
        train = upload(client, dolly_lines(4)).json()["id"]
        job_id = client.post("/v1/jobs", json=job_spec(str(tiny_teacher_dir), train)).json()["id"]
    return key, job_id


def move(live_api: LiveApi, job_id: str, target: JobStatus, **values: object) -> None:
    with live_api.session() as session:
        assert transition(session, job_id=job_id, target=target, **values)
        session.commit()


def stream_ids(live_api: LiveApi, key: str, job_id: str, after: int | None = None) -> list[int]:
    """The ids of every event the stream sends until it ends (it must end by itself)."""
    headers = {"Last-Event-ID": str(after)} if after is not None else {}
    ids = []
    with (
        live_api.client(key) as client,
        client.stream(
            "GET",
            f"/v1/jobs/{job_id}/events",
            params={"stream": "true"},
            headers=headers,
            timeout=STREAM_TIMEOUT_S,
        ) as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("id:"):
                ids.append(int(line.removeprefix("id:")))
            elif line.startswith("data:"):
                assert json.loads(line.removeprefix("data:"))["id"] == ids[-1]
    return ids


def listed_ids(live_api: LiveApi, key: str, job_id: str) -> list[int]:
    ids: list[int] = []
    params: dict[str, object] = {"limit": 1000}
    with live_api.client(key) as client:
        while True:
            page = client.get(f"/v1/jobs/{job_id}/events", params=params).json()
            ids += [event["id"] for event in page["data"]]
            if not page["has_more"]:
                return ids
            params["after"] = page["next_cursor"]


def test_a_log_longer_than_a_batch_is_streamed_whole(live_api: LiveApi, tenant_job: tuple[str, str]) -> None:
    key, job_id = tenant_job
    move(live_api, job_id, JobStatus.RUNNING, started_at=utcnow())
    with live_api.session() as session:
        for step in range(2 * sse.BATCH + 50):
            add_event(session, job_id=job_id, kind="eval", message=f"step {step}", step=step)
        session.commit()
    move(live_api, job_id, JobStatus.SUCCEEDED, finished_at=utcnow())
    expected = listed_ids(live_api, key, job_id)
    assert len(expected) == 2 * sse.BATCH + 50 + 3  # queued, running, the steps, succeeded
    assert stream_ids(live_api, key, job_id) == expected
    assert stream_ids(live_api, key, job_id, after=expected[sse.BATCH + 7]) == expected[sse.BATCH + 8 :]


def test_a_resumed_jobs_stream_goes_on_past_its_old_end(
    live_api: LiveApi, tenant_job: tuple[str, str]
) -> None:
    key, job_id = tenant_job
    move(live_api, job_id, JobStatus.RUNNING, started_at=utcnow())
    move(live_api, job_id, JobStatus.FAILED, finished_at=utcnow(), error_code="trainer_crashed")
    with live_api.session() as session:
        assert reopen(session, job_id=job_id, expected=[JobStatus.FAILED], message="resumed by the user")
        session.commit()
    received: list[int] = []
    listener = threading.Thread(
        target=lambda: received.extend(stream_ids(live_api, key, job_id)), daemon=True
    )
    listener.start()
    listener.join(timeout=3)
    assert listener.is_alive(), "the stream ended at the failed status of a job that was resumed"
    move(live_api, job_id, JobStatus.RUNNING)
    move(live_api, job_id, JobStatus.SUCCEEDED, finished_at=utcnow())
    listener.join(timeout=STREAM_TIMEOUT_S)
    assert not listener.is_alive(), "the stream did not end after the job succeeded"
    assert received == listed_ids(live_api, key, job_id) and len(received) == 6
