"""A stand-in for `python -m worker.trainer_process` in the supervisor's tests: it speaks the same file
protocol (`worker.job_files`: STOP, result.json, error.json) without loading torch.

    python fake_trainer.py MODE JOB_ID --spec PATH --worker-id ID

MODE: succeed | error | storage_full | crash | obey_stop | ignore_stop. The job directory is the folder of
the spec file. `storage_full` is the trainer that failed on a disk so full it could not write error.json.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from core.distill.layout import student_dir
from worker.job_files import EXIT_STORAGE_FULL, EXIT_TRAINING_FAILED, JobFiles


def main() -> int:
    mode, _job_id = sys.argv[1], sys.argv[2]
    job_dir = Path(sys.argv[sys.argv.index("--spec") + 1]).parent
    files = JobFiles(job_dir)
    (job_dir / "fake-env").write_text(
        json.dumps({k: v for k, v in os.environ.items() if k.startswith("DISTILL_")}), encoding="utf-8"
    )
    (job_dir / "fake-started").write_text(str(os.getpid()))
    if mode == "succeed":
        student_dir(job_dir).mkdir(exist_ok=True)
        files.write_result(step=6, stopped=False)
        return 0
    if mode == "error":
        files.write_error(code="invalid_data", message="line 3: bad")
        return EXIT_TRAINING_FAILED
    if mode == "storage_full":
        print("OSError: [Errno 28] No space left on device", file=sys.stderr)
        return EXIT_STORAGE_FULL
    if mode == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "obey_stop":
        while not files.stop_requested():
            time.sleep(0.05)
        files.write_result(step=2, stopped=True)
        return 0
    if mode == "ignore_stop":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends it
        while True:
            time.sleep(0.05)
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main())
