"""The AMiD per-token loss: a divergence between one end distribution (p or q) and the assistant r(α, λ)."""

from __future__ import annotations

from torch import Tensor

from core.distill.losses.divergences import ab_divergence, kl_divergence
from core.distill.losses.mixture import assistant_logprobs


def amid_token_losses(
    teacher_logprobs: Tensor,
    student_logprobs: Tensor,
    *,
    alpha: float,
    lam: float,
    divergence: str,
    order: str,
    ab_alpha: float,
    ab_beta: float,
) -> Tensor:
    """Per-token AMiD loss D(x ‖ y) with (x, y) picked by `order` from p, q and r = r(α, λ).

    Args:
        teacher_logprobs: ``[..., V]`` log p; should carry no gradient.
        student_logprobs: ``[..., V]`` log q; the gradient flows through q and through r (r is not detached).
        alpha, lam: the assistant's α (any real) and teacher weight λ in [0, 1].
        divergence: ``"kl"`` or ``"ab"`` (α-β divergence with `ab_alpha`, `ab_beta`).
        order: ``"pr"`` D(p‖r), ``"qr"`` D(q‖r), ``"rp"`` D(r‖p) or ``"rq"`` D(r‖q).

    Returns:
        ``[...]`` per-token losses.
    """
    log_r = assistant_logprobs(teacher_logprobs, student_logprobs, alpha, lam)
    pairs = {
        "pr": (teacher_logprobs, log_r),
        "qr": (student_logprobs, log_r),
        "rp": (log_r, teacher_logprobs),
        "rq": (log_r, student_logprobs),
    }
    if order not in pairs:
        raise ValueError(f"unknown order {order!r}")
    left, right = pairs[order]
    if divergence == "kl":
        return kl_divergence(left, right)
    if divergence == "ab":
        return ab_divergence(left, right, ab_alpha, ab_beta)
    raise ValueError(f"unknown divergence {divergence!r}")
