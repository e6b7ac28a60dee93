"""Downloadable `.tar.gz` archives of stored artifact directories (the student, checkpoints), built once
and kept in the artifact storage beside them.

Archives are byte-for-byte deterministic (sorted members, fixed owners and gzip header), so two requests
building the same archive at once write identical files and either may win the final rename.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from core.storage import Storage

# Weights barely compress; a low level keeps building fast on large students.
COMPRESS_LEVEL = 3


@dataclass(frozen=True)
class Archive:
    key: str  # in the artifact storage
    sha256: str
    size_bytes: int


class _HashingWriter:
    """A write-only file object that hashes what passes through it."""

    def __init__(self, sink: BinaryIO) -> None:
        self.sink = sink
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.sink.write(data)

    def flush(self) -> None:
        self.sink.flush()


def _normalized(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _write_tar(directory: Path, arcname: str, sink: BinaryIO) -> None:
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=sink, mtime=0, compresslevel=COMPRESS_LEVEL) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        tar.add(directory, arcname=arcname, recursive=False, filter=_normalized)
        for path in sorted(directory.rglob("*")):
            if path.is_file() or path.is_dir():
                tar.add(
                    path,
                    arcname=f"{arcname}/{path.relative_to(directory).as_posix()}",
                    recursive=False,
                    filter=_normalized,
                )


def directory_archive(storage: Storage, directory: str, archive: str, arcname: str) -> Archive:
    """The stored archive `archive` of the stored directory `directory` (built on first use, on local
    scratch, then put into the storage); the SHA-256 is kept in a side file."""
    sha_key = archive + ".sha256"
    size, sha256 = storage.size(archive), storage.read_text(sha_key)
    if size is not None and sha256:
        return Archive(archive, sha256.strip(), size)
    scratch = storage.root / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=scratch, suffix=".partial")
    sha_temp = scratch / f"{Path(temp_name).name}.sha256"
    try:
        with os.fdopen(handle, "wb") as sink, storage.checkout(directory, scratch) as local:
            writer = _HashingWriter(sink)
            _write_tar(local, arcname, writer)  # type: ignore[arg-type]
            sha256 = writer.digest.hexdigest()
        size = Path(temp_name).stat().st_size
        # The side file goes first: whoever sees the archive also finds its hash.
        sha_temp.write_text(sha256 + "\n")
        storage.put_file(sha_key, sha_temp)
        storage.put_file(archive, Path(temp_name))
    finally:
        Path(temp_name).unlink(missing_ok=True)
        sha_temp.unlink(missing_ok=True)
    return Archive(archive, sha256, size)
