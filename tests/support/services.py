"""Helpers and fixtures for the worker and end-to-end tests: fresh databases, seeded jobs, service
processes (uvicorn, Celery workers, the reaper, `distill serve`) and a small API client.

Each test session gets its own PostgreSQL database and Celery queue name, so several test runs can share
the local PostgreSQL and Redis servers without stealing each other's messages.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from cli.processes import ServiceProcess, stop_all
from core.config import Settings
from core.db import session_scope
from core.files.models import File
from core.jobs.models import Job
from core.jobs.states import JobStatus
from core.storage import Storage
from core.tenants.models import Tenant
from migrations.runner import upgrade_database
from tests.conftest import service_unavailable

REPO_ROOT = Path(__file__).resolve().parents[2]
POSTGRES_URL = os.environ.get(
    "DISTILL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("DISTILL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TERMINAL = {"succeeded", "failed", "cancelled"}


# ------------------------------------------------------------------------------------------ servers
def _reachable(url: str, default_port: int) -> bool:
    parsed = make_url(url)
    try:
        with socket.create_connection((parsed.host or "127.0.0.1", parsed.port or default_port), timeout=1):
            return True
    except OSError:
        return False


def require_postgres() -> None:
    if not _reachable(POSTGRES_URL, 5432):
        service_unavailable(f"PostgreSQL is not reachable at {POSTGRES_URL}")


def require_redis() -> None:
    if not _reachable(REDIS_URL, 6379):
        service_unavailable(f"Redis is not reachable at {REDIS_URL}")


@contextlib.contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, migrated PostgreSQL database (dropped afterwards); yields its URL."""
    require_postgres()
    name = f"distill_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade_database(url)
        yield url
    finally:
        from core.db import get_engine

        get_engine(url).dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def sqlite_database(directory: Path) -> str:
    """A new, migrated SQLite database file in `directory`; returns its URL."""
    directory.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{directory / 'distill.db'}"
    upgrade_database(url)
    return url


def make_settings(home: Path, *, database_url: str, broker_url: str | None = None, **values: Any) -> Settings:
    """Settings for a test service under `home`, with its own queue name and one-thread trainers (the test
    machine's cores are shared by the API, the workers and the tests themselves)."""
    return Settings(
        home=home,
        database_url=database_url,
        broker_url=broker_url or f"sqla+sqlite:///{home / 'broker.db'}",
        storage_dir=home / "artifacts",
        task_queue=f"distill-test-{uuid.uuid4().hex[:8]}",
        **({"trainer_threads": 1} | values),
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The DISTILL_* environment that makes a subprocess resolve exactly `settings`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("DISTILL_")}
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        env[f"DISTILL_{name.upper()}"] = ",".join(value) if isinstance(value, list) else str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# -------------------------------------------------------------------------------------- seeded rows
def tiny_spec(teacher_dir: Path, train: str, **training: Any) -> dict[str, Any]:
    """A job spec small enough to train in seconds on a CPU: tiny models, max_length 64."""
    return {
        "teacher": {"model": str(teacher_dir)},
        "student": {"from_teacher_layers": [0, 2]},
        "data": {"train": train, "max_length": 64, "max_prompt_length": 32},
        "loss": {"name": "amid", "alpha": 0.5, "lam": 0.1},
        "training": {
            "max_steps": 6,
            "batch_size": 2,
            "checkpoint_every": 3,
            "eval_every": 0,
            "learning_rate": 1e-3,
            **training,
        },
    }


def write_dolly_subset(path: Path, records: int = 32) -> Path:
    """The first `records` lines of the bundled Dolly training file."""
    lines = (REPO_ROOT / "data" / "dolly" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines[:records]) + "\n", encoding="utf-8")
    return path


def seed_job(settings: Settings, spec: dict[str, Any], *, tenant: str = "acme", max_attempts: int = 3) -> str:
    """Insert a tenant, an uploaded Dolly subset (as data.train) and a queued job; return the job id."""
    storage = Storage(settings.artifacts)
    with session_scope(settings.database_url) as session:
        row = Tenant(name=f"{tenant}-{uuid.uuid4().hex[:6]}")
        session.add(row)
        session.flush()
        file = File(
            tenant_id=row.id,
            filename="dolly.jsonl",
            size_bytes=0,
            sha256="0" * 64,
            records=32,
            storage_path="",
        )
        session.add(file)
        session.flush()
        path = write_dolly_subset(storage.file_path(row.id, file.id))
        file.storage_path = storage.relative(path)
        spec = {**spec, "data": {**spec["data"], "train": file.id}}
        job = Job(
            tenant_id=row.id,
            status=JobStatus.QUEUED,
            spec=spec,
            total_steps=spec.get("training", {}).get("max_steps", 200),
            max_attempts=max_attempts,
            latest_metrics={},
        )
        session.add(job)
        session.flush()
        return job.id


# ----------------------------------------------------------------------------------------- processes
def start_service(name: str, command: list[str], env: dict[str, str], log_dir: Path) -> ServiceProcess:
    """A service subprocess (its own session) writing to a fresh log file in `log_dir`."""
    log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
    return ServiceProcess(name, command, env=env, log_path=log_path, cwd=REPO_ROOT)


def distill_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(
    predicate: Callable[[], Any], *, timeout: float, interval: float = 0.25, what: str = "condition"
) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------- API client
class ApiClient:
    """A thin client of the HTTP API for tests."""

    def __init__(self, base_url: str, key: str) -> None:
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    def wait_ready(self, processes: list[ServiceProcess], timeout: float = 60) -> None:
        def ready() -> bool:
            for process in processes:
                if not process.alive():
                    pytest.fail(f"{process.name} exited early:\n{process.output()}")
            try:
                return self.http.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=timeout, what="the API to answer /healthz")

    def upload(self, path: Path, purpose: str = "train") -> str:
        with path.open("rb") as handle:
            response = self.http.post(
                "/v1/files",
                files={"file": (path.name, handle, "application/jsonl")},
                data={"purpose": purpose},
            )
        assert response.status_code in (200, 201), response.text
        return response.json()["id"]

    def create_job(self, spec: dict[str, Any], **headers: str) -> dict[str, Any]:
        response = self.http.post("/v1/jobs", json=spec, headers=headers)
        assert response.status_code in (200, 201, 202), response.text
        return response.json()

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def events(self, job_id: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 1000}
        while True:
            response = self.http.get(f"/v1/jobs/{job_id}/events", params=params)
            assert response.status_code == 200, response.text
            body = response.json()
            events += body["data"]
            if not body["has_more"]:
                return events
            params["after"] = body["next_cursor"]

    def wait_status(
        self, job_id: str, statuses: set[str], *, timeout: float, processes: list[ServiceProcess] = ()
    ) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            for process in processes:
                if not process.alive():
                    pytest.fail(f"{process.name} exited:\n{process.output()}")
            job = self.job(job_id)
            return job if job["status"] in statuses else None

        return wait_for(reached, timeout=timeout, what=f"job {job_id} to reach {sorted(statuses)}")


class Stack:
    """An API server, Celery workers and (optionally) a reaper, each a real `distill` subprocess."""

    def __init__(self, settings: Settings, log_dir: Path, *, key: str) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.env = settings_env(settings)
        self.port = free_port()
        self.api = start_service("api", distill_command("api", "--port", str(self.port)), self.env, log_dir)
        self.workers: list[ServiceProcess] = []
        self.others: list[ServiceProcess] = []
        self.client = ApiClient(f"http://127.0.0.1:{self.port}", key)

    def start_worker(self, *args: str, **env: str) -> ServiceProcess:
        """A `distill worker` with extra arguments (`--name`) and environment (DISTILL_WORKER_QUEUES=...)."""
        worker = start_service("worker", distill_command("worker", *args), self.env | env, self.log_dir)
        self.workers.append(worker)
        return worker

    def start_reaper(self) -> ServiceProcess:
        reaper = start_service("reaper", distill_command("reaper"), self.env, self.log_dir)
        self.others.append(reaper)
        return reaper

    @property
    def processes(self) -> list[ServiceProcess]:
        return [self.api, *(w for w in self.workers if w.alive()), *self.others]

    def stop(self) -> None:
        stop_all([*self.others, *self.workers, self.api], grace_s=15)
        self.client.http.close()


def download(client: ApiClient, path: str, target: Path) -> Path:
    """Stream a .tar.gz download to `target`, check its size and SHA-256 headers, and extract it."""
    import hashlib
    import tarfile

    digest = hashlib.sha256()
    archive = target.with_suffix(".tar.gz")
    with client.http.stream("GET", path) as response:
        assert response.status_code == 200, response.read().decode()
        with archive.open("wb") as handle:
            for chunk in response.iter_bytes():
                digest.update(chunk)
                handle.write(chunk)
        assert int(response.headers["content-length"]) == archive.stat().st_size
        assert response.headers["x-content-sha256"] == digest.hexdigest()
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target
