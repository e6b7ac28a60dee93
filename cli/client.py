"""`distill jobs ...` and `distill files ...`: the service from a terminal or a pipeline step, on the SDK.

    distill jobs create job.yaml --wait          # uploads local data, waits, exits 0 only on success
    distill jobs watch job_...                   # a live progress bar following the event stream
    distill jobs download job_... -o out/ [--checkpoint 50]
    distill files list --json
    distill sweeps create job.yaml --grid loss.alpha=-1,0.5 --grid loss.lam=0.1,0.3 --max-parallel 2 --wait

`--api-url` / `--api-key` default to DISTILL_API_URL / DISTILL_API_KEY. Exit codes, for pipelines:
0 succeeded (or the command did what it was asked), 1 the job failed, 3 cancelled, 4 timed out,
5 the API refused the request or could not be reached, 2 usage errors.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED, EXIT_TIMEOUT, EXIT_API = 0, 1, 2, 3, 4, 5
_STATUS_EXIT = {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `jobs` and `files` subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--api-url", default=None, help="Default: DISTILL_API_URL or http://127.0.0.1:8000.")
    common.add_argument("--api-key", default=None, help="Default: DISTILL_API_KEY.")
    common.add_argument("--json", action="store_true", help="Print JSON (for scripts).")

    jobs = subparsers.add_parser("jobs", help="Create, follow and download jobs on a Distillery server.")
    job_commands = jobs.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")
    create = job_commands.add_parser("create", parents=[common], help="Create a job from a YAML/JSON spec.")
    create.add_argument("spec", type=Path, help="Job spec; local data paths are uploaded first.")
    create.add_argument("--wait", action="store_true", help="Follow the job until it ends.")
    create.add_argument("--timeout", type=float, default=None, help="With --wait: give up after N seconds.")
    create.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    create.add_argument("--idempotency-key", default=None)
    create.set_defaults(handler=run_create)

    listing = job_commands.add_parser("list", parents=[common], help="List jobs, newest first.")
    listing.add_argument("--status", default=None)
    listing.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    listing.add_argument("--limit", type=int, default=20, help="At most this many jobs (0: all).")
    listing.set_defaults(handler=run_list)

    for name, help_text in (
        ("get", "Show a job."),
        ("cancel", "Cancel a job."),
        ("pause", "Checkpoint and pause a running job."),
        ("resume", "Resume a paused, failed or cancelled job from its checkpoint."),
    ):
        command = job_commands.add_parser(name, parents=[common], help=help_text)
        command.add_argument("job_id")
        command.set_defaults(handler=run_job_action, action=name)

    watch = job_commands.add_parser("watch", parents=[common], help="Follow a job live until it ends.")
    watch.add_argument("job_id")
    watch.add_argument("--timeout", type=float, default=None)
    watch.set_defaults(handler=run_watch)

    download = job_commands.add_parser(
        "download", parents=[common], help="Download the student or a checkpoint."
    )
    download.add_argument("job_id")
    download.add_argument("-o", "--output", type=Path, default=Path("."), help="Directory (default: .).")
    download.add_argument("--checkpoint", type=int, default=None, metavar="STEP")
    download.set_defaults(handler=run_download)

    _register_sweeps(subparsers, common)

    files = subparsers.add_parser("files", help="Upload and manage data files.")
    file_commands = files.add_subparsers(dest="files_command", required=True, metavar="COMMAND")
    upload = file_commands.add_parser("upload", parents=[common], help="Upload a JSONL file.")
    upload.add_argument("path", type=Path)
    upload.add_argument("--purpose", choices=["train", "eval"], default="train")
    upload.set_defaults(handler=run_files, action="upload")
    file_list = file_commands.add_parser("list", parents=[common], help="List files.")
    file_list.set_defaults(handler=run_files, action="list")
    delete = file_commands.add_parser("delete", parents=[common], help="Delete a file.")
    delete.add_argument("file_id")
    delete.set_defaults(handler=run_files, action="delete")


def _register_sweeps(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    sweeps = subparsers.add_parser("sweeps", help="Run a job per point of a grid over spec fields.")
    commands = sweeps.add_subparsers(dest="sweeps_command", required=True, metavar="COMMAND")
    create = commands.add_parser(
        "create", parents=[common], help="Create a sweep from a spec (or a sweep file) and --grid paths."
    )
    create.add_argument(
        "spec", type=Path, help="Job spec, or a sweep file with spec and grid; local data is uploaded first."
    )
    create.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="PATH=V1,V2",
        help="A dotted spec path and its values, e.g. loss.alpha=-1,0.5 (repeatable); a YAML list for "
        "objects: 'loss=[{name: amid, alpha: -1}, {name: fkl}]'.",
    )
    create.add_argument("--metric", default=None, help="Ranks the children (default eval_kd_loss).")
    create.add_argument("--mode", choices=["min", "max"], default=None, help="Lower or higher is better.")
    create.add_argument("--max-parallel", type=int, default=None, metavar="N")
    create.add_argument("--wait", action="store_true", help="Refresh the table until the sweep is done.")
    create.add_argument("--timeout", type=float, default=None, help="With --wait: give up after N seconds.")
    create.add_argument("--interval", type=float, default=5.0, help=argparse.SUPPRESS)
    create.add_argument("--idempotency-key", default=None)
    create.set_defaults(handler=run_sweep_create)

    get = commands.add_parser("get", parents=[common], help="Show a sweep: its jobs ranked by the metric.")
    get.add_argument("sweep_id")
    get.set_defaults(handler=run_sweep_action, action="get")
    cancel = commands.add_parser("cancel", parents=[common], help="Cancel every job of a sweep not ended.")
    cancel.add_argument("sweep_id")
    cancel.set_defaults(handler=run_sweep_action, action="cancel")
    listing = commands.add_parser("list", parents=[common], help="List sweeps, newest first.")
    listing.add_argument("--limit", type=int, default=20, help="At most this many sweeps (0: all).")
    listing.set_defaults(handler=run_sweep_list)
    watch = commands.add_parser(
        "watch", parents=[common], help="Refresh the table until no job is queued or running."
    )
    watch.add_argument("sweep_id")
    watch.add_argument("--timeout", type=float, default=None)
    watch.add_argument("--interval", type=float, default=5.0, help="Seconds between refreshes.")
    watch.set_defaults(handler=run_sweep_watch)


# ------------------------------------------------------------------------------------------- helpers
def _client(args: argparse.Namespace) -> Any:
    from distillery import Distillery

    return Distillery(args.api_url, args.api_key)


def _metadata(pairs: list[str]) -> dict[str, str] | None:
    if not pairs:
        return None
    metadata = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--metadata expects KEY=VALUE, got {pair!r}")
        metadata[key] = value
    return metadata


def _print(args: argparse.Namespace, obj: Any, text: str) -> None:
    if args.json:
        payload = obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj
        print(json.dumps(payload, indent=2, default=str))
    else:
        print(text)


def _describe(job: Any) -> str:
    progress = job.progress
    eta = f", ETA {progress.eta_seconds:.0f} s" if progress.eta_seconds else ""
    line = f"{job.id}  {job.status}  step {progress.step}/{progress.total_steps}{eta}"
    if job.error is not None:
        line += f"\n  error {job.error.code}: {job.error.message}"
    return line


def _guarded(handler: Any) -> Any:
    """Turn the SDK's errors into one line on stderr and exit code 5."""

    def run(args: argparse.Namespace) -> int:
        from distillery import DistilleryError, JobWaitTimeout

        try:
            return handler(args)
        except JobWaitTimeout as exc:
            print(f"timed out: {exc}", file=sys.stderr)
            return EXIT_TIMEOUT
        except DistilleryError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_API

    run.__name__ = handler.__name__
    return run


# ------------------------------------------------------------------------------------------ commands
@_guarded
def run_create(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.jobs.create(
            args.spec, idempotency_key=args.idempotency_key, metadata=_metadata(args.metadata)
        )
        if not args.wait:
            _print(args, job, job.id)
            return EXIT_OK
        if not args.json:
            print(f"created {job.id}", file=sys.stderr)
        return _follow(client, job.id, args, show_progress=not args.json)


@_guarded
def run_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        jobs = []
        for job in client.jobs.list(status=args.status, metadata=_metadata(args.metadata)):
            jobs.append(job)
            if args.limit and len(jobs) >= args.limit:
                break
        if args.json:
            print(json.dumps([job.model_dump(mode="json") for job in jobs], indent=2, default=str))
        else:
            for job in jobs:
                print(_describe(job))
    return EXIT_OK


@_guarded
def run_job_action(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = getattr(client.jobs, args.action)(args.job_id)
        _print(args, job, _describe(job))
    return EXIT_OK


@_guarded
def run_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _follow(client, args.job_id, args, show_progress=not args.json)


@_guarded
def run_download(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.checkpoint is None:
            path = client.jobs.download_student(args.job_id, args.output)
        else:
            path = client.jobs.download_checkpoint(args.job_id, args.checkpoint, args.output)
    _print(args, {"path": str(path)}, str(path))
    return EXIT_OK


@_guarded
def run_files(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "upload":
            file = client.files.upload(args.path, purpose=args.purpose)
            _print(args, file, f"{file.id}  {file.records} records  {file.filename}")
        elif args.action == "list":
            files = list(client.files.list())
            if args.json:
                print(json.dumps([f.model_dump(mode="json") for f in files], indent=2, default=str))
            for file in [] if args.json else files:
                print(f"{file.id}  {file.purpose:5}  {file.records:6} records  {file.filename}")
        else:
            _print(args, client.files.delete(args.file_id), f"deleted {args.file_id}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------ watching
def _follow(client: Any, job_id: str, args: argparse.Namespace, *, show_progress: bool) -> int:
    """Follow a job to its end: the event stream in a thread, the job's progress polled for the bar."""
    events: queue.Queue[Any] = queue.Queue()
    done = threading.Event()

    def stream() -> None:
        try:
            for event in client.jobs.events(job_id, stream=True):
                events.put(event)
        except Exception as exc:  # reported below; the poll loop still sees the job end
            events.put(exc)
        finally:
            done.set()

    threading.Thread(target=stream, name="events", daemon=True).start()
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    view = _ProgressView(job_id) if show_progress else None
    try:
        while True:
            job = client.jobs.get(job_id)
            while not events.empty():
                item = events.get()
                if isinstance(item, Exception):
                    print(f"event stream: {item}", file=sys.stderr)
                elif view is not None:
                    view.event(item)
            if view is not None:
                view.update(job)
            if job.is_terminal and done.is_set():
                break
            if deadline is not None and time.monotonic() > deadline:
                print(f"timed out after {args.timeout:g} s; the job is {job.status}", file=sys.stderr)
                return EXIT_TIMEOUT
            done.wait(1.0)
    finally:
        if view is not None:
            view.close()
    if args.json:
        print(json.dumps(job.model_dump(mode="json"), indent=2, default=str))
    else:
        print(_describe(job))
    return _STATUS_EXIT.get(job.status, EXIT_FAILED)


class _ProgressView:
    """A rich progress bar: step/total, ETA, loss and the latest eval metric; events printed above it."""

    def __init__(self, job_id: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=self.console,
        )
        self.task = self.progress.add_task(job_id, total=None, metrics="")
        self.progress.start()

    def event(self, event: Any) -> None:
        self.progress.console.print(f"[dim]{event.created_at:%H:%M:%S}[/dim] {event.kind}: {event.message}")

    def update(self, job: Any) -> None:
        metrics = job.latest_metrics or {}
        shown = [f"loss {metrics['loss']:.4f}"] if isinstance(metrics.get("loss"), (int, float)) else []
        evals = sorted(k for k in metrics if k.startswith("eval_") and isinstance(metrics[k], (int, float)))
        shown += [f"{name} {metrics[name]:.3f}" for name in evals[:2]]
        self.progress.update(
            self.task,
            completed=job.progress.step,
            total=job.progress.total_steps,
            description=f"{job.id} {job.status}",
            metrics="  ".join(shown),
        )

    def close(self) -> None:
        self.progress.stop()


# -------------------------------------------------------------------------------------------- sweeps
def _grid_value(text: str) -> Any:
    """A command-line value as JSON when it parses (numbers like 1e-3 included), else as YAML."""
    import yaml

    try:
        return json.loads(text)
    except ValueError:
        return yaml.safe_load(text)


def _grid(pairs: list[str]) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for pair in pairs:
        path, sep, values = pair.partition("=")
        if not sep or not path or not values:
            raise SystemExit(f"--grid expects PATH=V1,V2,..., got {pair!r}")
        if values.lstrip().startswith("["):
            parsed = _grid_value(values)
            if not isinstance(parsed, list):
                raise SystemExit(f"--grid {path}: {values!r} is not a list")
            grid[path] = parsed
        else:
            grid[path] = [_grid_value(value.strip()) for value in values.split(",")]
    return grid


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return " ".join(f"{key}={_value_text(item)}" for key, item in value.items())
    return json.dumps(value) if not isinstance(value, str) else value


def _sweep_table(sweep: Any) -> str:
    """The children best first by the sweep's metric (those without it last), the best one starred."""
    paths = list(sweep.grid)
    header = ["", "job", "status", *paths, sweep.metric]
    rows = []
    best = sweep.best.job_id if sweep.best is not None else None
    for job in sweep.ranked():
        value = job.metrics.get(sweep.metric)
        rows.append(
            [
                "*" if job.id == best else "",
                job.id,
                job.status,
                *(_value_text(job.params.get(path)) for path in paths),
                "-" if value is None else _value_text(float(value)),
            ]
        )
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    counts = ", ".join(f"{n} {status}" for status, n in sweep.counts.items() if n)
    title = f"{sweep.id}  {sweep.status}  ({counts})  {sweep.metric} {sweep.mode}"
    return "\n".join([title, *(line.rstrip() for line in lines)])


@_guarded
def run_sweep_create(args: argparse.Namespace) -> int:
    with _client(args) as client:
        sweep = client.sweeps.create(
            args.spec,
            _grid(args.grid),
            metric=args.metric,
            mode=args.mode,
            max_parallel=args.max_parallel,
            idempotency_key=args.idempotency_key,
        )
        if not args.wait:
            _print(args, sweep, _sweep_table(sweep))
            return EXIT_OK
        if not args.json:
            print(f"created {sweep.id}", file=sys.stderr)
        return _watch_sweep(client, sweep.id, args)


@_guarded
def run_sweep_action(args: argparse.Namespace) -> int:
    with _client(args) as client:
        sweep = getattr(client.sweeps, args.action)(args.sweep_id)
        _print(args, sweep, _sweep_table(sweep))
    return EXIT_OK


@_guarded
def run_sweep_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        sweeps = []
        for sweep in client.sweeps.list():
            sweeps.append(sweep)
            if args.limit and len(sweeps) >= args.limit:
                break
    if args.json:
        print(json.dumps([sweep.model_dump(mode="json") for sweep in sweeps], indent=2, default=str))
        return EXIT_OK
    for sweep in sweeps:
        best = f"best {sweep.best.value:.4g} ({sweep.best.job_id})" if sweep.best else "no best yet"
        print(f"{sweep.id}  {sweep.status}  {len(sweep.jobs)} jobs  {sweep.metric} {sweep.mode}: {best}")
    return EXIT_OK


@_guarded
def run_sweep_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _watch_sweep(client, args.sweep_id, args)


def _watch_sweep(client: Any, sweep_id: str, args: argparse.Namespace) -> int:
    """Refresh the sweep's table until no job is queued or running; 0 when a best job exists."""
    from distillery import SweepWaitTimeout

    live = None
    if not args.json:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        live = Live(console=Console(stderr=True), auto_refresh=False)
        live.start()

        def show(sweep: Any) -> None:
            live.update(Text(_sweep_table(sweep)), refresh=True)

    try:
        sweep = client.sweeps.wait(
            sweep_id,
            timeout=args.timeout,
            poll_interval=args.interval,
            on_update=None if live is None else show,
        )
    except SweepWaitTimeout as exc:
        print(f"timed out after {args.timeout:g} s; the sweep is {exc.sweep.status}", file=sys.stderr)
        return EXIT_TIMEOUT
    finally:
        if live is not None:
            live.stop()
    _print(args, sweep, _sweep_table(sweep))
    return EXIT_OK if sweep.best is not None else EXIT_FAILED
