"""API latency under load, and what that load costs the training job, on loopback, in one run.

Starts `distill api` and `distill worker` (real uvicorn and Celery processes) on a fresh home, uploads the
bundled Dolly data, and starts one long training job of a small random model. Then, in order:

1. quiet:    training throughput with no API traffic;
2. polling:  100 concurrent clients, each polling `GET /v1/jobs/{id}` every `--interval` seconds and
             creating a job (`POST /v1/jobs`) with probability `--post-fraction` instead; client-side
             p50/p99 latency of both, and training throughput meanwhile;
3. quiet again (the baseline is the mean of both quiet phases, which cancels slow drifts of the machine).

Throughput is the trainer's optimizer steps per second over each phase (from the job's progress), and its
own tokens/s metric. The created jobs are cancelled while still queued. The load generator runs in this
process, on the same machine, and its CPU time competes with the server and the trainer too.

    .venv/bin/python bench/api.py                        # embedded defaults: SQLite + SQLite broker
    .venv/bin/python bench/api.py --backend postgres     # PostgreSQL + Redis on 127.0.0.1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cli.processes import ServiceProcess, stop_all, wait_until_healthy  # noqa: E402
from cli.service import api_command, prepare_local_dirs, service_env, worker_command  # noqa: E402
from core.config import Settings  # noqa: E402
from migrations.runner import upgrade_database  # noqa: E402

POSTGRES_ADMIN_URL = os.environ.get(
    "DISTILL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("DISTILL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass
class Latencies:
    samples: list[float] = field(default_factory=list)
    errors: int = 0

    def summary(self) -> dict[str, float | int]:
        ordered = sorted(self.samples)
        if not ordered:
            return {"count": 0, "errors": self.errors}

        def pct(q: float) -> float:
            return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000

        return {
            "count": len(ordered),
            "errors": self.errors,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "max_ms": ordered[-1] * 1000,
        }


# --------------------------------------------------------------------------------------------- set-up
def make_models(root: Path, hidden: int, layers: int) -> Path:
    from core.distill.tiny import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer(root / "tokenizer")
    return make_tiny_model(
        root / "teacher", hidden_size=hidden, num_layers=layers, num_heads=4, seed=1, tokenizer=tokenizer
    )


def postgres_database() -> tuple[str, Any]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"distill_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        from core.db import get_engine

        get_engine(url).dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    return url, drop


def spec(teacher: Path, file_id: str, args: argparse.Namespace, max_steps: int) -> dict[str, Any]:
    return {
        "teacher": {"model": str(teacher)},
        "student": {"from_teacher_layers": list(range(0, args.layers, 2))},
        "data": {"train": file_id, "max_length": args.max_length, "max_prompt_length": args.max_length // 2},
        "training": {
            "max_steps": max_steps,
            "batch_size": args.batch_size,
            "checkpoint_every": 0,
            "eval_every": 0,
        },
    }


# ----------------------------------------------------------------------------------------- measuring
def progress(client: httpx.Client, job_id: str) -> tuple[float, int]:
    body = client.get(f"/v1/jobs/{job_id}").json()
    if body["status"] != "running":
        raise SystemExit(f"the training job is {body['status']}: {body.get('error')}")
    return time.monotonic(), body["progress"]["step"]


def tokens_per_s(client: httpx.Client, job_id: str, first: int, last: int) -> float:
    series = client.get(
        f"/v1/jobs/{job_id}/metrics", params={"names": "tokens_per_s", "from_step": first}
    ).json()
    values = [
        p["value"] for p in series["series"].get("tokens_per_s", []) if p["step"] <= last and p["value"]
    ]
    return statistics.fmean(values) if values else float("nan")


def _tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of process `root` and its live descendants, from /proc."""
    parent, ticks = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parent[pid], ticks[pid] = int(fields[1]), int(fields[11]) + int(fields[12])
    total, frontier = 0, [root]
    while frontier:
        pid = frontier.pop()
        total += ticks.get(pid, 0)
        frontier += [child for child, ppid in parent.items() if ppid == pid]
    return total / os.sysconf("SC_CLK_TCK")


def _cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    own = os.times()
    return {name: _tree_cpu_seconds(pid) for name, pid in pids.items()} | {"bench": own.user + own.system}


def measure(
    client: httpx.Client, job_id: str, pids: dict[str, int], action: Any
) -> tuple[dict[str, float], Any]:
    """Run `action()`; return training throughput and CPU cores used by each process group meanwhile."""
    cpu0, (t0, s0) = _cpu_snapshot(pids), progress(client, job_id)
    result = action()
    cpu1, (t1, s1) = _cpu_snapshot(pids), progress(client, job_id)
    figures = {"steps_per_s": (s1 - s0) / (t1 - t0), "tokens_per_s": tokens_per_s(client, job_id, s0 + 1, s1)}
    figures |= {f"cpu_{name}": (cpu1[name] - cpu0[name]) / (t1 - t0) for name in cpu0}
    return figures, result


async def _client_loop(
    http: httpx.AsyncClient, job_id: str, create_body: dict[str, Any], args: argparse.Namespace,
    deadline: float, measure_from: float, gets: Latencies, posts: Latencies, warmup: Latencies,
    created: list[str],
) -> None:  # fmt: skip
    await asyncio.sleep(random.uniform(0, args.interval))  # spread the clients over the interval
    while time.monotonic() < deadline:
        warming = time.monotonic() < measure_from
        started = time.perf_counter()
        post = random.random() < args.post_fraction
        try:
            if post:
                response = await http.post("/v1/jobs", json=create_body)
            else:
                response = await http.get(f"/v1/jobs/{job_id}")
            ok = response.status_code < 300
        except httpx.HTTPError:
            ok, response = False, None
        elapsed = time.perf_counter() - started
        bucket = warmup if warming else (posts if post else gets)
        if ok:
            bucket.samples.append(elapsed)
            if post:
                created.append(response.json()["id"])  # type: ignore[union-attr]
        else:
            bucket.errors += 1
        await asyncio.sleep(max(0.0, args.interval - elapsed))


async def _loop_lag(deadline: float, lags: Latencies) -> None:
    """How late this process's event loop wakes up: latency the load generator adds by itself (a stall
    of the whole machine shows here as well as in the server's answers)."""
    while time.monotonic() < deadline:
        started = time.perf_counter()
        await asyncio.sleep(0.01)
        lags.samples.append(max(0.0, time.perf_counter() - started - 0.01))


async def polling(base_url: str, key: str, job_id: str, create_body: dict[str, Any], args: argparse.Namespace) -> tuple[Latencies, Latencies, Latencies, Latencies, list[str]]:  # fmt: skip
    """Clients start together; the first `--warmup` seconds (connections, threads and database connections
    being opened) are kept apart from the measured window and reported on their own line."""
    gets, posts, lags, warmup, created = Latencies(), Latencies(), Latencies(), Latencies(), []
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=30) as http:
        measure_from = time.monotonic() + args.warmup
        deadline = measure_from + args.seconds
        await asyncio.gather(
            _loop_lag(deadline, lags),
            *(
                _client_loop(
                    http, job_id, create_body, args, deadline, measure_from, gets, posts, warmup, created
                )
                for _ in range(args.clients)
            ),
        )
    return gets, posts, lags, warmup, created


# ---------------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--interval", type=float, default=1.0, help="Seconds between one client's requests.")
    parser.add_argument(
        "--post-fraction", type=float, default=0.1, help="Share of requests that create a job."
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="Length of each phase.")
    parser.add_argument(
        "--warmup",
        type=float,
        default=5.0,
        help="Seconds of polling before the measured window (reported separately; training throughput "
        "of the polling phase includes them).",
    )
    parser.add_argument("--api-workers", type=int, default=1)
    parser.add_argument(
        "--trainer-nice",
        type=int,
        default=Settings.model_fields["trainer_nice"].default,
        help="Niceness of the worker and its trainers (0: the same CPU priority as the API).",
    )
    parser.add_argument(
        "--trainer-threads",
        type=int,
        default=None,
        help="Default: all cores but one, as `distill serve` does.",
    )
    parser.add_argument(
        "--hidden", type=int, default=128, help="Teacher hidden size (the student keeps half the layers)."
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary home (logs) afterwards.")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    drop_database = None
    processes: list[ServiceProcess] = []
    try:
        teacher = make_models(home / "models", args.hidden, args.layers)
        key = f"dk_bench_{uuid.uuid4().hex}"
        if args.backend == "postgres":
            database_url, drop_database = postgres_database()
            broker_url = REDIS_URL
        else:
            database_url, broker_url = "", ""
        settings = Settings(
            home=home, database_url=database_url, broker_url=broker_url, model_roots=[home / "models"],
            bootstrap_api_key=key, task_queue=f"distill-bench-{uuid.uuid4().hex[:6]}",
            trainer_threads=args.trainer_threads or max(1, len(os.sched_getaffinity(0)) - 1),
        )  # fmt: skip
        prepare_local_dirs(settings)
        upgrade_database(settings.database_url)
        env = service_env(settings) | {
            "DISTILL_BOOTSTRAP_API_KEY": key,
            "DISTILL_TASK_QUEUE": settings.task_queue,
            # 100 clients share the one bench key: the per-key rate limit would measure 429s.
            "DISTILL_RATE_LIMIT_PER_MINUTE": "0",
        }
        port = 18000 + random.randrange(1000)
        logs = home / "logs"
        logs.mkdir()
        for name, command, nice in (
            ("api", api_command("127.0.0.1", port, args.api_workers), 0),
            # As `distill worker` / `serve` start it: the worker and its trainers at the trainer niceness.
            ("worker", worker_command(settings), args.trainer_nice),
        ):
            processes.append(
                ServiceProcess(name, command, env=env, log_path=logs / f"{name}.log", cwd=REPO, nice=nice)
            )

        base_url = f"http://127.0.0.1:{port}"
        client = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        problem = wait_until_healthy(f"{base_url}/healthz", processes)
        if problem is not None:
            raise SystemExit(f"the service did not start ({problem}); see {logs}")

        with (REPO / "data" / "dolly" / "train.jsonl").open("rb") as handle:
            file_id = client.post("/v1/files", files={"file": ("dolly.jsonl", handle)}).json()["id"]
        job_id = client.post("/v1/jobs", json=spec(teacher, file_id, args, 10_000_000)).json()["id"]
        print(f"training job {job_id}; waiting for it to run ...", flush=True)
        deadline = time.monotonic() + 180
        while client.get(f"/v1/jobs/{job_id}").json()["progress"]["step"] < 5:
            if time.monotonic() > deadline:
                raise SystemExit(f"the job did not start training; see {logs} and {home}/artifacts/jobs")
            time.sleep(0.5)

        pids = {"api": processes[0].pid, "worker": processes[1].pid}
        print(f"phase 1/3: quiet, {args.seconds:g} s", flush=True)
        quiet_before, _ = measure(client, job_id, pids, lambda: time.sleep(args.seconds))
        print(
            f"phase 2/3: {args.clients} clients polling every {args.interval:g} s, "
            f"{args.warmup:g} s warm-up + {args.seconds:g} s",
            flush=True,
        )
        create_body = spec(teacher, file_id, args, 1)
        loaded, (gets, posts, lags, warmup, created) = measure(
            client, job_id, pids, lambda: asyncio.run(polling(base_url, key, job_id, create_body, args))
        )
        for created_id in created:
            client.post(f"/v1/jobs/{created_id}/cancel")
        print(f"phase 3/3: quiet, {args.seconds:g} s", flush=True)
        quiet_after, _ = measure(client, job_id, pids, lambda: time.sleep(args.seconds))
        client.post(f"/v1/jobs/{job_id}/cancel")

        baseline = {k: (quiet_before[k] + quiet_after[k]) / 2 for k in ("steps_per_s", "tokens_per_s")}
        ratio = {k: loaded[k] / baseline[k] for k in baseline}
        report = {
            "backend": args.backend,
            "clients": args.clients,
            "interval_s": args.interval,
            "api_workers": args.api_workers,
            "trainer_threads": settings.trainer_threads,
            "trainer_nice": args.trainer_nice,
            "requests_per_s": (len(gets.samples) + len(posts.samples)) / args.seconds,
            "get_job": gets.summary(),
            "post_job": posts.summary(),
            "warmup_s": args.warmup,
            "warmup_requests": warmup.summary(),
            "load_generator_loop_lag": lags.summary(),
            "training_quiet_before": quiet_before,
            "training_quiet_after": quiet_after,
            "training_under_polling": loaded,
            "throughput_ratio": ratio,
            "cpus": len(os.sched_getaffinity(0)),
        }
        print_report(report)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return 0
    finally:
        stop_all(processes, grace_s=15)
        if drop_database is not None:
            drop_database()
        if args.keep:
            print(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


def print_report(r: dict[str, Any]) -> None:
    get, post = r["get_job"], r["post_job"]

    def latency(name: str, s: dict[str, Any]) -> str:
        if not s["count"]:
            return f"{name}: no successful requests ({s['errors']} errors)"
        return f"{name}: n={s['count']:>5}  p50 {s['p50_ms']:6.1f} ms  p99 {s['p99_ms']:6.1f} ms  max {s['max_ms']:6.1f} ms  errors {s['errors']}"

    before, after, loaded, ratio = (r["training_quiet_before"], r["training_quiet_after"], r["training_under_polling"], r["throughput_ratio"])  # fmt: skip
    print()
    print(
        f"backend {r['backend']}, {r['cpus']} CPUs, trainer threads {r['trainer_threads']} at nice "
        f"{r['trainer_nice']}, "
        f"{r['api_workers']} API worker(s), {r['clients']} clients every {r['interval_s']:g} s "
        f"({r['requests_per_s']:.0f} requests/s)"
    )
    print(latency("GET  /v1/jobs/{id}", get))
    print(latency("POST /v1/jobs     ", post))
    print(
        latency(
            f"first {r['warmup_s']:g} s (warm-up, GET+POST, not in the figures above)", r["warmup_requests"]
        )
    )
    lag = r["load_generator_loop_lag"]
    print(
        f"load generator's own event-loop lag: p50 {lag['p50_ms']:.1f} ms  p99 {lag['p99_ms']:.1f} ms  max {lag['max_ms']:.1f} ms"
    )
    for name in ("steps_per_s", "tokens_per_s"):
        print(
            f"training {name:<12}: quiet {before[name]:8.2f} / {after[name]:8.2f}   under polling {loaded[name]:8.2f}"
            f"   ratio {ratio[name]:.3f} (loss {100 * (1 - ratio[name]):+.1f}%)"
        )
    requests = get["count"] + get["errors"] + post["count"] + post["errors"]
    seconds = requests / r["requests_per_s"] if r["requests_per_s"] else float("nan")
    print(
        f"CPU cores used, quiet / under polling: trainer+worker {before['cpu_worker']:.2f} / {loaded['cpu_worker']:.2f}, "
        f"API {before['cpu_api']:.2f} / {loaded['cpu_api']:.2f}, load generator {loaded['cpu_bench']:.2f}"
    )
    if requests:
        print(
            f"CPU per request: API {1000 * loaded['cpu_api'] * seconds / requests:.2f} ms, "
            f"load generator {1000 * loaded['cpu_bench'] * seconds / requests:.2f} ms"
        )
    get_ok = get.get("p99_ms", float("inf")) < 50
    loss_ok = 1 - ratio["steps_per_s"] < 0.10
    print(
        f"targets: GET p99 < 50 ms: {'met' if get_ok else 'MISSED'}; training loss < 10%: {'met' if loss_ok else 'MISSED'}"
    )


if __name__ == "__main__":
    sys.exit(main())
