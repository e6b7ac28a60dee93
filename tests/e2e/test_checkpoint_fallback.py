"""The fault test of checkpoints you can trust (SQLite database and broker, real processes): the newest
checkpoint of a running job is corrupted and its worker killed with SIGKILL; the reaper re-queues the job,
and a new worker resumes from the checkpoint before the corrupt one, says so, and finishes the job."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.distill.checkpoint import list_checkpoints, verify_checkpoint
from core.storage import Storage
from tests.support.services import (
    TERMINAL,
    Stack,
    make_settings,
    sqlite_database,
    tiny_spec,
    wait_for,
    write_dolly_subset,
)

MAX_STEPS = 30
CHECKPOINT_EVERY = 2


@pytest.fixture
def stack(tmp_path: Path, tiny_teacher_dir: Path) -> Iterator[Stack]:
    key = f"dk_test_{uuid.uuid4().hex}"
    settings = make_settings(
        tmp_path,
        database_url=sqlite_database(tmp_path / "db"),
        model_roots=[tiny_teacher_dir.parent],
        bootstrap_api_key=key,
        heartbeat_interval_s=0.5,
        stale_after_s=4,
        reaper_interval_s=0.5,
    )
    stack = Stack(settings, tmp_path / "logs", key=key)
    try:
        stack.start_worker()
        stack.start_reaper()
        stack.client.wait_ready(stack.processes)
        yield stack
    finally:
        stack.stop()


def trainer_pids(job_id: str) -> list[int]:
    """Trainer processes of `job_id` still alive on this machine."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"worker.trainer_process" in command and job_id.encode() in command:
            pids.append(int(entry.name))
    return pids


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_newest_checkpoint_resumes_from_the_previous_one(
    stack: Stack, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    client = stack.client
    file_id = client.upload(write_dolly_subset(tmp_path / "dolly.jsonl"))
    spec = tiny_spec(tiny_teacher_dir, file_id, max_steps=MAX_STEPS, checkpoint_every=CHECKPOINT_EVERY)
    job = client.create_job(spec)
    output_dir = Storage(stack.settings.artifacts).job_dir(job["id"])
    wait_for(
        lambda: any(step >= 6 for step, _ in list_checkpoints(output_dir)),
        timeout=180,
        interval=0.05,
        what="the checkpoint of step 6",
    )

    stack.workers[0].process.kill()  # SIGKILL: its trainer gets SIGKILL too (parent-death signal)
    stack.workers[0].process.wait(timeout=10)
    wait_for(lambda: not trainer_pids(job["id"]), timeout=30, what="the trainer process to die")
    assert client.job(job["id"])["status"] == "running"

    # Newest first: the run keeps 2 checkpoints by default, so the one before the newest is still there.
    (newest_step, newest), (previous_step, previous) = list(reversed(list_checkpoints(output_dir)))[:2]
    assert newest_step >= 6 and previous_step == newest_step - CHECKPOINT_EVERY
    assert verify_checkpoint(newest) is None and verify_checkpoint(previous) is None
    flip_a_byte(newest / "model.safetensors")

    stack.start_worker()
    done = client.wait_status(job["id"], TERMINAL, timeout=180, processes=stack.processes)
    assert done["status"] == "succeeded", (done, [w.output() for w in stack.workers])
    assert done["attempts"] == 2

    events = client.events(job["id"])
    messages = [(e["kind"], e["message"]) for e in events]
    resumes = [m for kind, m in messages if kind == "resume"]
    assert resumes == [f"resuming from the checkpoint of step {previous_step}"], messages
    warnings = [m for kind, m in messages if kind == "warning"]
    corrupt = f"the checkpoint of step {newest_step} is corrupt (model.safetensors does not match"
    assert len(warnings) == 1 and warnings[0].startswith(corrupt), messages
    starts = [e["data"]["start_step"] for e in events if e["kind"] == "start"]
    assert starts == [0, previous_step], messages

    # The corrupt copy is kept aside for inspection; the step was trained and written again.
    set_aside = output_dir / "checkpoints" / f"{newest.name}.corrupt"
    assert set_aside.is_dir() and verify_checkpoint(set_aside) is not None
    assert [step for step, _ in list_checkpoints(output_dir)] == [MAX_STEPS - CHECKPOINT_EVERY, MAX_STEPS]
    series = client.http.get(f"/v1/jobs/{job['id']}/metrics", params={"names": "loss"}).json()["series"]
    assert [p["step"] for p in series["loss"]] == list(range(1, MAX_STEPS + 1))
    listed = client.http.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
    assert [c["step"] for c in listed] == [MAX_STEPS - CHECKPOINT_EVERY, MAX_STEPS]
    assert client.http.get(f"/v1/jobs/{job['id']}/student").status_code == 200
    assert os.path.isdir(output_dir / "student")
