"""Routing with two real Celery workers (`distill worker`) on two queues: a job naming a device class
(`resources.queue`) runs only on a worker consuming that queue; an unknown queue is refused naming the
field; a worker pinned to fewer devices than a job needs hands the job back instead of running it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.services import (
    TERMINAL,
    Stack,
    make_settings,
    sqlite_database,
    tiny_spec,
    wait_for,
    write_dolly_subset,
)

# Long end-to-end runs: `make test-slow` (and CI) runs them; the default suite stays near 10 minutes.
pytestmark = pytest.mark.slow

JOB_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("routing")
    key = f"dk_test_{uuid.uuid4().hex}"
    suffix = uuid.uuid4().hex[:6]
    settings = make_settings(
        home,
        database_url=sqlite_database(home / "db"),
        model_roots=[tiny_teacher_dir.parent],
        bootstrap_api_key=key,
        heartbeat_interval_s=1.0,
        queues=[f"gpu-a-{suffix}", f"gpu-b-{suffix}"],
    )
    stack = Stack(settings, home / "logs", key=key)
    try:
        a, b = settings.queues
        # worker-a: queue a and the default queue, devices unknown (takes any job of its queues);
        # worker-b: queue b only, pinned to one GPU.
        stack.start_worker("--name", "worker-a@%h", DISTILL_WORKER_QUEUES=f"{a},{settings.task_queue}")
        stack.start_worker("--name", "worker-b@%h", DISTILL_WORKER_QUEUES=b, CUDA_VISIBLE_DEVICES="0")
        stack.client.wait_ready(stack.processes)
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def dolly_file(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> str:
    return stack.client.upload(write_dolly_subset(tmp_path_factory.mktemp("data") / "dolly.jsonl"))


def _spec(teacher: Path, file_id: str, **resources: Any) -> dict[str, Any]:
    return {**tiny_spec(teacher, file_id, max_steps=2, checkpoint_every=0), "resources": resources}


def test_each_job_runs_on_a_worker_of_its_queue(
    stack: Stack, dolly_file: str, tiny_teacher_dir: Path
) -> None:
    client = stack.client
    a, b = stack.settings.queues
    jobs = {
        "a": client.create_job(_spec(tiny_teacher_dir, dolly_file, queue=a)),
        "b": client.create_job(_spec(tiny_teacher_dir, dolly_file, queue=b)),
        "default": client.create_job(_spec(tiny_teacher_dir, dolly_file)),
    }
    done = {
        name: client.wait_status(job["id"], TERMINAL, timeout=JOB_TIMEOUT_S, processes=stack.processes)
        for name, job in jobs.items()
    }
    assert {name: job["status"] for name, job in done.items()} == dict.fromkeys(done, "succeeded")
    workers = {name: client.events(job["id"]) for name, job in jobs.items()}
    ran_on = {
        name: next(e["data"]["worker_id"] for e in events if e["kind"] == "attempt")
        for name, events in workers.items()
    }
    assert ran_on["a"].startswith("worker-a@"), ran_on
    assert ran_on["b"].startswith("worker-b@"), ran_on
    assert ran_on["default"].startswith("worker-a@"), ran_on  # worker-b does not consume the default queue


def test_an_unknown_queue_is_refused_naming_the_field(
    stack: Stack, dolly_file: str, tiny_teacher_dir: Path
) -> None:
    response = stack.client.http.post("/v1/jobs", json=_spec(tiny_teacher_dir, dolly_file, queue="gpu-zz"))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "resources.queue" and error["code"] == "unknown_queue"
    assert "gpu-zz" in error["message"] and stack.settings.queues[0] in error["message"]


def test_a_worker_with_fewer_devices_hands_the_job_back(
    stack: Stack, dolly_file: str, tiny_teacher_dir: Path
) -> None:
    client = stack.client
    _, b = stack.settings.queues
    big = client.create_job(_spec(tiny_teacher_dir, dolly_file, queue=b, devices=2))

    def handed_back() -> list[dict[str, Any]]:
        return [e for e in client.events(big["id"]) if e["kind"] == "queue"]

    event = wait_for(handed_back, timeout=60, what="worker-b to hand the 2-device job back")[0]
    assert event["data"]["devices"] == 1 and event["data"]["needed"] == 2
    assert event["data"]["worker_id"].startswith("worker-b@") and event["data"]["queue"] == b
    # Worker-b keeps handing it back (one event, not one per round) and still runs jobs that fit.
    small = client.create_job(_spec(tiny_teacher_dir, dolly_file, queue=b))
    done = client.wait_status(small["id"], TERMINAL, timeout=JOB_TIMEOUT_S, processes=stack.processes)
    assert done["status"] == "succeeded"
    time.sleep(3)
    job = client.job(big["id"])
    assert job["status"] == "queued" and job["attempts"] == 0
    assert len(handed_back()) == 1
    assert client.http.post(f"/v1/jobs/{big['id']}/cancel").status_code == 200
