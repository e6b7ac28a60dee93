"""Webhooks end to end, on the embedded defaults (SQLite, SQLite broker) and on PostgreSQL with Redis: real
`distill api`, `distill worker`, `distill reaper` (the dispatcher) and `distill webhook-worker` processes, a
tiny job that trains to the end, and real HTTP receivers on 127.0.0.1 that verify every signature with the
`standardwebhooks` library."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.services import (
    REDIS_URL,
    TERMINAL,
    Stack,
    distill_command,
    fresh_postgres_database,
    make_settings,
    require_redis,
    sqlite_database,
    start_service,
    tiny_spec,
    wait_for,
    write_dolly_subset,
)
from tests.support.webhook_receiver import Receiver

# Long end-to-end runs: `make test-slow` (and CI) runs them; the default suite stays near 10 minutes.
pytestmark = pytest.mark.slow

JOB_TIMEOUT_S = 120


@contextlib.contextmanager
def _backend(kind: str, home: Path) -> Iterator[dict[str, str]]:
    if kind == "embedded":
        yield {"database_url": sqlite_database(home / "db")}
        return
    require_redis()
    with fresh_postgres_database() as url:
        yield {"database_url": url, "broker_url": REDIS_URL}


@pytest.fixture(
    scope="module",
    params=["embedded", pytest.param("postgres-redis", marks=[pytest.mark.postgres, pytest.mark.redis])],
)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path
) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("webhooks")
    with _backend(request.param, home) as backend:
        yield from _stack(home, backend, tiny_teacher_dir)


def _stack(home: Path, backend: dict[str, str], tiny_teacher_dir: Path) -> Iterator[Stack]:
    key = f"dk_test_{uuid.uuid4().hex}"
    settings = make_settings(
        home,
        **backend,
        model_roots=[tiny_teacher_dir.parent],
        bootstrap_api_key=key,
        heartbeat_interval_s=1.0,
        webhook_queue=f"distill-webhooks-test-{uuid.uuid4().hex[:8]}",
        webhook_allow_hosts=["127.0.0.1"],  # the receivers
        webhook_retry_base_s=0.2,
        webhook_dispatch_interval_s=0.2,
    )
    stack = Stack(settings, home / "logs", key=key)
    try:
        stack.start_worker()
        stack.start_reaper()
        # One delivery thread: one job's events then reach a receiver in the order they happened.
        command = distill_command("webhook-worker", "--concurrency", "1")
        stack.others.append(start_service("webhooks", command, stack.env, stack.log_dir))
        stack.client.wait_ready(stack.processes)
        yield stack
    finally:
        stack.stop()


def _create_webhook(stack: Stack, receiver: Receiver, **body: Any) -> dict[str, Any]:
    response = stack.client.http.post("/v1/webhooks", json={"url": receiver.url, **body})
    assert response.status_code == 201, response.text
    created = response.json()
    receiver.secret = created["secret"]
    return created


def test_a_job_reaches_the_receivers_signed_in_order_with_retries(
    stack: Stack, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    client = stack.client
    with Receiver() as receiver, Receiver(statuses=[500, 500]) as flaky:
        every = _create_webhook(stack, receiver)
        ends = _create_webhook(stack, flaky, events=["job.succeeded"])
        train = client.upload(write_dolly_subset(tmp_path / "dolly.jsonl"))
        job = client.create_job(tiny_spec(tiny_teacher_dir, train))
        done = client.wait_status(job["id"], TERMINAL, timeout=JOB_TIMEOUT_S, processes=stack.processes)
        assert done["status"] == "succeeded", done
        checkpoints = [c["step"] for c in client.http.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]]
        assert checkpoints == [3, 6]
        expected = ["job.queued", "job.running", "job.checkpoint", "job.checkpoint", "job.succeeded"]
        wait_for(lambda: len(receiver.received) >= len(expected), timeout=30, what="every event delivered")
        wait_for(lambda: len(flaky.received) >= 3, timeout=30, what="the third attempt at the flaky receiver")

    # Every request, failed attempts included, carried a signature the library accepts.
    assert all(r.verified for r in receiver.received + flaky.received), [
        r.error for r in receiver.received + flaky.received
    ]
    payloads = [r.payload for r in receiver.received]
    assert [p["type"] for p in payloads] == expected  # in the order they happened, each once
    assert [p["timestamp"] for p in payloads] == sorted(p["timestamp"] for p in payloads)
    assert len({r.headers["webhook-id"] for r in receiver.received}) == len(expected)
    queued, running, first_checkpoint, last_checkpoint, succeeded = (p["data"] for p in payloads)
    # `data` is the job as GET /v1/jobs/{id} showed it at each event.
    assert succeeded == client.job(job["id"]) == done
    assert queued["status"] == "queued" and queued["progress"]["step"] == 0 and queued["started_at"] is None
    assert queued == job
    assert running["status"] == "running" and running["attempts"] == 1
    assert running["started_at"] == done["started_at"] and running["worker_id"] == done["worker_id"]
    assert [first_checkpoint["progress"]["step"], last_checkpoint["progress"]["step"]] == checkpoints
    assert first_checkpoint["status"] == last_checkpoint["status"] == "running"
    stable = ("id", "spec", "created_at", "max_attempts")
    for data in (queued, running, first_checkpoint, last_checkpoint):
        assert {k: data[k] for k in stable} == {k: done[k] for k in stable}

    # The flaky receiver: only the event it asked for, 500 twice then 200, one message id throughout.
    assert [r.payload["type"] for r in flaky.received] == ["job.succeeded"] * 3
    assert [r.answered for r in flaky.received] == [500, 500, 200]
    assert len({r.headers["webhook-id"] for r in flaky.received}) == 1
    [delivery] = client.http.get(f"/v1/webhooks/{ends['id']}/deliveries").json()["data"]
    assert delivery["id"] == flaky.received[0].headers["webhook-id"]
    assert delivery["status"] == "succeeded" and delivery["delivered_at"] is not None
    assert [(a["attempt"], a["status_code"]) for a in delivery["attempts"]] == [(1, 500), (2, 500), (3, 200)]
    assert delivery["attempts"][0]["error"] == "the endpoint answered HTTP 500"
    assert delivery["payload"]["data"] == done
    deliveries = client.http.get(f"/v1/webhooks/{every['id']}/deliveries").json()["data"]
    assert [d["event_type"] for d in deliveries[::-1]] == expected
    assert all(d["status"] == "succeeded" and len(d["attempts"]) == 1 for d in deliveries)
