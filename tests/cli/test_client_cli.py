"""`distill jobs` / `distill files` as a pipeline step would run them: real processes against a real API
server (no worker here, so jobs stay queued; the end-to-end test runs one to success)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.api import dolly_lines
from tests.support.live_api import LiveApi

pytestmark = pytest.mark.parametrize("live_api", ["sqlite"], indirect=True)


def distill(live_api: LiveApi, key: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")}
    env |= {"DISTILL_API_URL": live_api.base_url, "DISTILL_API_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_files_and_jobs_from_the_command_line(
    live_api: LiveApi, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    _, key = live_api.new_tenant("cli")
    data = tmp_path / "train.jsonl"
    data.write_bytes(dolly_lines(6))
    uploaded = distill(live_api, key, "files", "upload", str(data), "--json")
    assert uploaded.returncode == 0, uploaded.stderr
    file_id = json.loads(uploaded.stdout)["id"]
    listed = distill(live_api, key, "files", "list", "--json")
    assert [f["id"] for f in json.loads(listed.stdout)] == [file_id]

    spec = tmp_path / "job.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "teacher": {"model": str(tiny_teacher_dir)},
                "student": {"from_teacher_layers": [0, 2]},
                "data": {"train": "train.jsonl", "max_length": 64, "max_prompt_length": 32},
                "training": {"max_steps": 2, "batch_size": 2},
            }
        )
    )
    created = distill(live_api, key, "jobs", "create", str(spec), "--json")
    assert created.returncode == 0, created.stderr
    job = json.loads(created.stdout)
    assert job["status"] == "queued" and job["spec"]["data"]["train"].startswith("file_")

    # No worker runs here: waiting gives up with the timeout code, and the job is still listed as queued.
    waited = distill(live_api, key, "jobs", "watch", job["id"], "--timeout", "2", "--json")
    assert waited.returncode == 4, waited.stderr
    got = distill(live_api, key, "jobs", "get", job["id"], "--json")
    assert json.loads(got.stdout)["status"] == "queued"
    listed_jobs = distill(live_api, key, "jobs", "list", "--status", "queued", "--json")
    assert [j["id"] for j in json.loads(listed_jobs.stdout)] == [job["id"]]

    cancelled = distill(live_api, key, "jobs", "cancel", job["id"], "--json")
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["status"] == "cancelled"
    watched = distill(live_api, key, "jobs", "watch", job["id"], "--json")
    assert watched.returncode == 3, watched.stderr  # a cancelled job is not a success

    refused = distill(live_api, key, "jobs", "cancel", job["id"])
    assert refused.returncode == 5 and "job_not_cancellable" in refused.stderr
    missing = distill(live_api, key, "jobs", "download", "job_missing", "-o", str(tmp_path / "out"))
    assert missing.returncode == 5 and "404" in missing.stderr
    bad_key = distill(live_api, "dk_wrong", "files", "list")
    assert bad_key.returncode == 5 and "401" in bad_key.stderr
    usage = distill(live_api, key, "jobs", "create", str(spec), "--metadata", "novalue")
    assert usage.returncode != 0 and "KEY=VALUE" in usage.stderr
