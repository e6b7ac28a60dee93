"""TAID (Temporally Adaptive Interpolated Distillation): the per-token loss and the schedule of t."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from core.distill.losses.divergences import kl_divergence
from core.distill.losses.mixture import assistant_logprobs
from core.distill.losses.params import LOSS_PARAMS, TAID_SCHEDULE_PARAMS, LossConfigError, check_param

# TAID's target is a geometric interpolation of p and q, i.e. AMiD's assistant at α = 1.
_GEOMETRIC = 1.0
# Keeps the relative loss change finite when the previous loss was exactly 0 (as TAID's reference rule does).
_RELATIVE_EPS = 1e-15


def taid_token_losses(teacher_logprobs: Tensor, student_logprobs: Tensor, *, t: float) -> Tensor:
    """Per-token TAID loss KL(p_t ‖ q) with p_t = softmax(t·log p + (1 − t)·stopgrad(log q)).

    Equal to softmax(t·z_T + (1 − t)·stopgrad(z_S)) on logits, since the per-row normalizers cancel.

    Args:
        teacher_logprobs: ``[..., V]`` log p.
        student_logprobs: ``[..., V]`` log q; the gradient flows only through the second argument of the KL.
        t: the current interpolation in [0, 1] (0 targets the detached student, 1 the teacher).

    Returns:
        ``[...]`` per-token losses.
    """
    log_target = assistant_logprobs(teacher_logprobs, student_logprobs.detach(), _GEOMETRIC, t)
    return kl_divergence(log_target, student_logprobs)


class TaidInterpolation:
    """TAID's interpolation t, rising from `t_start` to 1 over `total_steps` optimizer steps.

    After each step with loss J: m ← μ·m + (1 − μ)·(J_prev − J)/J_prev, then
    t ← min(1, max(t_linear(step), t + β_lr·sigmoid(m)·(1 − t))), where t_linear ramps linearly from
    `t_start` (step 0) to 1 (step `total_steps`). The first update only records J.
    """

    def __init__(
        self,
        t_start: float = 0.4,
        beta_lr: float = 5e-4,
        momentum: float = 0.99,
        total_steps: int | None = None,
    ) -> None:
        if total_steps is None or total_steps < 1:
            raise LossConfigError("total_steps", f"must be a positive number of steps, got {total_steps}")
        check_param("t_start", t_start, LOSS_PARAMS["t"])
        check_param("beta_lr", beta_lr, TAID_SCHEDULE_PARAMS["beta_lr"])
        check_param("momentum", momentum, TAID_SCHEDULE_PARAMS["momentum"])
        self.t_start = float(t_start)
        self.beta_lr = float(beta_lr)
        self.momentum = float(momentum)
        self.total_steps = int(total_steps)
        self.t = self.t_start
        self.loss_momentum = 0.0
        self.prev_loss: float | None = None

    def linear_t(self, step: int) -> float:
        """The floor of t at `step`: the linear ramp from t_start to 1."""
        progress = min(1.0, max(0.0, step / self.total_steps))
        return self.t_start + (1.0 - self.t_start) * progress

    def update(self, step: int, loss: float | Tensor) -> float:
        """Advance t after optimizer step `step` whose (mean) loss was `loss`; returns the new t."""
        value = float(loss)
        if not math.isfinite(value):
            raise ValueError(f"TAID update at step {step}: loss is not finite ({value})")
        if self.prev_loss is None:
            self.prev_loss = value
            return self.t
        relative_change = (self.prev_loss - value) / (self.prev_loss + _RELATIVE_EPS)
        self.loss_momentum = self.momentum * self.loss_momentum + (1.0 - self.momentum) * relative_change
        delta = self.beta_lr * _sigmoid(self.loss_momentum) * (1.0 - self.t)
        self.t = min(1.0, max(self.linear_t(step), self.t + delta))
        self.prev_loss = value
        return self.t

    def state_dict(self) -> dict[str, Any]:
        """The evolving state as plain Python numbers (prev_loss is None before the first update)."""
        return {"t": self.t, "loss_momentum": self.loss_momentum, "prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.t = float(state["t"])
        self.loss_momentum = float(state["loss_momentum"])
        self.prev_loss = None if state["prev_loss"] is None else float(state["prev_loss"])


def _sigmoid(x: float) -> float:
    # Two branches so that exp never overflows for a large |x| (a loss jumping up from ~0 gives a huge m).
    if x >= 0.0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)
