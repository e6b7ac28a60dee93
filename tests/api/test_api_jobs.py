"""`/v1/jobs` through a real uvicorn server: validation naming the field, idempotent create, pagination,
tenant isolation and cancellation. No worker runs: jobs stay queued unless a test moves them."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from core.db import utcnow
from core.jobs.lifecycle import transition
from core.jobs.states import IllegalTransition, JobStatus
from tests.support.api import assert_error, dolly_lines, job_spec, upload
from tests.support.live_api import LiveApi


@pytest.fixture(scope="module")
def acme(live_api: LiveApi) -> dict[str, str]:
    """A tenant with an uploaded training file and an eval file."""
    _, key = live_api.new_tenant("acme")
    with live_api.client(key) as client:
        train = upload(client, dolly_lines(16)).json()["id"]
        evaluation = upload(client, dolly_lines(4), purpose="eval").json()["id"]
    return {"key": key, "train": train, "eval": evaluation}


def _spec(teacher: Path, acme: dict[str, str], **sections: Any) -> dict[str, Any]:
    return job_spec(str(teacher), acme["train"], **sections)


def test_create_and_get(live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path) -> None:
    with live_api.client(acme["key"]) as client:
        response = client.post("/v1/jobs", json=_spec(tiny_teacher_dir, acme))
        assert response.status_code == 201, response.text
        job = response.json()
        assert job["status"] == "queued"
        assert job["progress"] == {"step": 0, "total_steps": 4, "percent": 0.0, "eta_seconds": None}
        assert job["error"] is None and job["attempts"] == 0 and job["max_attempts"] == 2
        assert job["spec"]["data"]["train"] == acme["train"]
        assert job["spec"]["loss"]["name"] == "amid"  # defaults are filled in and stored
        assert client.get(f"/v1/jobs/{job['id']}").json() == job
        events = client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
        assert [(e["kind"], e["data"]) for e in events] == [("status", {"status": "queued"})]


def test_bare_model_name_resolves_under_model_roots(
    live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path
) -> None:
    """A bare name is checked as the model under MODEL_ROOTS but stored as given: the job never shows the
    server's path (the worker resolves the name again under its own roots, see tests/worker)."""
    name = tiny_teacher_dir.name
    with live_api.client(acme["key"]) as client:
        response = client.post(
            "/v1/jobs", json=job_spec(name, acme["train"]), headers={"Idempotency-Key": name}
        )
        assert response.status_code == 201, response.text
        job = response.json()
        assert job["spec"]["teacher"]["model"] == name
        assert client.get(f"/v1/jobs/{job['id']}").json()["spec"]["teacher"]["model"] == name
        # A retry compares the spec as given: the same job, not a conflict.
        again = client.post("/v1/jobs", json=job_spec(name, acme["train"]), headers={"Idempotency-Key": name})
        assert again.status_code == 200 and again.json()["id"] == job["id"]
        # Validated as the model found under the roots: its layers are counted from its config.json.
        too_deep = job_spec(name, acme["train"], student={"from_teacher_layers": [0, 99]})
        assert_error(client.post("/v1/jobs", json=too_deep), 422, param="student.from_teacher_layers")
        missing = job_spec("no-such-teacher", acme["train"])
        assert_error(client.post("/v1/jobs", json=missing), 422, param="teacher.model")


BAD_SPECS = [
    ("lam-above-1", {"loss": {"lam": 1.5}}, "loss.lam"),
    ("lam-negative", {"loss": {"lam": -0.1}}, "loss.lam"),
    ("alpha-not-a-number", {"loss": {"alpha": "abc"}}, "loss.alpha"),
    ("unknown-loss", {"loss": {"name": "nope"}}, "loss.name"),
    ("unknown-field", {"loss": {"lambda": 0.3}}, "loss.lambda"),
    ("unknown-section", {"optimizer": {"name": "adam"}}, "optimizer"),
    ("zero-steps", {"training": {"max_steps": 0}}, "training.max_steps"),
    ("prompt-too-long", {"data": {"max_length": 64, "max_prompt_length": 64}}, "data"),
    ("two-student-sources", {"student": {"model": "x", "from_teacher_layers": [0]}}, "student"),
]


@pytest.mark.parametrize(("sections", "param"), [b[1:] for b in BAD_SPECS], ids=[b[0] for b in BAD_SPECS])
def test_invalid_spec_fields(
    live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path, sections: dict[str, Any], param: str
) -> None:
    with live_api.client(acme["key"]) as client:
        assert_error(
            client.post("/v1/jobs", json=_spec(tiny_teacher_dir, acme, **sections)), 422, param=param
        )


def test_nan_alpha_is_refused(live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path) -> None:
    body = (
        str(_spec(tiny_teacher_dir, acme))
        .replace("'", '"')
        .replace('"training"', '"loss": {"alpha": NaN}, "training"')
    )
    with live_api.client(acme["key"]) as client:
        response = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
        assert_error(response, 422, param="loss.alpha")


def test_malformed_json_body(live_api: LiveApi, acme: dict[str, str]) -> None:
    with live_api.client(acme["key"]) as client:
        response = client.post(
            "/v1/jobs", content=b'{"teacher": ', headers={"Content-Type": "application/json"}
        )
        assert_error(response, 400, "invalid_json")
        assert_error(client.post("/v1/jobs", json=[1, 2]), 422, "invalid_request")


def test_missing_and_foreign_files(live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path) -> None:
    _, other_key = live_api.new_tenant("other")
    with live_api.client(other_key) as other:
        foreign = upload(other, dolly_lines(3)).json()["id"]
    with live_api.client(acme["key"]) as client:
        for train in ("file_missing", foreign):
            response = client.post("/v1/jobs", json=job_spec(str(tiny_teacher_dir), train))
            assert_error(response, 422, "file_not_found", "data.train")
        spec = _spec(tiny_teacher_dir, acme, data={"eval": foreign})
        assert_error(client.post("/v1/jobs", json=spec), 422, "file_not_found", "data.eval")
        text_file = upload(client, b'{"text": "plain text"}\n').json()["id"]
        spec = job_spec(str(tiny_teacher_dir), text_file)
        assert_error(client.post("/v1/jobs", json=spec), 422, "incompatible_file", "data.train")
        spec = _spec(tiny_teacher_dir, acme, strategy={"name": "adaptive"})
        assert_error(client.post("/v1/jobs", json=spec), 422, param="data.eval")
        spec = _spec(tiny_teacher_dir, acme, strategy={"name": "adaptive"}, data={"eval": acme["eval"]})
        assert client.post("/v1/jobs", json=spec).status_code == 201


def test_bad_model_references(
    live_api: LiveApi,
    acme: dict[str, str],
    tiny_teacher_dir: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    outside = tmp_path / "outside-teacher"
    shutil.copytree(tiny_teacher_dir, outside)
    root = tiny_teacher_dir.parent
    link = root / f"link-{tmp_path.name}"
    link.symlink_to(outside, target_is_directory=True)
    request.addfinalizer(link.unlink)
    cases = [
        (str(outside), "outside"),  # a real model, but outside MODEL_ROOTS
        (str(root / ".." / tmp_path.name / outside.name), "outside"),  # climbs out with ..
        (str(link), "outside"),  # a symlink inside the root pointing outside
        (str(root / "no-such-model"), "does not exist"),
        ("no-such-model", "hub"),  # neither under a root nor allowed from the hub
        ("some-org/some-model", "hub"),
        (str(root), "config.json"),  # a folder without config.json
    ]
    with live_api.client(acme["key"]) as client:
        for model, reason in cases:
            response = client.post("/v1/jobs", json=job_spec(model, acme["train"]))
            assert reason in assert_error(response, 422, "invalid_model", "teacher.model")["message"], model
        spec = _spec(tiny_teacher_dir, acme, student={"model": str(outside), "from_teacher_layers": None})
        assert_error(client.post("/v1/jobs", json=spec), 422, "invalid_model", "student.model")
        spec = _spec(tiny_teacher_dir, acme, student={"from_teacher_layers": [0, 7]})
        assert_error(client.post("/v1/jobs", json=spec), 422, "invalid_layers", "student.from_teacher_layers")


def test_idempotent_create(live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path) -> None:
    spec = _spec(tiny_teacher_dir, acme)
    with live_api.client(acme["key"]) as client:
        first = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "create-1"})
        again = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "create-1"})
        assert (first.status_code, again.status_code) == (201, 200)
        assert again.json()["id"] == first.json()["id"]
        changed = _spec(tiny_teacher_dir, acme, training={"max_steps": 5})
        response = client.post("/v1/jobs", json=changed, headers={"Idempotency-Key": "create-1"})
        assert_error(response, 409, "idempotency_key_reused")
        other = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "create-2"})
        assert other.status_code == 201 and other.json()["id"] != first.json()["id"]


def test_idempotent_create_under_concurrency(
    live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path
) -> None:
    spec = _spec(tiny_teacher_dir, acme)

    def create(_: int) -> tuple[int, str]:
        with live_api.client(acme["key"]) as client:
            response = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "race"})
            return response.status_code, response.json().get("id", response.text)

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(create, range(6)))
    assert len({job_id for _, job_id in results}) == 1, results
    assert sorted(code for code, _ in results) == [200] * 5 + [201]


def test_pagination_newest_first(live_api: LiveApi, tiny_teacher_dir: Path) -> None:
    _, key = live_api.new_tenant("pages")
    with live_api.client(key) as client:
        train = upload(client, dolly_lines(4)).json()["id"]
        created = [
            client.post("/v1/jobs", json=job_spec(str(tiny_teacher_dir), train)).json()["id"]
            for _ in range(25)
        ]
        seen, after, pages = [], None, 0
        while True:
            params: dict[str, Any] = {"limit": 7} | ({"after": after} if after else {})
            page = client.get("/v1/jobs", params=params).json()
            seen += [job["id"] for job in page["data"]]
            pages += 1
            if not page["has_more"]:
                assert page["next_cursor"] is None
                break
            after = page["next_cursor"]
        assert pages == 4
        assert seen == created[::-1]
        assert [j["id"] for j in client.get("/v1/jobs").json()["data"]] == created[::-1][:20]
        for job_id in created[:3]:
            assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        cancelled = client.get("/v1/jobs", params={"status": "cancelled"}).json()
        assert [j["id"] for j in cancelled["data"]] == created[:3][::-1]
        queued = client.get("/v1/jobs", params={"status": "queued", "limit": 100}).json()
        assert len(queued["data"]) == 22 and not queued["has_more"]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"status": "done"}, "status"),
        ({"after": "job_unknown"}, "after"),
    ],
)
def test_bad_list_parameters(
    live_api: LiveApi, acme: dict[str, str], params: dict[str, Any], param: str
) -> None:
    with live_api.client(acme["key"]) as client:
        error = assert_error(client.get("/v1/jobs", params=params), 422, param=param)
        assert param in error["message"] or "job_unknown" in error["message"]


def test_tenant_isolation(live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path) -> None:
    with live_api.client(acme["key"]) as client:
        job_id = client.post("/v1/jobs", json=_spec(tiny_teacher_dir, acme)).json()["id"]
    _, other_key = live_api.new_tenant("intruder")
    with live_api.client(other_key) as other:
        for method, path in [
            ("GET", f"/v1/jobs/{job_id}"),
            ("POST", f"/v1/jobs/{job_id}/cancel"),
            ("GET", f"/v1/jobs/{job_id}/events"),
            ("GET", f"/v1/jobs/{job_id}/metrics"),
            ("GET", f"/v1/jobs/{job_id}/checkpoints"),
            ("GET", f"/v1/jobs/{job_id}/student"),
            ("GET", f"/v1/files/{acme['train']}"),
            ("DELETE", f"/v1/files/{acme['train']}"),
        ]:
            assert_error(other.request(method, path), 404)
        assert other.get("/v1/jobs").json()["data"] == []
        assert other.get("/v1/files").json()["data"] == []
        assert_error(other.get("/v1/jobs", params={"after": job_id}), 422, "invalid_cursor", "after")
    with live_api.client(acme["key"]) as client:
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"


def test_cancel_and_illegal_transitions(
    live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path
) -> None:
    with live_api.client(acme["key"]) as client:
        queued = client.post("/v1/jobs", json=_spec(tiny_teacher_dir, acme)).json()["id"]
        body = client.post(f"/v1/jobs/{queued}/cancel").json()
        assert body["status"] == "cancelled" and body["finished_at"] and body["cancel_requested_at"]
        assert_error(client.post(f"/v1/jobs/{queued}/cancel"), 409, "job_not_cancellable", "job_id")

        running = client.post("/v1/jobs", json=_spec(tiny_teacher_dir, acme)).json()["id"]
        with live_api.session() as session:  # what a worker's claim does
            assert transition(
                session, job_id=running, target=JobStatus.RUNNING, started_at=utcnow(), attempts=1
            )
            session.commit()
            # A cancelled job can never run again: the conditional update refuses it.
            assert not transition(
                session, job_id=queued, target=JobStatus.RUNNING, expected=[JobStatus.QUEUED]
            )
            with pytest.raises(IllegalTransition):
                transition(session, job_id=queued, target=JobStatus.RUNNING, expected=[JobStatus.CANCELLED])
        assert client.post(f"/v1/jobs/{running}/cancel").json()["status"] == "cancelling"
        assert client.post(f"/v1/jobs/{running}/cancel").json()["status"] == "cancelling"  # no-op
        with live_api.session() as session:
            assert transition(session, job_id=running, target=JobStatus.CANCELLED, finished_at=utcnow())
            session.commit()
        assert_error(client.post(f"/v1/jobs/{running}/cancel"), 409, "job_not_cancellable")
        statuses = [e["data"]["status"] for e in client.get(f"/v1/jobs/{running}/events").json()["data"]]
        assert statuses == ["queued", "running", "cancelling", "cancelled"]


def test_file_in_use_cannot_be_deleted(live_api: LiveApi, tiny_teacher_dir: Path) -> None:
    _, key = live_api.new_tenant("deleter")
    with live_api.client(key) as client:
        train = upload(client, dolly_lines(4)).json()["id"]
        job_id = client.post("/v1/jobs", json=job_spec(str(tiny_teacher_dir), train)).json()["id"]
        assert_error(client.delete(f"/v1/files/{train}"), 409, "file_in_use")
        client.post(f"/v1/jobs/{job_id}/cancel")
        assert client.delete(f"/v1/files/{train}").status_code == 200
