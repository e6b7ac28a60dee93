"""Optimizer and learning-rate schedule of the training recipe: AdamW with warm-up, then cosine, linear
or constant."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

ScheduleName = Literal["cosine", "linear", "constant"]


def build_optimizer(model: nn.Module, *, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; norms and biases (1-D tensors) get no weight decay."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        # Weight decay on gains and offsets only pulls normalisation layers towards zero, which is never wanted.
        (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    try:
        # The fused kernel does the whole update in one pass: several times faster than the per-op loop on CPU.
        return torch.optim.AdamW(groups, lr=learning_rate, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=learning_rate)


def lr_factor(step: int, *, name: ScheduleName, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based: the step about to run)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if name == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if name == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, name: ScheduleName, warmup_steps: int, total_steps: int
) -> LambdaLR:
    """A LambdaLR following `lr_factor`; its state (last_epoch) is all a checkpoint needs to keep."""
    return LambdaLR(
        optimizer,
        lambda step: lr_factor(step, name=name, warmup_steps=warmup_steps, total_steps=total_steps),
    )
