"""End to end on the embedded defaults: `distill serve` as a subprocess (SQLite database, SQLite-backed
broker, artifacts under its home) runs the whole flow, stops cleanly on Ctrl-C, and comes back with the
same development key and data."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from tests.support.services import (
    TERMINAL,
    ApiClient,
    ServiceProcess,
    distill_command,
    download,
    free_port,
    start_service,
    tiny_spec,
    wait_for,
    write_dolly_subset,
)


def start_serve(home: Path, port: int, models: Path) -> ServiceProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DISTILL_")}
    env |= {"DISTILL_HOME": str(home), "DISTILL_MODEL_ROOTS": str(models)}
    return start_service("serve", distill_command("serve", "--port", str(port)), env, home.parent / "logs")


def printed_key(serve: ServiceProcess) -> str:
    line = wait_for(
        lambda: next((x for x in serve.output(400).splitlines() if "API key:" in x), None),
        timeout=60,
        what="serve to print its API key",
    )
    return line.split("API key:", 1)[1].strip()


def assert_trained_from_teacher_layers(
    downloaded: PreTrainedModel, artifact_dir: Path, teacher_dir: Path, layers: list[int]
) -> None:
    """The downloaded student is the one the worker saved, built from `layers` of the teacher, and trained."""
    assert downloaded.config.num_hidden_layers == len(layers) == len(downloaded.model.layers)
    # Every tensor is the one in the job's artifacts (what the download was made from).
    saved = load_file(artifact_dir / "model.safetensors")
    state = downloaded.state_dict()
    assert state.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    # Each tensor started as the teacher's counterpart (student layer i = teacher layer layers[i]) and moved
    # a little: 4 AdamW steps at lr 1e-3 shift a weight by about 4e-3 at most, while two different random
    # layers differ by far more than the bound below.
    teacher = load_file(teacher_dir / "model.safetensors")
    for name, tensor in saved.items():
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        source = f"model.layers.{layers[int(match[1])]}.{match[2]}" if match else name
        assert tensor.shape == teacher[source].shape, name
        assert not torch.equal(tensor, teacher[source]), (
            f"{name} is still the teacher's {source}: not trained"
        )
        moved = (tensor.float() - teacher[source].float()).abs().max().item()
        assert moved < 0.02, f"{name} is {moved} away from the teacher's {source}"


def test_distill_serve_runs_the_whole_flow(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    home, port = tmp_path / "home", free_port()
    serve = start_serve(home, port, tiny_teacher_dir.parent)
    try:
        key = printed_key(serve)
        assert (home / "dev-api-key").read_text().strip() == key
        assert (home / "distill.db").is_file()  # migrated by serve itself
        client = ApiClient(f"http://127.0.0.1:{port}", key)
        client.wait_ready([serve])
        assert client.http.get("/readyz").status_code == 200

        file_id = client.upload(write_dolly_subset(tmp_path / "dolly.jsonl"))
        job = client.create_job(tiny_spec(tiny_teacher_dir, file_id, max_steps=4, checkpoint_every=2))
        done = client.wait_status(job["id"], TERMINAL, timeout=180, processes=[serve])
        assert done["status"] == "succeeded", (done, serve.output())
        series = client.http.get(f"/v1/jobs/{job['id']}/metrics").json()["series"]
        assert [p["step"] for p in series["loss"]] == [1, 2, 3, 4]
        checkpoints = client.http.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
        assert [c["step"] for c in checkpoints] == [2, 4]
        student = download(client, f"/v1/jobs/{job['id']}/student", tmp_path / "student")
        downloaded = AutoModelForCausalLM.from_pretrained(student / "student", trust_remote_code=False)
        assert (home / "artifacts" / "jobs" / job["id"] / "student").is_dir()
        assert_trained_from_teacher_layers(
            downloaded,
            home / "artifacts" / "jobs" / job["id"] / "student",
            tiny_teacher_dir,
            tiny_spec(tiny_teacher_dir, file_id)["student"]["from_teacher_layers"],
        )
        client.http.close()

        os.killpg(serve.pid, signal.SIGINT)  # Ctrl-C in the terminal
        assert serve.process.wait(timeout=60) == 0, serve.output()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)

        # A restart keeps the key, the database and the artifacts.
        serve = start_serve(home, port, tiny_teacher_dir.parent)
        assert printed_key(serve) == key
        client = ApiClient(f"http://127.0.0.1:{port}", key)
        client.wait_ready([serve])
        assert client.job(job["id"])["status"] == "succeeded"
        client.http.close()
    finally:
        serve.stop(signal.SIGINT)
