"""No server path in anything a tenant reads: a job whose teacher (named by a bare name under MODEL_ROOTS)
fails to load in a real worker shows neither the model folders nor the storage folder in GET
/v1/jobs/{id}, its events or its error, though the library's own message named the file."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.storage import Storage
from tests.support.services import (
    TERMINAL,
    Stack,
    make_settings,
    sqlite_database,
    tiny_spec,
    write_dolly_subset,
)
from worker import job_files


@pytest.fixture
def models(tmp_path: Path, tiny_teacher_dir: Path) -> Path:
    """A model folder whose teacher's config.json is not JSON: accepted by the API, refused by the loader."""
    root = tmp_path / "srv" / "models"
    broken = root / "broken-teacher"
    shutil.copytree(tiny_teacher_dir, broken)
    (broken / "config.json").write_text("{ this is not json", encoding="utf-8")
    return root


@pytest.fixture
def stack(tmp_path: Path, models: Path) -> Iterator[Stack]:
    key = f"dk_test_{uuid.uuid4().hex}"
    settings = make_settings(
        tmp_path / "srv",
        database_url=sqlite_database(tmp_path / "srv" / "db"),
        model_roots=[models],
        bootstrap_api_key=key,
        heartbeat_interval_s=0.5,
    )
    stack = Stack(settings, tmp_path / "logs", key=key)
    try:
        stack.start_worker()
        stack.client.wait_ready(stack.processes)
        yield stack
    finally:
        stack.stop()


def test_a_failed_model_load_shows_no_server_path(stack: Stack, models: Path, tmp_path: Path) -> None:
    client = stack.client
    file_id = client.upload(write_dolly_subset(tmp_path / "dolly.jsonl"))
    spec = tiny_spec(Path("broken-teacher"), file_id)
    job = client.create_job(spec)
    done = client.wait_status(job["id"], TERMINAL, timeout=180, processes=stack.processes)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "model_load_failed", done["error"]
    # The library named the file it could not parse; the tenant sees its last part only.
    assert "config.json" in done["error"]["message"], done["error"]

    # The worker did load from its own path to the model (written for the trainer, never shown).
    job_dir = Storage(stack.settings.artifacts).job_dir(job["id"])
    written = json.loads((job_dir / job_files.SPEC_FILE).read_text(encoding="utf-8"))
    assert written["teacher"]["model"] == str((models / "broken-teacher").resolve())

    shown = json.dumps([done, client.job(job["id"]), client.events(job["id"])])
    assert done["spec"]["teacher"]["model"] == "broken-teacher"
    server_paths = {str(models), str(stack.settings.artifacts), str(tmp_path)}
    server_paths |= {str(Path(path).resolve()) for path in server_paths}
    leaked = sorted(path for path in server_paths if path in shown)
    assert not leaked, (leaked, shown)
