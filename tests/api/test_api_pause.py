"""Pause, resume and metadata through a real uvicorn server (SQLite and PostgreSQL).

`POST /v1/jobs/{id}/pause` pauses a queued job at once (its message, when a worker gets it, claims nothing)
and asks a running one to stop (`pausing`; the worker records `paused`, see tests/e2e/test_pause_resume.py);
resume puts a paused job back in the queue (its message really sent) with its attempts; cancel ends it;
ended or cancelling jobs answer 409 in the error shape. Jobs carry `metadata` (string → string) given at
creation, shown in the view, compared by Idempotency-Key and filtered by `metadata[KEY]=VALUE`. The test
plays the worker by writing rows where it needs a running job."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from core.db import utcnow
from core.jobs.models import Job
from core.jobs.states import JobStatus
from core.queue import queue_depth
from tests.support.api import assert_error, dolly_lines, job_spec, upload
from tests.support.live_api import LiveApi
from worker import reaper
from worker.supervisor import run_job

PUBLIC_URL = "https://93.184.216.34/hooks/distill"  # a public address: no name to resolve


@pytest.fixture(scope="module")
def tenant(live_api: LiveApi) -> dict[str, str]:
    _, key = live_api.new_tenant("pause")
    with live_api.client(key) as client:
        train = upload(client, dolly_lines(4)).json()["id"]
    return {"key": key, "train": train}


def create(
    client: httpx.Client, teacher: Path, train: str, metadata: Any = None, **headers: str
) -> httpx.Response:
    body = job_spec(str(teacher), train)
    if metadata is not None:
        body["metadata"] = metadata
    # json.dumps escapes what httpx would refuse to send (a lone surrogate is valid JSON: "\ud800").
    headers = {"Content-Type": "application/json", **headers}
    return client.post("/v1/jobs", content=json.dumps(body), headers=headers)


def new_job(client: httpx.Client, teacher: Path, train: str, metadata: Any = None) -> dict[str, Any]:
    response = create(client, teacher, train, metadata)
    assert response.status_code == 201, response.text
    return response.json()


def set_row(live_api: LiveApi, job_id: str, **values: Any) -> None:
    with live_api.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))
        session.commit()


def events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return response.json()["data"]


# ------------------------------------------------------------------------------------------------ pause
def test_a_queued_job_is_paused_at_once_and_resumed_into_the_queue(
    live_api: LiveApi, tenant: dict[str, str], tiny_teacher_dir: Path
) -> None:
    with live_api.client(tenant["key"]) as client:
        hook = client.post("/v1/webhooks", json={"url": PUBLIC_URL, "events": ["job.paused"]})
        assert hook.status_code == 201, hook.text
        job = new_job(client, tiny_teacher_dir, tenant["train"], {"pipeline": "nightly"})
        # As if an earlier attempt's worker had been lost: a pause and a resume keep the count.
        set_row(live_api, job["id"], attempts=1)
        messages = queue_depth(live_api.settings)

        paused = client.post(f"/v1/jobs/{job['id']}/pause")
        assert paused.status_code == 200, paused.text
        body = paused.json()
        assert (body["status"], body["worker_id"], body["attempts"]) == ("paused", None, 1)
        assert body == client.get(f"/v1/jobs/{job['id']}").json()
        last = events(client, job["id"])[-1]
        assert (last["kind"], last["data"], last["message"]) == (
            "status",
            {"status": "paused"},
            "job paused before it started",
        )
        # A pause emits the `job.paused` webhook event, with the job as it now is.
        deliveries = client.get(f"/v1/webhooks/{hook.json()['id']}/deliveries").json()["data"]
        assert [d["payload"]["type"] for d in deliveries] == ["job.paused"]
        data = deliveries[0]["payload"]["data"]
        assert (data["id"], data["status"], data["metadata"]) == (
            job["id"],
            "paused",
            {"pipeline": "nightly"},
        )

        # Pausing again changes nothing (a retried request).
        again = client.post(f"/v1/jobs/{job['id']}/pause")
        assert again.status_code == 200 and again.json() == body
        count = len(events(client, job["id"]))

        # The job's message, when a worker gets it, claims nothing: a worker takes only a queued job.
        assert run_job(job["id"], live_api.settings, "worker-test:1") == "not_claimed"
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "paused"
        # A paused job will resume: its files stay in use.
        assert_error(client.delete(f"/v1/files/{tenant['train']}"), 409, "file_in_use", "file_id")
        assert queue_depth(live_api.settings) == messages  # a pause sends nothing

        resumed = client.post(f"/v1/jobs/{job['id']}/resume")
        assert resumed.status_code == 200, resumed.text
        body = resumed.json()
        assert (body["status"], body["attempts"], body["worker_id"], body["error"]) == (
            "queued",
            1,
            None,
            None,
        )
        log = events(client, job["id"])
        assert len(log) == count + 1
        assert (log[-1]["kind"], log[-1]["data"]) == ("status", {"status": "queued"})
        assert "resumed by the user" in log[-1]["message"] and "from the start" in log[-1]["message"]
        assert queue_depth(live_api.settings) == messages + 1  # its message was sent

        # Resuming again while it is queued changes nothing and sends nothing.
        assert client.post(f"/v1/jobs/{job['id']}/resume").json() == body
        assert queue_depth(live_api.settings) == messages + 1
        assert len(events(client, job["id"])) == count + 1
        assert client.delete(f"/v1/webhooks/{hook.json()['id']}").status_code in (200, 204)


def test_a_running_job_is_pausing_until_its_worker_stops_it(
    live_api: LiveApi, tenant: dict[str, str], tiny_teacher_dir: Path
) -> None:
    with live_api.client(tenant["key"]) as client:
        job = new_job(client, tiny_teacher_dir, tenant["train"])
        set_row(
            live_api, job["id"], status=JobStatus.RUNNING, worker_id="w1:1", attempts=1, heartbeat_at=utcnow()
        )

        pausing = client.post(f"/v1/jobs/{job['id']}/pause")
        assert pausing.status_code == 200, pausing.text
        assert (pausing.json()["status"], pausing.json()["worker_id"]) == ("pausing", "w1:1")
        assert events(client, job["id"])[-1]["data"] == {"status": "pausing"}
        assert client.post(f"/v1/jobs/{job['id']}/pause").json() == pausing.json()

        # Resume waits for the stop: a pausing job is still held by its worker.
        error = assert_error(client.post(f"/v1/jobs/{job['id']}/resume"), 409, "job_not_resumable", "job_id")
        assert "pausing" in error["message"]

        # A cancel while pausing wins: the worker stops the trainer either way, then records `cancelled`.
        cancelling = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelling.status_code == 200 and cancelling.json()["status"] == "cancelling"
        error = assert_error(client.post(f"/v1/jobs/{job['id']}/pause"), 409, "job_not_pausable", "job_id")
        assert "cancelled" in error["message"] and "cancelling" in error["message"]


def test_a_pausing_job_whose_worker_is_gone_ends_paused(
    live_api: LiveApi, tenant: dict[str, str], tiny_teacher_dir: Path
) -> None:
    """The reaper's rule (here at once, as `distill serve` applies it to a worker it saw die): paused, its
    attempt not counted, nothing sent; the user's resume then queues it with its attempts."""
    node = f"gone-{uuid.uuid4().hex[:8]}"
    with live_api.client(tenant["key"]) as client:
        job = new_job(client, tiny_teacher_dir, tenant["train"])
        set_row(
            live_api,
            job["id"],
            status=JobStatus.RUNNING,
            worker_id=f"{node}:7",
            attempts=2,
            heartbeat_at=utcnow(),
        )
        assert client.post(f"/v1/jobs/{job['id']}/pause").json()["status"] == "pausing"
        messages = queue_depth(live_api.settings)
        assert reaper.reap_worker(live_api.settings, node, "was killed by SIGKILL") == []
        body = client.get(f"/v1/jobs/{job['id']}").json()
        assert (body["status"], body["worker_id"], body["attempts"]) == ("paused", None, 1)
        last = events(client, job["id"])[-1]
        assert last["data"] == {"status": "paused"} and "killed by SIGKILL while pausing" in last["message"]
        assert queue_depth(live_api.settings) == messages  # nothing runs until the user resumes it
        resumed = client.post(f"/v1/jobs/{job['id']}/resume").json()
        assert (resumed["status"], resumed["attempts"]) == ("queued", 1)
        assert queue_depth(live_api.settings) == messages + 1


def test_the_event_stream_of_a_paused_job_stays_open(
    live_api: LiveApi, tenant: dict[str, str], tiny_teacher_dir: Path
) -> None:
    """A paused job has not ended: its stream sends the pause and waits for what comes next (a resume)."""
    with live_api.client(tenant["key"]) as client:
        job = new_job(client, tiny_teacher_dir, tenant["train"])
        assert client.post(f"/v1/jobs/{job['id']}/pause").json()["status"] == "paused"
        seen: list[str] = []
        timeout = httpx.Timeout(10, read=2)
        with client.stream("GET", f"/v1/jobs/{job['id']}/events?stream=true", timeout=timeout) as response:
            assert response.status_code == 200
            with pytest.raises(httpx.ReadTimeout):  # still open after its last event
                for line in response.iter_lines():
                    seen.append(line)
        sent = [json.loads(line.removeprefix("data:")) for line in seen if line.startswith("data:")]
        assert [event["data"] for event in sent] == [{"status": "queued"}, {"status": "paused"}]


def test_a_paused_job_can_be_cancelled(
    live_api: LiveApi, tenant: dict[str, str], tiny_teacher_dir: Path
) -> None:
    with live_api.client(tenant["key"]) as client:
        job = new_job(client, tiny_teacher_dir, tenant["train"])
        assert client.post(f"/v1/jobs/{job['id']}/pause").json()["status"] == "paused"
        cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        body = cancelled.json()
        assert body["status"] == "cancelled"
        assert body["finished_at"] is not None and body["cancel_requested_at"] is not None
        last = events(client, job["id"])[-1]
        assert (last["data"], last["message"]) == ({"status": "cancelled"}, "job cancelled while paused")
        # It has ended: no pause, and (without a checkpoint) no resume.
        assert_error(client.post(f"/v1/jobs/{job['id']}/pause"), 409, "job_not_pausable", "job_id")
        assert_error(client.post(f"/v1/jobs/{job['id']}/resume"), 409, "job_not_resumable", "job_id")


@pytest.mark.parametrize("status", [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED])
def test_an_ended_job_is_not_pausable(
    live_api: LiveApi, tenant: dict[str, str], tiny_teacher_dir: Path, status: JobStatus
) -> None:
    with live_api.client(tenant["key"]) as client:
        job = new_job(client, tiny_teacher_dir, tenant["train"])
        set_row(live_api, job["id"], status=status, finished_at=utcnow())
        error = assert_error(client.post(f"/v1/jobs/{job['id']}/pause"), 409, "job_not_pausable", "job_id")
        assert status.value in error["message"] and "ended" in error["message"]
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == status.value


def test_pausing_an_unknown_or_foreign_job_is_not_found(
    live_api: LiveApi, tenant: dict[str, str], tiny_teacher_dir: Path
) -> None:
    with live_api.client(tenant["key"]) as client:
        job = new_job(client, tiny_teacher_dir, tenant["train"])
    _, other_key = live_api.new_tenant("other")
    with live_api.client(other_key) as client:
        assert_error(client.post(f"/v1/jobs/{job['id']}/pause"), 404, "job_not_found", "job_id")
        assert_error(client.post("/v1/jobs/job_nope/pause"), 404, "job_not_found", "job_id")
    with live_api.client(tenant["key"]) as client:
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"


# --------------------------------------------------------------------------------------------- metadata
LABELS = {"team": "nlp", "run.id": "a/b:c@d+e-f_g", "note": "ünïcode 日本 \"quoted\" 'x' \\ %"}


def test_metadata_is_stored_and_shown(
    live_api: LiveApi, tenant: dict[str, str], tiny_teacher_dir: Path
) -> None:
    with live_api.client(tenant["key"]) as client:
        job = new_job(client, tiny_teacher_dir, tenant["train"], LABELS)
        assert job["metadata"] == LABELS and "metadata" not in job["spec"]
        assert client.get(f"/v1/jobs/{job['id']}").json()["metadata"] == LABELS
        full = {f"k{i}": "v" * 512 for i in range(16)} | {"k" * 64: ""}
        del full["k0"]
        assert new_job(client, tiny_teacher_dir, tenant["train"], full)["metadata"] == full
        # Without metadata (or with null), an empty object.
        assert new_job(client, tiny_teacher_dir, tenant["train"])["metadata"] == {}
        response = client.post(
            "/v1/jobs", json={**job_spec(str(tiny_teacher_dir), tenant["train"]), "metadata": None}
        )
        assert response.status_code == 201 and response.json()["metadata"] == {}
    with live_api.session() as session:
        assert session.get(Job, job["id"]).user_metadata == LABELS  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("metadata", "param"),
    [
        ({f"k{i}": "v" for i in range(17)}, "metadata"),
        ({"k" * 65: "v"}, "metadata"),
        ({"": "v"}, "metadata"),
        ({"a b": "v"}, "metadata"),
        ({"naïve": "v"}, "metadata"),
        ({"line\n": "v"}, "metadata"),
        ({"team": 1}, "metadata.team"),
        ({"team": None}, "metadata.team"),
        ({"team": ["nlp"]}, "metadata.team"),
        ({"team": "v" * 513}, "metadata.team"),
        ({"team": "a\nb"}, "metadata.team"),
        ({"team": "a\x00b"}, "metadata.team"),
        ({"team": "\ud800"}, "metadata.team"),
        ("team=nlp", "metadata"),
        (["team", "nlp"], "metadata"),
    ],
)
def test_invalid_metadata_is_refused_naming_it(
    live_api: LiveApi, tenant: dict[str, str], tiny_teacher_dir: Path, metadata: Any, param: str
) -> None:
    with live_api.client(tenant["key"]) as client:
        before = _job_count(live_api)
        assert_error(create(client, tiny_teacher_dir, tenant["train"], metadata), 422, param=param)
        assert _job_count(live_api) == before


def _job_count(live_api: LiveApi) -> int:
    with live_api.session() as session:
        return session.scalar(select(func.count()).select_from(Job)) or 0


def test_metadata_is_part_of_the_idempotency_comparison(
    live_api: LiveApi, tenant: dict[str, str], tiny_teacher_dir: Path
) -> None:
    key = f"pause-test-{uuid.uuid4().hex}"
    with live_api.client(tenant["key"]) as client:
        first = create(
            client, tiny_teacher_dir, tenant["train"], {"a": "1", "b": "2"}, **{"Idempotency-Key": key}
        )
        assert first.status_code == 201, first.text
        # The same labels in another order are the same body.
        again = create(
            client, tiny_teacher_dir, tenant["train"], {"b": "2", "a": "1"}, **{"Idempotency-Key": key}
        )
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        for other in ({"a": "1"}, {"a": "1", "b": "3"}, None):
            response = create(client, tiny_teacher_dir, tenant["train"], other, **{"Idempotency-Key": key})
            assert_error(response, 409, "idempotency_key_reused", "Idempotency-Key")
        # Without labels, no labels and an empty object are the same body.
        key = f"pause-test-{uuid.uuid4().hex}"
        plain = create(client, tiny_teacher_dir, tenant["train"], **{"Idempotency-Key": key})
        assert plain.status_code == 201
        empty = create(client, tiny_teacher_dir, tenant["train"], {}, **{"Idempotency-Key": key})
        assert empty.status_code == 200 and empty.json()["id"] == plain.json()["id"]


def test_the_list_filters_by_metadata(live_api: LiveApi, tiny_teacher_dir: Path) -> None:
    _, key = live_api.new_tenant("labels")
    with live_api.client(key) as client:
        train = upload(client, dolly_lines(4)).json()["id"]
        a = new_job(client, tiny_teacher_dir, train, {"team": "nlp", "run": "1", "run.id": LABELS["run.id"]})
        b = new_job(client, tiny_teacher_dir, train, {"team": "nlp", "run": "2", "note": LABELS["note"]})
        c = new_job(client, tiny_teacher_dir, train, {"team": "vision", "run": "1"})
        d = new_job(client, tiny_teacher_dir, train)

        def ids(**params: Any) -> list[str]:
            response = client.get("/v1/jobs", params=params)
            assert response.status_code == 200, response.text
            return [job["id"] for job in response.json()["data"]]

        assert ids() == [d["id"], c["id"], b["id"], a["id"]]
        assert ids(**{"metadata[team]": "nlp"}) == [b["id"], a["id"]]
        assert ids(**{"metadata[team]": "nlp", "metadata[run]": "1"}) == [a["id"]]
        assert ids(**{"metadata[run]": "1"}) == [c["id"], a["id"]]
        assert ids(**{"metadata[run.id]": LABELS["run.id"]}) == [a["id"]]
        assert ids(**{"metadata[note]": LABELS["note"]}) == [b["id"]]
        assert ids(**{"metadata[team]": "NLP"}) == []  # values match exactly
        assert ids(**{"metadata[team]": ""}) == []
        assert ids(**{"metadata[missing]": "1"}) == []
        assert ids(**{"metadata[team]": "nlp", "metadata[run]": "3"}) == []
        # With the status filter and across pages.
        assert client.post(f"/v1/jobs/{a['id']}/pause").json()["status"] == "paused"
        assert ids(**{"metadata[team]": "nlp", "status": "paused"}) == [a["id"]]
        assert ids(**{"metadata[team]": "nlp", "status": "queued"}) == [b["id"]]
        page = client.get("/v1/jobs", params={"metadata[team]": "nlp", "limit": 1}).json()
        assert [job["id"] for job in page["data"]] == [b["id"]] and page["has_more"]
        rest = ids(**{"metadata[team]": "nlp", "limit": 1, "after": page["next_cursor"]})
        assert rest == [a["id"]]

    # Another tenant with the same labels sees only its own jobs.
    _, other_key = live_api.new_tenant("labels-other")
    with live_api.client(other_key) as client:
        assert client.get("/v1/jobs", params={"metadata[team]": "nlp"}).json()["data"] == []


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("metadata=nlp", "metadata"),
        ("metadata[team=nlp", "metadata[team"),
        ("metadata[a%20b]=x", "metadata[a b]"),
        ("metadata[]=x", "metadata[]"),
        ("metadata[team]=a%00b", "metadata[team]"),
        ("metadata[team]=a%0Ab", "metadata[team]"),
        (f"metadata[team]={'v' * 513}", "metadata[team]"),
        ("metadata[team]=a&metadata[team]=b", "metadata[team]"),
        ("&".join(f"metadata[k{i}]=v" for i in range(17)), "metadata"),
    ],
)
def test_an_invalid_metadata_filter_is_refused_naming_it(
    live_api: LiveApi, tenant: dict[str, str], query: str, param: str
) -> None:
    with live_api.client(tenant["key"]) as client:
        assert_error(client.get(f"/v1/jobs?{query}"), 422, "invalid_metadata", param)
