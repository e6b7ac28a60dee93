"""Fused, memory-bounded distillation loss: both LM heads applied chunk by chunk with a one-pass backward.

The naive path materializes float32 ``[tokens, V]`` logits for both models plus the loss's same-sized
intermediates and their gradients. Here the rows are cut into chunks; for each chunk the logits, the
per-token loss and ``d loss / d logits`` are computed and immediately folded into the gradients of the
student's hidden states and head weight, so no tensor larger than ``chunk x V`` exists at any time
(besides weight-sized gradient accumulators). Backward then only scales the stored gradients by the
upstream gradient, so nothing is recomputed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from core.distill.losses.params import LossConfig, LossConfigError, loss_config
from core.distill.losses.registry import configured_token_losses

# Elements of one [chunk, V] float32 tensor; the loss holds about twenty such tensors at its peak.
# Each chunk re-reads the head weights four times and updates the weight gradient once, so too small a
# chunk is slow. CPU: 2**23 (170 rows at V = 49,152) was as fast as larger chunks in bench/loss.py and
# clearly faster than smaller ones. CUDA (not measured here): 2**25, 220 rows at V = 151,936, keeps the
# fused peak near 1/8 of the naive one or below.
_CHUNK_ELEMENTS = {"cpu": 2**23, "cuda": 2**25}
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def default_chunk_size(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Rows per chunk so that one ``[chunk, vocab_size]`` tensor has a bounded, device-suited size."""
    elements = _CHUNK_ELEMENTS.get(torch.device(device).type, _CHUNK_ELEMENTS["cpu"])
    return max(1, elements // max(1, vocab_size))


def fused_distillation_loss(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_head_weight: Tensor,
    labels: Tensor,
    *,
    loss: str | LossConfig = "amid",
    chunk_size: int | None = None,
    ignore_index: int = -100,
    normalizer: float | Tensor | None = None,
    with_ce: bool = False,
    **params: object,
) -> Tensor | tuple[Tensor, Tensor]:
    """Distillation loss from hidden states and LM-head weights, never materializing full logits.

    Equals ``distillation_loss(loss, student_hidden @ W_s.T, teacher_hidden @ W_t[:V_s].T, labels, ...)``
    in value and in the gradients of ``student_hidden`` and ``student_head_weight``.

    Args:
        student_hidden: ``[..., H_s]`` final hidden states of the student (any float dtype).
        student_head_weight: ``[V_s, H_s]`` student LM-head weight (``logits = hidden @ weight.T``).
        teacher_hidden: ``[..., H_t]`` teacher hidden states at the same positions; gets no gradient.
        teacher_head_weight: ``[V_t, H_t]`` with ``V_t >= V_s``; only the first ``V_s`` rows are used
            (padded vocabulary). Gets no gradient.
        labels: ``[...]`` token ids already aligned with the hidden positions (the caller shifted them);
            positions equal to ``ignore_index`` are dropped before chunking.
        loss: a loss name of ``core.distill.losses`` (fkl rkl jsd skl srkl tvd ab taid amid), or an
            already validated ``LossConfig`` (then ``params`` must be empty).
        chunk_size: rows per chunk; default ``default_chunk_size(V_s, device)``.
        ignore_index: label value of positions that take no part in the loss.
        normalizer: divide the summed loss by this instead of the number of valid positions (e.g. the
            token count of a whole optimizer step under gradient accumulation).
        with_ce: also return the student's cross-entropy against ``labels`` (temperature 1), normalized
            the same way, computed from the same head pass.
        **params: the loss's parameters, validated once per call (never per chunk).

    Returns:
        ``kd`` (a float32/float64 scalar), or ``(kd, ce)`` when ``with_ce``. All positions masked gives
        zeros with zero gradients.
    """
    if isinstance(loss, LossConfig):
        if params:
            raise TypeError("give the loss parameters inside the LossConfig, not as keywords")
        config = loss
    else:
        config = loss_config(loss, params)
    vocab, hidden_s = student_head_weight.shape
    if student_hidden.shape[-1] != hidden_s:
        raise ValueError(f"student hidden size {student_hidden.shape[-1]} != head weight's {hidden_s}")
    if teacher_hidden.shape[-1] != teacher_head_weight.shape[1]:
        raise ValueError(
            f"teacher hidden size {teacher_hidden.shape[-1]} != head weight's {teacher_head_weight.shape[1]}"
        )
    if teacher_head_weight.shape[0] < vocab:
        raise ValueError(
            f"teacher vocabulary {teacher_head_weight.shape[0]} is smaller than student's {vocab}"
        )
    positions = labels.shape
    if student_hidden.shape[:-1] != positions or teacher_hidden.shape[:-1] != positions:
        raise ValueError(
            f"hidden positions {tuple(student_hidden.shape[:-1])} / {tuple(teacher_hidden.shape[:-1])} "
            f"do not match labels {tuple(positions)}"
        )
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab, student_hidden.device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    rows = (labels.reshape(-1) != ignore_index).nonzero().squeeze(1)
    targets = labels.reshape(-1).index_select(0, rows)
    if with_ce and targets.numel() and (targets.min() < 0 or targets.max() >= vocab):
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index {ignore_index}")
    # Selecting before the autograd function lets autograd scatter the hidden-state gradient back.
    h_s = student_hidden.reshape(-1, hidden_s).index_select(0, rows)
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, rows)
    w_t = teacher_head_weight.detach()[:vocab]
    kd_sum, ce_sum = _FusedHeadLoss.apply(
        h_s, student_head_weight, h_t, w_t, targets, config, chunk_size, with_ce
    )

    denominator = _denominator(normalizer, rows.numel(), kd_sum)
    kd = kd_sum / denominator
    return (kd, ce_sum / denominator) if with_ce else kd


def _denominator(normalizer: float | Tensor | None, rows: int, like: Tensor) -> float | Tensor:
    """What the sums are divided by; the same rules as `distillation_loss`."""
    if normalizer is None:
        return max(rows, 1)
    if isinstance(normalizer, Tensor):
        return normalizer.to(device=like.device, dtype=like.dtype).clamp_min(1)
    if not (math.isfinite(normalizer) and normalizer >= 0):
        raise LossConfigError("normalizer", f"must be a finite number >= 0, got {normalizer}")
    if normalizer == 0:
        if rows:
            raise LossConfigError("normalizer", f"is 0 but {rows} positions count")
        return 1  # nothing counted: both sums are exactly 0
    return normalizer


class _HeadMatmuls:
    """The three head matmuls of one model, with float32 (or float64) accumulation and output.

    On CUDA, half-precision operands stay half and the matmul writes float32 directly (``out_dtype``),
    which keeps tensor-core speed without rounding the logits. Elsewhere the weight is cast once.
    """

    def __init__(self, weight: Tensor, hidden_dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
        self.compute_dtype = compute_dtype
        self.native = (
            weight.is_cuda
            and weight.dtype in _LOW_PRECISION
            and hidden_dtype == weight.dtype
            and _cuda_out_dtype_works(weight)
        )
        self.weight = weight if self.native else weight.to(compute_dtype)

    def operand(self, hidden: Tensor) -> Tensor:
        """Cast a hidden chunk to the dtype the matmuls take."""
        return hidden.to(self.weight.dtype)

    def logits(self, hidden: Tensor) -> Tensor:
        """``[c, H] -> [c, V]`` logits in the compute dtype."""
        if self.native:
            return torch.mm(hidden, self.weight.T, out_dtype=self.compute_dtype)
        return hidden @ self.weight.T

    def hidden_grad(self, dlogits: Tensor, out: Tensor) -> None:
        """Write ``dlogits @ weight`` (``[c, H]``) into ``out``."""
        if self.native:
            out.copy_(torch.mm(dlogits.to(self.weight.dtype), self.weight, out_dtype=self.compute_dtype))
        else:
            torch.mm(dlogits, self.weight, out=out)

    def accumulate_weight_grad(self, accumulator: Tensor, dlogits: Tensor, hidden: Tensor) -> None:
        """``accumulator += dlogits.T @ hidden`` (``[V, H]``)."""
        if self.native:
            accumulator += torch.mm(dlogits.to(hidden.dtype).T, hidden, out_dtype=self.compute_dtype)
        else:
            accumulator.addmm_(dlogits.T, hidden)


_OUT_DTYPE_SUPPORT: dict[torch.device, bool] = {}


def _cuda_out_dtype_works(like: Tensor) -> bool:
    # torch.mm(..., out_dtype=) arrived in torch 2.8 and only for some dtypes; probe once per device.
    if like.device not in _OUT_DTYPE_SUPPORT:
        probe = torch.ones(2, 2, device=like.device, dtype=like.dtype)
        try:
            ok = torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            ok = False
        _OUT_DTYPE_SUPPORT[like.device] = ok
    return _OUT_DTYPE_SUPPORT[like.device]


def _chunk_losses(
    logits_s: Tensor,
    logits_t: Tensor,
    targets: Tensor | None,
    config: LossConfig,
    need_dlogits: bool,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Summed KD and CE losses of one chunk and, if asked, their gradients w.r.t. the student logits.

    ``logits_s`` ``[c, V]`` is consumed (the CE gradient is built in its storage); ``targets`` ``[c]`` or
    None for no CE. Returns ``(kd_sum, ce_sum, {"kd": [c, V], "ce": [c, V]})``.
    """
    dlogits: dict[str, Tensor] = {}
    if need_dlogits:
        with torch.enable_grad():
            leaf = logits_s.detach().requires_grad_()
            per_token = configured_token_losses(config, leaf, logits_t)
            kd = per_token.detach().sum()
            (dlogits["kd"],) = torch.autograd.grad(per_token.sum(), leaf)
        del per_token, leaf
    else:
        kd = configured_token_losses(config, logits_s, logits_t).sum()
    ce = torch.zeros_like(kd)
    if targets is not None:
        targets = targets.unsqueeze(1)
        log_norm = torch.logsumexp(logits_s, dim=-1, keepdim=True)
        ce = (log_norm - logits_s.gather(1, targets)).sum()
        if need_dlogits:
            # d CE / d logits = softmax - onehot, built in place: the logits are not needed any more.
            probs = logits_s.sub_(log_norm).exp_()
            dlogits["ce"] = probs.scatter_add_(1, targets, probs.new_full(targets.shape, -1.0))
    return kd, ce, dlogits


class _FusedHeadLoss(torch.autograd.Function):
    """Summed KD (and CE) loss over selected rows; gradients are computed during forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        h_s: Tensor,
        w_s: Tensor,
        h_t: Tensor,
        w_t: Tensor,
        targets: Tensor,
        config: LossConfig,
        chunk_size: int,
        with_ce: bool,
    ) -> tuple[Tensor, Tensor]:
        wide = torch.float64 in (h_s.dtype, w_s.dtype, h_t.dtype, w_t.dtype)
        compute_dtype = torch.float64 if wide else torch.float32
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        student = _HeadMatmuls(w_s, h_s.dtype, compute_dtype)
        teacher = _HeadMatmuls(w_t, h_t.dtype, compute_dtype)
        n_rows, device = h_s.shape[0], h_s.device

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, device=device, dtype=compute_dtype)

        kd_total, ce_total = zeros(), zeros()
        # One set of gradient buffers per output, because the upstream weights of kd and ce are only
        # known in backward; the KD and CE parts are kept apart and combined there.
        heads = ("kd", "ce") if with_ce else ("kd",)
        grad_h = {k: zeros(n_rows, h_s.shape[1]) for k in heads} if need_h else {}
        grad_w = {k: zeros(*w_s.shape) for k in heads} if need_w else {}

        need_dlogits = need_h or need_w
        # An enclosing autocast would turn the head matmuls back into half-precision logits.
        with torch.autocast(device.type, enabled=False):
            for start in range(0, n_rows, chunk_size):
                stop = min(start + chunk_size, n_rows)
                hs = student.operand(h_s[start:stop])
                logits_t = teacher.logits(teacher.operand(h_t[start:stop]))
                kd, ce, dlogits = _chunk_losses(
                    student.logits(hs),
                    logits_t,
                    targets[start:stop] if with_ce else None,
                    config,
                    need_dlogits,
                )
                del logits_t
                kd_total += kd
                ce_total += ce
                for key, grad in dlogits.items():
                    if need_h:
                        student.hidden_grad(grad, out=grad_h[key][start:stop])
                    if need_w:
                        student.accumulate_weight_grad(grad_w[key], grad, hs)
                del dlogits

        ctx.grad_h, ctx.grad_w = grad_h, grad_w
        ctx.input_dtypes = (h_s.dtype, w_s.dtype)
        return kd_total, ce_total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_kd: Tensor, grad_ce: Tensor):  # type: ignore[override]
        if ctx.grad_h is None:
            raise RuntimeError("fused_distillation_loss supports a single backward pass per forward")
        upstream = {"kd": grad_kd, "ce": grad_ce}
        h_dtype, w_dtype = ctx.input_dtypes

        def combine(grads: dict[str, Tensor], dtype: torch.dtype) -> Tensor | None:
            if not grads:
                return None
            total = None
            for key, grad in grads.items():
                # In place: the stored buffer is used once, and a second copy would double the peak.
                scaled = grad.mul_(upstream[key].to(grad.dtype))
                total = scaled if total is None else total.add_(scaled)
            return total.to(dtype)

        grad_h = combine(ctx.grad_h, h_dtype)
        grad_w = combine(ctx.grad_w, w_dtype)
        ctx.grad_h = ctx.grad_w = None
        return grad_h, grad_w, None, None, None, None, None, None
