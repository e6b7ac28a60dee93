"""End to end on object storage: the API (`distill api`) and a Celery worker (`distill worker`) with
DISTILL_STORAGE_URL=s3://... on moto's standalone server (`moto_server`, an emulator of the S3 API running
on this machine, not AWS). The worker trains in its own scratch directory, the API has none of its files:
whatever the API serves it reads from the bucket."""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.s3_server import S3Server, moto_s3_server
from tests.support.services import (
    TERMINAL,
    Stack,
    make_settings,
    sqlite_database,
    tiny_spec,
    wait_for,
    write_dolly_subset,
)

# Long end-to-end runs: `make test-slow` (and CI) runs them; the default suite stays near 10 minutes.
pytestmark = pytest.mark.slow

JOB_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with moto_s3_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, s3_server: S3Server
) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("s3-stack")
    key = f"dk_test_{uuid.uuid4().hex}"
    settings = make_settings(
        home,
        database_url=sqlite_database(home / "db"),
        model_roots=[tiny_teacher_dir.parent],
        bootstrap_api_key=key,
        heartbeat_interval_s=1.0,
        **s3_server.settings_values(s3_server.new_bucket(), prefix="prod/artifacts"),
    )
    settings.storage_dir = home / "api-scratch"
    stack = Stack(settings, home / "logs", key=key)
    try:
        # Another machine's scratch, as far as the API can tell.
        stack.start_worker(DISTILL_STORAGE_DIR=str(home / "worker-scratch"))
        stack.client.wait_ready(stack.processes)
        yield stack
    finally:
        stack.stop()


def _objects(server: S3Server, settings_url: str) -> list[str]:
    bucket, _, prefix = settings_url.removeprefix("s3://").partition("/")
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return [item["Key"].removeprefix(prefix + "/") for page in pages for item in page.get("Contents", [])]


def test_a_job_trains_from_the_bucket_and_its_student_downloads_in_two_ranges(
    stack: Stack, s3_server: S3Server, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    client, settings = stack.client, stack.settings
    data = write_dolly_subset(tmp_path / "dolly.jsonl")
    file_id = client.upload(data)
    stored = _objects(s3_server, settings.storage_url)
    file_key = next(k for k in stored if k.startswith("files/") and file_id in k)
    bucket = settings.storage_url.removeprefix("s3://").split("/")[0]
    body = s3_server.client().get_object(Bucket=bucket, Key=f"prod/artifacts/{file_key}")["Body"].read()
    assert body == data.read_bytes()
    api_scratch = settings.artifacts
    assert not (api_scratch / "files").exists()  # validated on scratch, then only in the bucket

    job = client.create_job(tiny_spec(tiny_teacher_dir, file_id))
    done = client.wait_status(job["id"], TERMINAL, timeout=JOB_TIMEOUT_S, processes=stack.processes)
    assert done["status"] == "succeeded", (done, stack.workers[0].output()[-3000:])

    stored = _objects(s3_server, settings.storage_url)
    job_prefix = f"jobs/{job['id']}/"
    assert f"{job_prefix}student/config.json" in stored
    assert f"{job_prefix}checkpoints/step-00000006/manifest.json" in stored
    assert not any(k.startswith(f"{job_prefix}spec.json") or "/logs/" in k for k in stored)  # scratch only
    assert not (api_scratch / "jobs").exists()

    # The whole student, then the same bytes fetched as two halves (a resumed download).
    whole = client.http.get(f"/v1/jobs/{job['id']}/student")
    assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
    sha = whole.headers["x-content-sha256"]
    assert hashlib.sha256(whole.content).hexdigest() == sha
    size = int(whole.headers["content-length"])
    assert size == len(whole.content)
    half = size // 2
    first = client.http.get(f"/v1/jobs/{job['id']}/student", headers={"Range": f"bytes=0-{half - 1}"})
    rest = client.http.get(f"/v1/jobs/{job['id']}/student", headers={"Range": f"bytes={half}-"})
    assert first.status_code == rest.status_code == 206
    assert rest.headers["content-range"] == f"bytes {half}-{size - 1}/{size}"
    assert int(rest.headers["content-length"]) == size - half
    assert hashlib.sha256(first.content + rest.content).hexdigest() == sha
    tail = client.http.get(f"/v1/jobs/{job['id']}/student", headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == whole.content[-10:]
    past = client.http.get(f"/v1/jobs/{job['id']}/student", headers={"Range": f"bytes={size}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{size}"
    assert past.json()["error"]["param"] == "Range"
    stale = client.http.get(
        f"/v1/jobs/{job['id']}/student", headers={"Range": f"bytes={half}-", "If-Range": '"other"'}
    )
    assert stale.status_code == 200 and stale.content == whole.content  # changed since: the whole file
    assert f"{job_prefix}archives/student.tar.gz" in _objects(s3_server, settings.storage_url)

    archive = tmp_path / "student.tar.gz"
    archive.write_bytes(first.content + rest.content)
    with tarfile.open(archive) as tar:
        assert "student/config.json" in tar.getnames()

    checkpoint = client.http.get(f"/v1/jobs/{job['id']}/checkpoints/3/download")
    assert checkpoint.status_code == 200
    assert hashlib.sha256(checkpoint.content).hexdigest() == checkpoint.headers["x-content-sha256"]

    # Deleting the file deletes its object.
    assert client.http.delete(f"/v1/files/{file_id}").status_code in (200, 204)
    assert file_key not in _objects(s3_server, settings.storage_url)


def test_resume_finds_checkpoints_in_the_bucket_and_a_fresh_worker_pulls_them(
    stack: Stack, s3_server: S3Server, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    """A cancelled job resumed on a worker whose scratch lost it continues from the pushed checkpoint."""
    client = stack.client
    file_id = client.upload(write_dolly_subset(tmp_path / "dolly.jsonl"))
    job = client.create_job(tiny_spec(tiny_teacher_dir, file_id, max_steps=400, checkpoint_every=3))

    def checkpointed() -> bool:
        return bool(client.http.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"])

    wait_for(checkpointed, timeout=JOB_TIMEOUT_S, what="a first checkpoint")
    assert client.http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    cancelled = client.wait_status(job["id"], TERMINAL, timeout=60, processes=stack.processes)
    assert cancelled["status"] == "cancelled"
    step = client.http.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"][-1]["step"]

    # The worker's scratch loses the job (another machine's worker would have none of it): resuming must
    # pull the checkpoint from the bucket.
    scratch = Path(stack.settings.home) / "worker-scratch" / "jobs" / job["id"]
    shutil.rmtree(scratch / "checkpoints")
    resumed = client.http.post(f"/v1/jobs/{job['id']}/resume")
    assert resumed.status_code == 200, resumed.text
    events: list[dict] = []

    def resumed_from_checkpoint() -> bool:
        events[:] = client.events(job["id"])
        return any(e["kind"] == "start" and (e["data"] or {}).get("start_step") == step for e in events)

    wait_for(resumed_from_checkpoint, timeout=JOB_TIMEOUT_S, what=f"the job to resume from step {step}")
    assert (scratch / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file()  # pulled
    client.http.post(f"/v1/jobs/{job['id']}/cancel")
    client.wait_status(job["id"], TERMINAL, timeout=60, processes=stack.processes)
