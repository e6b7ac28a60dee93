"""Per-token baseline losses: forward/reverse KL, GKD's generalized JSD, DistiLLM's skew KLs, TVD and ABKD.

Each takes the teacher's and the student's log-probabilities ``[..., V]`` and returns ``[...]``.
"""

from __future__ import annotations

from torch import Tensor

from core.distill.losses.divergences import ab_divergence, kl_divergence, total_variation
from core.distill.losses.mixture import assistant_logprobs

# α = −1 makes the assistant the arithmetic mixture λ·p + (1 − λ)·q, formed in log space.
_ARITHMETIC = -1.0


def fkl(teacher_logprobs: Tensor, student_logprobs: Tensor) -> Tensor:
    """Forward KL(p ‖ q)."""
    return kl_divergence(teacher_logprobs, student_logprobs)


def rkl(teacher_logprobs: Tensor, student_logprobs: Tensor) -> Tensor:
    """Reverse KL(q ‖ p)."""
    return kl_divergence(student_logprobs, teacher_logprobs)


def jsd(teacher_logprobs: Tensor, student_logprobs: Tensor, *, beta: float) -> Tensor:
    """GKD's generalized JSD: β·KL(p ‖ m) + (1 − β)·KL(q ‖ m) with m = β·p + (1 − β)·q (β on the teacher).

    β = 0 or 1 makes m equal to q or p and the loss identically 0.
    """
    log_m = assistant_logprobs(teacher_logprobs, student_logprobs, _ARITHMETIC, beta)
    # A zero-weight term is left out rather than multiplied by 0: its KL may be +inf, and 0·inf is NaN.
    terms = []
    if beta > 0.0:
        terms.append(beta * kl_divergence(teacher_logprobs, log_m))
    if beta < 1.0:
        terms.append((1.0 - beta) * kl_divergence(student_logprobs, log_m))
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def skl(teacher_logprobs: Tensor, student_logprobs: Tensor, *, skew: float) -> Tensor:
    """DistiLLM's skew forward KL: KL(p ‖ s·p + (1 − s)·q).

    DistiLLM's code computes the cross-entropy −Σ p·log(mixture), which is this plus the constant H(p):
    same gradients, but this one is 0 at q = p.
    """
    log_m = assistant_logprobs(teacher_logprobs, student_logprobs, _ARITHMETIC, skew)
    return kl_divergence(teacher_logprobs, log_m)


def srkl(teacher_logprobs: Tensor, student_logprobs: Tensor, *, skew: float) -> Tensor:
    """DistiLLM's skew reverse KL: KL(q ‖ (1 − s)·p + s·q)."""
    log_m = assistant_logprobs(teacher_logprobs, student_logprobs, _ARITHMETIC, 1.0 - skew)
    return kl_divergence(student_logprobs, log_m)


def tvd(teacher_logprobs: Tensor, student_logprobs: Tensor) -> Tensor:
    """Total variation distance ½·Σ |p − q|."""
    return total_variation(teacher_logprobs, student_logprobs)


def ab(teacher_logprobs: Tensor, student_logprobs: Tensor, *, ab_alpha: float, ab_beta: float) -> Tensor:
    """ABKD: the α-β divergence D_AB(p ‖ q)."""
    return ab_divergence(teacher_logprobs, student_logprobs, ab_alpha, ab_beta)
