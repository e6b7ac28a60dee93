"""A stand-in for `python -m core.jobs.child` in the supervisor's tests: it speaks the same file protocol
(STOP, result.json, error.json in the job directory) without loading torch.

    python fake_trainer.py MODE JOB_ID --spec PATH --worker-id ID

MODE: succeed | error | crash | obey_stop | ignore_stop. The job directory is the folder of the spec file.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def main() -> int:
    mode, _job_id = sys.argv[1], sys.argv[2]
    job_dir = Path(sys.argv[sys.argv.index("--spec") + 1]).parent
    (job_dir / "fake-env").write_text(
        json.dumps({k: v for k, v in os.environ.items() if k.startswith("DISTILL_")}), encoding="utf-8"
    )
    (job_dir / "fake-started").write_text(str(os.getpid()))
    if mode == "succeed":
        (job_dir / "student").mkdir(exist_ok=True)
        (job_dir / "result.json").write_text(json.dumps({"step": 6, "stopped": False}))
        return 0
    if mode == "error":
        (job_dir / "error.json").write_text(json.dumps({"code": "invalid_data", "message": "line 3: bad"}))
        return 3
    if mode == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "obey_stop":
        while not (job_dir / "STOP").exists():
            time.sleep(0.05)
        (job_dir / "result.json").write_text(json.dumps({"step": 2, "stopped": True}))
        return 0
    if mode == "ignore_stop":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends it
        while True:
            time.sleep(0.05)
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main())
