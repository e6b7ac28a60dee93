"""Training checkpoints: `output_dir/checkpoints/step-XXXXXXXX/` (see `core.distill.layout`).

Each one is a Hugging Face directory of the student (config, safetensors, tokenizer, generation config),
plus `trainer_state.pt` (optimizer, scheduler, step, RNG states, data position, strategy and TAID state)
and `spec.json` (the JobSpec that produced it). A checkpoint is assembled in a hidden temporary directory
and renamed into place, so a crash never leaves a half-written `step-*` directory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.distill.layout import checkpoint_path, checkpoints_dir, parse_checkpoint_name
from core.distill.models import save_student
from core.distill.spec import JobSpec

TRAINER_STATE = "trainer_state.pt"
SPEC_FILE = "spec.json"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = parse_checkpoint_name(child.name)
        if step is not None and (child / TRAINER_STATE).is_file():
            found.append((step, child))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint under `output_dir/checkpoints`, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy and torch (CPU and every CUDA device)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    student: nn.Module,
    tokenizer: Any,
    spec: JobSpec,
    trainer_state: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write checkpoint `step` atomically, prune to the newest `keep`, and return its path."""
    final = checkpoint_path(output_dir, step)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_student(student, tokenizer, tmp)
        torch.save(trainer_state, tmp / TRAINER_STATE)
        (tmp / SPEC_FILE).write_text(spec.model_dump_json(indent=2), encoding="utf-8")
        if final.exists():
            # Re-saving a step (a resumed run stopping where it started): replace the old copy.
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep is not None:
        for _, old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The `trainer_state.pt` of a checkpoint (it holds RNG states and numpy arrays, hence weights_only=False)."""
    return torch.load(Path(checkpoint) / TRAINER_STATE, map_location="cpu", weights_only=False)


def load_checkpoint_spec(checkpoint: Path) -> JobSpec:
    """The JobSpec stored with a checkpoint."""
    return JobSpec.model_validate(json.loads((Path(checkpoint) / SPEC_FILE).read_text(encoding="utf-8")))
