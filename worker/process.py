"""Process control: processes that die with their parent, training at a lower CPU priority than the API,
and stopping processes (with everything they started) politely first, then for sure. Used by the job
supervisor for trainer processes and by `cli.processes` for the service's own processes."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable

_PR_SET_PDEATHSIG = 1
# How long a signalled trainer gets to exit before the next, harder signal.
KILL_WAIT_S = 5.0


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent (thread) dies; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def lower_priority(nice: int) -> None:
    """Run this thread, and every thread and process it starts from now on, at niceness `nice` or lower
    priority: training beside the API then only takes the CPU the API leaves. 0 changes nothing, and a
    niceness already higher is kept (only root could lower it again)."""
    if nice > 0 and os.getpriority(os.PRIO_PROCESS, 0) < nice:
        os.setpriority(os.PRIO_PROCESS, 0, nice)


def child_preexec(parent_pid: int, nice: int = 0) -> None:
    """Runs in a child process (a trainer, a service of `distill serve`) between fork and exec: die with
    `parent_pid`, and run at niceness `nice` (see `lower_priority`)."""
    set_parent_death_signal()
    # The parent may have died between fork and prctl: then nobody would ever send the signal.
    if os.getppid() != parent_pid:
        os._exit(1)
    lower_priority(nice)


def stop(
    processes: Iterable[subprocess.Popen[bytes]],
    *,
    grace_s: float = KILL_WAIT_S,
    group: bool = True,
    first_signal: int = signal.SIGTERM,
) -> None:
    """Send `first_signal` to every process (its whole group when `group`), give them `grace_s` seconds
    together to exit, then SIGKILL whatever is left and reap it."""
    running = [process for process in processes if process.poll() is None]
    for sig in (first_signal, signal.SIGKILL):
        for process in running:
            _signal(process, sig, group)
        deadline = time.monotonic() + grace_s
        for process in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
        running = [process for process in running if process.poll() is None]
        if not running:
            return


def send_signal(process: subprocess.Popen[bytes], sig: int, *, group: bool = True) -> None:
    """Send `sig` to a process (its whole group when `group`), unless it has exited already."""
    if process.poll() is None:  # once reaped, its pid (and group id) may belong to another process
        _signal(process, sig, group)


def _signal(process: subprocess.Popen[bytes], sig: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM a trainer's process group, then SIGKILL it if it is still there after a few seconds."""
    stop([process], grace_s=KILL_WAIT_S, group=True)
