"""End to end on PostgreSQL and Redis: a real uvicorn server (`distill api`) and a real Celery worker
process (`distill worker`) train tiny random models. The whole flow with a duplicate delivery, a
cancellation, and a job with bad data that fails while the worker goes on to the next job."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from core.queue import enqueue_job
from tests.support.services import (
    REDIS_URL,
    TERMINAL,
    Stack,
    download,
    fresh_postgres_database,
    make_settings,
    require_redis,
    tiny_spec,
    wait_for,
    write_dolly_subset,
)

pytestmark = [pytest.mark.postgres, pytest.mark.redis]
JOB_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> Iterator[Stack]:
    require_redis()
    home = tmp_path_factory.mktemp("pg-redis")
    with fresh_postgres_database() as url:
        key = f"dk_test_{uuid.uuid4().hex}"
        settings = make_settings(
            home,
            database_url=url,
            broker_url=REDIS_URL,
            model_roots=[tiny_teacher_dir.parent],
            bootstrap_api_key=key,
            heartbeat_interval_s=1.0,
        )
        stack = Stack(settings, home / "logs", key=key)
        try:
            stack.start_worker()
            stack.client.wait_ready(stack.processes)
            yield stack
        finally:
            stack.stop()


@pytest.fixture(scope="module")
def dolly_file(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> str:
    return stack.client.upload(write_dolly_subset(tmp_path_factory.mktemp("data") / "dolly.jsonl"))


def test_the_whole_flow(stack: Stack, dolly_file: str, tiny_teacher_dir: Path, tmp_path: Path) -> None:
    client = stack.client
    job = client.create_job(tiny_spec(tiny_teacher_dir, dolly_file), **{"Idempotency-Key": "flow-1"})
    enqueue_job(stack.settings, job["id"])  # a duplicate delivery of the same task
    done = client.wait_status(job["id"], TERMINAL, timeout=JOB_TIMEOUT_S, processes=stack.processes)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1 and done["progress"]["step"] == done["progress"]["total_steps"] == 6
    assert "loss" in done["latest_metrics"]
    # The duplicate found the job already claimed: one attempt, one trip through `running`.
    events = client.events(job["id"])
    assert sum(e["kind"] == "attempt" for e in events) == 1
    assert sum(e["kind"] == "status" and e["data"]["status"] == "running" for e in events) == 1

    metrics = client.http.get(f"/v1/jobs/{job['id']}/metrics").json()["series"]
    assert [p["step"] for p in metrics["loss"]] == [1, 2, 3, 4, 5, 6]
    checkpoints = client.http.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
    assert [c["step"] for c in checkpoints] == [3, 6]

    student = download(client, f"/v1/jobs/{job['id']}/student", tmp_path / "student")
    model = AutoModelForCausalLM.from_pretrained(student / "student", trust_remote_code=False)
    assert model.config.num_hidden_layers == 2
    checkpoint = download(client, f"/v1/jobs/{job['id']}/checkpoints/3/download", tmp_path / "ckpt")
    assert (next(checkpoint.iterdir()) / "config.json").is_file()


def test_cancelling_a_running_job(
    stack: Stack, dolly_file: str, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    client = stack.client
    spec = tiny_spec(tiny_teacher_dir, dolly_file, max_steps=400, checkpoint_every=2)
    job = client.create_job(spec)
    wait_for(
        lambda: client.http.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"],
        timeout=JOB_TIMEOUT_S,
        what="a first checkpoint",
    )
    response = client.http.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] in ("cancelling", "cancelled")
    done = client.wait_status(job["id"], TERMINAL, timeout=60, processes=stack.processes)
    assert done["status"] == "cancelled", done
    assert done["progress"]["step"] < 400
    events = client.events(job["id"])
    assert any(e["kind"] == "stopped" for e in events), [e["message"] for e in events]

    checkpoints = client.http.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
    last = checkpoints[-1]["step"]
    assert last == done["progress"]["step"]  # the trainer saved where it stopped
    extracted = download(client, f"/v1/jobs/{job['id']}/checkpoints/{last}/download", tmp_path / "ckpt")
    assert (next(extracted.iterdir()) / "config.json").is_file()
    assert client.http.get(f"/v1/jobs/{job['id']}/student").status_code == 409


def test_bad_data_fails_cleanly_and_the_worker_serves_the_next_job(
    stack: Stack, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    client = stack.client
    bad_file = client.upload(write_dolly_subset(tmp_path / "bad.jsonl", records=8))
    # The upload was valid; its stored copy is then damaged (a disk fault, a bad edit on the volume).
    stored = next((stack.settings.artifacts / "files").rglob(f"{bad_file}.jsonl"))
    first_line = stored.read_text(encoding="utf-8").splitlines()[0]
    stored.write_text(f"{first_line}\nnot json at all\n", encoding="utf-8")
    good_file = client.upload(write_dolly_subset(tmp_path / "good.jsonl"))
    bad = client.create_job(tiny_spec(tiny_teacher_dir, bad_file))
    good = client.create_job(tiny_spec(tiny_teacher_dir, good_file, max_steps=2, checkpoint_every=0))

    failed = client.wait_status(bad["id"], TERMINAL, timeout=JOB_TIMEOUT_S, processes=stack.processes)
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "invalid_data"
    message = failed["error"]["message"]
    assert "line 2" in message and f"file {bad_file}" in message, message
    assert str(stack.settings.artifacts) not in message  # no server paths in what users see
    succeeded = client.wait_status(good["id"], TERMINAL, timeout=JOB_TIMEOUT_S, processes=stack.processes)
    assert succeeded["status"] == "succeeded", succeeded
    assert all(worker.alive() for worker in stack.workers)
