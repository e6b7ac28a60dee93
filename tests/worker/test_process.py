"""Process control (worker.process): a trainer process started the way the job supervisor starts it runs
at the configured niceness (training yields the CPU to the API), and niceness is only ever raised."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

from tests.support.services import wait_for
from worker import process as process_control
from worker.job_files import JobFiles

FAKE_TRAINER = Path(__file__).parents[1] / "support" / "fake_trainer.py"


def niceness(pid: int) -> int:
    """The nice value of `pid` as the kernel reports it (field 19 of /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def start_fake_trainer(job_dir: Path, nice: int) -> subprocess.Popen[bytes]:
    """The supervisor's tests' stand-in trainer, started with the supervisor's pre-exec hook."""
    job_dir.mkdir(parents=True)
    command = [sys.executable, str(FAKE_TRAINER), "obey_stop", "job-1"]
    command += ["--spec", str(job_dir / "spec.json"), "--worker-id", "w1"]
    return subprocess.Popen(
        command,
        start_new_session=True,
        preexec_fn=functools.partial(process_control.child_preexec, os.getpid(), nice),
    )


def run_fake_trainer(job_dir: Path, nice: int) -> int:
    """Start it, return its niceness while it runs, then stop it the protocol's way."""
    process = start_fake_trainer(job_dir, nice)
    try:
        marker = job_dir / "fake-started"
        wait_for(marker.is_file, timeout=30, what="the fake trainer to start")
        assert int(marker.read_text()) == process.pid
        observed = niceness(process.pid)
        assert os.getpriority(os.PRIO_PROCESS, process.pid) == observed
        JobFiles(job_dir).request_stop()
        assert process.wait(timeout=30) == 0
        return observed
    finally:
        process_control.stop([process], grace_s=5)


def test_a_trainer_runs_at_the_niceness_it_is_started_with(tmp_path: Path) -> None:
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert run_fake_trainer(tmp_path / "niced", 7) == max(own, 7)
    assert niceness(os.getpid()) == own  # only the child was reniced


def test_niceness_0_leaves_the_trainer_at_its_parents_priority(tmp_path: Path) -> None:
    assert run_fake_trainer(tmp_path / "plain", 0) == os.getpriority(os.PRIO_PROCESS, 0)


def test_lower_priority_never_raises_a_priority() -> None:
    script = (
        "import os; from worker.process import lower_priority; "
        "os.setpriority(os.PRIO_PROCESS, 0, 12); lower_priority(5); a = os.getpriority(os.PRIO_PROCESS, 0); "
        "lower_priority(15); print(a, os.getpriority(os.PRIO_PROCESS, 0))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["12", "15"]
