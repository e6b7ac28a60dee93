"""The service's commands: `distill serve` (everything on the embedded defaults), and `distill api`,
`distill worker` and `distill reaper` (the parts, for production).

The API and the worker run as their own processes, started by module name
(`uvicorn api.main:create_app --factory`, `celery -A worker.celery_app worker`).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

from sqlalchemy.engine import make_url

from cli.processes import ServiceProcess, stop_all, wait_until_healthy
from core.config import Settings, get_settings

DEV_KEY_FILE = "dev-api-key"
API_APP = "api.main:create_app"
WORKER_APP = "worker.celery_app"
_SHUTDOWN_GRACE_S = 10.0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `serve`, `api`, `worker` and `reaper` subcommands."""
    serve = subparsers.add_parser("serve", help="Run the API, one worker and the reaper together.")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(handler=run_serve)

    api = subparsers.add_parser("api", help="Run the HTTP API (uvicorn).")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1, help="uvicorn worker processes.")
    api.set_defaults(handler=run_api)

    worker = subparsers.add_parser("worker", help="Run a Celery worker that trains jobs.")
    worker.add_argument("--concurrency", type=int, default=1, help="Jobs run at once (one process each).")
    worker.add_argument("--pool", choices=["solo", "prefork"], default=None, help="Default: solo for 1 job.")
    worker.add_argument("--name", default=None, help="Celery node name (default: distill-<random>@host).")
    worker.set_defaults(handler=run_worker)

    reaper = subparsers.add_parser(
        "reaper", help="Re-queue or fail jobs whose worker stopped sending heartbeats."
    )
    reaper.set_defaults(handler=run_reaper_command)


# ------------------------------------------------------------------------------------------- helpers
def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _sqlite_file(url: str) -> Path | None:
    if not url.startswith(("sqlite", "sqla+sqlite")):
        return None
    database = make_url(url.removeprefix("sqla+")).database
    return Path(database) if database and database != ":memory:" else None


def prepare_local_dirs(settings: Settings) -> None:
    """Create the folders the embedded defaults write to (SQLite files, artifacts)."""
    for url in (settings.database_url, settings.broker_url):
        path = _sqlite_file(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    settings.artifacts.mkdir(parents=True, exist_ok=True)


def service_env(settings: Settings) -> dict[str, str]:
    """The environment for a service subprocess: these settings, spelled out, so it resolves the same."""
    return {
        **os.environ,
        "DISTILL_HOME": str(settings.home.resolve()),
        "DISTILL_DATABASE_URL": settings.database_url,
        "DISTILL_BROKER_URL": settings.broker_url,
        "DISTILL_STORAGE_DIR": str(settings.artifacts),
        "DISTILL_MODEL_ROOTS": ",".join(str(root) for root in settings.model_roots),
        "DISTILL_TRAINER_THREADS": str(settings.trainer_threads),
        "PYTHONUNBUFFERED": "1",
    }


def api_command(host: str, port: int, workers: int = 1) -> list[str]:
    command = [sys.executable, "-m", "uvicorn", API_APP, "--factory", "--host", host, "--port", str(port)]
    return [*command, "--workers", str(workers)] if workers > 1 else command


def worker_command(
    settings: Settings, *, concurrency: int = 1, pool: str | None = None, name: str | None = None
) -> list[str]:
    pool = pool or ("solo" if concurrency == 1 else "prefork")
    name = name or f"distill-{secrets.token_hex(3)}@%h"
    return [
        sys.executable, "-m", "celery", "-A", WORKER_APP, "worker",
        "--pool", pool, "--concurrency", str(concurrency), "--queues", settings.task_queue,
        "--hostname", name, "--loglevel", "INFO", "--without-gossip", "--without-mingle",
    ]  # fmt: skip


def development_key(settings: Settings) -> str:
    """The bootstrap key if configured, else the one kept in `home/dev-api-key` (made on first use)."""
    if settings.bootstrap_api_key:
        return settings.bootstrap_api_key
    path = settings.home.resolve() / DEV_KEY_FILE
    if path.is_file() and path.read_text(encoding="utf-8").strip():
        return path.read_text(encoding="utf-8").strip()
    from core.tenants.keys import KEY_PREFIX

    key = KEY_PREFIX + secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(key + "\n")
    return key


# ------------------------------------------------------------------------------------------ commands
def run_api(args: argparse.Namespace) -> int:
    settings = get_settings()
    prepare_local_dirs(settings)
    command = api_command(args.host, args.port, args.workers)
    os.execve(command[0], command, service_env(settings))
    return 0  # not reached


def run_worker(args: argparse.Namespace) -> int:
    settings = get_settings()
    prepare_local_dirs(settings)
    command = worker_command(settings, concurrency=args.concurrency, pool=args.pool, name=args.name)
    os.execve(command[0], command, service_env(settings))
    return 0  # not reached


def run_reaper_command(args: argparse.Namespace) -> int:
    from worker.reaper import run_reaper

    _configure_logging()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run_reaper(get_settings(), stop)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from core.db import get_sessionmaker
    from core.tenants.keys import ensure_bootstrap_key
    from migrations.runner import upgrade_database
    from worker.reaper import run_reaper

    _configure_logging()
    settings = get_settings()
    prepare_local_dirs(settings)
    upgrade_database(settings.database_url)
    key = development_key(settings)
    with get_sessionmaker(settings.database_url)() as session:
        ensure_bootstrap_key(session, key)

    if not settings.trainer_threads:
        # The API shares this machine with the trainer: leave it a core (see Settings.trainer_threads).
        settings.trainer_threads = max(1, len(os.sched_getaffinity(0)) - 1)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    env = service_env(settings)
    # Own sessions: a Ctrl-C in the terminal reaches only this process, which shuts the others down in order.
    processes = [
        ServiceProcess("api", api_command(args.host, args.port), env=env),
        ServiceProcess("worker", worker_command(settings), env=env),
    ]
    reaper = threading.Thread(target=run_reaper, args=(settings, stop), name="reaper", daemon=True)
    reaper.start()
    url = f"http://{args.host}:{args.port}"
    problem = wait_until_healthy(f"{url}/healthz", processes, stop=stop)
    if problem is not None:
        if not stop.is_set():
            print(problem, file=sys.stderr)
        stop_all(processes, grace_s=_SHUTDOWN_GRACE_S)
        return 0 if stop.is_set() else 1  # Ctrl-C during start-up is not an error
    print(
        f"\nDistillery is serving on {url} (OpenAPI: {url}/docs)\n"
        f"  API key:   {key}\n"
        f"  database:  {make_url(settings.database_url).render_as_string()}\n"
        f"  artifacts: {settings.artifacts}\n"
        f"  models:    {', '.join(str(root) for root in settings.model_roots)}\n"
        "Press Ctrl-C to stop.\n",
        flush=True,
    )
    exit_code = 0
    while not stop.is_set():
        for service in processes:
            if not service.alive():
                print(
                    f"the {service.name} process exited with code {service.returncode}; stopping",
                    file=sys.stderr,
                )
                exit_code = 1
                stop.set()
        stop.wait(0.5)
    # A job still training when the worker stops stays `running` until the reaper of the next start
    # re-queues it (after `stale_after_s`); it then resumes from its last checkpoint.
    stop_all(processes, grace_s=_SHUTDOWN_GRACE_S)
    reaper.join(timeout=5)
    return exit_code
