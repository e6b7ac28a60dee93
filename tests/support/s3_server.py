"""An S3-protocol server on this machine for the object-storage tests: moto's standalone server
(`moto_server`, from the `moto[server]` dev dependency), an *emulator* of the S3 API (multipart uploads,
ranged GETs, listings), not AWS itself. It keeps everything in memory and accepts any credentials."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import service_unavailable

MOTO_SERVER = Path(sys.executable).parent / "moto_server"
CREDENTIALS = {"s3_access_key_id": "testing", "s3_secret_access_key": "testing", "s3_region": "us-east-1"}


@dataclass
class S3Server:
    endpoint_url: str
    log_path: Path

    def settings_values(self, bucket: str, prefix: str = "distill") -> dict[str, Any]:
        """Settings fields that put the artifacts in `s3://bucket/prefix` on this server."""
        return {"storage_url": f"s3://{bucket}/{prefix}", "s3_endpoint_url": self.endpoint_url, **CREDENTIALS}

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=CREDENTIALS["s3_region"],
            aws_access_key_id=CREDENTIALS["s3_access_key_id"],
            aws_secret_access_key=CREDENTIALS["s3_secret_access_key"],
        )

    def new_bucket(self) -> str:
        name = f"distill-test-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name


@contextlib.contextmanager
def moto_s3_server(log_dir: Path) -> Iterator[S3Server]:
    """Start `moto_server` on a free port, wait until it answers, yield it; stop it by its PID after."""
    from tests.support.services import free_port

    if not MOTO_SERVER.is_file():
        service_unavailable(f"{MOTO_SERVER} is missing (pip install 'moto[server]', the dev extra)")
    port = free_port()
    log_path = log_dir / f"moto-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"moto_server exited:\n{log_path.read_text(errors='replace')}")
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not answer within 30 s") from None
                time.sleep(0.1)
        yield S3Server(url, log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
