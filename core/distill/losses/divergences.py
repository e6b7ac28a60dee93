"""Divergences between two distributions given as log-probabilities over the last axis.

Entries where both distributions are 0 (−inf log-probability, e.g. a padded or banned token) take no part:
they contribute 0 and get a zero, finite gradient. Where the divergence is truly infinite (a > 0 = b for
KL) the result is +inf and it is the caller's job to fail loudly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Near a_ = 0, b_ = 0 or a_ + b_ = 0 the general α-β formula divides a difference of O(1) sums by the small
# parameter: below _AB_WIDEN_BELOW it is evaluated in float64, and below AB_LIMIT_BELOW (where the float64
# rounding error, ~1e-16 / param, meets the O(param) distance to the limit) the limit formula is used.
AB_LIMIT_BELOW = 1e-8
_AB_WIDEN_BELOW = 0.05
_NEG_INF = -math.inf


def kl_divergence(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a ‖ b) = Σ_v a(v)·(log a(v) − log b(v)), with 0·log 0 = 0.

    Computed as Σ_v [a·log(a/b) − a + b], each entry >= 0: the added Σ (b − a) is 0 for normalized inputs
    but cancels, to first order, the rounding of the normalizers (float32 otherwise loses ~1e-3 of a small
    KL such as D(q ‖ r) at λ = 0.01). Its gradient w.r.t. the log-probabilities is a multiple of a and b,
    which the log_softmax that produced them projects away.

    Args:
        log_a, log_b: ``[..., V]`` normalized log-probabilities.

    Returns:
        ``[...]``; +inf where some a(v) > 0 has b(v) = 0.
    """
    absent = log_a == _NEG_INF
    # Substitute before multiplying: the masked lanes must not compute 0·(−inf), even in the backward pass.
    safe_a = log_a.masked_fill(absent, 0.0)
    safe_b = log_b.masked_fill(absent, 0.0)
    a, b = safe_a.exp(), safe_b.exp()
    u = safe_a - safe_b
    # a·u − a + b = a·u − b·expm1(u); the expm1 form keeps precision for small u, the other cannot overflow.
    near = u.abs() < 1.0
    u_near = u.masked_fill(~near, 0.0)
    terms = torch.where(near, a * u_near - b * torch.expm1(u_near), a * u - a + b)
    # Where a = 0 only the "+ b" part is left; where b = 0 < a the entry is +inf even if a underflows to 0.
    terms = torch.where(absent, log_b.exp(), terms).masked_fill(~absent & (log_b == _NEG_INF), math.inf)
    return terms.sum(dim=-1)


def total_variation(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Total variation ½·Σ_v |a(v) − b(v)|.

    Args:
        log_a, log_b: ``[..., V]`` normalized log-probabilities.

    Returns:
        ``[...]`` in [0, 1].
    """
    return 0.5 * (log_a.exp() - log_b.exp()).abs().sum(dim=-1)


def ab_divergence(log_a: Tensor, log_b: Tensor, ab_alpha: float, ab_beta: float) -> Tensor:
    """Cichocki's α-β divergence D_AB(a ‖ b) with parameters (a_, b_) = (ab_alpha, ab_beta).

    General case: −1/(a_·b_)·Σ_v [a^a_·b^b_ − a_/(a_+b_)·a^(a_+b_) − b_/(a_+b_)·b^(a_+b_)], each power
    formed as exp(exponent·log-probability). Limits: b_ = 0: 1/a_²·Σ [a^a_·log(a^a_/b^a_) − a^a_ + b^a_];
    a_ = 0: the same with (a, b) swapped and b_ for a_; a_ + b_ = 0: 1/a_²·Σ [(a/b)^a_ − log (a/b)^a_ − 1];
    a_ = b_ = 0: ½·Σ (log a − log b)². (1, 0) is KL(a ‖ b); (½, ½) is 4·(1 − Σ √(a·b)).

    Args:
        log_a, log_b: ``[..., V]`` normalized log-probabilities.
        ab_alpha, ab_beta: a_ and b_, any finite reals (NOT the mixture's α).

    Returns:
        ``[...]``, >= 0; +inf where an entry with exactly one zero probability has an infinite term (a zero
        base with a non-positive exponent, or a log of it).
    """
    a_, b_ = float(ab_alpha), float(ab_beta)
    s = a_ + b_
    out_dtype = log_a.dtype
    if min(abs(a_), abs(b_), abs(s)) < _AB_WIDEN_BELOW and out_dtype != torch.float64:
        log_a, log_b = log_a.double(), log_b.double()
    a_zero, b_zero = log_a == _NEG_INF, log_b == _NEG_INF
    both_zero = a_zero & b_zero
    a_only, b_only = a_zero & ~both_zero, b_zero & ~both_zero
    log_a = log_a.masked_fill(both_zero, 0.0)
    log_b = log_b.masked_fill(both_zero, 0.0)
    small_a, small_b = abs(a_) < AB_LIMIT_BELOW, abs(b_) < AB_LIMIT_BELOW
    # Which entries with a single zero are infinite follows from the exponents; it is said explicitly because
    # the float evaluation of such a limit may give 0·inf or inf − inf.
    none = torch.zeros_like(a_zero)
    if small_a and small_b:
        terms, infinite = 0.5 * (log_a - log_b).square(), a_only | b_only
    elif small_b:
        terms = _ab_one_sided_terms(log_a, log_b, a_)
        infinite = b_only | (a_only if a_ < 0 else none)
    elif small_a:
        terms = _ab_one_sided_terms(log_b, log_a, b_)
        infinite = a_only | (b_only if b_ < 0 else none)
    elif abs(s) < AB_LIMIT_BELOW:
        u = a_ * (log_a - log_b)
        terms, infinite = (torch.expm1(u) - u) / (a_ * a_), a_only | b_only
    else:
        terms = _ab_general_terms(log_a, log_b, a_, b_)
        # A zero base needs positive exponents: a in a^a_·b^b_ and a^(a_+b_), b likewise.
        infinite = (a_only if min(a_, s) <= 0 else none) | (b_only if min(b_, s) <= 0 else none)
    terms = terms.masked_fill(both_zero, 0.0).masked_fill(infinite, math.inf)
    return terms.sum(dim=-1).to(out_dtype)


def _ab_one_sided_terms(log_a: Tensor, log_b: Tensor, a_: float) -> Tensor:
    """Per-entry terms of the b_ = 0 limit: 1/a_²·[a^a_·(a_·(log a − log b) − 1) + b^a_]."""
    # a = 0 with a_ > 0: a^a_·log a -> 0; substitute so the dropped lane never forms 0·(−inf).
    absent = log_a == _NEG_INF if a_ > 0 else torch.zeros_like(log_a, dtype=torch.bool)
    safe_a = log_a.masked_fill(absent, 0.0)
    lead = (torch.exp(a_ * safe_a) * (a_ * (safe_a - log_b) - 1.0)).masked_fill(absent, 0.0)
    return (lead + torch.exp(a_ * log_b)) / (a_ * a_)


def _ab_general_terms(log_a: Tensor, log_b: Tensor, a_: float, b_: float) -> Tensor:
    """Per-entry terms of D_AB for a_, b_ and a_ + b_ all away from 0."""
    s = a_ + b_
    cross = torch.exp(a_ * log_a + b_ * log_b)
    own_a = torch.exp(s * log_a)
    own_b = torch.exp(s * log_b)
    direct = -(cross - (a_ / s) * own_a - (b_ / s) * own_b) / (a_ * b_)
    # Summing the three powers first (or using `direct` where a ≈ b) cancels to first order in
    # u = log a − log b: float32 then loses ~1e-4 of a small loss. Regrouped with expm1 the first-order
    # parts cancel analytically. `direct` stays where |u| is large, because expm1(b_·u) may overflow there.
    u = log_a - log_b
    near = u.abs() < 1.0
    u = u.masked_fill(~near, 0.0)
    close = (cross * torch.expm1(b_ * u) / b_ - own_b * torch.expm1(a_ * u) / a_) / s
    return torch.where(near, close, direct)
