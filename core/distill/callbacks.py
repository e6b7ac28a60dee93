"""How the trainer reports progress. The service implements this; `core.distill` never imports a
database or a queue."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TrainerCallbacks:
    """No-op base: subclass and override what you need. Called from the training process."""

    def on_start(self, *, total_steps: int, start_step: int) -> None:
        """Training begins (start_step > 0 when resuming from a checkpoint)."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """After optimizer step `step` (1-based). Metrics: loss, kd_loss, ce_loss, lr, grad_norm,
        tokens_per_s, teacher_time_s, student_time_s, and strategy-specific ones."""

    def on_eval(self, step: int, metrics: dict[str, float], samples: list[dict[str, Any]]) -> None:
        """After an evaluation. Metrics: eval_ce_loss, eval_kd_loss, eval_rouge_l; samples hold
        prompt, reference and generated response."""

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        """A checkpoint directory was written atomically at `path`."""

    def on_checkpoint_set_aside(self, step: int, path: Path, problem: str) -> None:
        """The checkpoint of `step` failed verification and was renamed to `path` (never used again); the
        default reports a warning event naming the step and the problem."""
        self.on_event(
            "warning",
            f"the checkpoint of step {step} is corrupt ({problem}); set aside as {path.name} and not used",
        )

    def on_event(self, kind: str, message: str) -> None:
        """Free-form lifecycle messages (loading models, data counts, warnings)."""

    def should_stop(self) -> bool:
        """Polled after every optimizer step, and during evaluations and generations before each batch and
        after each generated token (keep it cheap); True stops training after a checkpoint of the last
        complete step."""
        return False
