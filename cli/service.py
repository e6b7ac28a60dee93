"""The service's commands: `distill serve` (everything on the embedded defaults), and `distill api`,
`distill worker` and `distill reaper` (the parts, for production).

The API, the worker and the reaper run as their own processes, started by module name
(`uvicorn api.main:create_app --factory`, `celery -A worker.celery_app worker`, `cli.main reaper`);
`distill serve` supervises them (`cli.processes.Supervisor`). Workers train at a lower CPU priority
(`trainer_nice`) than the API.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import socket
import sys
import threading
from pathlib import Path

from sqlalchemy.engine import make_url

from cli.processes import ServiceProcess, Supervisor, wait_until_healthy
from core.config import Settings, get_settings
from worker import process as process_control

log = logging.getLogger(__name__)

DEV_KEY_FILE = "dev-api-key"
API_APP = "api.main:create_app"
WORKER_APP = "worker.celery_app"
# How long each part of `distill serve` gets to stop on Ctrl-C before it is killed. The worker's warm
# shutdown waits for its job: a job still training then is killed and re-queued (`reap_worker`).
_WORKER_STOP_GRACE_S = 10.0
_STOP_GRACE_S = 5.0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `serve`, `api`, `worker`, `webhook-worker` and `reaper` subcommands."""
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

    webhooks = subparsers.add_parser(
        "webhook-worker", help="Run a Celery worker that sends webhook deliveries (DISTILL_WEBHOOK_QUEUE)."
    )
    webhooks.add_argument("--concurrency", type=int, default=4, help="Deliveries sent at once (threads).")
    webhooks.set_defaults(handler=run_webhook_worker)

    reaper = subparsers.add_parser(
        "reaper", help="Re-queue or fail jobs whose worker stopped sending heartbeats."
    )
    reaper.set_defaults(handler=run_reaper_command)


# ------------------------------------------------------------------------------------------- helpers
def _configure_logging() -> None:
    """Text or JSON lines (DISTILL_LOG_FORMAT), as the API logs, for serve's own process and the reaper."""
    from core.logs import configure_logging

    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)


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
        "DISTILL_STORAGE_URL": settings.storage_url,
        "DISTILL_MODEL_ROOTS": ",".join(str(root) for root in settings.model_roots),
        "DISTILL_TRAINER_THREADS": str(settings.trainer_threads),
        "DISTILL_TRAINER_NICE": str(settings.trainer_nice),
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
        "--pool", pool, "--concurrency", str(concurrency),
        "--queues", ",".join(settings.worker_queues or [settings.task_queue]),  # DISTILL_WORKER_QUEUES
        "--hostname", name, "--loglevel", "INFO", "--without-gossip", "--without-mingle",
    ]  # fmt: skip


def webhook_worker_command(settings: Settings, *, concurrency: int = 4) -> list[str]:
    """A worker for the webhook queue alone: deliveries wait on the network, so threads, and never behind a
    training job (the training worker's solo pool runs one job at a time)."""
    return [
        sys.executable, "-m", "celery", "-A", WORKER_APP, "worker",
        "--pool", "threads", "--concurrency", str(concurrency), "--queues", settings.webhook_queue,
        "--hostname", f"distill-webhooks-{secrets.token_hex(3)}@%h", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle",
    ]  # fmt: skip


def webhook_worker_env(env: dict[str, str]) -> dict[str, str]:
    """The webhook worker's environment: it trains nothing, so it leaves the worker metrics port (the
    training worker's job-duration histogram) to the training worker on the same host."""
    return env | {"DISTILL_WORKER_METRICS_PORT": "0"}


def reaper_command() -> list[str]:
    return [sys.executable, "-m", "cli.main", "reaper"]


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
    env = service_env(settings)
    if args.workers > 1 and not env.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each uvicorn worker counts its requests in files there; a scrape of any of them adds up all.
        from api.metrics import fresh_multiprocess_dir

        env["PROMETHEUS_MULTIPROC_DIR"] = str(fresh_multiprocess_dir(settings.home.resolve() / "prometheus"))
    os.execve(command[0], command, env)
    return 0  # not reached


def run_worker(args: argparse.Namespace) -> int:
    settings = get_settings()
    prepare_local_dirs(settings)
    command = worker_command(settings, concurrency=args.concurrency, pool=args.pool, name=args.name)
    process_control.lower_priority(settings.trainer_nice)  # kept across exec, inherited by its trainers
    os.execve(command[0], command, service_env(settings))
    return 0  # not reached


def run_webhook_worker(args: argparse.Namespace) -> int:
    settings = get_settings()
    prepare_local_dirs(settings)
    command = webhook_worker_command(settings, concurrency=args.concurrency)
    os.execve(command[0], command, webhook_worker_env(service_env(settings)))
    return 0  # not reached


def run_reaper_command(args: argparse.Namespace) -> int:
    from worker.reaper import run_reaper

    _configure_logging()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run_reaper(get_settings(), stop)
    return 0


class _ServeWorker:
    """`distill serve`'s worker: a new Celery node name at each start, so that the jobs of one that died
    can be told apart and released at once."""

    def __init__(self, settings: Settings, env: dict[str, str]) -> None:
        self.settings = settings
        self.env = env
        self.node = ""

    def start(self) -> ServiceProcess:
        self.node = f"distill-{secrets.token_hex(3)}@{socket.gethostname()}"
        command = worker_command(self.settings, name=self.node)
        return ServiceProcess(
            "worker", command, env=self.env, die_with_parent=True, nice=self.settings.trainer_nice
        )

    def exited(self, process: ServiceProcess, how: str) -> None:
        from worker.reaper import reap_worker

        reap_worker(self.settings, self.node, how)  # its jobs re-queued (or failed) at once


def run_serve(args: argparse.Namespace) -> int:
    from core.db import get_sessionmaker
    from core.tenants.keys import ensure_bootstrap_key
    from migrations.runner import upgrade_database

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
    stop, force = threading.Event(), threading.Event()

    def on_signal(*_: object) -> None:
        if stop.is_set():
            force.set()  # a second Ctrl-C: kill what is still running
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    env = service_env(settings)
    # Each in its own session (a Ctrl-C in the terminal reaches only this process, which stops them in
    # order) and killed if this process is. Stopped in this order: the worker first, so that no new
    # job starts while the others stop.
    supervisor = Supervisor()
    worker = _ServeWorker(settings, env)
    supervisor.add("worker", worker.start, on_exit=worker.exited, stop_grace_s=_WORKER_STOP_GRACE_S)
    api = api_command(args.host, args.port)
    supervisor.add(
        "api",
        lambda: ServiceProcess("api", api, env=env, die_with_parent=True),
        stop_grace_s=_STOP_GRACE_S,
    )
    supervisor.add(
        "reaper",
        lambda: ServiceProcess("reaper", reaper_command(), env=env, die_with_parent=True),
        stop_grace_s=_STOP_GRACE_S,
    )
    webhooks = webhook_worker_command(settings)  # its own process: deliveries never wait for a training job
    supervisor.add(
        "webhooks",
        lambda: ServiceProcess("webhooks", webhooks, env=webhook_worker_env(env), die_with_parent=True),
        stop_grace_s=_STOP_GRACE_S,
    )
    url = f"http://{args.host}:{args.port}"
    problem = wait_until_healthy(f"{url}/healthz", supervisor.processes, stop=stop)
    if problem is not None:
        if not stop.is_set():
            print(problem, file=sys.stderr)
        supervisor.shutdown(force)
        return 0 if stop.is_set() else 1  # Ctrl-C during start-up is not an error
    print(
        f"\nDistillery is serving on {url} (OpenAPI: {url}/docs)\n"
        f"  dashboard: {url}/ui (paste the API key)\n"
        f"  API key:   {key}\n"
        f"  database:  {make_url(settings.database_url).render_as_string()}\n"
        f"  artifacts: {settings.artifacts}\n"
        f"  models:    {', '.join(str(root) for root in settings.model_roots)}\n"
        "Press Ctrl-C to stop.\n",
        flush=True,
    )
    exit_code = 0
    while not stop.is_set():
        problem = supervisor.check()  # restarts what died, with backoff
        if problem is not None:
            print(f"{problem}; stopping", file=sys.stderr)
            exit_code = 1
            break
        stop.wait(0.5)
    log.info("shutting down: the worker (no new jobs), then the API and the reaper")
    supervisor.shutdown(force)
    return exit_code
