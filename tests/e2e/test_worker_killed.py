"""A worker killed with SIGKILL in the middle of a job (PostgreSQL + Redis, real processes): its trainer
dies with it, the reaper re-queues the job once the heartbeats stop, and a second worker resumes from the
last checkpoint and finishes it. Nothing is lost or counted twice, and no job is left running."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.services import (
    REDIS_URL,
    TERMINAL,
    Stack,
    fresh_postgres_database,
    make_settings,
    require_redis,
    tiny_spec,
    wait_for,
    write_dolly_subset,
)

pytestmark = [pytest.mark.postgres, pytest.mark.redis]
MAX_STEPS = 18


@pytest.fixture
def stack(tmp_path: Path, tiny_teacher_dir: Path) -> Iterator[Stack]:
    require_redis()
    with fresh_postgres_database() as url:
        key = f"dk_test_{uuid.uuid4().hex}"
        settings = make_settings(
            tmp_path,
            database_url=url,
            broker_url=REDIS_URL,
            model_roots=[tiny_teacher_dir.parent],
            bootstrap_api_key=key,
            heartbeat_interval_s=0.5,
            stale_after_s=4,
            reaper_interval_s=0.5,
        )
        stack = Stack(settings, tmp_path / "logs", key=key)
        try:
            stack.start_worker()
            stack.start_reaper()
            stack.client.wait_ready(stack.processes)
            yield stack
        finally:
            stack.stop()


def test_a_killed_workers_job_resumes_on_another_worker(
    stack: Stack, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    client = stack.client
    file_id = client.upload(write_dolly_subset(tmp_path / "dolly.jsonl"))
    job = client.create_job(tiny_spec(tiny_teacher_dir, file_id, max_steps=MAX_STEPS, checkpoint_every=3))
    wait_for(
        lambda: client.http.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"],
        timeout=180,
        what="a first checkpoint",
    )
    first = client.job(job["id"])
    assert first["status"] == "running" and first["attempts"] == 1

    stack.workers[0].process.kill()  # kill -9 of the main process alone: no shutdown, no ack, no last words
    stack.workers[0].process.wait(timeout=10)
    stack.start_worker()
    done = client.wait_status(job["id"], TERMINAL, timeout=180, processes=stack.processes)
    assert done["status"] == "succeeded", (done, [w.output() for w in stack.workers])
    assert done["attempts"] == 2 and done["worker_id"] != first["worker_id"]

    events = client.events(job["id"])
    messages = [e["message"] for e in events]
    assert any("re-queued (attempt 2 of 3)" in m for m in messages), messages
    starts = [e["data"]["start_step"] for e in events if e["kind"] == "start"]
    assert starts[0] == 0 and len(starts) == 2 and starts[1] >= 3, messages  # resumed, not restarted

    # Every step's metrics exactly once: the lost attempt's steps after its checkpoint were replaced.
    series = client.http.get(f"/v1/jobs/{job['id']}/metrics", params={"names": "loss"}).json()["series"]
    assert [p["step"] for p in series["loss"]] == list(range(1, MAX_STEPS + 1))
    for status in ("running", "cancelling", "queued"):
        assert client.http.get("/v1/jobs", params={"status": status}).json()["data"] == []
    assert client.http.get(f"/v1/jobs/{job['id']}/student").status_code == 200
