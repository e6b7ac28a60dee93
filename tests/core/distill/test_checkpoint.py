"""Checkpoints you can trust: the manifest, verification, falling back past corrupt checkpoints, pruning
that keeps good ones, a trainer state that cannot run code, and a full disk reported as such."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from core.distill import checkpoint as ckpt
from core.distill.checkpoint import (
    LEGACY_STATE,
    MANIFEST,
    STATE_JSON,
    STATE_TENSORS,
    CheckpointError,
    StorageFullError,
    find_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    prune_checkpoints,
    verify_checkpoint,
    write_trainer_state,
)
from core.distill.layout import checkpoint_path
from core.distill.models import load_causal_lm, load_tokenizer
from core.distill.trainer import train
from tests.core.distill._trainer_utils import Recorder, tiny_spec, write_subset

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def train_path(tmp_path_factory, dolly_train_path):
    return write_subset(dolly_train_path, tmp_path_factory.mktemp("ckpt-data") / "train.jsonl", 10)


@pytest.fixture(scope="module")
def spec(tiny_teacher_dir, train_path):
    return tiny_spec(
        tiny_teacher_dir,
        None,
        train_path,
        training={"max_steps": 4, "batch_size": 3, "checkpoint_every": 1, "keep_checkpoints": None},
    )


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, spec):
    """A 4-step run with a checkpoint after every step (all kept), and what it logged."""
    out = tmp_path_factory.mktemp("full-run")
    recorder = Recorder()
    train(spec, output_dir=out, callbacks=recorder, device="cpu")
    return out, recorder


@pytest.fixture
def run_dir(full_run, tmp_path):
    """A private copy of the full run's output directory."""
    return Path(shutil.copytree(full_run[0], tmp_path / "run"))


def flip_a_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def same_losses(a: dict[str, float], b: dict[str, float]) -> bool:
    """The step's losses, learning rate and gradient norm are identical (timings are not compared)."""
    keys = ("loss", "kd_loss", "ce_loss", "grad_norm", "lr")
    return {k: a[k] for k in keys} == {k: b[k] for k in keys}


class RunsCode:
    """A pickle that creates `marker` when it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# ------------------------------------------------------------------------------------------- manifest
def test_the_manifest_lists_every_file_with_its_size_and_sha256(run_dir):
    path = checkpoint_path(run_dir, 4)
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["format"] == 2 and manifest["step"] == 4
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    assert {f["path"] for f in manifest["files"]} == on_disk
    assert {STATE_JSON, STATE_TENSORS, "spec.json", "config.json", "model.safetensors"} <= on_disk
    for entry in manifest["files"]:
        data = (path / entry["path"]).read_bytes()
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert verify_checkpoint(path) is None
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def _truncate(path: Path) -> None:
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])


def _edit_state(path: Path) -> None:
    state = json.loads((path / STATE_JSON).read_text())
    state["state"]["step"] = 1
    (path / STATE_JSON).write_text(json.dumps(state))


def _forge_manifest_step(path: Path) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).write_text(json.dumps(manifest | {"step": 3}))


CORRUPTIONS = {
    "flipped weights byte": (
        lambda p: flip_a_byte(p / "model.safetensors"),
        "model.safetensors does not match",
    ),
    "truncated weights": (_truncate, "model.safetensors has"),
    "deleted state": (lambda p: (p / STATE_TENSORS).unlink(), f"{STATE_TENSORS} is missing"),
    "edited state": (_edit_state, f"{STATE_JSON} does not match"),
    "extra file": (lambda p: (p / "pytorch_model.bin").write_bytes(b"x"), "pytorch_model.bin is not in"),
    "no manifest": (lambda p: (p / MANIFEST).unlink(), "no manifest.json"),
    "garbled manifest": (lambda p: (p / MANIFEST).write_text("{"), "unreadable manifest.json"),
    "manifest of another step": (_forge_manifest_step, "manifest.json is for step 3"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_is_skipped_for_the_previous_one(run_dir, corruption):
    corrupt, expected = CORRUPTIONS[corruption]
    newest = checkpoint_path(run_dir, 4)
    assert verify_checkpoint(newest) is None  # (fills this process's cache: a change must still be seen)
    corrupt(newest)
    problem = verify_checkpoint(newest)
    assert problem is not None and expected in problem, problem
    search = find_checkpoint(run_dir)
    assert search.checkpoint == checkpoint_path(run_dir, 3) == latest_checkpoint(run_dir)
    assert [(s.step, s.path, s.problem) for s in search.skipped] == [(4, newest, problem)]
    assert newest.is_dir()  # finding never moves anything


def test_no_checkpoint_verifies(run_dir):
    for step in range(1, 5):
        flip_a_byte(checkpoint_path(run_dir, step) / STATE_TENSORS)
    search = find_checkpoint(run_dir)
    assert search.checkpoint is None and [s.step for s in search.skipped] == [4, 3, 2, 1]


def test_training_resumes_from_the_fallback_and_sets_the_corrupt_one_aside(run_dir, spec, full_run):
    """The in-process version of the fault test: the newest checkpoint is corrupt, the run resumes from
    the one before, warns, keeps the corrupt one as step-XXXXXXXX.corrupt, and ends exactly as the
    uninterrupted run did."""
    newest = checkpoint_path(run_dir, 4)
    flip_a_byte(newest / "model.safetensors")
    (run_dir / "student").rename(run_dir / "student-of-the-first-run")
    resume_from = latest_checkpoint(run_dir)
    assert resume_from == checkpoint_path(run_dir, 3)

    recorder = Recorder()
    result = train(spec, output_dir=run_dir, callbacks=recorder, resume_from=resume_from, device="cpu")
    assert recorder.started == [(4, 3)] and sorted(recorder.steps) == [4]
    warnings = [m for kind, m in recorder.events if kind == "warning"]
    assert len(warnings) == 1 and "checkpoint of step 4 is corrupt" in warnings[0], warnings
    assert "model.safetensors does not match" in warnings[0] and "step-00000004.corrupt" in warnings[0]
    set_aside = run_dir / "checkpoints" / "step-00000004.corrupt"
    assert set_aside.is_dir() and verify_checkpoint(set_aside) is not None
    assert [step for step, _ in list_checkpoints(run_dir)] == [1, 2, 3, 4]
    assert verify_checkpoint(newest) is None  # step 4 written again, intact
    assert result.step == 4 and not result.stopped
    assert same_losses(recorder.steps[4], full_run[1].steps[4])


def test_resuming_from_a_checkpoint_that_does_not_verify_is_refused(run_dir, spec):
    flip_a_byte(checkpoint_path(run_dir, 2) / "model.safetensors")
    with pytest.raises(CheckpointError, match="step-00000002: model.safetensors does not match"):
        train(spec, output_dir=run_dir, resume_from=checkpoint_path(run_dir, 2), device="cpu")


# -------------------------------------------------------------------------------------------- pruning
def test_pruning_keeps_the_newest_good_checkpoints_and_sets_corrupt_ones_aside(run_dir):
    flip_a_byte(checkpoint_path(run_dir, 3) / STATE_TENSORS)
    set_aside = prune_checkpoints(run_dir, keep=2, current=checkpoint_path(run_dir, 4))
    assert [(s.step, s.path.name) for s in set_aside] == [(3, "step-00000003.corrupt")]
    assert [step for step, _ in list_checkpoints(run_dir)] == [2, 4]  # 1 pruned, 2 kept: it verifies
    assert (run_dir / "checkpoints" / "step-00000003.corrupt").is_dir()


def test_pruning_counts_the_current_checkpoint_even_when_newer_ones_exist(run_dir):
    prune_checkpoints(run_dir, keep=1, current=checkpoint_path(run_dir, 2))
    assert [step for step, _ in list_checkpoints(run_dir)] == [2]


def test_saving_a_step_again_replaces_it_whole(run_dir, spec):
    path = checkpoint_path(run_dir, 4)
    state = load_trainer_state(path) | {"step": 4, "note": "second copy"}
    student, tokenizer = load_causal_lm(path), load_tokenizer(path)
    assert (
        ckpt.save_checkpoint(run_dir, 4, student=student, tokenizer=tokenizer, spec=spec, trainer_state=state)
        == path
    )
    assert verify_checkpoint(path) is None and load_trainer_state(path)["note"] == "second copy"
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def test_leftovers_of_a_killed_writer_are_swept_once_stale(run_dir):
    root = run_dir / "checkpoints"
    stale, fresh = root / ".tmp-step-00000005-123", root / ".pruned-step-00000001-456"
    for leftover in (stale, fresh):
        (leftover / "sub").mkdir(parents=True)
    os.utime(stale, (1, 1))
    ckpt.sweep_leftovers(run_dir)
    assert not stale.exists() and fresh.is_dir()
    assert [step for step, _ in list_checkpoints(run_dir)] == [1, 2, 3, 4]


def test_training_keeps_two_checkpoints_by_default(tmp_path, tiny_teacher_dir, train_path):
    spec = tiny_spec(tiny_teacher_dir, None, train_path, training={"max_steps": 3, "checkpoint_every": 1})
    assert spec.training.keep_checkpoints == 2
    train(spec, output_dir=tmp_path, device="cpu")
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 3]


# -------------------------------------------------------------------------------- state without pickle
def test_trainer_state_round_trips_exactly(tmp_path):
    state = {
        "step": 7,
        "rng": {"python": __import__("random").getstate(), "numpy": np.random.get_state()},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}}, "groups": []},
        "betas": (0.9, 0.999),
        "nested": [1, (2, [3.5, None]), {"__looks_like_a_tag__": "x", 5: "int key"}],
        "metrics": {"loss": float("nan"), "lr": 1e-3, "big": 2**40},
        "generator": torch.Generator().manual_seed(3).get_state(),
    }
    write_trainer_state(tmp_path, state)
    loaded = load_trainer_state(tmp_path)
    assert loaded["rng"]["python"] == state["rng"]["python"]
    np_state = loaded["rng"]["numpy"]
    assert np_state[0] == "MT19937" and np_state[1].dtype == np.uint32
    assert np.array_equal(np_state[1], state["rng"]["numpy"][1]) and np_state[2:] == state["rng"]["numpy"][2:]
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert loaded["optimizer"]["state"][0]["step"].shape == () and list(loaded["optimizer"]["state"]) == [0]
    assert loaded["betas"] == (0.9, 0.999) and loaded["nested"] == state["nested"]
    assert math.isnan(loaded["metrics"]["loss"]) and loaded["metrics"]["big"] == 2**40
    assert torch.equal(loaded["generator"], state["generator"])
    assert loaded["step"] == 7


def test_a_state_file_replaced_by_a_pickle_is_refused_without_running_it(run_dir, spec, tmp_path):
    marker = tmp_path / "code-ran"
    payload = pickle.dumps({"step": RunsCode(marker)})
    live = tmp_path / "proof"
    pickle.loads(pickle.dumps(RunsCode(live)))
    assert live.exists()  # such a payload really runs code when it is unpickled

    newest = checkpoint_path(run_dir, 4)
    (newest / STATE_TENSORS).write_bytes(payload)
    problem = verify_checkpoint(newest)
    assert problem is not None and problem.startswith(STATE_TENSORS), problem
    assert latest_checkpoint(run_dir) == checkpoint_path(run_dir, 3)
    # Even with the manifest rewritten to match, reading the state never unpickles it.
    (newest / MANIFEST).unlink()
    ckpt._write_manifest(newest, 4)
    assert verify_checkpoint(newest) is None
    with pytest.raises(CheckpointError, match="the trainer state does not load"):
        load_trainer_state(newest)
    torch.save({"step": RunsCode(marker)}, newest / STATE_TENSORS)
    with pytest.raises(CheckpointError):
        load_trainer_state(newest)
    assert not marker.exists()


def test_a_manifestless_pickle_is_refused_without_running_it(run_dir, tmp_path):
    """A directory made to look like a format-1 checkpoint (no manifest, a `trainer_state.pt` pickle)."""
    marker = tmp_path / "code-ran"
    newest = checkpoint_path(run_dir, 4)
    for name in (MANIFEST, STATE_JSON, STATE_TENSORS):
        (newest / name).unlink()
    torch.save({"step": 4, "hook": RunsCode(marker)}, newest / LEGACY_STATE)
    problem = verify_checkpoint(newest)
    assert problem is not None and "format-1 checkpoint does not load" in problem
    assert latest_checkpoint(run_dir) == checkpoint_path(run_dir, 3)
    with pytest.raises(CheckpointError):
        load_trainer_state(newest)
    assert not marker.exists()


def test_a_format_1_checkpoint_still_resumes_exactly(run_dir, spec, full_run):
    """Written before manifests: `trainer_state.pt` with numpy RNG arrays, read with weights_only=True."""
    old = checkpoint_path(run_dir, 3)
    state = load_trainer_state(old)
    for name in (MANIFEST, STATE_JSON, STATE_TENSORS):
        (old / name).unlink()
    torch.save(state, old / LEGACY_STATE)
    shutil.rmtree(checkpoint_path(run_dir, 4))
    assert verify_checkpoint(old) is None and latest_checkpoint(run_dir) == old

    recorder = Recorder()
    train(spec, output_dir=run_dir, callbacks=recorder, resume_from=old, device="cpu")
    assert recorder.started == [(4, 3)]
    assert same_losses(recorder.steps[4], full_run[1].steps[4])
    assert verify_checkpoint(checkpoint_path(run_dir, 4)) is None  # new checkpoints use the new format


# ----------------------------------------------------------------------------------------- disk full
def test_a_full_disk_while_checkpointing_is_a_storage_full_error(run_dir, spec, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    with pytest.raises(StorageFullError) as raised:
        train(spec, output_dir=run_dir, resume_from=checkpoint_path(run_dir, 3), device="cpu")
    assert str(raised.value) == (
        "the artifact storage is full while writing the checkpoint of step 4: free space or raise the quota"
    )
    assert raised.value.errno == errno.ENOSPC
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_library_worded_full_disk_is_recognised(tmp_path, monkeypatch):
    def rust_error(*args, **kwargs):  # how safetensors' writer reports it: not an OSError
        raise RuntimeError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "x" })'
        )

    monkeypatch.setattr(safetensors.torch, "save_file", rust_error)
    full = pytest.raises(StorageFullError, match="while writing the trainer state")
    with full, ckpt.storage_errors("the trainer state"):
        write_trainer_state(tmp_path, {"x": torch.ones(1)})
    with pytest.raises(ValueError), ckpt.storage_errors("the trainer state"):
        raise ValueError("not about space")  # anything else passes through unchanged


_TINY_DISK_SCRIPT = """
import sys
from pathlib import Path
from core.distill.checkpoint import StorageFullError, save_checkpoint
from core.distill.models import load_causal_lm, load_tokenizer
from core.distill.spec import JobSpec

student_dir, spec_path, out = map(Path, sys.argv[1:4])
spec = JobSpec.model_validate_json(spec_path.read_text())
student = load_causal_lm(student_dir)
try:
    save_checkpoint(out, 5, student=student, tokenizer=load_tokenizer(str(student_dir)), spec=spec,
                    trainer_state={"step": 5})
except StorageFullError as exc:
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    print("STORAGE_FULL", exc, left)
"""


def test_a_full_disk_on_a_real_tiny_filesystem(tmp_path, tiny_student_dir, spec):
    """A 64 KiB tmpfs in a private mount namespace (needs `unshare`; skipped where it is refused)."""
    mount_point = tmp_path / "tiny-disk"
    mount_point.mkdir()
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    (tmp_path / "script.py").write_text(textwrap.dedent(_TINY_DISK_SCRIPT))
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    mount = f"mount -t tmpfs -o size=64k tmpfs {mount_point}"
    probe = subprocess.run(["unshare", *user, "--mount", "sh", "-c", mount], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")
    run = f'{mount} && exec "$0" "$@"'
    args = [sys.executable, str(tmp_path / "script.py"), str(tiny_student_dir), str(tmp_path / "spec.json")]
    done = subprocess.run(
        ["unshare", *user, "--mount", "sh", "-c", run, *args, str(mount_point)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "STORAGE_FULL the artifact storage is full while writing the checkpoint of step 5" in done.stdout
    assert done.stdout.strip().endswith("[]"), done.stdout  # no half-written directory left behind
