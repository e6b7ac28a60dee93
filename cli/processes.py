"""Service processes (API, workers, reaper): started, waited for until the API answers, kept running, and
stopped in order. `ServiceProcess`, `wait_until_healthy` and `stop_all` are what `distill serve`,
`bench/api.py` and the end-to-end tests share; `Supervisor` is what keeps `distill serve` up."""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from worker import process as process_control

log = logging.getLogger(__name__)


class ServiceProcess:
    """One service process in its own session (a Ctrl-C in the terminal does not reach it), its output
    in `log_path` when given, else inherited. With `die_with_parent` it is killed when this process dies;
    with `nice` it runs at that niceness."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        *,
        env: dict[str, str],
        log_path: Path | None = None,
        cwd: Path | None = None,
        die_with_parent: bool = False,
        nice: int = 0,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = log_path
        preexec = None
        if die_with_parent:
            preexec = functools.partial(process_control.child_preexec, os.getpid(), nice)
        elif nice:
            preexec = functools.partial(process_control.lower_priority, nice)
        output = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            output = open(log_path, "ab")  # noqa: SIM115  (the child holds it; closed below)
        try:
            self.process: subprocess.Popen[bytes] = subprocess.Popen(
                self.command,
                env=env,
                cwd=cwd,
                stdout=output,
                stderr=subprocess.STDOUT if output else None,
                start_new_session=True,
                preexec_fn=preexec,
            )
        finally:
            if output is not None:
                output.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def output(self, tail: int = 60) -> str:
        """The last `tail` lines it wrote (when it writes to a log file)."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(lines[-tail:])

    def send_signal(self, sig: int) -> None:
        """Send `sig` to its process group (nothing once it has exited)."""
        process_control.send_signal(self.process, sig, group=True)

    def wait(self, timeout: float | None = None) -> int | None:
        """Its exit code once it has exited, None if it is still running after `timeout` seconds."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 15.0) -> int:
        """Send `sig` to its process group, SIGKILL it after `grace_s`; returns its exit code."""
        process_control.stop([self.process], grace_s=grace_s, first_signal=sig)
        return self.process.wait()


def describe_exit(returncode: int) -> str:
    """How a process ended, for a log line: "exited with code 1", "was killed by SIGKILL"."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def wait_until_healthy(
    url: str,
    processes: Sequence[ServiceProcess],
    *,
    timeout_s: float = 120.0,
    stop: threading.Event | None = None,
) -> str | None:
    """Poll `url` until it answers 200; None when it does, else why not (a process died, time ran out,
    `stop` was set)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for service in processes:
            if not service.alive():
                return f"the {service.name} process exited with code {service.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return None
        except (urllib.error.URLError, OSError):
            pass
        if stop is not None and stop.is_set():
            return "stopped"
        if time.monotonic() > deadline:
            return f"{url} did not answer within {timeout_s:g} s"
        if stop is not None:
            stop.wait(0.25)
        else:
            time.sleep(0.25)


def stop_all(processes: Sequence[ServiceProcess], *, grace_s: float = 10.0) -> None:
    """SIGTERM every process (and what it started), SIGKILL what is left after `grace_s` together."""
    process_control.stop([service.process for service in processes], grace_s=grace_s)


# ------------------------------------------------------------------------------------------ supervision
@dataclass
class Backoff:
    """When to restart a process that exited, and when to stop trying.

    The first restart waits `initial_s`; each further exit within `stable_after_s` of its start doubles the
    wait, up to `max_s`. A process that stayed up for `stable_after_s` starts over from `initial_s`.
    `give_up_after` such quick exits in a row mean it cannot run at all (a port in use, a broken
    database): restarting it forever would only hide that.
    """

    initial_s: float = 1.0
    max_s: float = 30.0
    stable_after_s: float = 60.0
    give_up_after: int = 8
    quick_exits: int = 0

    def after_exit(self, uptime_s: float) -> float | None:
        """The wait before the next start of a process that ran `uptime_s` seconds; None: give up."""
        if uptime_s >= self.stable_after_s:
            self.quick_exits = 0
            return self.initial_s
        self.quick_exits += 1
        if self.quick_exits >= self.give_up_after:
            return None
        return min(self.max_s, self.initial_s * 2 ** (self.quick_exits - 1))


# Called with a process that exited (or was stopped) and how, e.g. "was killed by SIGKILL".
ExitHook = Callable[[ServiceProcess, str], None]


@dataclass
class _Service:
    name: str
    start: Callable[[], ServiceProcess]
    on_exit: ExitHook | None
    stop_grace_s: float
    backoff: Backoff
    process: ServiceProcess | None = None
    started_at: float = 0.0
    restart_at: float | None = None


class Supervisor:
    """Service processes kept running: `check()` restarts each one that exits (after its `Backoff`) and
    logs why, `shutdown()` stops them in the order they were added.

    `clock` (monotonic seconds) is injectable so that tests can run the backoff without sleeping.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._services: list[_Service] = []

    def add(
        self,
        name: str,
        start: Callable[[], ServiceProcess],
        *,
        on_exit: ExitHook | None = None,
        stop_grace_s: float = 10.0,
        backoff: Backoff | None = None,
    ) -> None:
        """Start a service now with `start()` (and again whenever it exits); `on_exit` runs after each
        exit, before the restart."""
        service = _Service(name, start, on_exit, stop_grace_s, backoff or Backoff())
        self._services.append(service)
        self._start(service)

    @property
    def processes(self) -> list[ServiceProcess]:
        """The current process of every service (none for a service waiting to be restarted)."""
        return [service.process for service in self._services if service.process is not None]

    def check(self) -> str | None:
        """Handle exited processes and restarts that are due; returns why it gives up, else None."""
        for service in self._services:
            process = service.process
            if process is not None and not process.alive():
                uptime = self.clock() - service.started_at
                service.process = None
                how = describe_exit(process.returncode or 0)
                self._run_exit_hook(service, process, how)
                problem = self._schedule_restart(service, f"(pid {process.pid}) {how}", uptime)
                if problem is not None:
                    return problem
            if (
                service.process is None
                and service.restart_at is not None
                and self.clock() >= service.restart_at
            ):
                problem = self._start(service)
                if problem is not None:
                    return problem
        return None

    def shutdown(self, force: threading.Event | None = None) -> None:
        """Stop every service in the order they were added: SIGTERM, then SIGKILL after its grace period,
        or at once when `force` is set (a second Ctrl-C). Each service's `on_exit` runs after its stop."""
        for service in self._services:
            service.restart_at = None
            process, service.process = service.process, None
            if process is None:
                continue
            how = "was stopped at shutdown" if process.alive() else describe_exit(process.returncode or 0)
            if process.alive():
                log.info("stopping the %s (pid %d)", service.name, process.pid)
                process.send_signal(signal.SIGTERM)
                deadline = self.clock() + service.stop_grace_s
                while process.wait(timeout=0.1) is None:
                    if force is not None and force.is_set():
                        how = "was killed at shutdown (forced)"
                        break
                    if self.clock() >= deadline:
                        how = f"was killed at shutdown (still running after {service.stop_grace_s:g} s)"
                        break
                if process.alive():
                    log.warning("the %s (pid %d) %s", service.name, process.pid, how)
                    process.send_signal(signal.SIGKILL)
                    process.wait()
            self._run_exit_hook(service, process, how)

    def _start(self, service: _Service) -> str | None:
        service.restart_at = None
        service.started_at = self.clock()
        try:
            service.process = service.start()
        except OSError as exc:
            return self._schedule_restart(service, f"could not be started ({exc})", 0.0)
        log.info("started the %s (pid %d)", service.name, service.process.pid)
        return None

    def _schedule_restart(self, service: _Service, how: str, uptime: float) -> str | None:
        delay = service.backoff.after_exit(uptime)
        if delay is None:
            problem = (
                f"the {service.name} {how} {uptime:.1f} s after it started; it keeps exiting right after "
                f"it starts ({service.backoff.quick_exits} times in a row): giving up"
            )
            log.error(problem)
            return problem
        log.warning("the %s %s after %.1f s; restarting it in %g s", service.name, how, uptime, delay)
        service.restart_at = self.clock() + delay
        return None

    def _run_exit_hook(self, service: _Service, process: ServiceProcess, how: str) -> None:
        if service.on_exit is None:
            return
        try:
            service.on_exit(process, how)
        except Exception:  # a failed clean-up must not stop the supervision of the others
            log.exception("the %s's exit handler failed", service.name)
