"""MLflow tracking against a real `mlflow server` (SQLite backend, local artifact store) started here and
shared by the module: a job through the API and a real Celery worker logs its spec, tags and every step
and evaluation metric into one run, logs its student as a `transformers` model and registers it, all read
back through MLflow's client; a resumed attempt logs into the same run without repeating a step; a dead
tracking server never fails a job; the API refuses tracking on a service without a tracking server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlflow.artifacts
import mlflow.transformers
import pytest
import yaml
from mlflow import MlflowClient
from pydantic import ValidationError
from sqlalchemy import select

from core.config import Settings
from core.db import session_scope
from core.distill.spec import JobSpec, MlflowSpec
from core.jobs.models import JobEvent
from core.tenants.keys import create_api_key
from migrations.runner import upgrade_database
from tests.support.api import assert_error
from tests.support.live_api import serve_in_thread, service_settings
from tests.support.services import (
    TERMINAL,
    Stack,
    free_port,
    make_settings,
    seed_job,
    sqlite_database,
    tiny_spec,
    write_dolly_subset,
)
from worker import supervisor
from worker.tracking import RUN_FILE, MlflowTracker, open_tracker

# Long end-to-end runs: `make test-slow` (and CI) runs them; the default suite stays near 10 minutes.
pytestmark = pytest.mark.slow

MAX_STEPS = 6
TRACKING = {"mlflow": {"experiment": "e2e", "run_name": "tiny", "register_as": "tiny-student"}}


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server on a free port: SQLite backend store, local artifact store."""
    home = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (home / "server.log").open("wb")
    # One worker and no job runner: the test machine's cores are shared.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}"]
    command += ["--artifacts-destination", str(home / "artifacts"), "--workers", "1"]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(home / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _stop_group(server)
        log.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (its uvicorn workers), SIGKILL after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            os.killpg(process.pid, signal.SIGKILL)  # what is left of the group
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
        return


def tracking_events(settings: Settings, job_id: str) -> list[JobEvent]:
    with session_scope(settings.database_url) as session:
        query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == "tracking")
        events = list(session.scalars(query.order_by(JobEvent.id)))
        session.expunge_all()
    return events


# ------------------------------------------------------------------------------------- a real job
@pytest.fixture
def stack(tmp_path: Path, tiny_teacher_dir: Path, mlflow_url: str) -> Iterator[Stack]:
    key = f"dk_test_{uuid.uuid4().hex}"
    settings = make_settings(
        tmp_path,
        database_url=sqlite_database(tmp_path / "db"),
        model_roots=[tiny_teacher_dir.parent],
        bootstrap_api_key=key,
        mlflow_tracking_uri=mlflow_url,
    )
    stack = Stack(settings, tmp_path / "logs", key=key)
    try:
        stack.start_worker()
        stack.client.wait_ready(stack.processes)
        yield stack
    finally:
        stack.stop()


def test_a_job_logs_its_run_and_registers_its_student(
    stack: Stack, mlflow_url: str, tiny_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)  # for `models:/` and artifact URIs
    api = stack.client
    train = api.upload(write_dolly_subset(tmp_path / "train.jsonl"))
    evaluation = api.upload(write_dolly_subset(tmp_path / "eval.jsonl", records=4), purpose="eval")
    spec: dict[str, Any] = tiny_spec(tiny_teacher_dir, train, max_steps=MAX_STEPS, eval_every=3)
    spec["data"]["eval"] = evaluation
    spec["evaluation"] = {"max_records": 2, "max_new_tokens": 4, "batch_size": 2}

    # The spec's tracking section is validated like the rest; a tracking server is never the spec's.
    bad = {"mlflow": {**TRACKING["mlflow"], "register_as": "team/model"}}
    assert_error(
        api.http.post("/v1/jobs", json={**spec, "tracking": bad}), 422, param="tracking.mlflow.register_as"
    )
    bad = {"mlflow": {"experiment": "e2e", "tracking_uri": "http://169.254.169.254"}}
    assert_error(
        api.http.post("/v1/jobs", json={**spec, "tracking": bad}), 422, param="tracking.mlflow.tracking_uri"
    )

    job = api.create_job({**spec, "tracking": TRACKING})
    done = api.wait_status(job["id"], TERMINAL, timeout=240, processes=stack.processes)
    assert done["status"] == "succeeded", (done, [w.output() for w in stack.workers])

    client = MlflowClient(tracking_uri=mlflow_url)
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id], f"tags.`distill.job_id` = '{job['id']}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    params = run.data.params
    assert (params["loss.name"], params["loss.alpha"], params["loss.lam"]) == ("amid", "0.5", "0.1")
    assert params["training.max_steps"] == str(MAX_STEPS) and params["data.train"] == train  # a file id
    assert params["teacher.model"] == tiny_teacher_dir.name  # inside MODEL_ROOTS: no server path
    tags = run.data.tags
    assert tags["distill.job_id"] == job["id"] and tags["distill.loss"] == "amid"
    assert tags["distill.teacher"] == tiny_teacher_dir.name and tags["distill.tenant"].startswith("ten")
    assert tags["distill.registered_as"] == "tiny-student/1"

    # Every step's metrics once, with its step, and the same values the service recorded.
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(point.step for point in history) == list(range(1, MAX_STEPS + 1))
    series = api.http.get(f"/v1/jobs/{job['id']}/metrics", params={"names": "loss,eval_ce_loss"}).json()
    assert {p.step: p.value for p in history} == pytest.approx(
        {p["step"]: p["value"] for p in series["series"]["loss"]}
    )
    eval_steps = sorted(p.step for p in client.get_metric_history(run.info.run_id, "eval_ce_loss"))
    assert eval_steps == [p["step"] for p in series["series"]["eval_ce_loss"]] == [0, 3, 6]
    assert {"eval_rouge_l", "kd_loss", "lr", "grad_norm"} <= set(run.data.metrics)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "eval")] == [
        f"eval/samples-{step:08d}.json" for step in (0, 3, 6)
    ]

    # The student: an MLflow `transformers` model of this run, registered as version 1.
    [output] = client.get_run(run.info.run_id).outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.source_run_id == run.info.run_id and logged.name == "student"
    version = client.get_model_version("tiny-student", "1")
    assert version.run_id == run.info.run_id and version.source == f"models:/{logged.model_id}"
    assert version.tags["distill.job_id"] == job["id"]
    files = {a.path for a in client.list_logged_model_artifacts(logged.model_id, "model")}
    assert {"model/config.json", "model/model.safetensors"} <= files, files
    mlmodel_path = mlflow.artifacts.download_artifacts(
        f"{logged.artifact_location}/MLmodel", dst_path=str(tmp_path)
    )
    mlmodel = yaml.safe_load(Path(mlmodel_path).read_text(encoding="utf-8"))
    flavor = mlmodel["flavors"]["transformers"]
    assert flavor["task"] == "text-generation" and flavor["pipeline_model_type"] == "LlamaForCausalLM"
    assert str(tmp_path) not in str(mlmodel) and "/jobs/" not in flavor["source_model_name"]
    pipeline = mlflow.transformers.load_model("models:/tiny-student/1")
    assert type(pipeline.model).__name__ == "LlamaForCausalLM"
    assert pipeline.model.config.num_hidden_layers == 2  # the student, not the teacher
    [generated] = pipeline("Name three primary colors.", max_new_tokens=4)
    assert generated["generated_text"].startswith("Name three primary colors.")

    messages = [e["message"] for e in api.events(job["id"]) if e["kind"] == "tracking"]
    assert messages[0] == f"MLflow: logging to run {run.info.run_id} in experiment 'e2e'", messages
    assert messages[-1] == "registered as tiny-student version 1", messages
    assert not any("stopped" in m for m in messages), messages


# --------------------------------------------------------------------------------- resumed attempts
def _tracker(url: str, job_dir: Path, reports: list[str], earlier_run_id: str | None = None) -> MlflowTracker:
    return MlflowTracker(
        tracking_uri=url,
        options=MlflowSpec(experiment="resume"),
        job_id="job_resume",
        tenant_id="ten_x",
        params={"loss.name": "amid", "loss.alpha": "0.5"},
        teacher="tiny-teacher",
        loss="amid",
        job_dir=job_dir,
        report=lambda message, data: reports.append(message),
        earlier_run_id=earlier_run_id,
        flush_interval_s=0,
    )


@pytest.mark.parametrize("same_machine", [True, False], ids=["run-file", "event-only"])
def test_a_resumed_attempt_logs_into_the_same_run_once_per_step(
    mlflow_url: str, tmp_path: Path, same_machine: bool
) -> None:
    reports: list[str] = []
    first = _tracker(mlflow_url, tmp_path, reports)
    first.on_start(total_steps=6, start_step=0)
    for step in range(1, 6):
        first.on_step(step, {"loss": float(step)})
    # The attempt dies after step 5; its last checkpoint is of step 3.
    if not same_machine:
        (tmp_path / RUN_FILE).unlink()  # another machine: only the run id in the job's events is left
    second = _tracker(mlflow_url, tmp_path, reports, earlier_run_id=first.run_id)
    second.on_start(total_steps=6, start_step=3)
    for step in range(4, 7):
        second.on_step(step, {"loss": 10.0 * step})
    second.finish(student_dir=None)  # stopped: the run is KILLED until a resume

    assert second.run_id == first.run_id and first.active and second.active, reports
    client = MlflowClient(tracking_uri=mlflow_url)
    history = sorted((p.step, p.value) for p in client.get_metric_history(first.run_id, "loss"))
    # MLflow cannot delete values: the steps the first attempt sent (4, 5) keep its values.
    assert history == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 60.0)]
    assert client.get_run(first.run_id).info.status == "KILLED"
    assert reports[-1] == f"MLflow: resumed run {first.run_id} in experiment 'resume'"


# ----------------------------------------------------------------------------- a dead tracking server
def test_a_dead_tracking_server_never_fails_the_job(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    closed = free_port()  # nothing listens there
    settings = make_settings(
        tmp_path,
        database_url=sqlite_database(tmp_path / "db"),
        model_roots=[tiny_teacher_dir.parent],
        mlflow_tracking_uri=f"http://127.0.0.1:{closed}",
    )
    spec = {
        **tiny_spec(tiny_teacher_dir, "placeholder", max_steps=4, checkpoint_every=2),
        "tracking": TRACKING,
    }
    job_id = seed_job(settings, spec)
    started = time.monotonic()
    assert supervisor.run_job(job_id, settings, "w1") == "succeeded"
    events = tracking_events(settings, job_id)
    assert len(events) == 1, [e.message for e in events]
    assert events[0].message == (
        "MLflow tracking stopped: the tracking server is unreachable; the job goes on without it"
    )
    assert str(closed) not in str(events[0].data)
    assert time.monotonic() - started < 120


def test_only_rank_zero_of_a_tracked_job_on_a_worker_with_a_server_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reports: list[str] = []
    spec = JobSpec.model_validate({**tiny_spec(Path("teacher"), "file_x"), "tracking": TRACKING})

    def tracker(settings: Settings, job_spec: JobSpec = spec) -> MlflowTracker | None:
        report = lambda message, data: reports.append(message)  # noqa: E731
        return open_tracker(settings=settings, spec=job_spec, job_id="job_x", job_dir=tmp_path, report=report)

    with_server = make_settings(tmp_path, database_url="sqlite://", mlflow_tracking_uri="http://127.0.0.1:9")
    assert tracker(with_server, JobSpec.model_validate(tiny_spec(Path("teacher"), "file_x"))) is None
    monkeypatch.setenv("RANK", "1")
    assert tracker(with_server) is None and reports == []
    monkeypatch.setenv("RANK", "0")
    # A worker configured without the API's tracking server: the job trains on, and says why.
    assert tracker(make_settings(tmp_path, database_url="sqlite://")) is None
    assert reports == [
        "MLflow tracking skipped: this worker has no tracking server (DISTILL_MLFLOW_TRACKING_URI); "
        "the job goes on without it"
    ]


# ------------------------------------------------------------------------------------------- the API
@pytest.mark.parametrize(
    ("mlflow_options", "field"),
    [
        ({"experiment": ""}, "experiment"),
        ({"experiment": "   "}, "experiment"),
        ({"experiment": "e" * 257}, "experiment"),
        ({"experiment": "a\x00b"}, "experiment"),
        ({"experiment": 7}, "experiment"),
        ({"run_name": "r" * 251}, "run_name"),
        ({"run_name": "line\nbreak"}, "run_name"),
        ({"register_as": "team:model"}, "register_as"),
        ({"register_as": ".."}, "register_as"),
        ({"register_as": "\ud800"}, "register_as"),
        ({"tracking_uri": "http://127.0.0.1:5000"}, "tracking_uri"),
    ],
)
def test_the_spec_refuses_bad_tracking_fields(mlflow_options: dict[str, Any], field: str) -> None:
    body = {**tiny_spec(Path("teacher"), "file_x"), "tracking": {"mlflow": mlflow_options}}
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(body)
    assert [error["loc"] for error in caught.value.errors()] == [("tracking", "mlflow", field)]


def test_the_api_refuses_tracking_without_a_tracking_server(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    upgrade_database(url)
    settings = service_settings(tmp_path, url, model_roots=[tiny_teacher_dir.parent])
    base_url, stop = serve_in_thread(settings)
    try:
        with session_scope(url) as session:
            _, key = create_api_key(session, tenant_name="acme")
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}) as http:
            with write_dolly_subset(tmp_path / "train.jsonl").open("rb") as handle:
                train = http.post("/v1/files", files={"file": ("train.jsonl", handle)}).json()["id"]
            spec = tiny_spec(tiny_teacher_dir, train)
            response = http.post("/v1/jobs", json={**spec, "tracking": TRACKING})
            error = assert_error(response, 422, "tracking_unavailable", "tracking.mlflow")
            assert "DISTILL_MLFLOW_TRACKING_URI" in error["message"]
            assert http.post("/v1/jobs", json={**spec, "tracking": {}}).status_code == 201  # nothing asked
    finally:
        stop()
