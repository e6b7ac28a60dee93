"""The α-mixture assistant distribution r(α, λ) of AMiD, computed in log space.

r̃ = (λ·p^c + (1 − λ)·q^c)^(1/c) with c = (1 − α)/2 (the weighted power mean of p and q), the geometric mean
p^λ·q^(1−λ) at α = 1, and r = r̃ / Σ r̃. λ is always the weight on the TEACHER p.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from core.distill.losses.params import LossConfigError

# The usual log-space form logaddexp(log λ + c·log p, log(1−λ) + c·log q) / c loses precision like 1/|c|
# near α = 1. The pivoted expm1/log1p form below has no such loss, so the exact geometric form is only needed
# where c·(log p − log q) could underflow; at |1 − α| < 1e-12 the two differ by at most ~1e-13·(log p − log q)²,
# far below float64 rounding of the loss, so the switch is continuous in practice.
GEOMETRIC_BELOW = 1e-12


def assistant_logprobs(
    teacher_logprobs: Tensor, student_logprobs: Tensor, alpha: float, lam: float
) -> Tensor:
    """Normalized log-probabilities of the α-mixture assistant r(α, λ).

    Args:
        teacher_logprobs: ``[..., V]`` log p (normalized; −inf for impossible tokens).
        student_logprobs: ``[..., V]`` log q, same shape. Gradients flow through it.
        alpha: the mixture's α, any real number (α > 1 included; α = 1 is the geometric mixture).
        lam: λ in [0, 1], the weight on the TEACHER. λ = 1 returns log p, λ = 0 returns log q, unchanged.

    Returns:
        ``[..., V]`` log r. For α < 1 the support of r is the union of the supports of p and q; for α ≥ 1
        their intersection (entries outside get −inf and a zero gradient). Gradients are finite wherever
        the inputs are finite or −inf; a row whose p and q have disjoint supports has no r for α ≥ 1 (NaN).
    """
    if not math.isfinite(alpha):
        raise LossConfigError("alpha", f"must be finite, got {alpha}")
    if not 0.0 <= lam <= 1.0:
        raise LossConfigError("lam", f"must lie in [0, 1], got {lam}")
    if teacher_logprobs.shape != student_logprobs.shape:
        raise ValueError(f"shapes differ: {tuple(teacher_logprobs.shape)} vs {tuple(student_logprobs.shape)}")
    if lam == 1.0:
        return teacher_logprobs
    if lam == 0.0:
        return student_logprobs
    c = (1.0 - alpha) / 2.0
    if abs(1.0 - alpha) < GEOMETRIC_BELOW:
        unnormalized = lam * teacher_logprobs + (1.0 - lam) * student_logprobs
    else:
        unnormalized = _log_power_mean(teacher_logprobs, student_logprobs, c, lam)
    return torch.log_softmax(unnormalized, dim=-1)


def _log_power_mean(log_p: Tensor, log_q: Tensor, c: float, lam: float) -> Tensor:
    """log (λ·p^c + (1 − λ)·q^c)^(1/c) elementwise, for c ≠ 0 and 0 < λ < 1."""
    neg_inf = -math.inf
    p_zero, q_zero = log_p == neg_inf, log_q == neg_inf
    # c > 0: a zero only drops its term (the other survives), both zero gives 0.
    # c < 0: p^c = +inf, the harmonic-like mean is 0 as soon as either is zero.
    dead = (p_zero & q_zero) if c > 0 else (p_zero | q_zero)
    # Substituted inputs keep the discarded lanes finite, so their (zero) gradient is not 0·inf = NaN.
    log_p = log_p.masked_fill(dead, 0.0)
    log_q = log_q.masked_fill(dead, 0.0)
    # With s = c·(log p − log q), pivot on the larger of the two powered terms:
    #   s >= 0:  log p + log1p((1−λ)·expm1(−s)) / c      s < 0:  log q + log1p(λ·expm1(s)) / c
    # expm1 sees only a non-positive argument (no overflow) and neither form cancels as c -> 0.
    s = c * (log_p - log_q)
    p_leads = s >= 0
    # where(), not -abs(): abs has a zero subgradient at s = 0 (tied logits), which would drop ∂/∂s there.
    shrink = torch.where(p_leads, -s, s)
    pivot = torch.where(p_leads, log_p, log_q)
    other_weight = torch.where(p_leads, log_p.new_tensor(1.0 - lam), log_p.new_tensor(lam))
    result = pivot + torch.log1p(other_weight * torch.expm1(shrink)) / c
    return result.masked_fill(dead, neg_inf)
