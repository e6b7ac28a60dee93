"""The student a job produces is a model users can register: on a real stack (uvicorn API, Celery worker,
SQLite database and broker) the downloaded student carries its model card and distillery.json, and
`examples/pipeline.py` runs the whole pipeline step against it as a user would."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from transformers import AutoModelForCausalLM

from tests.support.services import REPO_ROOT, Stack, free_port, make_settings, sqlite_database, wait_for

# Long end-to-end runs: `make test-slow` (and CI) runs them; the default suite stays near 10 minutes.
pytestmark = pytest.mark.slow

TEACHER = "licensed-teacher"


@contextlib.contextmanager
def running_stack(home: Path, teacher_dir: Path, **settings: Any) -> Iterator[Stack]:
    """API + worker on SQLite, with a copy of the tiny teacher that declares a license under the model roots."""
    models = home / "models"
    shutil.copytree(teacher_dir, models / TEACHER)
    (models / TEACHER / "README.md").write_text(
        "---\nlicense: apache-2.0\n---\n# Teacher\n", encoding="utf-8"
    )
    key = f"dk_test_{uuid.uuid4().hex}"
    stack = Stack(
        make_settings(
            home,
            database_url=sqlite_database(home / "db"),
            model_roots=[models],
            bootstrap_api_key=key,
            heartbeat_interval_s=1.0,
            **settings,
        ),
        home / "logs",
        key=key,
    )
    try:
        stack.start_worker()
        stack.client.wait_ready(stack.processes)
        yield stack
    finally:
        stack.stop()


def run_example(stack: Stack, out: Path, *extra: str) -> list[str]:
    """examples/pipeline.py as a user runs it (the API's address and key in the environment); its lines."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("DISTILL_")}
    # The SDK as `make install` provides it, whether or not this .venv's editable install predates it.
    env["PYTHONPATH"] = str(REPO_ROOT)
    env |= {
        "DISTILL_API_URL": f"http://127.0.0.1:{stack.port}",
        "DISTILL_API_KEY": stack.settings.bootstrap_api_key or "",
    }
    command = [sys.executable, str(REPO_ROOT / "examples" / "pipeline.py"), "--teacher", TEACHER]
    command += ["--records", "12", "--steps", "4", "--out", str(out), *extra]
    result = subprocess.run(command, env=env, cwd=out.parent, capture_output=True, text=True, timeout=300)
    logs = "\n".join(process.output() for process in stack.processes)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{logs}"
    return result.stdout.splitlines()


def test_the_pipeline_example_runs_end_to_end(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    with running_stack(tmp_path / "home", tiny_teacher_dir) as stack:
        lines = run_example(stack, tmp_path / "students")
        check_example_output(stack, lines, tmp_path / "students")
    assert lines[-1] == "registered: not registered (the job had no MLflow target)"


def check_example_output(stack: Stack, lines: list[str], out: Path) -> None:
    """Each step printed what it did, and the student it downloaded carries the card the worker wrote."""
    assert re.fullmatch(
        r"uploaded train-first-12\.jsonl: file_\w+, 12 records, sha256 [0-9a-f]{64}", lines[0]
    )
    file_id = lines[0].split()[2].rstrip(",")
    job_id = next(line.split()[1] for line in lines if line.startswith("created job_"))
    assert f"created {job_id} (metadata {{'pipeline': 'example'}}); watching its events:" in lines
    assert "  [status] job succeeded" in lines
    assert any(line.startswith(f"job {job_id} succeeded at step 4; final loss ") for line in lines)
    student = out / job_id / "student"
    assert (
        f"downloaded the student to {student}: SHA-256 verified, distillery.json names {job_id} and the uploaded data"
        in lines
    )
    assert any(line.startswith("generated for 'Give three tips for staying healthy.': '") for line in lines)

    # What the example downloaded is the card the worker wrote, checked here against the API's records.
    job = stack.client.job(job_id)
    uploaded = stack.client.http.get(f"/v1/files/{file_id}").json()
    assert job["metadata"] == {"pipeline": "example"}
    record = json.loads((student / "distillery.json").read_text(encoding="utf-8"))
    assert record["job_id"] == job_id and record["steps"] == 4
    assert record["data_files"] == {
        "train": {
            "id": file_id,
            "filename": uploaded["filename"],
            "sha256": uploaded["sha256"],
            "records": 12,
        }
    }
    assert record["metrics"]["loss"] == pytest.approx(job["latest_metrics"]["loss"])
    # The spec as the tenant gave it: the file id and the model's name, not the server's paths.
    assert record["spec"]["teacher"]["model"] == TEACHER and record["spec"]["data"]["train"] == file_id
    assert record["spec"]["loss"] == job["spec"]["loss"]
    card = (student / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "apache-2.0" and front["base_model"] == TEACHER
    assert f"job `{job_id}`" in card and uploaded["sha256"] in card
    home = str(stack.settings.home)
    assert home not in card and home not in json.dumps(record)
    assert AutoModelForCausalLM.from_pretrained(student).config.num_hidden_layers == 2


# ------------------------------------------------------------------------------------------ with MLflow
@contextlib.contextmanager
def mlflow_server(home: Path) -> Iterator[str]:
    """A real `mlflow server` (SQLite backend store, local artifacts) on a free port; yields its URL."""
    home.mkdir(parents=True)
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}"]
    command += ["--artifacts-destination", str(home / "artifacts"), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with (home / "server.log").open("wb") as log:
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: _healthy(url, server, home), timeout=90, what="the MLflow server")
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=5)


def _healthy(url: str, server: subprocess.Popen[bytes], home: Path) -> bool:
    if server.poll() is not None:
        pytest.fail(f"mlflow server exited:\n{(home / 'server.log').read_text()[-3000:]}")
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.slow
def test_the_pipeline_example_says_where_mlflow_registered_the_student(
    tmp_path: Path, tiny_teacher_dir: Path
) -> None:
    with (
        mlflow_server(tmp_path / "mlflow") as url,
        running_stack(tmp_path / "home", tiny_teacher_dir, mlflow_tracking_uri=url) as stack,
    ):
        lines = run_example(stack, tmp_path / "students", "--mlflow-register-as", "pipeline-student")
        check_example_output(stack, lines, tmp_path / "students")
    assert re.fullmatch(
        r"registered: in the service's MLflow registry as 'pipeline-student' version 1 \(run \w+\)", lines[-1]
    ), lines
