"""docker-compose.yml's object storage and queues, checked against the code (no Docker engine here)."""

from __future__ import annotations

from pathlib import Path

import yaml

from core.config import Settings
from core.queue import job_queues

REPO_ROOT = Path(__file__).resolve().parents[1]


def _services() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text(encoding="utf-8"))["services"]


def _settings(env: dict[str, str]) -> Settings:
    values = {k.removeprefix("DISTILL_").lower(): v for k, v in env.items() if k.startswith("DISTILL_")}
    values = {k: v for k, v in values.items() if "${" not in str(v)}  # interpolated by compose
    return Settings.model_validate(values | {"storage_url": env["DISTILL_STORAGE_URL"]})


def test_artifacts_go_to_the_minio_bucket_the_compose_file_creates() -> None:
    services = _services()
    env = services["api"]["environment"]
    assert env["DISTILL_STORAGE_URL"].startswith("s3://")
    bucket = env["DISTILL_STORAGE_URL"].removeprefix("s3://").split("/")[0]
    assert env["DISTILL_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert f"local/{bucket}" in services["minio-bucket"]["command"][0]
    for name in ("api", "worker", "worker-h100"):
        depends = services[name]["depends_on"]
        assert depends["minio-bucket"]["condition"] == "service_completed_successfully", name


def test_two_workers_on_different_gpus_consume_configured_queues() -> None:
    services = _services()
    workers = {name: s for name, s in services.items() if s.get("command", [None, None])[1:2] == ["worker"]}
    assert len(workers) >= 2
    gpu_sets = []
    for name, service in workers.items():
        settings = _settings(service["environment"])
        assert set(settings.worker_queues) <= set(job_queues(settings)), name
        devices = service["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        assert settings.worker_devices == len(devices), name
        gpu_sets.append(set(devices))
    assert not set.intersection(*gpu_sets)  # no GPU reserved twice
