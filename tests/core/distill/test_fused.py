"""The fused, chunked loss equals `distillation_loss` on full logits, and never holds a full-logit tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from core.distill.fused import default_chunk_size, fused_distillation_loss
from core.distill.losses import LossConfigError, distillation_loss, loss_config

IGNORE = -100

# Every loss by name, then AMiD across the mixture's regimes (α < 1, the α = 1 limit, α > 1), each order,
# both divergences, and a temperature.
LOSS_CASES = [
    ("fkl", {}),
    ("rkl", {}),
    ("jsd", {"beta": 0.3}),
    ("skl", {"skew": 0.2}),
    ("srkl", {"skew": 0.2}),
    ("tvd", {}),
    ("ab", {"ab_alpha": 0.3, "ab_beta": 0.6}),
    ("taid", {"t": 0.6}),
    ("amid", {}),
    ("amid", {"alpha": -0.5, "lam": 0.3, "order": "pr"}),
    ("amid", {"alpha": 1.0, "lam": 0.4, "order": "qr"}),
    ("amid", {"alpha": 2.5, "lam": 0.6, "order": "rp"}),
    ("amid", {"alpha": 0.5, "lam": 0.2, "order": "rq", "temperature": 2.0}),
    ("amid", {"alpha": -1.0, "lam": 0.5, "order": "pr", "divergence": "ab"}),
    ("amid", {"alpha": 3.0, "lam": 0.1, "order": "qr", "divergence": "ab", "ab_alpha": 0.5, "ab_beta": 0.4}),
]
CASE_IDS = [
    f"{name}-{'-'.join(f'{k}={v}' for k, v in params.items()) or 'default'}" for name, params in LOSS_CASES
]


def _inputs(
    dtype: torch.dtype = torch.float32,
    *,
    batch: int = 3,
    length: int = 13,
    hidden_s: int = 16,
    hidden_t: int = 24,
    vocab: int = 40,
    vocab_t: int = 45,
    masked: bool = True,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Tensor]:
    """Random hidden states and heads; logits have a spread like a trained model's (std ≈ 2)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)

    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    if masked:
        labels[:, :4] = IGNORE  # prompts
        labels[1, -3:] = IGNORE  # padding
    return {
        "student_hidden": randn(batch, length, hidden_s).requires_grad_(),
        "student_head_weight": randn(vocab, hidden_s, scale=2 / hidden_s**0.5).requires_grad_(),
        "teacher_hidden": randn(batch, length, hidden_t).requires_grad_(),
        "teacher_head_weight": randn(vocab_t, hidden_t, scale=2 / hidden_t**0.5).requires_grad_(),
        "labels": labels.to(device),
    }


def _reference_logits(t: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    vocab = t["student_head_weight"].shape[0]
    student = t["student_hidden"] @ t["student_head_weight"].T
    with torch.no_grad():
        teacher = t["teacher_hidden"] @ t["teacher_head_weight"][:vocab].T
    return student, teacher


def _grads(value: Tensor, t: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    return torch.autograd.grad(value, (t["student_hidden"], t["student_head_weight"]))


def _fused(inputs: dict[str, Tensor], /, **kwargs):
    return fused_distillation_loss(
        inputs["student_hidden"],
        inputs["student_head_weight"],
        inputs["teacher_hidden"],
        inputs["teacher_head_weight"],
        inputs["labels"],
        **kwargs,
    )


def _assert_rel(actual: Tensor, expected: Tensor, rel: float) -> None:
    """Largest absolute difference within `rel` of the reference's largest magnitude."""
    assert actual.shape == expected.shape
    scale = expected.detach().abs().max().item()
    error = (actual.detach().to(expected.dtype) - expected.detach()).abs().max().item()
    assert error <= rel * max(scale, 1e-12), f"error {error:.3g} vs scale {scale:.3g}"


def _check_against_full_logits(t: dict[str, Tensor], loss: str, params: dict, rel: float, **kwargs) -> None:
    student, teacher = _reference_logits(t)
    reference = distillation_loss(
        loss, student, teacher, t["labels"], normalizer=kwargs.get("normalizer"), **params
    )
    fused = _fused(t, loss=loss, **kwargs, **params)
    assert fused.dtype == reference.dtype
    _assert_rel(fused, reference, rel)
    for got, want in zip(_grads(fused, t), _grads(reference, t), strict=True):
        assert torch.isfinite(got).all()
        _assert_rel(got, want, rel)


@pytest.mark.parametrize(("loss", "params"), LOSS_CASES, ids=CASE_IDS)
def test_matches_full_logits_float32(loss: str, params: dict) -> None:
    # 31 valid rows in chunks of 5: the last chunk is partial; the teacher's vocabulary is padded.
    _check_against_full_logits(_inputs(), loss, params, rel=1e-5, chunk_size=5)


@pytest.mark.parametrize(("loss", "params"), LOSS_CASES, ids=CASE_IDS)
def test_matches_full_logits_float64(loss: str, params: dict) -> None:
    _check_against_full_logits(_inputs(torch.float64), loss, params, rel=1e-10, chunk_size=4)


@pytest.mark.parametrize("chunk_size", [1, 7, 31, 1000, None])
def test_chunk_size_does_not_change_the_result(chunk_size: int | None) -> None:
    _check_against_full_logits(_inputs(), "amid", {"alpha": 0.5, "lam": 0.3}, rel=1e-5, chunk_size=chunk_size)


def test_normalizer_replaces_the_token_count() -> None:
    t = _inputs()
    _check_against_full_logits(t, "amid", {}, rel=1e-5, chunk_size=6, normalizer=57.0)
    by_count = _fused(t, loss="amid", chunk_size=6)
    by_normalizer = _fused(t, loss="amid", chunk_size=6, normalizer=57.0)
    by_tensor = _fused(t, loss="amid", chunk_size=6, normalizer=torch.tensor(57))
    valid = int((t["labels"] != IGNORE).sum())
    torch.testing.assert_close(by_normalizer, by_count * valid / 57.0)
    torch.testing.assert_close(by_tensor, by_normalizer)
    with pytest.raises(LossConfigError):
        _fused(t, loss="amid", normalizer=0.0)


def test_teacher_gets_no_gradient() -> None:
    t = _inputs()
    _fused(t, loss="amid", chunk_size=4).backward()
    assert t["teacher_hidden"].grad is None and t["teacher_head_weight"].grad is None
    assert t["student_hidden"].grad is not None and t["student_head_weight"].grad is not None
    # Masked positions get exactly zero gradient.
    masked = t["labels"] == IGNORE
    assert (t["student_hidden"].grad[masked] == 0).all()
    assert (t["student_hidden"].grad[~masked].abs().sum(-1) > 0).all()


def test_all_masked_gives_zero_loss_and_zero_gradients() -> None:
    t = _inputs()
    t["labels"].fill_(IGNORE)
    kd, ce = _fused(t, loss="amid", chunk_size=4, with_ce=True)
    assert kd.item() == 0.0 and ce.item() == 0.0
    (kd + ce).backward()
    for name in ("student_hidden", "student_head_weight"):
        grad = t[name].grad
        assert grad is not None and grad.shape == t[name].shape and (grad == 0).all()


@pytest.mark.parametrize(("kd_weight", "ce_weight"), [(0.25, 0.75), (1.0, 0.0), (0.0, 1.0), (-2.0, 3.5)])
def test_with_ce_matches_cross_entropy_for_any_upstream_gradients(kd_weight: float, ce_weight: float) -> None:
    t = _inputs()
    student, teacher = _reference_logits(t)
    vocab = student.shape[-1]
    kd_ref = distillation_loss("skl", student, teacher, t["labels"], skew=0.1)
    ce_ref = F.cross_entropy(student.reshape(-1, vocab), t["labels"].reshape(-1), ignore_index=IGNORE)
    kd, ce = _fused(t, loss="skl", skew=0.1, chunk_size=7, with_ce=True)
    _assert_rel(kd, kd_ref, 1e-5)
    _assert_rel(ce, ce_ref, 1e-5)
    got = _grads(kd_weight * kd + ce_weight * ce, t)
    want = _grads(kd_weight * kd_ref + ce_weight * ce_ref, t)
    for g, w in zip(got, want, strict=True):
        _assert_rel(g, w, 1e-5)


def test_ce_alone_can_be_backpropagated() -> None:
    t = _inputs()
    student, _ = _reference_logits(t)
    ce_ref = F.cross_entropy(
        student.reshape(-1, student.shape[-1]), t["labels"].reshape(-1), ignore_index=IGNORE
    )
    _, ce = _fused(t, loss="fkl", chunk_size=3, with_ce=True)
    for g, w in zip(_grads(ce, t), _grads(ce_ref, t), strict=True):
        _assert_rel(g, w, 1e-5)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_bfloat16_hidden_states_use_float32_logits(weight_dtype: torch.dtype) -> None:
    t = _inputs()
    hidden_bf16 = t["student_hidden"].detach().to(torch.bfloat16).requires_grad_()
    weight = t["student_head_weight"].detach().to(weight_dtype).requires_grad_()
    # The reference sees the same (exactly representable) values in float32.
    t["student_hidden"] = hidden_bf16.detach().float().requires_grad_()
    t["student_head_weight"] = weight.detach().float().requires_grad_()
    student, teacher = _reference_logits(t)
    reference = distillation_loss("amid", student, teacher, t["labels"])
    ref_grad_h, ref_grad_w = _grads(reference, t)

    t["student_hidden"], t["student_head_weight"] = hidden_bf16, weight
    fused = _fused(t, loss="amid", chunk_size=5)
    _assert_rel(fused, reference, 1e-5)
    grad_h, grad_w = _grads(fused, t)
    assert grad_h.dtype == torch.bfloat16 and grad_w.dtype == weight_dtype
    # Only the final rounding of a gradient to bfloat16 separates it from the float32 reference.
    _assert_rel(grad_w, ref_grad_w, 1e-5 if weight_dtype == torch.float32 else 1e-2)
    _assert_rel(grad_h, ref_grad_h, 1e-2)


def test_enclosing_autocast_does_not_lower_the_logits_precision() -> None:
    t = _inputs()
    plain = _fused(t, loss="amid", chunk_size=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = _fused(t, loss="amid", chunk_size=5)
    _assert_rel(under_autocast, plain, 1e-6)


def test_without_gradients_only_the_value_is_computed() -> None:
    t = _inputs()
    student, teacher = _reference_logits(t)
    reference = distillation_loss("tvd", student, teacher, t["labels"])
    with torch.no_grad():
        value = _fused(t, loss="tvd", chunk_size=6)
    assert not value.requires_grad
    _assert_rel(value, reference, 1e-5)


def test_rejects_bad_inputs() -> None:
    t = _inputs()
    with pytest.raises(LossConfigError):
        _fused(t, loss="amid", order="xy")
    with pytest.raises(ValueError, match="teacher vocabulary"):
        _fused(_inputs(vocab=40, vocab_t=30), loss="fkl")
    with pytest.raises(ValueError, match="chunk_size"):
        _fused(t, loss="fkl", chunk_size=0)
    with pytest.raises(ValueError, match="do not match labels"):
        _fused({**t, "labels": t["labels"][:, :-1]}, loss="fkl")


def test_default_chunk_size_bounds_a_chunk() -> None:
    for vocab in (1, 500, 49_152, 151_936, 10**9):
        rows = default_chunk_size(vocab)
        assert rows >= 1
        assert rows * vocab <= 2**23 or rows == 1


class _LargestAllocation(TorchDispatchMode):
    """Records the element count of the largest tensor storage any aten op allocates while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        existing = {
            a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, Tensor) and tensor.untyped_storage().data_ptr() not in existing:
                self.largest = max(self.largest, tensor.untyped_storage().nbytes() // tensor.element_size())
        return out


@pytest.mark.parametrize("loss", ["amid", "taid", "jsd"])
def test_no_tensor_larger_than_a_chunk_of_logits(loss: str) -> None:
    rows, vocab, hidden_s, hidden_t, chunk = 192, 500, 8, 12, 16
    t = _inputs(
        batch=1, length=rows, hidden_s=hidden_s, hidden_t=hidden_t, vocab=vocab, vocab_t=vocab, masked=False
    )
    bound = max(chunk * vocab, vocab * hidden_s, vocab * hidden_t, rows * hidden_s)
    assert bound * 8 <= rows * vocab  # the shapes leave room to tell the paths apart

    with _LargestAllocation() as fused_probe:
        kd, ce = _fused(t, loss=loss, chunk_size=chunk, with_ce=True)
        (kd + ce).backward()
    assert fused_probe.largest <= bound

    # The probe does see full-logit tensors when they exist.
    with _LargestAllocation() as naive_probe:
        distillation_loss(loss, *_reference_logits(t), t["labels"]).backward()
    assert naive_probe.largest >= rows * vocab


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("loss", "params"), LOSS_CASES, ids=CASE_IDS)
def test_cuda_float32_matches_full_logits(loss: str, params: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    _check_against_full_logits(_inputs(device="cuda"), loss, params, rel=1e-5, chunk_size=5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bfloat16_model_matches_float32_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    t = _inputs(device="cuda", vocab=300, vocab_t=320, hidden_s=64, hidden_t=96)
    low = {
        k: (v.detach().to(torch.bfloat16).requires_grad_() if v.is_floating_point() else v)
        for k, v in t.items()
    }
    exact = {
        k: (v.detach().double().requires_grad_() if v.is_floating_point() else v) for k, v in low.items()
    }
    student, teacher = _reference_logits(exact)
    reference = distillation_loss("amid", student, teacher, exact["labels"])
    fused = _fused(low, loss="amid", chunk_size=7)
    # Logits from bfloat16 operands with float32 accumulation: the value is float32-accurate.
    _assert_rel(fused, reference, 1e-5)
    for got, want in zip(_grads(fused, low), _grads(reference, exact), strict=True):
        assert got.dtype == torch.bfloat16
        _assert_rel(got, want, 2e-2)


def test_parameters_are_validated_once_per_call_not_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.distill.losses import params as params_module

    calls = []
    original = params_module.validate_loss_params

    def counting(name: str, params: dict) -> dict:
        calls.append(name)
        return original(name, params)

    monkeypatch.setattr(params_module, "validate_loss_params", counting)
    torch.manual_seed(0)
    h_s, w_s = torch.randn(3, 5, 8, requires_grad=True), torch.randn(32, 8)
    h_t, w_t = torch.randn(3, 5, 12), torch.randn(32, 12)
    labels = torch.randint(0, 32, (3, 5))
    kd = fused_distillation_loss(h_s, w_s, h_t, w_t, labels, loss="amid", chunk_size=2, alpha=-1.0, lam=0.3)
    kd.backward()
    assert calls == ["amid"]  # 15 rows in 8 chunks, one validation

    calls.clear()
    config = loss_config("amid", {"alpha": -1.0, "lam": 0.3})
    assert calls == ["amid"]
    again = fused_distillation_loss(h_s, w_s, h_t, w_t, labels, loss=config, chunk_size=2)
    assert calls == ["amid"]  # a validated config is not checked again
    torch.testing.assert_close(again, kd.detach(), rtol=0, atol=0)
    with pytest.raises(TypeError):
        fused_distillation_loss(h_s, w_s, h_t, w_t, labels, loss=config, alpha=0.5)
