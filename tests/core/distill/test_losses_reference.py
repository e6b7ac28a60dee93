"""Every loss against an independent float64 reference written in probability space with explicit powers.

The reference never uses log space, logsumexp, expm1 or the library's helpers: it follows AMID.md's
definitions literally (power means, Σ a·log(a/b), Cichocki's α-β formulas), so it only works for strictly
positive probabilities — which is what these tests feed it.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from core.distill.losses import LOSS_NAMES, ORDERS, assistant_logprobs, default_loss_params, token_losses


@pytest.fixture(autouse=True)
def single_thread():
    """Run on one intra-op thread: on these tiny tensors a second thread only adds OpenMP hand-off cost,
    which is 10-100x the work on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


ALPHAS = (-3.0, -1.0, 0.0, 0.5, 0.999, 1.0, 1.0005, 2.0, 3.0)
LAMS = (0.0, 0.1, 0.5, 1.0)
# (a_, b_): the default, both signs mixed, and each limit case of the α-β divergence.
AB_PARAMS = ((0.2, 0.7), (1.5, -0.4), (-0.5, 1.2), (0.8, 0.0), (0.0, 0.6), (0.6, -0.6), (0.0, 0.0))


def ref_assistant(p: Tensor, q: Tensor, alpha: float, lam: float) -> Tensor:
    """r(α, λ) as a normalized weighted power mean of p and q."""
    if lam == 1.0:
        return p
    if lam == 0.0:
        return q
    if alpha == 1.0:
        mean = p**lam * q ** (1.0 - lam)
    else:
        c = (1.0 - alpha) / 2.0
        mean = (lam * p**c + (1.0 - lam) * q**c) ** (1.0 / c)
    return mean / mean.sum(-1, keepdim=True)


def ref_kl(a: Tensor, b: Tensor) -> Tensor:
    return (a * torch.log(a / b)).sum(-1)


def ref_ab(a: Tensor, b: Tensor, x: float, y: float) -> Tensor:
    """Cichocki, Cruces & Amari (2011), D_AB^(x, y)(a ‖ b) with its limit cases."""
    if x == 0.0 and y == 0.0:
        return 0.5 * (torch.log(a) - torch.log(b)).pow(2).sum(-1)
    if y == 0.0:
        return (a**x * torch.log(a**x / b**x) - a**x + b**x).sum(-1) / x**2
    if x == 0.0:
        return (b**y * torch.log(b**y / a**y) - b**y + a**y).sum(-1) / y**2
    if x + y == 0.0:
        ratio = b**x / a**x
        return (torch.log(ratio) + 1.0 / ratio - 1.0).sum(-1) / x**2
    s = x + y
    return -(a**x * b**y - x / s * a**s - y / s * b**s).sum(-1) / (x * y)


def ref_loss(name: str, student_logits: Tensor, teacher_logits: Tensor, **params: object) -> Tensor:
    """Per-token loss `name` in probability space."""
    params = default_loss_params(name) | params
    temperature = float(params["temperature"])
    q = torch.softmax(student_logits / temperature, -1)
    p = torch.softmax(teacher_logits.detach() / temperature, -1)
    if name == "fkl":
        return ref_kl(p, q)
    if name == "rkl":
        return ref_kl(q, p)
    if name == "jsd":
        beta = params["beta"]
        m = beta * p + (1 - beta) * q
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    if name == "skl":
        m = params["skew"] * p + (1 - params["skew"]) * q
        return ref_kl(p, m)
    if name == "srkl":
        m = (1 - params["skew"]) * p + params["skew"] * q
        return ref_kl(q, m)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "ab":
        return ref_ab(p, q, params["ab_alpha"], params["ab_beta"])
    if name == "taid":
        t = params["t"]
        target = torch.softmax((t * teacher_logits + (1 - t) * student_logits.detach()) / temperature, -1)
        return ref_kl(target, q)
    if name == "amid":
        r = ref_assistant(p, q, params["alpha"], params["lam"])
        left, right = {"pr": (p, r), "qr": (q, r), "rp": (r, p), "rq": (r, q)}[params["order"]]
        if params["divergence"] == "kl":
            return ref_kl(left, right)
        return ref_ab(left, right, params["ab_alpha"], params["ab_beta"])
    raise AssertionError(name)


def _logits(rows: int = 4, vocab: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = 2.0 * torch.randn(rows, vocab, generator=generator, dtype=torch.float64)
    teacher = 2.0 * torch.randn(rows, vocab, generator=generator, dtype=torch.float64)
    return student, teacher


def _value_and_grad(fn, student: Tensor, teacher: Tensor, **params: object) -> tuple[Tensor, Tensor]:
    leaf = student.detach().clone().requires_grad_()
    loss = fn(leaf, teacher, **params)
    # Random row weights make the check cover each row's gradient, not only their sum.
    weights = torch.linspace(0.5, 1.5, loss.shape[0], dtype=loss.dtype)
    if not loss.requires_grad:  # the reference at λ = 1 with pr / rp does not involve the student
        return loss.detach(), torch.zeros_like(leaf)
    (grad,) = torch.autograd.grad((loss * weights).sum(), leaf)
    return loss.detach(), grad


def _assert_matches_reference(name: str, **params: object) -> None:
    student, teacher = _logits()
    value, grad = _value_and_grad(
        lambda st, te, **kw: token_losses(name, st, te, **kw), student, teacher, **params
    )
    ref_value, ref_grad = _value_and_grad(
        lambda st, te, **kw: ref_loss(name, st, te, **kw), student, teacher, **params
    )
    torch.testing.assert_close(value, ref_value, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("divergence", ["kl", "ab"])
def test_amid_matches_reference_over_grid(alpha: float, divergence: str) -> None:
    for lam in LAMS:
        for order in ORDERS:
            _assert_matches_reference("amid", alpha=alpha, lam=lam, order=order, divergence=divergence)


@pytest.mark.parametrize(("ab_alpha", "ab_beta"), AB_PARAMS)
def test_amid_ab_divergence_parameters_match_reference(ab_alpha: float, ab_beta: float) -> None:
    for order in ORDERS:
        _assert_matches_reference(
            "amid", alpha=0.5, lam=0.3, order=order, divergence="ab", ab_alpha=ab_alpha, ab_beta=ab_beta
        )


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("fkl", {}),
        ("rkl", {}),
        ("jsd", {"beta": 0.5}),
        ("jsd", {"beta": 0.9}),
        ("skl", {"skew": 0.1}),
        ("srkl", {"skew": 0.3}),
        ("tvd", {}),
        *[("ab", {"ab_alpha": x, "ab_beta": y}) for x, y in AB_PARAMS],
        ("taid", {"t": 0.4}),
        ("taid", {"t": 0.85}),
        ("amid", {"temperature": 2.5, "alpha": -0.5, "lam": 0.3, "order": "rq"}),
        ("fkl", {"temperature": 0.7}),
    ],
)
def test_baselines_match_reference(name: str, params: dict[str, object]) -> None:
    _assert_matches_reference(name, **params)


def test_reference_covers_every_loss() -> None:
    student, teacher = _logits(rows=1, vocab=4)
    for name in LOSS_NAMES:
        assert torch.isfinite(ref_loss(name, student, teacher)).all()


@pytest.mark.parametrize(
    ("name", "params"),
    [
        *[
            ("amid", {"alpha": a, "lam": 0.3, "order": o, "divergence": d})
            for a in (-3.0, 1.0, 1.0005, 3.0)
            for o in ORDERS
            for d in ("kl", "ab")
        ],
        # Not taid: its stop-gradient makes autograd's gradient differ from the finite difference by design.
        *[(name, {}) for name in LOSS_NAMES if name not in ("amid", "taid")],
    ],
)
def test_gradcheck(name: str, params: dict[str, object]) -> None:
    student, teacher = _logits(rows=2, vocab=5, seed=1)
    student.requires_grad_()
    assert torch.autograd.gradcheck(lambda s: token_losses(name, s, teacher, **params), (student,))


def _dtype_cases() -> list[tuple[str, dict[str, object]]]:
    cases: list[tuple[str, dict[str, object]]] = [(name, {}) for name in LOSS_NAMES if name != "amid"]
    for alpha in (-3.0, 0.5, 1.0, 1.0005, 3.0):
        for lam in (0.1, 0.5):
            for order in ORDERS:
                for divergence in ("kl", "ab"):
                    cases.append(
                        ("amid", {"alpha": alpha, "lam": lam, "order": order, "divergence": divergence})
                    )
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_match_float64(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    student = (2.0 * torch.randn(8, 64, generator=generator)).to(dtype)
    teacher = (2.0 * torch.randn(8, 64, generator=generator)).to(dtype)
    for name, params in _dtype_cases():
        value, grad = _value_and_grad(
            lambda st, te, n=name, **kw: token_losses(n, st, te, **kw), student, teacher, **params
        )
        # The float64 result of exactly the same (already rounded) input values.
        ref_value, ref_grad = _value_and_grad(
            lambda st, te, n=name, **kw: token_losses(n, st, te, **kw),
            student.double(),
            teacher.double(),
            **params,
        )
        assert value.dtype == torch.float32, (name, params)
        torch.testing.assert_close(
            value.double(),
            ref_value,
            rtol=1e-5,
            atol=0.0,
            msg=lambda m, label=f"{name} {params}": f"{label}: {m}",
        )
        # Autograd hands a bf16 leaf its gradient rounded to bf16 (8 bits): compare up to that rounding.
        rtol = 0.0 if dtype == torch.float32 else 2.0**-7
        atol = 1e-5 * float(ref_grad.abs().max())
        torch.testing.assert_close(
            grad.double(),
            ref_grad,
            rtol=rtol,
            atol=atol,
            msg=lambda m, label=f"{name} {params}": f"{label}: {m}",
        )


@pytest.mark.parametrize("alpha", [-3.0, 0.5, 1.0005, 3.0])
def test_assistant_gradient_at_tied_probabilities(alpha: float) -> None:
    """Entries with p(v) = q(v) exactly sit on the switch between the two pivots of the log-space form."""
    generator = torch.Generator().manual_seed(5)
    log_p = torch.randn(3, 8, generator=generator, dtype=torch.float64).log_softmax(-1)
    # q is p with two entries swapped: normalized, and tied with p on the other six.
    log_q = log_p[:, [1, 0, 2, 3, 4, 5, 6, 7]].clone()
    weights = torch.randn(3, 8, generator=generator, dtype=torch.float64)
    leaf = log_q.clone().requires_grad_()
    (grad,) = torch.autograd.grad((weights * assistant_logprobs(log_p, leaf, alpha, 0.3).exp()).sum(), leaf)
    ref_leaf = log_q.clone().requires_grad_()
    ref = ref_assistant(log_p.exp(), ref_leaf.exp(), alpha, 0.3)
    (ref_grad,) = torch.autograd.grad((weights * ref).sum(), ref_leaf)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-13)
