"""−inf logits (banned or padded vocabulary entries), zero probabilities for α > 1, and extreme α."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from core.distill.losses import ORDERS, assistant_logprobs, token_losses
from tests.core.distill.test_losses_reference import single_thread  # noqa: F401  (autouse fixture)

NEG_INF = -math.inf
ALPHAS = (-40.0, -3.0, -1.0, 0.0, 0.5, 0.9995, 1.0, 1.0 + 1e-13, 1.0005, 2.0, 3.0, 40.0)
LAMS = (0.0, 0.1, 0.5, 1.0)
SHARED, STUDENT_ONLY, TEACHER_ONLY = [0, 1], [2], [3]
# (a_, b_) of the α-β divergence: positive, each sign mixed, and every limit case.
AB_PARAMS = (
    (0.2, 0.7),
    (1.5, -0.4),
    (-0.5, 1.2),
    (-0.3, -0.4),
    (0.8, 0.0),
    (-0.5, 0.0),
    (0.0, 0.6),
    (0.0, -0.6),
    (0.6, -0.6),
    (0.0, 0.0),
)


def _configs() -> list[tuple[str, dict[str, object]]]:
    configs: list[tuple[str, dict[str, object]]] = [
        ("fkl", {}),
        ("rkl", {}),
        ("tvd", {}),
        *[("jsd", {"beta": b}) for b in (0.0, 0.5, 1.0)],
        *[("skl", {"skew": s}) for s in (0.0, 0.1, 1.0)],
        *[("srkl", {"skew": s}) for s in (0.0, 0.1, 1.0)],
        *[("ab", {"ab_alpha": x, "ab_beta": y}) for x, y in AB_PARAMS],
        *[("taid", {"t": t}) for t in (0.0, 0.4, 1.0)],
    ]
    for alpha in ALPHAS:
        for lam in LAMS:
            for order in ORDERS:
                for divergence in ("kl", "ab"):
                    configs.append(
                        ("amid", {"alpha": alpha, "lam": lam, "order": order, "divergence": divergence})
                    )
    return configs


def _logits(dtype: torch.dtype, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = 2.0 * torch.randn(3, 12, generator=generator, dtype=torch.float64)
    teacher = 2.0 * torch.randn(3, 12, generator=generator, dtype=torch.float64)
    return student.to(dtype), teacher.to(dtype)


def _value_and_grad(name: str, student: Tensor, teacher: Tensor, params: dict) -> tuple[Tensor, Tensor]:
    leaf = student.clone().requires_grad_()
    loss = token_losses(name, leaf, teacher, **params)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shared_neg_inf_entries_change_nothing(dtype: torch.dtype) -> None:
    """Entries impossible for both models are as good as absent: same loss, zero gradient there."""
    student, teacher = _logits(dtype)
    student[:, SHARED] = NEG_INF
    teacher[:, SHARED] = NEG_INF
    kept = [i for i in range(student.shape[1]) if i not in SHARED]
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-7}
    for name, params in _configs():
        loss, grad = _value_and_grad(name, student, teacher, params)
        ref_loss, ref_grad = _value_and_grad(name, student[:, kept], teacher[:, kept], params)
        label = f"{name} {params}"
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), label
        torch.testing.assert_close(loss, ref_loss, **tol, msg=lambda m, c=label: f"{c}: {m}")
        torch.testing.assert_close(grad[:, kept], ref_grad, **tol, msg=lambda m, c=label: f"{c}: {m}")
        assert torch.equal(grad[:, SHARED], torch.zeros_like(grad[:, SHARED])), label


def _support(name: str, params: dict, p: set[int], q: set[int]) -> tuple[set[int], set[int]]:
    """Supports of the two arguments of the (KL) divergence the loss computes."""

    def mixture(alpha: float, lam: float) -> set[int]:
        if lam == 1.0:
            return p
        if lam == 0.0:
            return q
        return p | q if alpha < 1.0 else p & q

    if name in ("fkl", "ab"):
        return p, q
    if name == "rkl":
        return q, p
    if name == "skl":
        return p, mixture(-1.0, params["skew"])
    if name == "srkl":
        return q, mixture(-1.0, 1.0 - params["skew"])
    if name == "taid":
        return mixture(1.0, params["t"]), q
    if name == "amid":
        r = mixture(params["alpha"], params["lam"])
        return {"pr": (p, r), "qr": (q, r), "rp": (r, p), "rq": (r, q)}[params["order"]]
    raise AssertionError(name)


def _expected_finite(name: str, params: dict, p: set[int], q: set[int]) -> bool:
    if name in ("tvd", "jsd"):
        return True  # bounded divergences (the JSD mixture covers both supports)
    left, right = _support(name, params, p, q)
    if name == "ab" or params.get("divergence") == "ab":
        x, y = params.get("ab_alpha", 0.2), params.get("ab_beta", 0.7)
        # Entries where only the left (a) or only the right (b) distribution is zero.
        a_only, b_only = bool(right - left), bool(left - right)
        if x == 0 and y == 0 or x + y == 0:
            return not (a_only or b_only)  # log a − log b appears: any lone zero is infinite
        if y == 0:  # a^x·log(a^x/b^x) − a^x + b^x
            return not b_only and not (a_only and x < 0)
        if x == 0:
            return not a_only and not (b_only and y < 0)
        # a^x·b^y, a^(x+y), b^(x+y): a zero base needs positive exponents.
        return not (a_only and min(x, x + y) <= 0) and not (b_only and min(y, x + y) <= 0)
    return left <= right


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_one_sided_neg_inf_is_finite_exactly_where_the_divergence_is(side: str) -> None:
    student, teacher = _logits(torch.float64)
    student[:, SHARED] = NEG_INF
    teacher[:, SHARED] = NEG_INF
    (student if side == "student" else teacher)[:, STUDENT_ONLY if side == "student" else TEACHER_ONLY] = (
        NEG_INF
    )
    vocab = set(range(student.shape[1])) - set(SHARED)
    q = vocab - set(STUDENT_ONLY) if side == "student" else vocab
    p = vocab - set(TEACHER_ONLY) if side == "teacher" else vocab
    finite_count = 0
    for name, params in _configs():
        loss, grad = _value_and_grad(name, student, teacher, params)
        label = f"{name} {params}"
        if _expected_finite(name, params, p, q):
            finite_count += 1
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), label
            assert (loss >= 0).all(), label
        else:
            # A truly infinite divergence is reported as +inf, never hidden as a finite number or NaN.
            assert torch.isposinf(loss).all(), (label, loss)
    assert finite_count > 100


@pytest.mark.parametrize("alpha", [1.5, 3.0, 40.0])
def test_alpha_above_one_gives_zero_probability_where_either_is_zero(alpha: float) -> None:
    student, teacher = _logits(torch.float64)
    student[:, 2] = NEG_INF
    teacher[:, 3] = NEG_INF
    leaf = student.clone().requires_grad_()
    log_r = assistant_logprobs(teacher.log_softmax(-1), leaf.log_softmax(-1), alpha, 0.4)
    assert torch.equal(log_r[:, 2:4], torch.full_like(log_r[:, 2:4], NEG_INF))
    assert torch.isfinite(log_r[:, 4:]).all()
    torch.testing.assert_close(log_r.exp().sum(-1), torch.ones(3, dtype=torch.float64))
    (grad,) = torch.autograd.grad((log_r.exp() * torch.arange(12.0, dtype=torch.float64)).sum(), leaf)
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[:, 2], torch.zeros(3, dtype=torch.float64))


def test_alpha_below_one_keeps_the_union_of_supports() -> None:
    student, teacher = _logits(torch.float64)
    student[:, 2] = NEG_INF
    teacher[:, 3] = NEG_INF
    log_r = assistant_logprobs(teacher.log_softmax(-1), student.log_softmax(-1), -3.0, 0.4)
    assert torch.isfinite(log_r).all()


@pytest.mark.parametrize("alpha", [-1e4, -300.0, 300.0, 1e4])
def test_extreme_alpha_stays_finite_in_float32(alpha: float) -> None:
    student, teacher = _logits(torch.float32)
    student = 10.0 * student  # log-probabilities down to about −100
    for order in ORDERS:
        loss, grad = _value_and_grad("amid", student, teacher, {"alpha": alpha, "lam": 0.3, "order": order})
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), order
        assert (loss >= 0).all()


def test_very_negative_but_finite_log_probabilities() -> None:
    """Log-ratios far beyond exp's float32 range must not overflow the expm1 forms."""
    student, teacher = _logits(torch.float32)
    student[:, 0] = -1e4
    teacher[:, 1] = -1e4
    for name, params in [("fkl", {}), ("rkl", {}), ("ab", {}), ("amid", {"divergence": "ab", "order": "rq"})]:
        loss, grad = _value_and_grad(name, student, teacher, params)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), name
        wide, _ = _value_and_grad(name, student.double(), teacher.double(), params)
        torch.testing.assert_close(loss.double(), wide, rtol=1e-5, atol=0)


@pytest.mark.parametrize(("x", "y"), AB_PARAMS)
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_ab_infinities_are_the_limit_of_vanishing_probabilities(x: float, y: float, side: str) -> None:
    """Where a zero probability makes D_AB infinite, a tiny one makes it large and growing; elsewhere the
    tiny one gives (nearly) the value at zero."""

    def loss_with(value: float) -> Tensor:
        student, teacher = _logits(torch.float64)
        (student if side == "student" else teacher)[:, 2] = value
        return token_losses("ab", student, teacher, ab_alpha=x, ab_beta=y)

    at_zero = loss_with(NEG_INF)
    if torch.isposinf(at_zero).all():
        assert (loss_with(-400.0) > loss_with(-200.0) + 1.0).all()
    else:
        assert torch.isfinite(at_zero).all()
        torch.testing.assert_close(loss_with(-400.0), at_zero, rtol=1e-9, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype: torch.dtype) -> None:
    student, teacher = _logits(torch.float32)
    student[:, SHARED] = NEG_INF
    teacher[:, SHARED] = NEG_INF
    student, teacher = student.to(dtype), teacher.to(dtype)
    for name, params in _configs():
        loss, grad = _value_and_grad(name, student, teacher, params)
        cuda_loss, cuda_grad = _value_and_grad(name, student.cuda(), teacher.cuda(), params)
        label = f"{name} {params}"
        torch.testing.assert_close(
            cuda_loss.cpu(), loss, rtol=1e-5, atol=1e-6, msg=lambda m, c=label: f"{c}: {m}"
        )
        # A bf16 leaf receives its gradient rounded to bf16, where one ulp is 2^-8 relative.
        rtol = 1e-4 if dtype == torch.float32 else 2.0**-7
        torch.testing.assert_close(
            cuda_grad.cpu(), grad, rtol=rtol, atol=1e-5, msg=lambda m, c=label: f"{c}: {m}"
        )
