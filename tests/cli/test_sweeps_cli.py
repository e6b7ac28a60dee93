"""`distill sweeps` as a pipeline step would run it: real processes against a real API server. No worker
runs here: the test plays it by writing the children's rows (the end-to-end test trains a sweep)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import update

from core.jobs.lifecycle import transition
from core.jobs.models import Job
from core.jobs.states import JobStatus
from tests.cli.test_client_cli import distill
from tests.support.api import dolly_lines
from tests.support.live_api import LiveApi

pytestmark = pytest.mark.parametrize("live_api", ["sqlite"], indirect=True)


def _finish(live_api: LiveApi, job_id: str, target: JobStatus, metrics: dict[str, Any]) -> None:
    with live_api.session() as session:
        assert transition(session, job_id=job_id, target=JobStatus.RUNNING)
        session.execute(update(Job).where(Job.id == job_id).values(latest_metrics=metrics))
        assert transition(session, job_id=job_id, target=target)
        session.commit()


def test_sweeps_from_the_command_line(live_api: LiveApi, tiny_teacher_dir: Path, tmp_path: Path) -> None:
    _, key = live_api.new_tenant("cli-sweeps")
    (tmp_path / "train.jsonl").write_bytes(dolly_lines(6))
    spec = {
        "teacher": {"model": str(tiny_teacher_dir)},
        "student": {"from_teacher_layers": [0, 2]},
        "data": {"train": "train.jsonl", "max_length": 64, "max_prompt_length": 32},
        "training": {"max_steps": 2, "batch_size": 2},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))

    created = distill(
        live_api, key, "sweeps", "create", str(tmp_path / "job.yaml"),
        "--grid", "loss.alpha=-1,0.5", "--grid", "training.learning_rate=1e-3,5e-4",
        "--metric", "eval_rouge_l", "--mode", "max", "--max-parallel", "2", "--json",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    sweep = json.loads(created.stdout)
    assert sweep["grid"] == {"loss.alpha": [-1, 0.5], "training.learning_rate": [1e-3, 5e-4]}
    assert (sweep["metric"], sweep["mode"], sweep["max_parallel"]) == ("eval_rouge_l", "max", 2)
    assert [job["params"]["loss.alpha"] for job in sweep["jobs"]] == [-1, -1, 0.5, 0.5]
    assert sweep["spec"]["data"]["train"].startswith("file_")  # the local file was uploaded
    got = distill(live_api, key, "sweeps", "get", sweep["id"], "--json")
    assert got.returncode == 0 and json.loads(got.stdout)["id"] == sweep["id"]

    # Queued children only: watching gives up with the timeout code.
    waited = distill(
        live_api, key, "sweeps", "watch", sweep["id"], "--timeout", "1", "--interval", "0.2", "--json"
    )
    assert waited.returncode == 4, waited.stderr

    ids = [job["id"] for job in sweep["jobs"]]
    rouge = [12.5, 30.0, None, 20.0]
    for job_id, value in zip(ids, rouge, strict=True):
        metrics = {} if value is None else {"eval_rouge_l": value}
        _finish(live_api, job_id, JobStatus.SUCCEEDED if value else JobStatus.FAILED, metrics)
    table = distill(live_api, key, "sweeps", "get", sweep["id"])
    assert table.returncode == 0, table.stderr
    title, header, *rows = table.stdout.strip().splitlines()
    assert sweep["id"] in title and "succeeded" in title
    assert header.split() == ["job", "status", "loss.alpha", "training.learning_rate", "eval_rouge_l"]
    # Best first (max), the child without the metric last; the best one starred.
    assert [row.split()[0:2] for row in rows] == [
        ["*", ids[1]],
        [ids[3], "succeeded"],
        [ids[0], "succeeded"],
        [ids[2], "failed"],
    ]
    assert rows[0].split()[-1] == "30"
    watched = distill(live_api, key, "sweeps", "watch", sweep["id"], "--json")
    assert watched.returncode == 0 and json.loads(watched.stdout)["best"]["job_id"] == ids[1]
    listed = distill(live_api, key, "sweeps", "list", "--json")
    assert [s["id"] for s in json.loads(listed.stdout)] == [sweep["id"]]


def test_a_sweep_file_and_its_errors(live_api: LiveApi, tiny_teacher_dir: Path, tmp_path: Path) -> None:
    _, key = live_api.new_tenant("cli-sweep-file")
    (tmp_path / "train.jsonl").write_bytes(dolly_lines(6))
    body = {
        "spec": {
            "teacher": {"model": str(tiny_teacher_dir)},
            "student": {"from_teacher_layers": [0, 2]},
            "data": {"train": "train.jsonl", "max_length": 64, "max_prompt_length": 32},
            "loss": {"name": "amid", "lam": 0.1},
            "training": {"max_steps": 2, "batch_size": 2},
        },
        "grid": {"loss": [{"name": "amid", "alpha": -1.0}, {"name": "fkl"}]},
        "max_parallel": 1,
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(body))
    created = distill(live_api, key, "sweeps", "create", str(tmp_path / "sweep.yaml"), "--json")
    assert created.returncode == 0, created.stderr
    sweep = json.loads(created.stdout)
    assert [job["params"] for job in sweep["jobs"]] == [{"loss": loss} for loss in body["grid"]["loss"]]
    assert (sweep["metric"], sweep["mode"], sweep["max_parallel"]) == ("eval_kd_loss", "min", 1)

    # The same file with a --grid on top: a YAML list of objects on the command line.
    extra = distill(
        live_api, key, "sweeps", "create", str(tmp_path / "sweep.yaml"),
        "--grid", "training.seed=[1, 2]", "--json",
    )  # fmt: skip
    assert extra.returncode == 0, extra.stderr
    assert len(json.loads(extra.stdout)["jobs"]) == 4

    cancelled = distill(live_api, key, "sweeps", "cancel", sweep["id"], "--json")
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["status"] == "cancelled"
    watched = distill(live_api, key, "sweeps", "watch", sweep["id"], "--json")
    assert watched.returncode == 1  # ended without any job having the metric

    invalid = distill(
        live_api, key, "sweeps", "create", str(tmp_path / "sweep.yaml"), "--grid", "training.max_steps=2,-1"
    )
    assert invalid.returncode == 5 and "children[1].training.max_steps" in invalid.stderr
    usage = distill(live_api, key, "sweeps", "create", str(tmp_path / "sweep.yaml"), "--grid", "loss.lam")
    assert usage.returncode != 0 and "PATH=V1,V2" in usage.stderr
