"""Uploaded files: store (streamed, hashed and validated line by line), list, get, delete."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.config import Settings
from core.db import new_id
from core.distill.data_formats import inspect_jsonl
from core.errors import InvalidRequest, NotFound, PayloadTooLarge
from core.files.models import File
from core.pagination import newest_first_page
from core.storage import open_storage, storage_errors

CHUNK_BYTES = 1 << 20
PURPOSES = ("train", "eval")
MAX_REPORTED_LINES = 20
MAX_FILENAME_CHARS = 255  # File.filename's column


def _clean_filename(filename: str) -> str:
    """The base name of an uploaded file's name (a browser may send a client path); refused (422) when it
    holds control characters (NUL, newlines), is not valid Unicode text or is longer than the column."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    if any(ord(char) < 32 or ord(char) == 127 for char in filename):
        raise InvalidRequest(
            "invalid_filename", "the file name holds control characters (NUL, newline, ...)", param="file"
        )
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            "invalid_filename", "the file name is not valid UTF-8 text", param="file"
        ) from exc
    if len(name) > MAX_FILENAME_CHARS:
        raise InvalidRequest(
            "invalid_filename",
            f"the file name is longer than {MAX_FILENAME_CHARS} characters ({len(name)})",
            param="file",
        )
    return name if name not in ("", ".", "..") else "upload.jsonl"


def _lines_while_copying(
    source: BinaryIO, sink: BinaryIO, digest: hashlib._Hash, limit: int
) -> Iterator[bytes]:
    """Yield `source`'s lines while copying it to `sink` and hashing it; stop at `limit` bytes with 413."""
    size, pending = 0, b""
    while chunk := source.read(CHUNK_BYTES):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                "file_too_large", f"the file is larger than the {limit}-byte limit", param="file"
            )
        sink.write(chunk)
        digest.update(chunk)
        *lines, pending = (pending + chunk).split(b"\n")
        yield from lines
    if pending:
        yield pending


def _describe_invalid(invalid: list[dict[str, object]], count: int) -> str:
    shown = "; ".join(f"line {item['line']}: {item['error']}" for item in invalid[:MAX_REPORTED_LINES])
    more = f" (and {count - MAX_REPORTED_LINES} more)" if count > MAX_REPORTED_LINES else ""
    numbers = ", ".join(str(item["line"]) for item in invalid[:MAX_REPORTED_LINES])
    return f"{count} invalid line(s), at line(s) {numbers}{more}: {shown}"


def store_upload(
    *,
    session: Session,
    settings: Settings,
    tenant_id: str,
    source: BinaryIO,
    filename: str,
    purpose: str = "train",
) -> File:
    """Validate every line of an uploaded JSONL file and store it; refuses a bad file with 4xx."""
    if purpose not in PURPOSES:
        raise InvalidRequest(
            "invalid_purpose", f"purpose must be one of {', '.join(PURPOSES)}", param="purpose"
        )
    name = _clean_filename(filename)
    storage = open_storage(settings)
    with storage_errors("storing the upload"):
        scratch = storage.root / "tmp"  # local in any case: the file is validated before it is stored
        scratch.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        handle, temp_name = tempfile.mkstemp(dir=scratch, suffix=".upload")
        temp_path = Path(temp_name)
        try:
            with os.fdopen(handle, "wb") as sink:
                report = inspect_jsonl(_lines_while_copying(source, sink, digest, settings.max_upload_bytes))
                size = sink.tell()
            if report.invalid_count:
                raise InvalidRequest(
                    "invalid_file",
                    _describe_invalid(report.invalid_lines, report.invalid_count),
                    param="file",
                )
            if report.records == 0:
                raise InvalidRequest("empty_file", "the file holds no records", param="file")
            file_id = new_id("file")
            key = storage.relative(storage.file_path(tenant_id, file_id))
            storage.put_file(key, temp_path)
        finally:
            temp_path.unlink(missing_ok=True)
    row = File(
        id=file_id,
        tenant_id=tenant_id,
        filename=name,
        purpose=purpose,
        size_bytes=size,
        sha256=digest.hexdigest(),
        records=report.records,
        format=report.detected_format,
        storage_path=key,
    )
    session.add(row)
    try:
        session.commit()
    except BaseException:
        session.rollback()
        with storage_errors("removing an upload that was not recorded"):
            storage.delete(key)
        raise
    return row


def list_files(
    *, session: Session, tenant_id: str, limit: int, after: str | None = None
) -> tuple[list[File], bool]:
    """A page of the tenant's files, newest first, and whether more follow."""
    query = select(File).where(File.tenant_id == tenant_id)
    return newest_first_page(session, query, File, tenant_id=tenant_id, after=after, limit=limit)


def get_file(*, session: Session, tenant_id: str, file_id: str, param: str | None = None) -> File:
    """One of the tenant's files; another tenant's id is answered like a missing one."""
    row = session.scalar(select(File).where(File.id == file_id, File.tenant_id == tenant_id))
    if row is None:
        raise NotFound("file_not_found", f"no file {file_id!r}", param=param)
    return row


def file_path(*, settings: Settings, file: File) -> Path:
    """A local path holding a stored file's content (what the worker hands the trainer for a file id):
    the file itself in a local store, a copy pulled into this machine's scratch from object storage. The
    path does not exist when the stored content is gone."""
    storage = open_storage(settings)
    with storage_errors("reading an uploaded file"):
        return storage.pull(file.storage_path)


def delete_file(*, session: Session, settings: Settings, tenant_id: str, file_id: str) -> None:
    """Delete a file and its row (callers check first that no active job reads it)."""
    row = get_file(session=session, tenant_id=tenant_id, file_id=file_id)
    key = row.storage_path
    session.delete(row)
    session.commit()
    with storage_errors("deleting the file"):
        open_storage(settings).delete(key)
