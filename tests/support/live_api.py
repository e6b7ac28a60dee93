"""Fixtures for the service tests: fresh databases on SQLite and PostgreSQL, settings, and a real uvicorn
server running the API in a thread.

PostgreSQL cases use a database created for this test session on DISTILL_TEST_POSTGRES_URL's server
(default 127.0.0.1:5432, user postgres) and dropped afterwards; they are skipped only when that server is
unreachable.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from core.config import Settings
from core.db import get_engine, get_sessionmaker
from migrations.runner import upgrade_database
from tests.conftest import service_unavailable

POSTGRES_SERVER_URL = os.environ.get(
    "DISTILL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def _postgres_reachable() -> bool:
    url = make_url(POSTGRES_SERVER_URL)
    try:
        with socket.create_connection((url.host or "127.0.0.1", url.port or 5432), timeout=1):
            return True
    except OSError:
        return False


class DatabaseFactory:
    """Creates empty databases (a SQLite file, or a PostgreSQL database) and drops them at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.created: list[str] = []
        self._admin = None

    def __call__(self, backend: str) -> str:
        name = f"distill_test_{uuid.uuid4().hex[:12]}"
        if backend == "sqlite":
            return f"sqlite:///{self.directory / (name + '.db')}"
        if not _postgres_reachable():
            service_unavailable(f"PostgreSQL is not reachable at {POSTGRES_SERVER_URL}")
        if self._admin is None:
            self._admin = create_engine(POSTGRES_SERVER_URL, isolation_level="AUTOCOMMIT")
        with self._admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return make_url(POSTGRES_SERVER_URL).set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        if self._admin is None:
            return
        for name in self.created:
            url = make_url(POSTGRES_SERVER_URL).set(database=name).render_as_string(hide_password=False)
            get_engine(url).dispose()
            with self._admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self._admin.dispose()


@pytest.fixture(scope="session")
def make_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatabaseFactory]:
    """`make_database("sqlite" | "postgres") -> url` of a new, empty database (dropped after the session)."""
    factory = DatabaseFactory(tmp_path_factory.mktemp("databases"))
    yield factory
    factory.drop_all()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, make_database: DatabaseFactory) -> str:
    """A new, empty database on each backend (not migrated)."""
    return make_database(request.param)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class LiveApi:
    """A running API server: its settings and base URL, and clients authenticated as new tenants."""

    settings: Settings
    base_url: str

    def session(self) -> Session:
        """A session on the server's database."""
        return get_sessionmaker(self.settings.database_url)()

    def client(self, key: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30, **kwargs)

    def new_tenant(self, prefix: str = "tenant") -> tuple[str, str]:
        """A fresh tenant's (tenant id, API key)."""
        from core.tenants.keys import create_api_key

        with self.session() as session:
            key, plaintext = create_api_key(session, tenant_name=f"{prefix}-{uuid.uuid4().hex[:8]}")
            return key.tenant_id, plaintext


def serve_in_thread(settings: Settings) -> tuple[str, Callable[[], None]]:
    """Start uvicorn with the app for `settings` on a free port; returns its URL and a stop function."""
    from api.main import create_app

    port = free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    return f"http://127.0.0.1:{port}", stop


def service_settings(home: Path, database_url: str, **values: Any) -> Settings:
    """Settings for a test service under `home` (embedded SQLite broker: enqueue works with no worker)."""
    return Settings(
        home=home,
        database_url=database_url,
        broker_url=f"sqla+sqlite:///{home / 'broker.db'}",
        storage_dir=home / "artifacts",
        task_queue=f"distill-test-{uuid.uuid4().hex[:8]}",
        **values,
    )


UPLOAD_LIMIT = 64 * 1024


@pytest.fixture(scope="module", params=BACKENDS)
def live_api(
    request: pytest.FixtureRequest,
    make_database: DatabaseFactory,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_teacher_dir: Path,
) -> Iterator[LiveApi]:
    """A migrated database on each backend and a real uvicorn server in front of it."""
    url = make_database(request.param)
    upgrade_database(url)
    home = tmp_path_factory.mktemp(f"service-{request.param}")
    settings = service_settings(
        home, url, model_roots=[tiny_teacher_dir.parent], max_upload_bytes=UPLOAD_LIMIT, max_attempts=2
    )
    base_url, stop = serve_in_thread(settings)
    yield LiveApi(settings=settings, base_url=base_url)
    stop()
