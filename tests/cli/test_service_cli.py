"""The service's command line: `distill db upgrade`, `distill keys create`, the development key of
`distill serve`, and the commands that start the API and the worker by module name."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli import service as service_cli
from cli.main import main
from core.config import Settings, get_settings
from core.db import get_sessionmaker
from core.tenants.keys import authenticate
from migrations.runner import current_revision, head_revision
from tests.support.services import wait_for
from worker import process as process_control


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for name in (
        "DISTILL_DATABASE_URL",
        "DISTILL_BROKER_URL",
        "DISTILL_STORAGE_DIR",
        "DISTILL_BOOTSTRAP_API_KEY",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


def test_db_upgrade_creates_the_embedded_database_and_is_idempotent(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["db", "upgrade"]) == 0
    url = get_settings().database_url
    assert (home / "distill.db").is_file() and current_revision(url) == head_revision()
    assert main(["db", "upgrade"]) == 0
    assert f"revision {head_revision()}" in capsys.readouterr().out


def test_keys_create_prints_a_working_key_alone_on_the_last_line(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["db", "upgrade"]) == 0
    capsys.readouterr()
    assert main(["keys", "create", "--tenant", "acme", "--name", "ci"]) == 0
    key = capsys.readouterr().out.rstrip("\n").splitlines()[-1]
    assert key.startswith("dk_") and " " not in key
    with get_sessionmaker(get_settings().database_url)() as session:
        tenant = authenticate(session, key)
        assert tenant is not None and tenant.name == "acme"


def test_the_development_key_is_kept_across_restarts(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, database_url="sqlite://", broker_url="memory://")
    first = service_cli.development_key(settings)
    assert first.startswith("dk_") and service_cli.development_key(settings) == first
    assert (tmp_path / service_cli.DEV_KEY_FILE).stat().st_mode & 0o077 == 0  # readable by its owner only
    configured = Settings(
        home=tmp_path, database_url="sqlite://", bootstrap_api_key="dk_configured_0123456789"
    )
    assert service_cli.development_key(configured) == "dk_configured_0123456789"


def test_service_processes_are_started_by_module_name(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, task_queue="q1")
    api = service_cli.api_command("0.0.0.0", 9000, workers=2)
    assert api[1:] == ["-m", "uvicorn", "api.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "9000", "--workers", "2"]  # fmt: skip
    worker = service_cli.worker_command(settings)
    assert worker[1:6] == ["-m", "celery", "-A", "worker.celery_app", "worker"]
    assert worker[worker.index("--pool") + 1] == "solo" and worker[worker.index("--queues") + 1] == "q1"
    assert service_cli.worker_command(settings, concurrency=2)[worker.index("--pool") + 1] == "prefork"
    assert service_cli.reaper_command()[1:] == ["-m", "cli.main", "reaper"]
    env = service_cli.service_env(settings.model_copy(update={"trainer_nice": 4}))
    assert (
        env["DISTILL_DATABASE_URL"] == settings.database_url
        and env["DISTILL_BROKER_URL"] == settings.broker_url
        and env["DISTILL_TRAINER_NICE"] == "4"
    )


def test_distill_worker_trains_at_the_configured_niceness(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DISTILL_")}
    env |= {"DISTILL_HOME": str(tmp_path), "DISTILL_TRAINER_NICE": "6"}
    worker = subprocess.Popen([sys.executable, "-m", "cli.main", "worker"], env=env, start_new_session=True)
    try:
        # The niceness is set before `distill worker` becomes the Celery worker (exec), and stays.
        cmdline = Path(f"/proc/{worker.pid}/cmdline")
        wait_for(lambda: b"celery" in cmdline.read_bytes(), timeout=30, what="the exec into celery")
        assert os.getpriority(os.PRIO_PROCESS, worker.pid) == max(6, os.getpriority(os.PRIO_PROCESS, 0))
    finally:
        process_control.stop([worker], grace_s=5)


def test_reaper_logs_json_lines_when_asked(tmp_path: Path) -> None:
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from migrations.runner import upgrade_database

    url = f"sqlite:///{tmp_path / 'distill.db'}"
    upgrade_database(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")}
    env |= {"DISTILL_HOME": str(tmp_path), "DISTILL_DATABASE_URL": url, "DISTILL_LOG_FORMAT": "json"}
    reaper = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "reaper"], env=env, stderr=subprocess.PIPE, text=True
    )
    time.sleep(3)
    reaper.send_signal(signal.SIGTERM)
    _, err = reaper.communicate(timeout=30)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "the reaper logged nothing"
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert any("reaper started" in record["message"] for record in records)
    assert all({"level", "logger", "message"} <= record.keys() for record in records)


def test_the_webhook_worker_leaves_the_metrics_port_alone() -> None:
    env = service_cli.webhook_worker_env({"DISTILL_WORKER_METRICS_PORT": "9100", "PATH": "/bin"})
    assert env == {"DISTILL_WORKER_METRICS_PORT": "0", "PATH": "/bin"}
