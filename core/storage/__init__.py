"""Artifact storage: a local (or mounted, shared) directory, or an S3-protocol bucket (`core.storage.s3`).

Every artifact has a key, a relative path: `files/<tenant>/<file id>.jsonl` for uploads, `jobs/<job id>/`
as the trainer's output directory (`checkpoints/step-XXXXXXXX/`, `student/`, `archives/`). The database
stores keys, so that the root can move (a volume mounted elsewhere in another container, another bucket).

A `Storage` is also a local tree laid out by the same keys (`root`, `file_path`, `job_dir`, `resolve`):
for `LocalStorage` that tree *is* the store, and `push`/`pull` do nothing; for `S3Storage` it is this
machine's scratch copy, which a worker trains in and `push`es to the bucket, and which `pull` fills from it.
The API reads only the store (`exists`, `size`, `open_range`, `checkout`), never a worker's scratch.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.config import Settings
from core.errors import StorageFull, StorageUnavailable

logger = logging.getLogger(__name__)

# "No space left on device" and "disk quota exceeded": the storage is full, not broken.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# S3 error codes that mean the same of a bucket (a quota on MinIO, Ceph, R2).
_FULL_S3_CODES = frozenset({"QuotaExceeded", "XMinioStorageFull", "XMinioAdminBucketQuotaExceeded"})
READ_CHUNK_BYTES = 1 << 20


def _is_object_storage_error(exc: BaseException) -> bool:
    """An error of the S3 client (botocore, boto3, s3transfer), told apart without importing them."""
    return type(exc).__module__.split(".")[0] in {"botocore", "boto3", "s3transfer"}


def _s3_code(exc: BaseException) -> str:
    while exc is not None:
        code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code")
        if code:
            return str(code)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return ""


@contextmanager
def storage_errors(action: str) -> Iterator[None]:
    """Turn an error of the artifact storage into a named error for the caller: `StorageFull` (507) when
    the disk, quota or bucket is full, `StorageUnavailable` (503) otherwise. The message says what failed,
    never where: server paths and bucket names stay in the server's log."""
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
    except Exception as exc:
        if not _is_object_storage_error(exc):
            raise
        logger.warning("object storage error while %s: %r", action, exc)
        code = _s3_code(exc)
        if code in _FULL_S3_CODES:
            raise StorageFull(f"the server's storage is full while {action}; try again later") from exc
        reason = code or type(exc).__name__
        raise StorageUnavailable(
            f"the server's storage failed while {action} ({reason}); try again later"
        ) from exc


class LocalStorage:
    """Artifacts in a local directory: the local tree is the store."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    # ------------------------------------------------------------------------------ the local tree
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

    # ---------------------------------------------------------------------------------- the store
    def put_file(self, key: str, source: Path) -> None:
        """Move the finished local file `source` into the store at `key` (replacing what was there)."""
        target = self.resolve(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)

    def exists(self, key: str) -> bool:
        """Whether the store holds a file or a directory at `key` (object storage: objects under it)."""
        return self.resolve(key).exists()

    def size(self, key: str) -> int | None:
        """The stored file's size in bytes; None when there is none."""
        path = self.resolve(key)
        return path.stat().st_size if path.is_file() else None

    def read_text(self, key: str) -> str | None:
        """A small stored text file (a hash, a manifest); None when there is none."""
        path = self.resolve(key)
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The bytes `start`..`end` (inclusive; None = to the end) of a stored file, in bounded chunks."""
        with self.resolve(key).open("rb") as handle:
            handle.seek(start)
            remaining = None if end is None else end - start + 1
            while remaining is None or remaining > 0:
                chunk = handle.read(
                    READ_CHUNK_BYTES if remaining is None else min(READ_CHUNK_BYTES, remaining)
                )
                if not chunk:
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    def delete(self, key: str) -> None:
        """Delete the file, or the directory tree, at `key` (nothing when there is none)."""
        path = self.resolve(key)
        if path == self.root:
            raise ValueError("refusing to delete the whole storage")
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def local_file(self, key: str) -> Path | None:
        """A stored file as a local path a server may send itself (with Range support); None when the store
        is not a local directory."""
        return self.resolve(key)

    @contextlib.contextmanager
    def checkout(self, key: str, scratch: Path) -> Iterator[Path]:
        """A local directory holding the store's tree at `key` while the block runs (here: the store's own
        directory; object storage downloads it under `scratch` and removes it after)."""
        yield self.resolve(key)

    # ------------------------------------------------- syncing the local tree (a worker's scratch)
    def push(self, key: str) -> None:
        """Copy the local file or tree at `key` to the store (unchanged files are skipped), deleting stored
        files under `key` that the local tree no longer has. Hidden entries (`.tmp-*`) are not copied.
        Here nothing: the local tree is the store."""

    def pull(self, key: str) -> Path:
        """Copy the store's file or tree at `key` into the local tree (files the same size and age are
        skipped); returns its local path. Here nothing to copy: the local tree is the store."""
        return self.resolve(key)


# The local store's former name.
Storage = LocalStorage


def open_storage(settings: Settings) -> LocalStorage:
    """The configured artifact storage: `storage_url` s3://bucket/prefix, else the local `storage_dir`."""
    if settings.storage_url.startswith("s3://"):
        from core.storage.s3 import S3Storage

        return S3Storage.from_settings(settings)
    return LocalStorage(settings.artifacts)
