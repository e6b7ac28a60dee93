"""Process control for the job supervisor: trainer processes that die with their supervisor, and
killing a trainer with everything it started."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys

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


def child_preexec(parent_pid: int) -> None:
    """Runs in a trainer process between fork and exec: die with the supervisor `parent_pid`."""
    set_parent_death_signal()
    # The parent may have died between fork and prctl: then nobody would ever send the signal.
    if os.getppid() != parent_pid:
        os._exit(1)


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group, then SIGKILL it if it is still there after a few seconds."""
    for sig, wait in ((signal.SIGTERM, KILL_WAIT_S), (signal.SIGKILL, KILL_WAIT_S)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
