"""`/v1/sweeps` through a real uvicorn server on SQLite and PostgreSQL: the grid's children and their specs,
validation naming the child and the field (and creating nothing), idempotent create, tenant isolation,
pagination, cancellation, ranking by a metric, and `max_parallel` with the reaper's release step. No worker
runs: children stay queued unless a test moves them, as a worker would, by writing their rows."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from core.db import utcnow
from core.jobs.lifecycle import transition
from core.jobs.models import Job, JobEvent, Sweep
from core.jobs.states import JobStatus
from core.queue import queue_depth
from migrations.runner import upgrade_database
from tests.support.api import assert_error, dolly_lines, job_spec, upload
from tests.support.live_api import LiveApi, serve_in_thread, service_settings
from worker.reaper import reap_once, resend_lost


@pytest.fixture(scope="module")
def acme(live_api: LiveApi) -> dict[str, str]:
    """A tenant with an uploaded training file."""
    tenant_id, key = live_api.new_tenant("sweeps")
    with live_api.client(key) as client:
        train = upload(client, dolly_lines(8)).json()["id"]
    return {"tenant_id": tenant_id, "key": key, "train": train}


def _body(teacher: Path, train: str, grid: dict[str, list[Any]], **fields: Any) -> dict[str, Any]:
    spec = job_spec(str(teacher), train, loss={"name": "amid", "alpha": 0.5, "lam": 0.1})
    return {"spec": spec, "grid": grid, **fields}


def _counts(live_api: LiveApi, tenant_id: str) -> tuple[int, int]:
    """(jobs, sweeps) the tenant has in the database."""
    with live_api.session() as session:
        jobs = session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id))
        sweeps = session.scalar(select(func.count()).select_from(Sweep).where(Sweep.tenant_id == tenant_id))
    return jobs or 0, sweeps or 0


def _move(live_api: LiveApi, job_id: str, *targets: JobStatus, **values: Any) -> None:
    """Play the worker: move the job through `targets`, then write `values` into its row."""
    with live_api.session() as session:
        for target in targets:
            assert transition(session, job_id=job_id, target=target)
        if values:
            session.execute(update(Job).where(Job.id == job_id).values(**values))
        session.commit()


def test_a_grid_makes_one_child_per_point(
    live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path
) -> None:
    grid = {"loss.alpha": [-1, 0.5], "loss.lam": [0.1, 0.3]}
    with live_api.client(acme["key"]) as client:
        response = client.post(
            "/v1/sweeps", json=_body(tiny_teacher_dir, acme["train"], grid, metric="eval_rouge_l", mode="max")
        )
        assert response.status_code == 201, response.text
        sweep = response.json()
        assert sweep["id"].startswith("swp_")
        assert sweep["status"] == "running" and sweep["best"] is None
        assert (sweep["metric"], sweep["mode"], sweep["max_parallel"]) == ("eval_rouge_l", "max", None)
        assert sweep["grid"] == grid
        assert sweep["counts"]["queued"] == 4 and sum(sweep["counts"].values()) == 4
        # The cartesian product, the last path varying fastest.
        assert [child["params"] for child in sweep["jobs"]] == [
            {"loss.alpha": -1, "loss.lam": 0.1},
            {"loss.alpha": -1, "loss.lam": 0.3},
            {"loss.alpha": 0.5, "loss.lam": 0.1},
            {"loss.alpha": 0.5, "loss.lam": 0.3},
        ]
        for child in sweep["jobs"]:
            assert child["status"] == "queued" and child["metrics"] == {}
            job = client.get(f"/v1/jobs/{child['id']}").json()
            assert job["sweep_id"] == sweep["id"]
            loss = job["spec"]["loss"]
            assert (loss["alpha"], loss["lam"]) == (
                child["params"]["loss.alpha"],
                child["params"]["loss.lam"],
            )
            assert loss["name"] == "amid" and job["spec"]["data"]["train"] == acme["train"]
            assert job["spec"]["teacher"]["model"] == str(tiny_teacher_dir)
        assert client.get(f"/v1/sweeps/{sweep['id']}").json() == sweep
        # A plain job is no sweep's child.
        plain = client.post("/v1/jobs", json=job_spec(str(tiny_teacher_dir), acme["train"])).json()
        assert plain["sweep_id"] is None
    with live_api.session() as session:  # no max_parallel: every child was sent
        sent = session.scalars(select(Job.enqueued_at).where(Job.sweep_id == sweep["id"])).all()
        assert len(sent) == 4 and None not in sent


def test_section_values_merge_into_the_base_spec(
    live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path
) -> None:
    grid = {"loss": [{"name": "amid", "alpha": -3.0}, {"name": "fkl"}], "training.learning_rate": [1e-3]}
    with live_api.client(acme["key"]) as client:
        response = client.post("/v1/sweeps", json=_body(tiny_teacher_dir, acme["train"], grid))
        assert response.status_code == 201, response.text
        children = response.json()["jobs"]
        specs = [client.get(f"/v1/jobs/{child['id']}").json()["spec"] for child in children]
    assert [child["params"] for child in children] == [
        {"loss": {"name": "amid", "alpha": -3.0}, "training.learning_rate": 1e-3},
        {"loss": {"name": "fkl"}, "training.learning_rate": 1e-3},
    ]
    assert [(s["loss"]["name"], s["loss"]["alpha"], s["loss"]["lam"]) for s in specs] == [
        ("amid", -3.0, 0.1),  # lam from the base spec
        ("fkl", 0.5, 0.1),
    ]
    assert all(s["training"]["learning_rate"] == 1e-3 and s["training"]["max_steps"] == 4 for s in specs)


BAD_GRIDS = [
    # (grid, status, code, param)
    ({"loss.alpah": [1.0]}, 422, "invalid_grid", "grid.loss.alpah"),
    ({"loss.alpha.x": [1.0]}, 422, "invalid_grid", "grid.loss.alpha.x"),
    ({"optimizer": [1.0]}, 422, "invalid_grid", "grid.optimizer"),
    ({}, 422, "invalid_grid", "grid"),
    ({"loss.alpha": []}, 422, "invalid_grid", "grid.loss.alpha"),
    ({"loss.alpha": [0.5, 0.5]}, 422, "invalid_grid", "grid.loss.alpha.1"),
    ({"loss": [{"name": "fkl"}, 3]}, 422, "invalid_grid", "grid.loss.1"),
    ({"loss.alpha": [{"x": 1}]}, 422, "invalid_grid", "grid.loss.alpha.0"),
    ({"loss": [{"name": "fkl"}], "loss.lam": [0.2]}, 422, "invalid_grid", "grid.loss"),
    ({"loss.alpha": list(range(9)), "loss.lam": [0.1 * i for i in range(8)]}, 422, "sweep_too_large", "grid"),
    # The child's own validation: child 1 is (alpha -1, lam 5).
    ({"loss.alpha": [-1, 0.5], "loss.lam": [0.1, 5]}, 422, "invalid_sweep_child", "children[1].loss.lam"),
    ({"loss": [{"name": "amid"}, {"name": "nope"}]}, 422, "invalid_sweep_child", "children[1].loss.name"),
    ({"training.max_steps": [4, "ten"]}, 422, "invalid_sweep_child", "children[1].training.max_steps"),
    ({"strategy.name": ["off_policy", "adaptive"]}, 422, "invalid_sweep_child", "children[1].data.eval"),
    # References, checked like a job's: a file the tenant does not have, a layer the teacher lacks.
    ({"data.train": ["{train}", "file_missing"]}, 422, "file_not_found", "children[1].data.train"),
    (
        {"student.from_teacher_layers": [[0], [0, 99]]},
        422,
        "invalid_layers",
        "children[1].student.from_teacher_layers",
    ),
]


@pytest.mark.parametrize(
    ("grid", "status", "code", "param"), BAD_GRIDS, ids=[p[3] + "-" + p[2] for p in BAD_GRIDS]
)
def test_an_invalid_child_names_the_child_and_creates_nothing(
    live_api: LiveApi,
    acme: dict[str, str],
    tiny_teacher_dir: Path,
    grid: dict[str, list[Any]],
    status: int,
    code: str,
    param: str,
) -> None:
    grid = {
        path: [acme["train"] if value == "{train}" else value for value in values]
        for path, values in grid.items()
    }
    before = _counts(live_api, acme["tenant_id"])
    with live_api.client(acme["key"]) as client:
        response = client.post("/v1/sweeps", json=_body(tiny_teacher_dir, acme["train"], grid))
    error = assert_error(response, status, code, param)
    if param.startswith("children["):
        assert error["message"].startswith(f"child {param[9]}")
    assert _counts(live_api, acme["tenant_id"]) == before


def test_invalid_requests_answer_in_the_error_shape(
    live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path
) -> None:
    before = _counts(live_api, acme["tenant_id"])
    body = _body(tiny_teacher_dir, acme["train"], {"loss.alpha": [1.0]})
    with live_api.client(acme["key"]) as client:
        assert_error(client.post("/v1/sweeps", json={**body, "mode": "best"}), 422, "invalid_request", "mode")
        assert_error(
            client.post("/v1/sweeps", json={**body, "max_parallel": 0}),
            422,
            "invalid_request",
            "max_parallel",
        )
        assert_error(
            client.post("/v1/sweeps", json={**body, "metric": "a b"}), 422, "invalid_request", "metric"
        )
        assert_error(client.post("/v1/sweeps", json={**body, "extra": 1}), 422, "invalid_request", "extra")
        base = {**body["spec"], "loss": {"lam": 2}}
        assert_error(
            client.post("/v1/sweeps", json={**body, "spec": base}), 422, "invalid_request", "spec.loss.lam"
        )
        assert_error(client.get("/v1/sweeps/swp_missing"), 404, "sweep_not_found", "sweep_id")
        assert_error(
            client.get("/v1/sweeps", params={"after": "swp_missing"}), 422, "invalid_cursor", "after"
        )
    assert _counts(live_api, acme["tenant_id"]) == before


def test_idempotency_key(live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path) -> None:
    body = _body(tiny_teacher_dir, acme["train"], {"loss.alpha": [0.0, 1.0]})
    headers = {"Idempotency-Key": "sweep-retry-1"}
    with live_api.client(acme["key"]) as client:
        first = client.post("/v1/sweeps", json=body, headers=headers)
        assert first.status_code == 201, first.text
        after_first = _counts(live_api, acme["tenant_id"])
        again = client.post("/v1/sweeps", json=body, headers=headers)
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        assert _counts(live_api, acme["tenant_id"]) == after_first
        other = {**body, "grid": {"loss.alpha": [0.0, 2.0]}}
        assert_error(client.post("/v1/sweeps", json=other, headers=headers), 409, "idempotency_key_reused")


def test_tenants_see_only_their_sweeps(
    live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path
) -> None:
    _, other_key = live_api.new_tenant("rival")
    with live_api.client(acme["key"]) as client:
        sweep = client.post(
            "/v1/sweeps", json=_body(tiny_teacher_dir, acme["train"], {"loss.alpha": [0.0]})
        ).json()
    with live_api.client(other_key) as rival:
        assert_error(rival.get(f"/v1/sweeps/{sweep['id']}"), 404, "sweep_not_found")
        assert_error(rival.post(f"/v1/sweeps/{sweep['id']}/cancel"), 404, "sweep_not_found")
        assert_error(rival.get(f"/v1/jobs/{sweep['jobs'][0]['id']}"), 404)
        assert rival.get("/v1/sweeps").json()["data"] == []
        # Another tenant's file is no file of this tenant's children.
        own = upload(rival, dolly_lines(2)).json()["id"]
        body = _body(tiny_teacher_dir, own, {"data.train": [own, acme["train"]]})
        assert_error(rival.post("/v1/sweeps", json=body), 422, "file_not_found", "children[1].data.train")
    with live_api.client(acme["key"]) as client:
        assert client.get(f"/v1/sweeps/{sweep['id']}/cancel").status_code == 405


def test_pagination(live_api: LiveApi, tiny_teacher_dir: Path) -> None:
    _, key = live_api.new_tenant("pages")
    with live_api.client(key) as client:
        train = upload(client, dolly_lines(2)).json()["id"]
        made = [
            client.post("/v1/sweeps", json=_body(tiny_teacher_dir, train, {"loss.alpha": [float(i)]})).json()[
                "id"
            ]
            for i in range(3)
        ]
        first = client.get("/v1/sweeps", params={"limit": 2}).json()
        assert [s["id"] for s in first["data"]] == made[::-1][:2]
        assert first["has_more"] and first["next_cursor"] == made[1]
        second = client.get("/v1/sweeps", params={"limit": 2, "after": first["next_cursor"]}).json()
        assert [s["id"] for s in second["data"]] == [made[0]]
        assert not second["has_more"] and second["next_cursor"] is None
        assert second["data"][0]["jobs"][0]["params"] == {"loss.alpha": 0.0}


def test_cancel_cancels_every_child_that_has_not_ended(
    live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path
) -> None:
    with live_api.client(acme["key"]) as client:
        sweep = client.post(
            "/v1/sweeps", json=_body(tiny_teacher_dir, acme["train"], {"loss.alpha": [-1.0, 0.0, 1.0]})
        ).json()
        done, running, waiting = (child["id"] for child in sweep["jobs"])
        _move(live_api, done, JobStatus.RUNNING, JobStatus.SUCCEEDED)
        _move(live_api, running, JobStatus.RUNNING)
        response = client.post(f"/v1/sweeps/{sweep['id']}/cancel")
        assert response.status_code == 200, response.text
        cancelled = response.json()
        assert [child["status"] for child in cancelled["jobs"]] == ["succeeded", "cancelling", "cancelled"]
        assert cancelled["status"] == "cancelling" and cancelled["cancelled_at"] is not None
        assert cancelled["counts"] == {
            **{s.value: 0 for s in JobStatus},
            "succeeded": 1,
            "cancelling": 1,
            "cancelled": 1,
        }
        _move(live_api, running, JobStatus.CANCELLED)  # the worker stops it
        ended = client.get(f"/v1/sweeps/{sweep['id']}").json()
        assert ended["status"] == "cancelled"
        assert_error(
            client.post(f"/v1/sweeps/{sweep['id']}/cancel"), 409, "sweep_not_cancellable", "sweep_id"
        )
        assert client.get(f"/v1/jobs/{waiting}").json()["status"] == "cancelled"


def test_best_child_by_the_metric(live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path) -> None:
    grid = {"loss.alpha": [-1.0, 0.0, 0.5, 1.0]}
    with live_api.client(acme["key"]) as client:
        low = client.post("/v1/sweeps", json=_body(tiny_teacher_dir, acme["train"], grid)).json()
        high = client.post(
            "/v1/sweeps", json=_body(tiny_teacher_dir, acme["train"], grid, metric="eval_rouge_l", mode="max")
        ).json()
        # Each child's latest values, as the worker writes them; None: not logged yet.
        kd = [2.5, 1.25, 1.25, None]  # a tie between children 1 and 2: the earlier wins
        rouge = [3.0, None, 7.5, 7.0]
        for sweep, values in ((low, kd), (high, rouge)):
            ids = [child["id"] for child in sweep["jobs"]]
            assert client.get(f"/v1/sweeps/{sweep['id']}").json()["best"] is None
            for job_id, value in zip(ids, values, strict=True):
                metrics = {"loss": 9.0} if value is None else {"loss": 9.0, sweep["metric"]: value}
                _move(live_api, job_id, JobStatus.RUNNING, latest_metrics=metrics)
        got = client.get(f"/v1/sweeps/{low['id']}").json()
        assert got["best"] == {"job_id": low["jobs"][1]["id"], "params": {"loss.alpha": 0.0}, "value": 1.25}
        assert [child["metrics"].get("eval_kd_loss") for child in got["jobs"]] == kd
        assert got["status"] == "running" and got["counts"]["running"] == 4
        got = client.get(f"/v1/sweeps/{high['id']}").json()
        assert got["best"] == {"job_id": high["jobs"][2]["id"], "params": {"loss.alpha": 0.5}, "value": 7.5}

        # Ended: succeeded as soon as one child succeeded; failed when every child failed.
        for job_id in [child["id"] for child in low["jobs"]]:
            _move(live_api, job_id, JobStatus.FAILED)
        assert client.get(f"/v1/sweeps/{low['id']}").json()["status"] == "failed"
        first, *rest = [child["id"] for child in high["jobs"]]
        _move(live_api, first, JobStatus.SUCCEEDED)
        for job_id in rest:
            _move(live_api, job_id, JobStatus.FAILED)
        ended = client.get(f"/v1/sweeps/{high['id']}").json()
        assert ended["status"] == "succeeded" and ended["best"]["value"] == 7.5


def test_max_parallel_holds_children_until_a_slot_frees(
    db_url: str, tmp_path: Path, tiny_teacher_dir: Path
) -> None:
    # A server of its own: its broker queue holds exactly the messages this test's sweep sends.
    upgrade_database(db_url)
    settings = service_settings(tmp_path, db_url, model_roots=[tiny_teacher_dir.parent])
    base_url, stop = serve_in_thread(settings)
    api = LiveApi(settings=settings, base_url=base_url)
    try:
        _, key = api.new_tenant("parallel")
        with api.client(key) as client:
            train = upload(client, dolly_lines(4)).json()["id"]
            body = _body(tiny_teacher_dir, train, {"loss.alpha": [-1.0, 0.0, 1.0]}, max_parallel=2)
            sweep = client.post("/v1/sweeps", json=body).json()
            first, second, held = (child["id"] for child in sweep["jobs"])

            def sent() -> dict[str, bool]:
                with api.session() as session:
                    rows = session.execute(select(Job.id, Job.enqueued_at).where(Job.sweep_id == sweep["id"]))
                    return {job_id: enqueued_at is not None for job_id, enqueued_at in rows}

            assert sent() == {first: True, second: True, held: False}
            assert queue_depth(settings) == 2
            assert sweep["counts"]["queued"] == 3 and sweep["max_parallel"] == 2

            # The lost-message resend leaves the held child alone, even long after: it was never sent.
            assert resend_lost(settings, now=utcnow() + timedelta(hours=1)) == []
            # A pass with both slots busy (one queued and sent, one running) releases nothing.
            _move(api, first, JobStatus.RUNNING, heartbeat_at=utcnow(), worker_id="w:1")  # not stale
            assert reap_once(settings).released == 0
            assert sent()[held] is False and queue_depth(settings) == 2

            _move(api, first, JobStatus.SUCCEEDED)
            assert reap_once(settings).released == 1
            assert sent()[held] is True and queue_depth(settings) == 3
            events = client.get(f"/v1/jobs/{held}/events").json()["data"]
            assert events[-1]["kind"] == "queue" and sweep["id"] in events[-1]["message"]
            assert reap_once(settings).released == 0  # nothing is sent twice
    finally:
        stop()


def test_a_cancelled_sweep_releases_no_held_child(
    live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path
) -> None:
    body = _body(tiny_teacher_dir, acme["train"], {"loss.alpha": [-1.0, 0.0]}, max_parallel=1)
    with live_api.client(acme["key"]) as client:
        sweep = client.post("/v1/sweeps", json=body).json()
        first, held = (child["id"] for child in sweep["jobs"])
        _move(live_api, first, JobStatus.RUNNING)
        cancelled = client.post(f"/v1/sweeps/{sweep['id']}/cancel").json()
        assert [child["status"] for child in cancelled["jobs"]] == ["cancelling", "cancelled"]
        _move(live_api, first, JobStatus.CANCELLED)
        reap_once(live_api.settings)
        with live_api.session() as session:
            assert session.get(Job, held).enqueued_at is None
            kinds = session.scalars(select(JobEvent.kind).where(JobEvent.job_id == held)).all()
        assert "queue" not in kinds


def test_a_sweep_whose_open_children_are_paused_is_paused(
    live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path
) -> None:
    with live_api.client(acme["key"]) as client:
        sweep = client.post(
            "/v1/sweeps", json=_body(tiny_teacher_dir, acme["train"], {"loss.alpha": [-1.0, 0.0]})
        ).json()
        paused, ended = (child["id"] for child in sweep["jobs"])
        assert client.post(f"/v1/jobs/{paused}/pause").json()["status"] == "paused"
        assert client.get(f"/v1/sweeps/{sweep['id']}").json()["status"] == "running"  # one still queued
        assert client.post(f"/v1/jobs/{ended}/cancel").json()["status"] == "cancelled"
        got = client.get(f"/v1/sweeps/{sweep['id']}").json()
        assert got["status"] == "paused" and got["counts"]["paused"] == 1
        # Cancelling the sweep cancels the paused child too.
        cancelled = client.post(f"/v1/sweeps/{sweep['id']}/cancel").json()
        assert cancelled["status"] == "cancelled"
        assert [child["status"] for child in cancelled["jobs"]] == ["cancelled", "cancelled"]
