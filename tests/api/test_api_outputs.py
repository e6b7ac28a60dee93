"""What jobs produce, through a real uvicorn server: the event log (list and live SSE), metric series,
checkpoint and student downloads as .tar.gz. The test plays the worker by writing rows and files."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from transformers import AutoModelForCausalLM

from core.db import utcnow
from core.jobs.lifecycle import add_event, transition
from core.jobs.models import Checkpoint, Metric
from core.jobs.states import JobStatus
from core.storage import Storage
from tests.support.api import assert_error, dolly_lines, job_spec, upload
from tests.support.live_api import LiveApi

# How long the live event stream may take to deliver what the test waits for before the test fails.
STREAM_DEADLINE_S = 30.0


@pytest.fixture
def tenant_job(live_api: LiveApi, tiny_teacher_dir: Path) -> tuple[str, str]:
    """(api key, id of a new queued job)."""
    _, key = live_api.new_tenant("outputs")
    with live_api.client(key) as client:
        train = upload(client, dolly_lines(4)).json()["id"]
        job_id = client.post("/v1/jobs", json=job_spec(str(tiny_teacher_dir), train)).json()["id"]
    return key, job_id


def _move(live_api: LiveApi, job_id: str, target: JobStatus, **values: object) -> None:
    with live_api.session() as session:
        assert transition(session, job_id=job_id, target=target, **values)
        session.commit()


def _sse_events(lines: list[str]) -> list[dict[str, str]]:
    events, current = [], {}
    for line in lines:
        if not line:
            if "data" in current:
                events.append(current)
            current = {}
        elif not line.startswith(":") and ":" in line:
            field, value = line.split(":", 1)
            current[field] = value.strip()
    return events


def test_event_stream_follows_the_job_to_its_end(live_api: LiveApi, tenant_job: tuple[str, str]) -> None:
    key, job_id = tenant_job
    received: list[str] = []
    failures: list[BaseException] = []
    done = threading.Event()

    def listen() -> None:
        try:
            with (
                live_api.client(key) as client,
                client.stream("GET", f"/v1/jobs/{job_id}/events", params={"stream": "true"}) as response,
            ):
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                for line in response.iter_lines():
                    received.append(line)
        except BaseException as exc:  # an assertion or a transport error: reported by the test thread
            failures.append(exc)
            return
        done.set()

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    # The queued event is already in the log, so it is sent on the stream's first poll (every 0.5 s). A
    # stream that never sends it (heartbeats keep the connection open) must fail here, not hang the run.
    deadline = time.monotonic() + STREAM_DEADLINE_S
    while not any(line.startswith("id:") for line in list(received)):  # the queued event arrived
        assert not failures, f"the event stream failed: {failures[0]!r}; received {received!r}"
        assert listener.is_alive(), f"the event stream ended before its first event; received {received!r}"
        assert time.monotonic() < deadline, (
            f"no event with an id on the stream within {STREAM_DEADLINE_S:.0f} s; received {received!r}"
        )
        time.sleep(0.05)
    _move(live_api, job_id, JobStatus.RUNNING, started_at=utcnow())
    with live_api.session() as session:
        add_event(session, job_id=job_id, kind="log", message="step 1", data={"step": 1})
        session.commit()
    _move(live_api, job_id, JobStatus.SUCCEEDED, finished_at=utcnow())
    assert done.wait(timeout=STREAM_DEADLINE_S), (
        f"the stream did not end after the final status: {failures or 'still open'}; received {received!r}"
    )
    events = _sse_events(received)
    kinds = [(e["event"], json.loads(e["data"])["message"]) for e in events]
    assert kinds == [
        ("status", "job queued"),
        ("status", "job is running"),
        ("log", "step 1"),
        ("status", "job is succeeded"),
    ]
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids) and all(json.loads(e["data"])["id"] == int(e["id"]) for e in events)

    # Reconnecting with Last-Event-ID resumes after that event, and ends at once for an ended job.
    with live_api.client(key) as client:
        response = client.get(
            f"/v1/jobs/{job_id}/events", params={"stream": "true"}, headers={"Last-Event-ID": str(ids[1])}
        )
        resumed = _sse_events(response.text.splitlines())
        assert [int(e["id"]) for e in resumed] == ids[2:]
        listed = client.get(f"/v1/jobs/{job_id}/events", params={"after": ids[0], "limit": 2}).json()
        assert [e["id"] for e in listed["data"]] == ids[1:3] and listed["has_more"] is True
        assert listed["next_cursor"] == str(ids[2])
        assert_error(client.get(f"/v1/jobs/{job_id}/events", params={"limit": 0}), 422, param="limit")
        assert_error(client.get(f"/v1/jobs/{job_id}/events", params={"after": "x"}), 422, param="after")


def test_metric_series(live_api: LiveApi, tenant_job: tuple[str, str]) -> None:
    key, job_id = tenant_job
    with live_api.session() as session:
        for step in range(1, 6):
            session.add(Metric(job_id=job_id, step=step, name="loss", value=1.0 / step))
            session.add(Metric(job_id=job_id, step=step, name="lr", value=0.001))
        session.add(Metric(job_id=job_id, step=6, name="loss", value=float("inf")))  # SQLite cannot store NaN
        session.commit()
    with live_api.client(key) as client:
        everything = client.get(f"/v1/jobs/{job_id}/metrics").json()
        assert set(everything["series"]) == {"loss", "lr"}
        assert [p["step"] for p in everything["series"]["loss"]] == [1, 2, 3, 4, 5, 6]
        assert everything["series"]["loss"][1] == {"step": 2, "value": 0.5}
        assert everything["series"]["loss"][-1] == {"step": 6, "value": None}  # inf is not JSON
        some = client.get(f"/v1/jobs/{job_id}/metrics", params={"names": "loss", "from_step": 4}).json()
        assert some["series"] == {
            "loss": [{"step": 4, "value": 0.25}, {"step": 5, "value": 0.2}, {"step": 6, "value": None}]
        }
        assert_error(
            client.get(f"/v1/jobs/{job_id}/metrics", params={"from_step": -1}), 422, param="from_step"
        )
        assert_error(client.get(f"/v1/jobs/{job_id}/metrics", params={"names": ","}), 422, param="names")


def _download(client: httpx.Client, path: str) -> tuple[httpx.Response, bytes]:
    with client.stream("GET", path) as response:
        return response, response.read()


def test_checkpoint_download(live_api: LiveApi, tenant_job: tuple[str, str], tiny_student_dir: Path) -> None:
    key, job_id = tenant_job
    storage = Storage(live_api.settings.artifacts)
    directory = storage.job_dir(job_id) / "checkpoints" / "step-00000003"
    shutil.copytree(tiny_student_dir, directory / "model")
    (directory / "trainer_state.json").write_text('{"step": 3}')
    with live_api.session() as session:
        session.add(
            Checkpoint(
                job_id=job_id,
                step=3,
                storage_path=storage.relative(directory),
                size_bytes=1,
                metrics={"loss": 2.5},
            )
        )
        session.commit()
    with live_api.client(key) as client:
        listed = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
        assert [(c["step"], c["metrics"]) for c in listed] == [(3, {"loss": 2.5})]
        response, body = _download(client, listed[0]["download_url"])
        assert response.status_code == 200
        assert int(response.headers["content-length"]) == len(body)
        assert response.headers["x-content-sha256"] == hashlib.sha256(body).hexdigest()
        assert "checkpoint-00000003.tar.gz" in response.headers["content-disposition"]
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
            names = archive.getnames()
        assert "checkpoint-00000003/trainer_state.json" in names
        assert "checkpoint-00000003/model/config.json" in names
        assert_error(client.get(f"/v1/jobs/{job_id}/checkpoints/4/download"), 404, "checkpoint_not_found")
        assert_error(client.get(f"/v1/jobs/{job_id}/checkpoints/x/download"), 422, param="step")


def test_student_download_loads_with_transformers(
    live_api: LiveApi, tenant_job: tuple[str, str], tiny_student_dir: Path, tmp_path: Path
) -> None:
    key, job_id = tenant_job
    with live_api.client(key) as client:
        assert_error(client.get(f"/v1/jobs/{job_id}/student"), 409, "student_not_ready")
        _move(live_api, job_id, JobStatus.RUNNING, started_at=utcnow())
        assert_error(client.get(f"/v1/jobs/{job_id}/student"), 409, "student_not_ready")
        shutil.copytree(tiny_student_dir, Storage(live_api.settings.artifacts).job_dir(job_id) / "student")
        _move(live_api, job_id, JobStatus.SUCCEEDED, finished_at=utcnow())

        response, body = _download(client, f"/v1/jobs/{job_id}/student")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/gzip"
        assert int(response.headers["content-length"]) == len(body)
        digest = hashlib.sha256(body).hexdigest()
        assert response.headers["x-content-sha256"] == digest
        again, body_again = _download(client, f"/v1/jobs/{job_id}/student")  # served from the cached archive
        assert again.headers["x-content-sha256"] == digest and body_again == body

    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
        archive.extractall(tmp_path, filter="data")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    reference = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    assert model.config.num_hidden_layers == reference.config.num_hidden_layers
    for (name, value), (_, expected) in zip(
        model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert value.equal(expected), name
