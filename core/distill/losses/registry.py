"""Losses by name: per-token losses from logits, and the masked, normalized batch loss."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from core.distill.losses import baselines
from core.distill.losses.amid import amid_token_losses
from core.distill.losses.params import LossConfig, LossConfigError, loss_config
from core.distill.losses.taid import taid_token_losses

# Each maps (teacher log-probs, student log-probs, **loss-specific params) to per-token losses.
_TOKEN_LOSSES: dict[str, Callable[..., Tensor]] = {
    "fkl": baselines.fkl,
    "rkl": baselines.rkl,
    "jsd": baselines.jsd,
    "skl": baselines.skl,
    "srkl": baselines.srkl,
    "tvd": baselines.tvd,
    "ab": baselines.ab,
    "taid": taid_token_losses,
    "amid": amid_token_losses,
}


def token_losses(name: str, student_logits: Tensor, teacher_logits: Tensor, **params: Any) -> Tensor:
    """Unreduced, unmasked per-token loss `name` between the student and the teacher.

    Logits are cast to float32 (float64 stays float64) before the softmax and divided by `temperature`.
    The teacher gets no gradient. A teacher vocabulary longer than the student's (padded embedding) is cut
    to the student's.

    Args:
        name: one of `LOSS_NAMES`.
        student_logits: ``[N, V]`` (any leading shape works) student logits, any float dtype.
        teacher_logits: ``[N, V_t]`` teacher logits with ``V_t >= V``.
        **params: the loss's parameters (see `validate_loss_params`); missing ones take their defaults.

    Returns:
        ``[N]`` per-token losses in the compute dtype (float32 or float64).
    """
    return configured_token_losses(loss_config(name, params), student_logits, teacher_logits)


def configured_token_losses(config: LossConfig, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """`token_losses` for an already validated `config` (the fused loss calls this once per chunk)."""
    teacher_logits = _cut_teacher_vocab(student_logits, teacher_logits)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student positions {tuple(student_logits.shape[:-1])} != teacher's {tuple(teacher_logits.shape[:-1])}"
        )
    dtype = torch.promote_types(
        torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32
    )
    student_logprobs = _logprobs(student_logits.to(dtype), config.temperature)
    with torch.no_grad():
        teacher_logprobs = _logprobs(teacher_logits.detach().to(dtype), config.temperature)
    losses = _TOKEN_LOSSES[config.name](teacher_logprobs, student_logprobs, **config.specific())
    if student_logits.requires_grad and not losses.requires_grad:
        # Some settings do not depend on the student (λ = 1 with pr or rp, skew = 1 for skl): keep the result
        # in the graph with a zero gradient, so backward() works. An empty slice, since 0·logits is NaN at −inf.
        losses = losses + student_logits.narrow(-1, 0, 0).sum(dim=-1).to(losses.dtype)
    return losses


def distillation_loss(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    normalizer: float | Tensor | None = None,
    **params: Any,
) -> Tensor:
    """Loss `name` summed over the positions whose label is not `ignore_index`, divided by `normalizer`.

    Args:
        name: one of `LOSS_NAMES`.
        student_logits: ``[..., V]`` student logits.
        teacher_logits: ``[..., V_t]`` teacher logits at the same positions, ``V_t >= V``; no gradient.
        labels: ``[...]``; only positions with ``labels != ignore_index`` count.
        ignore_index: label value of positions that take no part.
        normalizer: the number of loss positions in the whole optimizer step (so that gradient
            accumulation is exact); default: the number of counted positions here. 0 is only valid when
            no position counts.
        **params: the loss's parameters (see `validate_loss_params`).

    Returns:
        ``[]`` scalar. No counted position gives exactly 0 with a zero gradient.
    """
    config = loss_config(name, params)
    if student_logits.shape[:-1] != labels.shape or teacher_logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logit positions {tuple(student_logits.shape[:-1])} / {tuple(teacher_logits.shape[:-1])} "
            f"do not match labels {tuple(labels.shape)}"
        )
    counted = labels != ignore_index
    # Selecting rows (instead of masking per-token results) keeps ignored positions out of the math entirely,
    # so whatever they hold (−inf logits included) cannot turn the gradient into NaN.
    per_token = configured_token_losses(config, student_logits[counted], teacher_logits[counted])
    total = per_token.sum()
    rows = per_token.shape[0]
    if normalizer is None:
        return total / max(rows, 1)
    if isinstance(normalizer, Tensor):
        return total / normalizer.to(device=total.device, dtype=total.dtype).clamp_min(1)
    if not (math.isfinite(normalizer) and normalizer >= 0):
        raise LossConfigError("normalizer", f"must be a finite number >= 0, got {normalizer}")
    if normalizer == 0:
        if rows:
            raise LossConfigError("normalizer", f"is 0 but {rows} positions count")
        return total
    return total / normalizer


def amid_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    alpha: float,
    lam: float,
    divergence: str = "kl",
    order: str = "pr",
    ab_alpha: float = 0.2,
    ab_beta: float = 0.7,
    temperature: float = 1.0,
    ignore_index: int = -100,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """The AMiD loss; ``distillation_loss("amid", ...)`` with λ (`lam`) the weight on the TEACHER."""
    return distillation_loss(
        "amid",
        student_logits,
        teacher_logits,
        labels,
        ignore_index=ignore_index,
        normalizer=normalizer,
        alpha=alpha,
        lam=lam,
        divergence=divergence,
        order=order,
        ab_alpha=ab_alpha,
        ab_beta=ab_beta,
        temperature=temperature,
    )


def _cut_teacher_vocab(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    vocab, teacher_vocab = student_logits.shape[-1], teacher_logits.shape[-1]
    if teacher_vocab < vocab:
        raise LossConfigError(
            "teacher_logits", f"teacher vocabulary {teacher_vocab} is smaller than the student's {vocab}"
        )
    # Extra teacher entries are padding of the embedding matrix, not tokens the student could emit.
    return teacher_logits[..., :vocab] if teacher_vocab > vocab else teacher_logits


def _logprobs(logits: Tensor, temperature: float) -> Tensor:
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)
