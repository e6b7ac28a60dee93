"""Shared pieces of the trainer tests: a small data subset, a tiny JobSpec and a recording callback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.distill.callbacks import TrainerCallbacks
from core.distill.spec import JobSpec


def write_subset(source: Path, target: Path, count: int, *, skip: int = 0) -> Path:
    lines = source.read_text(encoding="utf-8").splitlines()[skip : skip + count]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def tiny_spec(
    teacher: Path,
    student: Path | None,
    train: Path,
    eval_path: Path | None = None,
    **sections: dict[str, Any],
) -> JobSpec:
    """A JobSpec for the tiny models: short sequences, 4 steps, no eval or checkpoints unless asked."""
    raw: dict[str, Any] = {
        "teacher": {"model": str(teacher)},
        "student": {"model": str(student)} if student is not None else {"from_teacher_layers": [0, 3]},
        "data": {"train": str(train), "max_length": 64, "max_prompt_length": 40},
        "training": {
            "max_steps": 4,
            "batch_size": 4,
            "learning_rate": 5e-3,
            "eval_every": 0,
            "checkpoint_every": 0,
        },
        "evaluation": {"max_records": 4, "max_new_tokens": 4, "batch_size": 4},
    }
    if eval_path is not None:
        raw["data"]["eval"] = str(eval_path)
    for key, value in sections.items():
        raw[key] = raw.get(key, {}) | value if isinstance(value, dict) else value
    return JobSpec.model_validate(raw)


class Recorder(TrainerCallbacks):
    """Keeps everything the trainer reports; `stop_after` makes should_stop True from that step on."""

    def __init__(self, stop_after: int | None = None):
        self.started: list[tuple[int, int]] = []
        self.steps: dict[int, dict[str, float]] = {}
        self.evals: list[tuple[int, dict[str, float], list[dict[str, Any]]]] = []
        self.checkpoints: list[tuple[int, Path]] = []
        self.events: list[tuple[str, str]] = []
        self.stop_after = stop_after

    def on_start(self, *, total_steps: int, start_step: int) -> None:
        self.started.append((total_steps, start_step))

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.steps[step] = dict(metrics)

    def on_eval(self, step: int, metrics: dict[str, float], samples: list[dict[str, Any]]) -> None:
        self.evals.append((step, dict(metrics), samples))

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        self.checkpoints.append((step, path))

    def on_event(self, kind: str, message: str) -> None:
        self.events.append((kind, message))

    def should_stop(self) -> bool:
        return self.stop_after is not None and max(self.steps, default=0) >= self.stop_after
