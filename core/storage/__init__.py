"""Artifact storage on a local (or mounted, shared) filesystem.

Layout under the root: `files/<tenant>/<file id>.jsonl` for uploads, `jobs/<job id>/` as the trainer's
output directory (`checkpoints/step-XXXXXXXX/`, `student/`). The database stores paths relative to the
root so that the root can move (a volume mounted elsewhere in another container).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.errors import StorageFull, StorageUnavailable

logger = logging.getLogger(__name__)

# "No space left on device" and "disk quota exceeded": the storage is full, not broken.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


@contextmanager
def storage_errors(action: str) -> Iterator[None]:
    """Turn an `OSError` of the artifact storage into a named error for the caller: `StorageFull` (507)
    when the disk or quota is full, `StorageUnavailable` (503) otherwise. The message says what failed,
    never where: server paths stay in the server's log."""
    try:
        yield
    except OSError as exc:
        logger.warning("storage error while %s: %s", action, exc)
        if exc.errno in _FULL_ERRNOS:
            raise StorageFull(f"the server's storage is full while {action}; try again later") from exc
        reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        raise StorageUnavailable(
            f"the server's storage failed while {action} ({reason}); try again later"
        ) from exc


class Storage:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def file_path(self, tenant_id: str, file_id: str) -> Path:
        return self.root / "files" / tenant_id / f"{file_id}.jsonl"

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root))

    def resolve(self, relative: str) -> Path:
        """The absolute path of a stored relative path; refuses anything that escapes the root."""
        path = (self.root / relative).resolve()
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"storage path escapes the storage root: {relative!r}")
        return path
