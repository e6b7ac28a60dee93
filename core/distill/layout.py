"""The layout of a training run's output directory, shared by the trainer, the worker and the API:

    <output_dir>/checkpoints/step-00000050/   a checkpoint (Hugging Face student + trainer state)
    <output_dir>/student/                     the final student (Hugging Face directory)

Imports nothing heavy, so the API can name these paths without loading torch.
"""

from __future__ import annotations

import re
from pathlib import Path

STUDENT_DIR = "student"
CHECKPOINTS_DIR = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^step-(\d{8})$")


def student_dir(output_dir: Path) -> Path:
    """Where a finished run keeps its student."""
    return Path(output_dir) / STUDENT_DIR


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint taken after optimizer step `step` (`step-00000050`)."""
    return f"step-{step:08d}"


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / checkpoint_name(step)


def checkpoint_download_name(step: int) -> str:
    """What a downloaded checkpoint archive is called and unpacks to (`checkpoint-00000050`)."""
    return f"checkpoint-{step:08d}"


def parse_checkpoint_name(name: str) -> int | None:
    """The step a checkpoint directory name stands for, or None when `name` is not one."""
    match = _CHECKPOINT_NAME.match(name)
    return int(match.group(1)) if match else None


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint directory (`step-XXXXXXXX`) was written at."""
    step = parse_checkpoint_name(Path(checkpoint).name)
    if step is None:
        raise ValueError(f"not a checkpoint directory: {checkpoint}")
    return step
