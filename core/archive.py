"""Downloadable `.tar.gz` archives of artifact directories (the student, checkpoints), built once and kept.

Archives are byte-for-byte deterministic (sorted members, fixed owners and gzip header), so two requests
building the same archive at once write identical files and either may win the final rename.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

# Weights barely compress; a low level keeps building fast on large students.
COMPRESS_LEVEL = 3


@dataclass(frozen=True)
class Archive:
    path: Path
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


def directory_archive(directory: Path, archive_path: Path, arcname: str) -> Archive:
    """The cached archive of `directory` (built on first use); the SHA-256 is kept in a side file."""
    sha_path = archive_path.with_name(archive_path.name + ".sha256")
    if archive_path.is_file() and sha_path.is_file():
        return Archive(archive_path, sha_path.read_text().strip(), archive_path.stat().st_size)
    archive_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=archive_path.parent, suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as sink:
            writer = _HashingWriter(sink)
            _write_tar(directory, arcname, writer)  # type: ignore[arg-type]
            sha256 = writer.digest.hexdigest()
        # The side file goes first: whoever sees the archive also finds its hash.
        sha_temp = archive_path.with_name(f"{sha_path.name}.{os.getpid()}-{threading.get_ident()}.partial")
        sha_temp.write_text(sha256 + "\n")
        os.replace(sha_temp, sha_path)
        os.replace(temp_name, archive_path)
    finally:
        Path(temp_name).unlink(missing_ok=True)
    return Archive(archive_path, sha256, archive_path.stat().st_size)
