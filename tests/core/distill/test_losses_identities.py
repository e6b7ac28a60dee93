"""AMID.md's "Reductions" and power-mean table as tests: each identity is checked in float64 against a
formula written directly from the paper it comes from (DistiLLM, GKD, TAID), not against the library."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from core.distill.losses import (
    LOSS_NAMES,
    ORDERS,
    ab_divergence,
    assistant_logprobs,
    kl_divergence,
    token_losses,
)
from tests.core.distill.test_losses_reference import single_thread  # noqa: F401  (autouse fixture)


def _logits(rows: int = 5, vocab: int = 24, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = 2.0 * torch.randn(rows, vocab, generator=generator, dtype=torch.float64)
    teacher = 2.0 * torch.randn(rows, vocab, generator=generator, dtype=torch.float64)
    return student, teacher


def _grad(loss: Tensor, leaf: Tensor) -> Tensor:
    (grad,) = torch.autograd.grad(loss.sum(), leaf, retain_graph=True)
    return grad


def _close(actual: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def _entropy(p: Tensor) -> Tensor:
    return -(p * p.log()).sum(-1)


@pytest.mark.parametrize("skew", [0.1, 0.3])
def test_skew_forward_kl_is_distillm_cross_entropy_minus_teacher_entropy(skew: float) -> None:
    student, teacher = _logits()
    leaf = student.clone().requires_grad_()
    p, q = teacher.softmax(-1), leaf.softmax(-1)
    # DistiLLM's skewed_forward_kl: −Σ p·log(s·p + (1 − s)·q), the teacher-entropy constant included.
    distillm = -(p * torch.log(skew * p + (1 - skew) * q)).sum(-1)
    ours = token_losses("skl", leaf, teacher, skew=skew)
    amid = token_losses("amid", leaf, teacher, alpha=-1.0, lam=skew, order="pr")
    _close(ours, distillm.detach() - _entropy(p))
    _close(amid, ours)
    _close(_grad(ours, leaf), _grad(distillm, leaf))


@pytest.mark.parametrize("skew", [0.1, 0.3])
def test_skew_reverse_kl_is_distillm(skew: float) -> None:
    student, teacher = _logits()
    leaf = student.clone().requires_grad_()
    p, q = teacher.softmax(-1), leaf.softmax(-1)
    distillm = (q * (q.log() - torch.log((1 - skew) * p + skew * q))).sum(-1)
    ours = token_losses("srkl", leaf, teacher, skew=skew)
    amid = token_losses("amid", leaf, teacher, alpha=-1.0, lam=1 - skew, order="qr")
    _close(ours, distillm.detach())
    _close(amid, ours)
    _close(_grad(ours, leaf), _grad(distillm, leaf))


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_is_weighted_sum_of_amid_terms(beta: float) -> None:
    student, teacher = _logits()
    leaf = student.clone().requires_grad_()
    p, q = teacher.softmax(-1), leaf.softmax(-1)
    m = beta * p + (1 - beta) * q
    gkd = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    ours = token_losses("jsd", leaf, teacher, beta=beta)
    combination = beta * token_losses("amid", leaf, teacher, alpha=-1.0, lam=beta, order="pr") + (
        1 - beta
    ) * token_losses("amid", leaf, teacher, alpha=-1.0, lam=beta, order="qr")
    _close(ours, gkd.detach())
    _close(combination, ours)
    _close(_grad(ours, leaf), _grad(gkd, leaf))


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_at_the_ends_is_zero(beta: float) -> None:
    student, teacher = _logits()
    leaf = student.clone().requires_grad_()
    loss = token_losses("jsd", leaf, teacher, beta=beta)
    assert torch.equal(loss.detach(), torch.zeros_like(loss))
    assert torch.equal(_grad(loss, leaf), torch.zeros_like(leaf))


@pytest.mark.parametrize("alpha", [-3.0, -1.0, 0.5, 1.0, 1.0005, 3.0])
@pytest.mark.parametrize("divergence", ["kl", "ab"])
def test_lambda_edges_give_reverse_and_forward_divergence(alpha: float, divergence: str) -> None:
    student, teacher = _logits()
    leaf = student.clone().requires_grad_()
    common = {"alpha": alpha, "divergence": divergence}
    reverse = token_losses("amid", leaf, teacher, lam=1.0, order="qr", **common)
    forward = token_losses("amid", leaf, teacher, lam=0.0, order="pr", **common)
    q, p = leaf.log_softmax(-1), teacher.log_softmax(-1)
    if divergence == "kl":
        expected_reverse = (q.exp() * (q - p)).sum(-1)
        expected_forward = (p.exp() * (p - q)).sum(-1)
        _close(reverse, token_losses("rkl", leaf, teacher))
        _close(forward, token_losses("fkl", leaf, teacher))
    else:
        expected_reverse = ab_divergence(q, p, 0.2, 0.7)
        expected_forward = ab_divergence(p, q, 0.2, 0.7)
    _close(reverse, expected_reverse)
    _close(forward, expected_forward)
    _close(_grad(reverse, leaf), _grad(expected_reverse, leaf))
    _close(_grad(forward, leaf), _grad(expected_forward, leaf))


@pytest.mark.parametrize("t", [0.4, 0.75])
def test_geometric_rq_has_taid_form_but_taid_detaches_the_student(t: float) -> None:
    student, teacher = _logits()
    leaf = student.clone().requires_grad_()
    # TAID as published: interpolate the logits, with the student's detached.
    target = torch.softmax(t * teacher + (1 - t) * leaf.detach(), -1)
    taid_paper = (target * (target.log() - leaf.log_softmax(-1))).sum(-1)
    taid = token_losses("taid", leaf, teacher, t=t)
    amid = token_losses("amid", leaf, teacher, alpha=1.0, lam=t, order="rq")
    _close(taid, taid_paper.detach())
    _close(amid, taid)
    _close(_grad(taid, leaf), _grad(taid_paper, leaf))
    # AMiD keeps r in the graph, so its gradient is a different one.
    assert (_grad(amid, leaf) - _grad(taid, leaf)).abs().max() > 1e-3


def _all_configs() -> list[tuple[str, dict[str, object]]]:
    configs: list[tuple[str, dict[str, object]]] = [
        ("fkl", {}),
        ("rkl", {}),
        ("jsd", {"beta": 0.3}),
        ("skl", {"skew": 0.1}),
        ("srkl", {"skew": 0.1}),
        ("tvd", {}),
        ("ab", {}),
        ("ab", {"ab_alpha": 0.0, "ab_beta": 0.0}),
        ("taid", {"t": 0.4}),
    ]
    for alpha in (-7.0, -3.0, -1.0, 0.0, 0.5, 0.999, 1.0, 1.0005, 2.0, 3.0, 9.0):
        for lam in (0.1, 0.5, 0.9):
            for order in ORDERS:
                for divergence in ("kl", "ab"):
                    configs.append(
                        ("amid", {"alpha": alpha, "lam": lam, "order": order, "divergence": divergence})
                    )
    return configs


def test_config_list_covers_every_loss() -> None:
    assert {name for name, _ in _all_configs()} == set(LOSS_NAMES)


def test_losses_are_nonnegative_and_vanish_at_equal_logits_up_to_a_shift() -> None:
    student, teacher = _logits(rows=6, vocab=32, seed=4)
    shift = torch.linspace(-5.0, 5.0, 6, dtype=torch.float64).unsqueeze(1)
    for name, params in _all_configs():
        assert (token_losses(name, student, teacher, **params) >= 0).all(), (name, params)
        leaf = (teacher + shift).requires_grad_()
        at_teacher = token_losses(name, leaf, teacher, **params)
        torch.testing.assert_close(at_teacher, torch.zeros_like(at_teacher), rtol=0, atol=1e-13)
        if name == "tvd":
            continue  # |p − q| has no derivative at q = p; rounding picks a subgradient.
        # q = p minimizes every other one: the gradient vanishes too.
        torch.testing.assert_close(
            _grad(at_teacher, leaf),
            torch.zeros_like(leaf),
            rtol=0,
            atol=1e-12,
            msg=lambda m, c=(name, params): f"{c}: {m}",
        )


def _assistant(p: Tensor, q: Tensor, alpha: float, lam: float) -> Tensor:
    return assistant_logprobs(p.log(), q.log(), alpha, lam).exp()


@pytest.mark.parametrize("lam", [0.1, 0.5, 0.8])
def test_assistant_rows_of_the_power_mean_table(lam: float) -> None:
    student, teacher = _logits()
    p, q = teacher.softmax(-1), student.softmax(-1)

    def normalized(x: Tensor) -> Tensor:
        return x / x.sum(-1, keepdim=True)

    _close(_assistant(p, q, -1.0, lam), normalized(lam * p + (1 - lam) * q))
    _close(_assistant(p, q, 1.0, lam), normalized(p**lam * q ** (1 - lam)))
    _close(_assistant(p, q, 3.0, lam), normalized(1.0 / (lam / p + (1 - lam) / q)))
    _close(_assistant(p, q, -3.0, lam), normalized(torch.sqrt(lam * p**2 + (1 - lam) * q**2)))
    _close(_assistant(p, q, 0.0, lam), normalized((lam * p.sqrt() + (1 - lam) * q.sqrt()) ** 2))
    # λ = 1 and λ = 0 return the end distributions themselves, bit for bit.
    assert torch.equal(assistant_logprobs(p.log(), q.log(), 0.5, 1.0), p.log())
    assert torch.equal(assistant_logprobs(p.log(), q.log(), 3.0, 0.0), q.log())


def test_assistant_tends_to_max_and_min_for_large_alpha() -> None:
    student, teacher = _logits()
    p, q = teacher.softmax(-1), student.softmax(-1)

    def normalized(x: Tensor) -> Tensor:
        return x / x.sum(-1, keepdim=True)

    # With λ = ½ the power mean of order c is max(p, q)·(½ + ½·(min/max)^c)^(1/c): within 2^(1/c) of the max.
    torch.testing.assert_close(
        _assistant(p, q, -801.0, 0.5), normalized(torch.maximum(p, q)), rtol=3e-3, atol=0
    )
    torch.testing.assert_close(
        _assistant(p, q, 801.0, 0.5), normalized(torch.minimum(p, q)), rtol=3e-3, atol=0
    )


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("divergence", ["kl", "ab"])
def test_loss_is_continuous_around_alpha_one(order: str, divergence: str) -> None:
    student, teacher = _logits(vocab=48)
    params = {"lam": 0.3, "order": order, "divergence": divergence}
    at_one = token_losses("amid", student, teacher, alpha=1.0, **params)
    step = 1e-4
    slope = (
        token_losses("amid", student, teacher, alpha=1.0 + step, **params)
        - token_losses("amid", student, teacher, alpha=1.0 - step, **params)
    ) / (2 * step)
    # Down to and across the switch to the geometric form (|1 − α| < 1e-12): the change stays ~ slope·δ.
    for delta in (1e-3, 1e-5, 1e-7, 1e-9, 1.01e-12, 0.99e-12, 1e-14):
        for alpha in (1.0 - delta, 1.0 + delta):
            change = token_losses("amid", student, teacher, alpha=alpha, **params) - at_one
            bound = 2.0 * slope.abs() * delta + 1e-14
            assert (change.abs() <= bound).all(), (alpha, change, bound)


def test_float32_keeps_precision_near_alpha_one() -> None:
    # The plain logaddexp(...)/c form loses ~1e-7/|c| relative precision; the pivoted form must not.
    student, teacher = _logits(vocab=48)
    for alpha in (1.0 - 1e-5, 1.0 + 1e-5, 1.0 + 1e-9):
        params = {"alpha": alpha, "lam": 0.3, "order": "pr"}
        wide = token_losses("amid", student, teacher, **params)
        narrow = token_losses("amid", student.float(), teacher.float(), **params)
        torch.testing.assert_close(narrow.double(), wide, rtol=1e-5, atol=0)


@pytest.mark.parametrize(("x", "y"), [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)])
def test_ab_divergence_special_members(x: float, y: float) -> None:
    student, teacher = _logits()
    log_p, log_q = teacher.log_softmax(-1), student.log_softmax(-1)
    d = ab_divergence(log_p, log_q, x, y)
    if (x, y) == (1.0, 0.0):
        _close(d, kl_divergence(log_p, log_q))
    elif (x, y) == (0.0, 1.0):
        _close(d, kl_divergence(log_q, log_p))
    else:
        _close(d, 4.0 * (1.0 - (log_p.exp() * log_q.exp()).sqrt().sum(-1)))


@pytest.mark.parametrize(
    ("limit", "near"),
    [
        ((0.7, 0.0), [(0.7, 1e-4), (0.7, -1e-6), (0.7, 1.01e-8), (0.7, 0.99e-8)]),
        ((0.0, 0.6), [(1e-4, 0.6), (-1e-6, 0.6), (1.01e-8, 0.6), (-0.99e-8, 0.6)]),
        ((0.6, -0.6), [(0.6, -0.6 + 1e-4), (0.6, -0.6 - 1e-6), (0.6, -0.6 + 1.01e-8), (0.6, -0.6 + 0.99e-8)]),
        ((0.0, 0.0), [(1e-4, 2e-4), (-1e-5, 3e-5), (2e-6, -1e-6)]),
    ],
)
def test_ab_divergence_is_continuous_at_its_limit_cases(limit: tuple[float, float], near: list) -> None:
    student, teacher = _logits()
    log_p, log_q = teacher.log_softmax(-1), student.log_softmax(-1)
    at_limit = ab_divergence(log_p, log_q, *limit)
    for x, y in near:
        distance = abs(x - limit[0]) + abs(y - limit[1])
        # D_AB is smooth in (a_, b_): the change is O(distance), with a generous constant.
        torch.testing.assert_close(ab_divergence(log_p, log_q, x, y), at_limit, rtol=100 * distance, atol=0)
        # float32 inputs near a limit are evaluated in float64 internally, so they keep their precision.
        narrow = ab_divergence(log_p.float(), log_q.float(), x, y)
        assert narrow.dtype == torch.float32
        torch.testing.assert_close(narrow.double(), ab_divergence(log_p, log_q, x, y), rtol=1e-5, atol=0)
