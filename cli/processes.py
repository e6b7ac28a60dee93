"""A set of service processes (API, workers, reaper) started together, waited for until the API answers,
and stopped in order: what `distill serve`, `bench/api.py` and the end-to-end tests share."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from worker import process as process_control


class ServiceProcess:
    """One service process in its own session (a Ctrl-C in the terminal does not reach it), its output
    in `log_path` when given, else inherited."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        *,
        env: dict[str, str],
        log_path: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = log_path
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

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 15.0) -> int:
        """Send `sig` to its process group, SIGKILL it after `grace_s`; returns its exit code."""
        process_control.stop([self.process], grace_s=grace_s, first_signal=sig)
        return self.process.wait()


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
