"""A job's directory as the supervisor and its trainer process share it, one attempt at a time:

    spec.json               the spec with file ids resolved to paths          supervisor → trainer
    STOP                    a stop request (cancel)                           supervisor → trainer
    result.json             {"step", "stopped"}: training ended (exit 0)      trainer → supervisor
    error.json              {"code", "message"}: training failed (exit 3)     trainer → supervisor
    logs/attempt-N.log      the trainer process' output

Exit 4 says the disk (or the quota) is full: not even error.json (or result.json) could be written.

The directory is also the trainer's output directory (`core.distill.layout`: checkpoints/, student/).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from core.distill import layout
from core.distill.spec import JobSpec

SPEC_FILE = "spec.json"
STOP_FILE = "STOP"
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
LOG_DIR = "logs"

# The trainer process' exit status when it reports a failure in error.json.
EXIT_TRAINING_FAILED = 3
# ... and when the disk or the quota is full, so that it could write neither error.json nor result.json.
EXIT_STORAGE_FULL = 4


class JobFiles:
    """The protocol files of the job directory `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def spec_path(self) -> Path:
        return self.root / SPEC_FILE

    @property
    def stop_path(self) -> Path:
        return self.root / STOP_FILE

    def log_path(self, attempt: int) -> Path:
        return self.root / LOG_DIR / f"attempt-{attempt}.log"

    # ------------------------------------------------------------------------------------- supervisor
    def prepare_attempt(self, spec: JobSpec) -> Path:
        """Clear the last attempt's signals and results, write `spec`; returns the spec file's path."""
        (self.root / LOG_DIR).mkdir(parents=True, exist_ok=True)
        for name in (STOP_FILE, RESULT_FILE, ERROR_FILE):
            (self.root / name).unlink(missing_ok=True)
        self.spec_path.write_text(spec.model_dump_json(indent=2), encoding="utf-8")
        return self.spec_path

    def request_stop(self) -> None:
        self.stop_path.touch()

    def read_result(self) -> dict[str, Any] | None:
        return _read_json(self.root / RESULT_FILE)

    def read_error(self) -> dict[str, Any] | None:
        return _read_json(self.root / ERROR_FILE)

    def has_student(self) -> bool:
        return layout.student_dir(self.root).is_dir()

    # ---------------------------------------------------------------------------------------- trainer
    def read_spec(self, path: Path | None = None) -> JobSpec:
        """The spec the supervisor wrote (it was validated when the worker read the job's row)."""
        return JobSpec.model_validate_json((path or self.spec_path).read_text(encoding="utf-8"))

    def stop_requested(self) -> bool:
        return self.stop_path.exists()

    def write_result(self, *, step: int, stopped: bool) -> None:
        _write_json(self.root / RESULT_FILE, {"step": step, "stopped": stopped})

    def write_error(self, *, code: str, message: str) -> None:
        _write_json(self.root / ERROR_FILE, {"code": code, "message": message[:4000]})


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(value), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a torn file on a full disk: give its blocks back
        raise


def is_disk_full(exc: OSError) -> bool:
    """Whether a failed write of a protocol file means the disk or the quota is full."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
