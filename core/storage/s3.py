"""Artifacts in an S3-protocol bucket (AWS S3, MinIO, Ceph, Cloudflare R2): `s3://bucket/prefix`.

Objects are named `<prefix>/<key>`; a "directory" key is every object under `<prefix>/<key>/`. Transfers
stream: uploads go in multipart parts of `s3_multipart_chunk_bytes` read from the file as they are sent,
downloads are written to disk as they arrive, and ranged reads are yielded in 1 MiB chunks, so memory stays
bounded by the part size times the transfer threads whatever the artifact's size.

The local tree (`root`, the inherited layout) is this machine's scratch copy: a worker trains in it and
`push`es what it wrote; `pull` fills it from the bucket. Files count as the same when their size matches
and the local copy is not newer than the object (downloads take the object's time), like `aws s3 sync`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from core.config import Settings
from core.storage import READ_CHUNK_BYTES, LocalStorage

_MISSING = {"404", "NoSuchKey", "NotFound"}
_DELETE_BATCH = 1000  # DeleteObjects' limit


@functools.lru_cache(maxsize=8)
def _client(endpoint_url: str, region: str, access_key_id: str, secret_access_key: str) -> Any:
    """One client per configuration (boto3 clients are thread-safe and slow to build)."""
    credentials = (
        {"aws_access_key_id": access_key_id, "aws_secret_access_key": secret_access_key}
        if access_key_id
        else {}  # the standard chain: AWS_* variables, ~/.aws, instance or pod roles
    )
    config = Config(
        # Path-style requests for self-hosted endpoints (MinIO, Ceph): no per-bucket DNS names.
        s3={"addressing_style": "path" if endpoint_url else "auto"},
        retries={"max_attempts": 5, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url or None, region_name=region or None, config=config, **credentials
    )


def _visible(relative: Path) -> bool:
    """Not a writer's hidden temporary (`.tmp-step-...`, `.pruned-...`)."""
    return not any(part.startswith(".") for part in relative.parts)


class S3Storage(LocalStorage):
    """Artifacts in `s3://bucket/prefix`, with `root` as this machine's scratch copy."""

    def __init__(
        self, *, bucket: str, prefix: str, client: Any, scratch: Path, transfer: TransferConfig
    ) -> None:
        super().__init__(scratch)
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client
        self.transfer = transfer

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Storage:
        bucket, _, prefix = settings.storage_url.removeprefix("s3://").partition("/")
        chunk = settings.s3_multipart_chunk_bytes
        transfer = TransferConfig(
            multipart_threshold=chunk,
            multipart_chunksize=chunk,
            max_concurrency=settings.s3_max_concurrency,
            # Downloaded chunks wait in this queue for the thread writing the file: keep it short (4 MiB).
            io_chunksize=256 * 1024,
            max_io_queue=16,
        )
        client = _client(
            settings.s3_endpoint_url,
            settings.s3_region,
            settings.s3_access_key_id,
            settings.s3_secret_access_key,
        )
        return cls(bucket=bucket, prefix=prefix, client=client, scratch=settings.artifacts, transfer=transfer)

    # ------------------------------------------------------------------------------------------ names
    def object_name(self, key: str) -> str:
        self.resolve(key)  # refuses keys that escape the root
        key = key.strip("/")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _objects(self, key: str) -> Iterator[dict[str, Any]]:
        """The objects under the directory `key` (each with `Key`, `Size`, `LastModified`)."""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.object_name(key) + "/"):
            yield from page.get("Contents", [])

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.object_name(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING:
                return None
            raise

    # ---------------------------------------------------------------------------------- the store
    def put_file(self, key: str, source: Path) -> None:
        self.client.upload_file(str(source), self.bucket, self.object_name(key), Config=self.transfer)
        Path(source).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        if self._head(key) is not None:
            return True
        listed = self.client.list_objects_v2(
            Bucket=self.bucket, Prefix=self.object_name(key) + "/", MaxKeys=1
        )
        return bool(listed.get("KeyCount"))

    def size(self, key: str) -> int | None:
        head = self._head(key)
        return None if head is None else int(head["ContentLength"])

    def read_text(self, key: str) -> str | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.object_name(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING:
                return None
            raise
        with contextlib.closing(response["Body"]) as body:
            return body.read(1 << 20).decode("utf-8")

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        # The request is made now, so that a missing object or an unreachable endpoint raises here, before
        # a response has started; the body is read as the caller iterates.
        span = f"bytes={start}-{'' if end is None else end}"
        response = self.client.get_object(Bucket=self.bucket, Key=self.object_name(key), Range=span)
        return _chunks(response["Body"])

    def delete(self, key: str) -> None:
        if not key.strip("/"):
            raise ValueError("refusing to delete the whole storage")
        names = [{"Key": self.object_name(key)}] + [{"Key": o["Key"]} for o in self._objects(key)]
        for batch in range(0, len(names), _DELETE_BATCH):
            self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": names[batch : batch + _DELETE_BATCH], "Quiet": True}
            )

    def local_file(self, key: str) -> Path | None:
        return None

    @contextlib.contextmanager
    def checkout(self, key: str, scratch: Path) -> Iterator[Path]:
        scratch.mkdir(parents=True, exist_ok=True)
        directory = Path(tempfile.mkdtemp(dir=scratch, prefix="checkout-"))
        try:
            for item in self._objects(key):
                relative = item["Key"][len(self.object_name(key)) + 1 :]
                self._download(item, directory / relative)
            yield directory
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    # ------------------------------------------------------------------------- syncing the local tree
    def push(self, key: str) -> None:
        local = self.resolve(key)
        if local.is_file():
            head = self._head(key)
            if head is None or not _same(local, int(head["ContentLength"]), head["LastModified"]):
                self._upload(local, self.object_name(key))
            return
        stored = {item["Key"]: item for item in self._objects(key)}
        base = self.object_name(key)
        for path in sorted(local.rglob("*")) if local.is_dir() else []:
            relative = path.relative_to(local)
            if not path.is_file() or not _visible(relative):
                continue
            name = f"{base}/{relative.as_posix()}"
            item = stored.pop(name, None)
            if item is None or not _same(path, int(item["Size"]), item["LastModified"]):
                self._upload(path, name)
        gone = [{"Key": name} for name in stored]
        for batch in range(0, len(gone), _DELETE_BATCH):
            self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": gone[batch : batch + _DELETE_BATCH], "Quiet": True}
            )

    def pull(self, key: str) -> Path:
        local = self.resolve(key)
        head = self._head(key)
        if head is not None:
            item = {
                "Key": self.object_name(key),
                "Size": head["ContentLength"],
                "LastModified": head["LastModified"],
            }
            if not (local.is_file() and _same(local, int(item["Size"]), item["LastModified"])):
                self._download(item, local)
            return local
        base = self.object_name(key)
        for item in self._objects(key):
            path = local / item["Key"][len(base) + 1 :]
            if not (path.is_file() and _same(path, int(item["Size"]), item["LastModified"])):
                self._download(item, path)
        return local

    # -------------------------------------------------------------------------------------- transfers
    def _upload(self, path: Path, name: str) -> None:
        self.client.upload_file(str(path), self.bucket, name, Config=self.transfer)

    def _download(self, item: dict[str, Any], path: Path) -> None:
        """Download an object to `path` (through a temporary beside it) with the object's time."""
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        os.close(handle)
        try:
            self.client.download_file(self.bucket, item["Key"], temp_name, Config=self.transfer)
            modified = item["LastModified"].timestamp()
            os.utime(temp_name, (modified, modified))
            os.replace(temp_name, path)
        finally:
            Path(temp_name).unlink(missing_ok=True)


def _same(path: Path, size: int, modified: datetime) -> bool:
    """A local file that need not be copied: the object's size, and not newer than the object."""
    stat = path.stat()
    return stat.st_size == size and stat.st_mtime <= modified.timestamp() + 1


def _chunks(body: Any) -> Iterator[bytes]:
    with contextlib.closing(body):
        yield from body.iter_chunks(READ_CHUNK_BYTES)
