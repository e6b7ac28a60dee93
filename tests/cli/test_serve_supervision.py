"""`distill serve` supervised: the restart backoff on an injected clock, the ordered shutdown with real
processes, and a real `distill serve` on the embedded defaults whose killed worker (its job released at
once, see worker.reaper.reap_worker) and API come back, whose trainer runs niced, and which a Ctrl-C stops
with nothing left."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cli.processes import Backoff, ServiceProcess, Supervisor
from tests.support.services import (
    TERMINAL,
    ApiClient,
    distill_command,
    free_port,
    start_service,
    tiny_spec,
    wait_for,
    write_dolly_subset,
)


# --------------------------------------------------------------------------------------------- backoff
def test_backoff_doubles_up_to_its_cap_starts_over_after_a_stable_run_and_gives_up() -> None:
    backoff = Backoff(initial_s=1, max_s=30, stable_after_s=60, give_up_after=8)
    assert [backoff.after_exit(5) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.after_exit(120) == 1  # it stayed up a while: a fresh start
    assert [backoff.after_exit(0.5) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.after_exit(0.5) is None  # the 8th quick exit in a row


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeProcess:
    """Stands in for a ServiceProcess: "exits" when told to, or on the signals it does not ignore."""

    pids = iter(range(50_000, 60_000))

    def __init__(self, name: str, *, ignores_sigterm: bool = False) -> None:
        self.name, self.pid, self.returncode = name, next(self.pids), None
        self.ignores_sigterm = ignores_sigterm

    def alive(self) -> bool:
        return self.returncode is None

    def die(self, returncode: int) -> None:
        self.returncode = returncode

    def send_signal(self, sig: int) -> None:
        if sig == signal.SIGKILL or not self.ignores_sigterm:
            self.returncode = self.returncode if self.returncode is not None else -sig

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode


def test_a_dead_process_is_restarted_after_its_backoff_and_its_exit_is_handled_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, started, exits = FakeClock(), [], []

    def start() -> Any:
        started.append(FakeProcess("worker"))
        return started[-1]

    supervisor = Supervisor(clock=clock)
    supervisor.add("worker", start, on_exit=lambda process, how: exits.append((process.pid, how)))
    first = started[0]
    clock.now += 10
    first.die(-signal.SIGKILL)
    with caplog.at_level("INFO", logger="cli.processes"):
        assert supervisor.check() is None
        assert exits == [(first.pid, "was killed by SIGKILL")] and len(started) == 1
        assert supervisor.processes == []
        clock.now += 0.9
        assert supervisor.check() is None and len(started) == 1  # not before its 1 s
        clock.now += 0.2
        assert supervisor.check() is None and len(started) == 2
    assert supervisor.processes == [started[1]]
    restart = f"the worker (pid {first.pid}) was killed by SIGKILL after 10.0 s; restarting it in 1 s"
    assert restart in caplog.text and f"started the worker (pid {started[1].pid})" in caplog.text

    # A second quick exit waits twice as long; one after a long run starts over from 1 s.
    clock.now += 3
    started[1].die(1)
    supervisor.check()
    clock.now += 1.5
    supervisor.check()
    assert len(started) == 2
    clock.now += 0.6
    supervisor.check()
    assert len(started) == 3
    clock.now += 3600
    started[2].die(0)
    supervisor.check()
    clock.now += 1.0
    supervisor.check()
    assert len(started) == 4
    assert [how for _, how in exits] == ["was killed by SIGKILL", "exited with code 1", "exited with code 0"]


def test_a_process_that_keeps_exiting_right_after_start_makes_the_supervisor_give_up() -> None:
    clock, started = FakeClock(), []

    def start() -> Any:
        started.append(FakeProcess("api"))
        started[-1].die(1)  # e.g. its port is taken
        return started[-1]

    supervisor = Supervisor(clock=clock)
    supervisor.add("api", start, backoff=Backoff(give_up_after=4))
    problems = []
    for _ in range(100):
        problem = supervisor.check()
        if problem is not None:
            problems.append(problem)
            break
        clock.now += 0.5
    assert len(started) == 4, started
    assert problems and "keeps exiting right after it starts (4 times in a row): giving up" in problems[0]
    assert clock.now - 1000.0 <= 1 + 2 + 4 + 0.5 * 4  # restarted after 1, 2 and 4 s, then no more


def test_shutdown_stops_in_order_and_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    stopped: list[tuple[str, str]] = []
    env = dict(os.environ)
    ignore_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    supervisor = Supervisor()
    for name, code, grace in [
        ("worker", "import time; time.sleep(60)", 5.0),
        ("api", ignore_term, 0.5),
        ("reaper", "import time; time.sleep(60)", 5.0),
    ]:
        supervisor.add(
            name,
            lambda name=name, code=code: ServiceProcess(name, [sys.executable, "-c", code], env=env),
            on_exit=lambda process, how: stopped.append((process.name, how)),
            stop_grace_s=grace,
        )
    processes = supervisor.processes
    time.sleep(0.5)  # let the API install its SIGTERM handler
    began = time.monotonic()
    supervisor.shutdown()
    assert time.monotonic() - began < 4
    assert stopped == [
        ("worker", "was stopped at shutdown"),
        ("api", "was killed at shutdown (still running after 0.5 s)"),
        ("reaper", "was stopped at shutdown"),
    ]
    assert [p.returncode for p in processes] == [-signal.SIGTERM, -signal.SIGKILL, -signal.SIGTERM]
    assert supervisor.processes == []
    assert supervisor.check() is None and supervisor.processes == []  # nothing comes back afterwards


def test_a_forced_shutdown_does_not_wait_for_the_grace_period() -> None:
    clock = FakeClock()
    supervisor = Supervisor(clock=clock)
    stubborn, exits = FakeProcess("worker", ignores_sigterm=True), []
    supervisor.add("worker", lambda: stubborn, on_exit=lambda _, how: exits.append(how), stop_grace_s=3600)
    force = threading.Event()
    force.set()
    supervisor.shutdown(force)
    assert stubborn.returncode == -signal.SIGKILL and exits == ["was killed at shutdown (forced)"]


# ----------------------------------------------------------------------------- a real `distill serve`
TRAINER_NICE = 7


def start_serve(home: Path, port: int, models: Path) -> ServiceProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DISTILL_")}
    env |= {"DISTILL_HOME": str(home), "DISTILL_MODEL_ROOTS": str(models), "DISTILL_TRAINER_THREADS": "1"}
    env["DISTILL_TRAINER_NICE"] = str(TRAINER_NICE)
    return start_service("serve", distill_command("serve", "--port", str(port)), env, home.parent / "logs")


def started(serve: ServiceProcess, name: str) -> list[int]:
    """The pids serve logged for its `name` process, oldest first."""
    return [int(pid) for pid in re.findall(rf"started the {name} \(pid (\d+)\)", serve.output(2000))]


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def children(pid: int) -> list[int]:
    pids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        pids += [int(child) for child in (task / "children").read_text().split()]
    return pids


def trainer_of(worker_pid: int) -> int | None:
    for pid in children(worker_pid):
        if b"worker.trainer_process" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    return None


def test_serve_brings_back_a_killed_worker_and_api_and_stops_cleanly(
    tmp_path: Path, tiny_teacher_dir: Path
) -> None:
    home, port = tmp_path / "home", free_port()
    serve = start_serve(home, port, tiny_teacher_dir.parent)
    try:
        line = wait_for(
            lambda: next((x for x in serve.output(400).splitlines() if "API key:" in x), None),
            timeout=60,
            what="serve to print its API key",
        )
        client = ApiClient(f"http://127.0.0.1:{port}", line.split("API key:", 1)[1].strip())
        client.wait_ready([serve])
        [api], [worker], [reaper] = started(serve, "api"), started(serve, "worker"), started(serve, "reaper")
        own_nice = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, api) == own_nice
        assert os.getpriority(os.PRIO_PROCESS, worker) == max(own_nice, TRAINER_NICE)

        # The worker killed in the middle of a job: its job is re-queued at once (not after the
        # reaper's 60 s) and the restarted worker resumes it.
        file_id = client.upload(write_dolly_subset(tmp_path / "dolly.jsonl"))
        job = client.create_job(tiny_spec(tiny_teacher_dir, file_id, max_steps=8, checkpoint_every=4))
        # Its trainer takes seconds to load torch and the models: killed well before the job can end.
        trainer = wait_for(lambda: trainer_of(worker), timeout=60, what="the job's trainer to start")
        assert os.getpriority(os.PRIO_PROCESS, trainer) == max(own_nice, TRAINER_NICE)
        assert client.job(job["id"])["status"] == "running"
        os.kill(worker, signal.SIGKILL)
        wait_for(
            lambda: any(
                "was killed by SIGKILL; re-queued (attempt 2 of 3)" in event["message"]
                for event in client.events(job["id"])
            ),
            timeout=10,
            what="the killed worker's job to be re-queued",
        )
        assert not running(trainer)
        new_worker = wait_for(lambda: started(serve, "worker")[1:], timeout=20, what="a new worker")[0]
        done = client.wait_status(job["id"], TERMINAL, timeout=120, processes=[serve])
        assert done["status"] == "succeeded" and done["attempts"] == 2, (done, serve.output())

        # The API killed: it answers again.
        os.kill(api, signal.SIGKILL)
        new_api = wait_for(lambda: started(serve, "api")[1:], timeout=20, what="a new API")[0]
        client.wait_ready([serve], timeout=30)
        assert client.job(job["id"])["status"] == "succeeded"
        client.http.close()

        # Ctrl-C: everything stops, nothing is left behind.
        os.killpg(serve.pid, signal.SIGINT)
        assert serve.process.wait(timeout=60) == 0, serve.output()
        assert "giving up" not in serve.output(2000)
        for pid in (api, new_api, worker, new_worker, reaper, trainer):
            assert not running(pid), pid
    finally:
        serve.stop(signal.SIGINT)
