"""S3Storage against an S3-protocol server on this machine: moto's standalone server (`moto_server`), an
emulator of the S3 API, not AWS. Multipart uploads, ranged and streamed reads, sync of a local tree both
ways, deletion, archives, and errors named as the API reports them."""

from __future__ import annotations

import hashlib
import os
import tarfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.archive import directory_archive
from core.config import Settings
from core.errors import StorageUnavailable
from core.storage import LocalStorage, open_storage, storage_errors
from core.storage.s3 import S3Storage
from tests.support.s3_server import S3Server, moto_s3_server

MiB = 1024 * 1024
CHUNK = 5 * MiB  # S3's smallest multipart part
BIG = 12 * MiB  # three parts


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with moto_s3_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


def _settings(tmp_path: Path, server: S3Server, bucket: str, **values: object) -> Settings:
    return Settings(
        home=tmp_path,
        **server.settings_values(bucket),
        s3_multipart_chunk_bytes=CHUNK,
        s3_max_concurrency=2,
        **values,
    )


@pytest.fixture
def storage(tmp_path: Path, s3_server: S3Server) -> S3Storage:
    store = open_storage(_settings(tmp_path / "api", s3_server, s3_server.new_bucket()))
    assert isinstance(store, S3Storage)
    return store


def _big_file(path: Path, size: int = BIG) -> str:
    """A file of `size` pseudo-random bytes (incompressible, distinct per MiB); returns its SHA-256."""
    digest = hashlib.sha256()
    with path.open("wb") as handle:
        for index in range(size // MiB):
            block = hashlib.sha256(str(index).encode()).digest() * (MiB // 32)
            handle.write(block)
            digest.update(block)
    return digest.hexdigest()


def test_settings_take_a_bucket_url_or_a_local_directory(tmp_path: Path) -> None:
    s3 = Settings(home=tmp_path, storage_url="s3://bucket/some/prefix")
    assert s3.artifacts == tmp_path.resolve() / "scratch"  # the scratch copy; the store is the bucket
    local = Settings(home=tmp_path, storage_url=f"file://{tmp_path / 'store'}")
    assert local.storage_url == "" and local.artifacts == tmp_path / "store"
    assert isinstance(open_storage(local), LocalStorage) and not isinstance(open_storage(local), S3Storage)
    for bad in ("s3://", "s3:///prefix", "gs://bucket/prefix"):
        with pytest.raises(ValueError, match="DISTILL_STORAGE_URL"):
            Settings(home=tmp_path, storage_url=bad)


def test_a_big_file_goes_up_in_parts_and_comes_back_in_ranges_with_bounded_memory(
    storage: S3Storage, tmp_path: Path, s3_server: S3Server
) -> None:
    source = tmp_path / "big.bin"
    sha = _big_file(source)
    original = source.read_bytes()

    tracemalloc.start()
    try:
        storage.put_file("files/t/big.bin", source)
        _, put_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        digest, size = hashlib.sha256(), 0
        for chunk in storage.open_range("files/t/big.bin"):
            digest.update(chunk)
            size += len(chunk)
        _, get_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Neither direction holds the file: at most about a part per transfer thread.
    assert put_peak < BIG / 2, f"upload peak {put_peak / MiB:.1f} MiB"
    assert get_peak < 4 * MiB, f"download peak {get_peak / MiB:.1f} MiB"
    assert digest.hexdigest() == sha and size == BIG

    assert not source.exists()  # moved into the store
    head = s3_server.client().head_object(Bucket=storage.bucket, Key="distill/files/t/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload of three 5 MiB parts
    assert storage.size("files/t/big.bin") == BIG and storage.exists("files/t/big.bin")
    assert storage.exists("files/t") and not storage.exists("files/other")
    assert storage.size("files/t/missing.bin") is None and storage.read_text("files/t/missing.bin") is None

    # Ranges: inside a part, across the part boundary, the tail.
    for start, end in ((10, 99), (CHUNK - 7, CHUNK + 6), (BIG - 5, BIG - 1), (BIG - 3, None)):
        got = b"".join(storage.open_range("files/t/big.bin", start, end))
        assert got == original[start : (BIG if end is None else end + 1)]


def test_push_and_pull_sync_a_tree_and_skip_what_is_unchanged(
    storage: S3Storage, tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints = storage.job_dir("job_1") / "checkpoints"
    step = checkpoints / "step-00000003"
    step.mkdir(parents=True)
    sha = _big_file(step / "model.safetensors", 6 * MiB)
    (step / "config.json").write_text('{"a": 1}')
    (checkpoints / ".tmp-step-00000006-42").mkdir()
    (checkpoints / ".tmp-step-00000006-42" / "half.bin").write_bytes(b"partial")
    key = storage.relative(checkpoints)
    assert key == "jobs/job_1/checkpoints"

    storage.push(key)
    listed = s3_server.client().list_objects_v2(Bucket=storage.bucket, Prefix="distill/jobs/job_1/")
    assert sorted(o["Key"] for o in listed["Contents"]) == [
        "distill/jobs/job_1/checkpoints/step-00000003/config.json",
        "distill/jobs/job_1/checkpoints/step-00000003/model.safetensors",
    ]  # a writer's hidden temporary is not copied

    uploads: list[str] = []
    real_upload = storage._upload
    monkeypatch.setattr(
        storage, "_upload", lambda path, name: (uploads.append(name), real_upload(path, name))
    )
    storage.push(key)
    assert uploads == []  # nothing changed
    (step / "config.json").write_text('{"a": 22}')
    os.utime(step / "config.json", (os.path.getmtime(step) + 5,) * 2)
    storage.push(key)
    assert uploads == ["distill/jobs/job_1/checkpoints/step-00000003/config.json"]

    # Another machine's scratch pulls the tree: the same bytes, then nothing more to copy.
    other = open_storage(_settings(tmp_path / "worker-2", s3_server, storage.bucket))
    assert isinstance(other, S3Storage) and other.root != storage.root
    local = other.pull(key)
    pulled = local / "step-00000003"
    assert (pulled / "config.json").read_text() == '{"a": 22}'
    assert hashlib.sha256((pulled / "model.safetensors").read_bytes()).hexdigest() == sha
    assert not (local / ".tmp-step-00000006-42").exists()
    downloads: list[str] = []
    monkeypatch.setattr(other, "_download", lambda item, path: downloads.append(item["Key"]))
    other.pull(key)
    assert downloads == []

    # A pruned checkpoint disappears from the bucket at the next push; delete removes a whole tree.
    (step / "config.json").unlink()
    storage.push(key)
    assert not storage.exists(f"{key}/step-00000003/config.json")
    assert storage.exists(f"{key}/step-00000003/model.safetensors")
    storage.delete("jobs/job_1")
    assert not storage.exists(key)
    with pytest.raises(ValueError):
        storage.delete("")


def test_a_stored_directory_is_archived_once_and_served_from_the_bucket(
    storage: S3Storage, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    student = storage.job_dir("job_2") / "student"
    student.mkdir(parents=True)
    (student / "config.json").write_text("{}")
    (student / "model.safetensors").write_bytes(os.urandom(300_000))
    storage.push("jobs/job_2/student")
    for path in sorted(student.iterdir()):
        path.unlink()
    student.rmdir()  # the API has no copy: it archives from the bucket

    archive = directory_archive(
        storage, "jobs/job_2/student", "jobs/job_2/archives/student.tar.gz", "student"
    )
    body = b"".join(storage.open_range(archive.key))
    assert len(body) == archive.size_bytes == storage.size(archive.key)
    assert hashlib.sha256(body).hexdigest() == archive.sha256
    assert storage.read_text(archive.key + ".sha256").strip() == archive.sha256
    (tmp_path / "a.tar.gz").write_bytes(body)
    with tarfile.open(tmp_path / "a.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["student", "student/config.json", "student/model.safetensors"]
    assert not list((storage.root / "tmp").iterdir())  # no scratch left behind

    def no_checkout(*_args: object) -> None:
        raise AssertionError("a stored archive is not built again")

    monkeypatch.setattr(storage, "checkout", no_checkout)
    assert directory_archive(storage, "jobs/job_2/student", archive.key, "student") == archive


def test_storage_errors_are_named_without_bucket_or_server(tmp_path: Path, s3_server: S3Server) -> None:
    missing_bucket = open_storage(_settings(tmp_path, s3_server, "no-such-bucket-here"))
    with pytest.raises(StorageUnavailable) as caught, storage_errors("storing the upload"):
        missing_bucket.size("files/x.jsonl")
        list(missing_bucket.open_range("files/x.jsonl"))
    assert "no-such-bucket-here" not in caught.value.message

    with pytest.raises(StorageUnavailable) as caught, storage_errors("storing the upload"):
        source = tmp_path / "x.jsonl"
        source.write_text("{}\n")
        missing_bucket.put_file("files/x.jsonl", source)
    assert "storing the upload" in caught.value.message and "no-such-bucket" not in caught.value.message

    unreachable = Settings(
        home=tmp_path,
        storage_url="s3://bucket/p",
        s3_endpoint_url="http://127.0.0.1:9",
        s3_access_key_id="k",
        s3_secret_access_key="s",
        s3_region="us-east-1",
    )
    with pytest.raises(StorageUnavailable), storage_errors("reading an uploaded file"):
        open_storage(unreachable).pull("files/t/f.jsonl")
