"""Faults with real processes (API, Celery workers, reaper and trainers; PostgreSQL and Redis): nothing is
lost and nothing is counted twice.

- Workers killed with SIGKILL at random points of 10 jobs, before and after their first checkpoint: all 10
  succeed, with every step's metrics, evaluations and checkpoints exactly once.
- A trainer killed on its own after a checkpoint is retried from it; a cancelled job resumed by the user
  finishes; an event stream reconnecting with Last-Event-ID while a job runs gets every event once.
- A Redis without persistence restarted under 1 running and 5 queued jobs: /readyz says the queue was lost,
  the reaper sends the messages again, and all 6 succeed.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from core.db import session_scope
from core.jobs.models import Checkpoint, Job, JobEvent
from core.jobs.states import JobStatus
from tests.support.services import (
    REDIS_URL,
    TERMINAL,
    ApiClient,
    Stack,
    free_port,
    fresh_postgres_database,
    make_settings,
    require_redis,
    tiny_spec,
    wait_for,
    write_dolly_subset,
)

# Long end-to-end runs: `make test-slow` (and CI) runs them; the default suite stays near 10 minutes.
pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

MAX_STEPS, CHECKPOINT_EVERY = 24, 12
SEED = int(os.environ.get("DISTILL_FAULTS_SEED", "20261201"))


def spec(teacher: Path, train: str, evaluation: str, **training: Any) -> dict[str, Any]:
    schedule = {"max_steps": MAX_STEPS, "checkpoint_every": CHECKPOINT_EVERY, "eval_every": CHECKPOINT_EVERY}
    body = tiny_spec(teacher, train, **(schedule | training))
    body["data"]["eval"] = evaluation
    body["evaluation"] = {"max_records": 2, "max_new_tokens": 4}
    return body


def stack_settings(tmp: Path, database_url: str, broker_url: str, teacher: Path, key: str, **values: Any):  # type: ignore[no-untyped-def]
    return make_settings(
        tmp,
        database_url=database_url,
        broker_url=broker_url,
        model_roots=[teacher.parent],
        bootstrap_api_key=key,
        heartbeat_interval_s=0.5,
        stale_after_s=3,
        reaper_interval_s=0.5,
        **values,
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> Iterator[Stack]:
    """PostgreSQL, the shared Redis (a queue of our own), an API, two workers and a reaper."""
    require_redis()
    tmp = tmp_path_factory.mktemp("faults")
    with fresh_postgres_database() as url:
        key = f"dk_test_{uuid.uuid4().hex}"
        stack = Stack(stack_settings(tmp, url, REDIS_URL, tiny_teacher_dir, key), tmp / "logs", key=key)
        try:
            stack.start_worker()
            stack.start_worker()
            stack.start_reaper()
            stack.client.wait_ready(stack.processes)
            yield stack
        finally:
            stack.stop()


@pytest.fixture(scope="module")
def data(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(train file id, eval file id) uploaded to the module's stack."""
    tmp = tmp_path_factory.mktemp("faults-data")
    train = stack.client.upload(write_dolly_subset(tmp / "train.jsonl"))
    evaluation = stack.client.upload(write_dolly_subset(tmp / "eval.jsonl", 4), purpose="eval")
    return train, evaluation


# ------------------------------------------------------------------------------------------ checks
def assert_every_step_once(
    client: ApiClient, job_id: str, *, checkpoints: bool = True, max_steps: int = MAX_STEPS
) -> list[dict]:
    """Every step's metric, evaluation and checkpoint exactly once; returns the job's events."""
    eval_steps = [0, *range(CHECKPOINT_EVERY, max_steps + 1, CHECKPOINT_EVERY)]
    series = client.http.get(f"/v1/jobs/{job_id}/metrics", params={"names": "loss,eval_loss"}).json()
    series = series["series"]
    assert [p["step"] for p in series["loss"]] == list(range(1, max_steps + 1)), series["loss"]
    assert [p["step"] for p in series["eval_loss"]] == eval_steps, series["eval_loss"]
    events = client.events(job_id)
    assert sorted(e["data"]["step"] for e in events if e["kind"] == "eval") == eval_steps
    if checkpoints:
        saved = sorted(e["data"]["step"] for e in events if e["kind"] == "checkpoint")
        assert saved == list(range(CHECKPOINT_EVERY, max_steps + 1, CHECKPOINT_EVERY)), saved
    assert sum(e["kind"] == "done" for e in events) == 1
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids))
    return events


def start_steps(events: list[dict]) -> list[int]:
    return [e["data"]["start_step"] for e in events if e["kind"] == "start"]


def job_row(stack: Stack, job_id: str) -> Job:
    with session_scope(stack.settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def trainer_pid(worker_pid: int) -> int | None:
    """The trainer process a worker started (its child running worker.trainer_process), if any."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == worker_pid and b"worker.trainer_process" in (entry / "cmdline").read_bytes():
                return int(entry.name)
    return None


# ----------------------------------------------------------------------------------- killed workers
def test_workers_killed_at_random_steps_lose_nothing(
    stack: Stack, data: tuple[str, str], tiny_teacher_dir: Path
) -> None:
    """10 jobs; each job's worker is killed once, a random moment after its training started (before the
    checkpoint of step 12) or after that checkpoint. A new worker replaces each killed one."""
    rng = random.Random(SEED)
    client = stack.client
    jobs = [client.create_job(spec(tiny_teacher_dir, *data))["id"] for _ in range(10)]
    plans = dict(zip(jobs, rng.sample(["before"] * 5 + ["after"] * 5, 10), strict=True))
    # Training's 12 steps before the checkpoint take about 0.4 s on an idle machine, the 12 after it
    # (with the last evaluation and the student) a little more.
    delays = {job_id: rng.uniform(0.0, 0.25 if plans[job_id] == "before" else 0.1) for job_id in jobs}
    armed: dict[str, float] = {}  # job → when to kill its worker
    killed: dict[str, int] = {}  # job → the step its progress showed when its worker was killed
    deadline = time.monotonic() + 240
    while len(killed) < len(jobs):
        assert time.monotonic() < deadline, f"killed {len(killed)} of 10: {killed}"
        with session_scope(stack.settings.database_url) as session:
            running = session.execute(
                select(Job.id, Job.worker_id, Job.current_step).where(Job.status == JobStatus.RUNNING)
            ).all()
            for job_id, _worker_id, _step in running:
                if job_id in killed or job_id in armed:
                    continue
                if plans[job_id] == "before":
                    ready = session.scalar(
                        select(JobEvent.id).where(JobEvent.job_id == job_id, JobEvent.kind == "start")
                    )
                else:
                    ready = session.scalar(select(Checkpoint.id).where(Checkpoint.job_id == job_id))
                if ready is not None:
                    armed[job_id] = time.monotonic() + delays[job_id]
            now = time.monotonic()
            for job_id, worker_id, step in running:
                if job_id in armed and now >= armed[job_id] and job_id not in killed:
                    pid = int(worker_id.rsplit(":", 1)[1])
                    [worker] = [w for w in stack.workers if w.pid == pid]
                    worker.process.kill()  # kill -9: no shutdown, no ack; its trainer dies with it
                    worker.process.wait(timeout=10)
                    killed[job_id] = step
                    stack.start_worker()
        for job_id in list(armed):  # a job that ended before its kill came would never be killed
            assert job_id in killed or client.job(job_id)["status"] not in TERMINAL, (job_id, plans)
        time.sleep(0.02)

    resumed_from = {}
    for job_id in jobs:
        done = client.wait_status(job_id, TERMINAL, timeout=180, processes=stack.processes)
        assert done["status"] == "succeeded", (done, [w.output() for w in stack.workers])
        assert done["attempts"] == 2, done
        events = assert_every_step_once(client, job_id)
        starts = start_steps(events)
        assert len(starts) == 2 and starts[0] == 0 and starts[1] in (0, 12, 24), starts
        resumed_from[job_id] = starts[1]
    # Both cases happened: attempts that restarted from scratch and attempts resumed from a checkpoint.
    counts = Counter(step > 0 for step in resumed_from.values())
    assert counts[False] >= 3 and counts[True] >= 3, (resumed_from, killed, plans)
    for status in ("running", "cancelling", "queued"):
        assert client.http.get("/v1/jobs", params={"status": status}).json()["data"] == []


# -------------------------------------------------------------------- a crash, a resume, a stream
def test_a_trainer_killed_after_a_checkpoint_is_retried(
    stack: Stack, data: tuple[str, str], tiny_teacher_dir: Path
) -> None:
    client = stack.client
    job_id = client.create_job(spec(tiny_teacher_dir, *data))["id"]
    wait_for(
        lambda: client.http.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"],
        timeout=120,
        what="a first checkpoint",
    )
    worker_pid = int(job_row(stack, job_id).worker_id.rsplit(":", 1)[1])  # type: ignore[union-attr]
    pid = trainer_pid(worker_pid)
    assert pid is not None and client.job(job_id)["status"] == "running"
    os.kill(pid, signal.SIGKILL)  # the OOM killer's way: the worker itself lives on
    done = client.wait_status(job_id, TERMINAL, timeout=120, processes=stack.processes)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    events = assert_every_step_once(client, job_id)
    # From the checkpoint it had when it was killed (a busy machine may have reached the next one first).
    starts = start_steps(events)
    assert starts[0] == 0 and starts[1] in range(CHECKPOINT_EVERY, MAX_STEPS + 1, CHECKPOINT_EVERY), starts
    messages = "\n".join(e["message"] for e in events)
    assert "killed by SIGKILL" in messages and "re-queued to resume from" in messages, messages


def test_a_cancelled_job_resumed_by_the_user_finishes(
    stack: Stack, data: tuple[str, str], tiny_teacher_dir: Path
) -> None:
    client = stack.client
    # Long enough that the cancel, sent at the first checkpoint, lands before the end (on a busy machine
    # a stop takes a second or two to reach the trainer, dozens of tiny steps).
    job_id = client.create_job(spec(tiny_teacher_dir, *data, max_steps=10 * MAX_STEPS))["id"]
    wait_for(
        lambda: client.http.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"],
        timeout=120,
        what="a first checkpoint",
    )
    assert client.http.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    cancelled = client.wait_status(job_id, TERMINAL, timeout=60, processes=stack.processes)
    assert cancelled["status"] == "cancelled", cancelled
    response = client.http.post(f"/v1/jobs/{job_id}/resume")
    assert response.status_code == 200 and response.json()["status"] in ("queued", "running"), response.text
    done = client.wait_status(job_id, TERMINAL, timeout=240, processes=stack.processes)
    assert done["status"] == "succeeded" and done["attempts"] == 1 and done["error"] is None, done
    events = assert_every_step_once(client, job_id, checkpoints=False, max_steps=10 * MAX_STEPS)
    starts = start_steps(events)
    assert len(starts) == 2 and starts[1] >= CHECKPOINT_EVERY, starts
    assert any("resumed by the user" in e["message"] for e in events)


def test_a_stream_reconnecting_mid_run_gets_every_event_once(
    stack: Stack, data: tuple[str, str], tiny_teacher_dir: Path
) -> None:
    """The client drops the connection after every 3 events and reconnects with Last-Event-ID while the
    worker writes them (a checkpoint and an evaluation every 2 steps)."""
    client = stack.client
    job_id = client.create_job(spec(tiny_teacher_dir, *data, checkpoint_every=2, eval_every=2))["id"]
    received: list[int] = []
    connections = 0
    deadline = time.monotonic() + 120
    ended = False
    while not ended:
        assert time.monotonic() < deadline, f"the stream did not end; received {received}"
        headers = {"Last-Event-ID": str(received[-1])} if received else {}
        connections += 1
        with client.http.stream(
            "GET", f"/v1/jobs/{job_id}/events", params={"stream": "true"}, headers=headers
        ) as response:
            assert response.status_code == 200
            batch = 0
            ended = True  # unless this connection is dropped on purpose below
            for line in response.iter_lines():
                if line.startswith("id:"):
                    received.append(int(line.removeprefix("id:")))
                    batch += 1
                    if batch == 3:
                        ended = False
                        break
    assert client.job(job_id)["status"] == "succeeded"
    listed = [e["id"] for e in client.events(job_id)]
    assert received == listed, (received, listed)
    assert connections > 10 and len(listed) > 30


# ------------------------------------------------------------------------------ a restarted Redis
class RedisServer:
    """A redis-server of this test's own, without persistence: a restart empties it."""

    def __init__(self, port: int, log_dir: Path) -> None:
        self.port, self.log_dir = port, log_dir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.log_dir / f"redis-{self.port}.log").open("ab")
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "no", "--daemonize", "no", "--dir", str(self.log_dir)]
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(self._answers, timeout=10, what=f"redis-server on port {self.port}")

    def _answers(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if subprocess.run(["which", "redis-server"], capture_output=True).returncode != 0:
        pytest.skip("redis-server is not installed")
    server = RedisServer(free_port(), tmp_path)
    server.start()
    yield server
    server.kill()


def test_a_redis_restart_loses_no_job(
    redis_server: RedisServer, tmp_path: Path, tiny_teacher_dir: Path
) -> None:
    with fresh_postgres_database() as url:
        key = f"dk_test_{uuid.uuid4().hex}"
        settings = stack_settings(tmp_path, url, redis_server.url, tiny_teacher_dir, key, requeue_after_s=3)
        stack = Stack(settings, tmp_path / "logs", key=key)
        try:
            stack.start_worker()
            client = stack.client
            client.wait_ready(stack.processes)
            train = client.upload(write_dolly_subset(tmp_path / "train.jsonl"))
            evaluation = client.upload(write_dolly_subset(tmp_path / "eval.jsonl", 4), purpose="eval")
            jobs = [client.create_job(spec(tiny_teacher_dir, train, evaluation))["id"] for _ in range(6)]
            wait_for(
                lambda: client.job(jobs[0])["status"] == "running", timeout=60, what="the first job to run"
            )
            assert [client.job(j)["status"] for j in jobs[1:]] == ["queued"] * 5

            redis_server.kill()  # without persistence: the 5 queued messages are gone
            redis_server.start()

            # No reaper yet: once the jobs have waited requeue_after_s, /readyz says what happened.
            def lost_queue() -> str | None:
                response = client.http.get("/readyz")
                broker = response.json()["checks"]["broker"]
                return broker if response.status_code == 503 and "5 jobs queued" in broker else None

            lost = wait_for(lost_queue, timeout=30, what="/readyz to report the 5 lost messages")
            assert "holds 0 messages" in lost, lost

            stack.start_reaper()
            for job_id in jobs:
                done = client.wait_status(job_id, TERMINAL, timeout=180, processes=stack.processes)
                assert done["status"] == "succeeded", (done, [p.output() for p in stack.processes])
                assert done["attempts"] == 1, done
                assert_every_step_once(client, job_id)
            resent = [e for job_id in jobs[1:] for e in client.events(job_id) if e["kind"] == "queue"]
            assert len(resent) >= 5 and all("sent again" in e["message"] for e in resent)
            assert client.http.get("/readyz").status_code == 200
        finally:
            stack.stop()
