"""Pause and resume end to end, through the Python SDK (`distillery.Distillery`) against real processes
(`distill api`, one `distill worker`, SQLite and its broker): a job paused mid-training checkpoints and
stops, holds no worker (a second job of the same spec runs to the end meanwhile), and once resumed continues
from that checkpoint to the very same student as the uninterrupted run, every tensor equal, with every
step's metrics exactly once. Metadata given at creation finds the jobs again in the list."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillery import Distillery
from tests.support.services import (
    Stack,
    make_settings,
    sqlite_database,
    tiny_spec,
    wait_for,
    write_dolly_subset,
)

# Long end-to-end runs: `make test-slow` (and CI) runs them; the default suite stays near 10 minutes.
pytestmark = pytest.mark.slow

# Long enough that the pause lands well before the end (a tiny step takes tens of milliseconds).
MAX_STEPS = 48


@pytest.fixture
def stack(tmp_path: Path, tiny_teacher_dir: Path) -> Iterator[Stack]:
    key = f"dk_test_{uuid.uuid4().hex}"
    settings = make_settings(
        tmp_path,
        database_url=sqlite_database(tmp_path / "db"),
        model_roots=[tiny_teacher_dir.parent],
        bootstrap_api_key=key,
        heartbeat_interval_s=0.2,  # the supervisor checks for a stop request this often
    )
    stack = Stack(settings, tmp_path / "logs", key=key)
    try:
        stack.start_worker()
        stack.client.wait_ready(stack.processes)
        yield stack
    finally:
        stack.stop()


def test_a_paused_job_resumes_to_the_same_student_as_an_uninterrupted_run(
    stack: Stack, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    key = stack.settings.bootstrap_api_key
    assert key is not None
    with Distillery(f"http://127.0.0.1:{stack.port}", key) as sdk:
        train = sdk.files.upload(write_dolly_subset(tmp_path / "dolly.jsonl")).id
        spec = tiny_spec(tiny_teacher_dir, train, max_steps=MAX_STEPS, checkpoint_every=16)
        suite = uuid.uuid4().hex
        paused = sdk.jobs.create(spec, metadata={"suite": suite, "run": "paused"})
        straight = sdk.jobs.create(spec, metadata={"suite": suite, "run": "straight"})
        assert paused.metadata == {"suite": suite, "run": "paused"}

        # The one worker takes the first job; pause it once it trains.
        wait_for(lambda: sdk.jobs.get(paused.id).progress.step >= 2, timeout=120, what="training to start")
        assert sdk.jobs.pause(paused.id).status == "pausing"
        job = wait_for(
            lambda: (j := sdk.jobs.get(paused.id)).status != "pausing" and j,
            timeout=60,
            what="the pause to land",
        )
        step = job.progress.step
        assert job.status == "paused" and 2 <= step < MAX_STEPS, job
        # No worker holds it, and the attempt it stopped is not counted.
        assert (job.worker_id, job.attempts) == (None, 0)
        assert step in [c.step for c in sdk.jobs.checkpoints(paused.id)]  # the step it stopped at
        checkpoint = sdk.jobs.download_checkpoint(paused.id, step, tmp_path / "checkpoint")
        at_pause = load_file(checkpoint / "model.safetensors")
        assert sdk.jobs.pause(paused.id).status == "paused"  # pausing again changes nothing

        # The worker is free: the second job runs to the end while the first stays paused.
        done = sdk.jobs.wait(straight.id, timeout=120)
        assert done.status == "succeeded", done
        assert sdk.jobs.get(paused.id).status == "paused"

        # Metadata finds them again.
        assert [j.id for j in sdk.jobs.list(metadata={"suite": suite})] == [straight.id, paused.id]
        assert [j.id for j in sdk.jobs.list(metadata={"suite": suite, "run": "paused"})] == [paused.id]
        assert [j.id for j in sdk.jobs.list(metadata={"suite": suite}, status="paused")] == [paused.id]
        assert list(sdk.jobs.list(metadata={"suite": uuid.uuid4().hex})) == []

        assert sdk.jobs.resume(paused.id).status in ("queued", "running")
        resumed = sdk.jobs.wait(paused.id, timeout=120)
        assert resumed.status == "succeeded" and resumed.attempts == 1, resumed

        # It continued from the checkpoint of the step it stopped at, and logged every step once.
        events = list(sdk.jobs.events(paused.id))
        assert [e.data["start_step"] for e in events if e.kind == "start"] == [0, step]  # type: ignore[index]
        statuses = [e.data["status"] for e in events if e.kind == "status"]  # type: ignore[index]
        assert statuses == ["queued", "running", "pausing", "paused", "queued", "running", "succeeded"]
        for job_id in (paused.id, straight.id):
            loss = sdk.jobs.metrics(job_id, names=["loss"]).series["loss"]
            assert [point.step for point in loss] == list(range(1, MAX_STEPS + 1)), job_id

        # The same student as the uninterrupted run, every tensor equal; and the resumed steps trained it.
        students = [
            load_file(sdk.jobs.download_student(job_id, tmp_path / job_id) / "model.safetensors")
            for job_id in (paused.id, straight.id)
        ]
        assert students[0].keys() == students[1].keys() and students[0]
        for name, tensor in students[0].items():
            assert torch.equal(tensor, students[1][name]), name
        assert any(not torch.equal(at_pause[name], tensor) for name, tensor in students[0].items())
