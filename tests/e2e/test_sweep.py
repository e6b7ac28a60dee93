"""A sweep end to end on the embedded defaults: real `distill api`, `distill worker` and `distill reaper`
processes (SQLite database and broker), three tiny children over loss.alpha with max_parallel 2. Every child
trains to the end, the third is sent only after one of the first two ended, and `best` is the child with the
lowest last eval_kd_loss among the values the children actually logged; the SDK's `sweeps.wait` returns it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from distillery import Distillery
from tests.support.services import Stack, make_settings, sqlite_database, tiny_spec, write_dolly_subset

# Long end-to-end runs: `make test-slow` (and CI) runs them; the default suite stays near 10 minutes.
pytestmark = pytest.mark.slow

SWEEP_TIMEOUT_S = 240


@pytest.fixture
def stack(tmp_path: Path, tiny_teacher_dir: Path) -> Iterator[Stack]:
    key = f"dk_test_{uuid.uuid4().hex}"
    settings = make_settings(
        tmp_path,
        database_url=sqlite_database(tmp_path / "db"),
        model_roots=[tiny_teacher_dir.parent],
        bootstrap_api_key=key,
        heartbeat_interval_s=1.0,
        reaper_interval_s=0.5,  # the reaper's pass sends a held child once a slot frees
    )
    stack = Stack(settings, tmp_path / "logs", key=key)
    try:
        stack.start_worker()
        stack.start_reaper()
        stack.client.wait_ready(stack.processes)
        yield stack
    finally:
        stack.stop()


def test_a_sweep_trains_every_child_and_ranks_them(
    stack: Stack, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    http = stack.client.http
    train = stack.client.upload(write_dolly_subset(tmp_path / "train.jsonl", records=16))
    evaluation = stack.client.upload(write_dolly_subset(tmp_path / "eval.jsonl", records=4), purpose="eval")
    spec = tiny_spec(tiny_teacher_dir, train, max_steps=4, checkpoint_every=0, eval_every=4)
    spec["data"]["eval"] = evaluation
    spec["evaluation"] = {"max_records": 4, "max_new_tokens": 4}
    body = {"spec": spec, "grid": {"loss.alpha": [-1.0, 0.0, 0.5]}, "max_parallel": 2}
    response = http.post("/v1/sweeps", json=body)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["best"] is None and created["counts"]["queued"] == 3

    with Distillery(str(http.base_url), stack.settings.bootstrap_api_key) as client:
        sweep = client.sweeps.wait(created["id"], timeout=SWEEP_TIMEOUT_S, poll_interval=1.0)
    for process in stack.processes:
        assert process.alive(), f"{process.name} exited:\n{process.output()}"
    assert sweep.status == "succeeded", sweep
    assert [job.status for job in sweep.jobs] == ["succeeded"] * 3
    assert sweep.counts["succeeded"] == 3

    # Each child's last eval_kd_loss from its own metric series; the best is the lowest of them.
    last = {}
    for job in sweep.jobs:
        series = http.get(f"/v1/jobs/{job.id}/metrics", params={"names": "eval_kd_loss"}).json()["series"]
        points = series["eval_kd_loss"]
        assert [point["step"] for point in points] == [0, 4]
        last[job.id] = points[-1]["value"]
        assert job.metrics["eval_kd_loss"] == last[job.id]
        assert http.get(f"/v1/jobs/{job.id}").json()["spec"]["loss"]["alpha"] == job.params["loss.alpha"]
    assert len(set(last.values())) == 3  # different losses train differently: the ranking means something
    best_id = min(last, key=last.__getitem__)
    assert sweep.best is not None
    assert (sweep.best.job_id, sweep.best.value) == (best_id, last[best_id])
    assert sweep.best.params == next(job.params for job in sweep.jobs if job.id == best_id)

    # max_parallel 2: the third child was held, then sent by the reaper after one of the first two ended.
    first_two = [http.get(f"/v1/jobs/{job.id}").json()["finished_at"] for job in sweep.jobs[:2]]
    events = http.get(f"/v1/jobs/{sweep.jobs[2].id}/events").json()["data"]
    released = [event for event in events if event["kind"] == "queue"]
    assert len(released) == 1 and created["id"] in released[0]["message"], events
    assert released[0]["created_at"] >= min(first_two)
    assert events[0]["message"].startswith("job queued; its sweep sends it")
