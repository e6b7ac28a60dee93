"""distillation_loss / amid_loss / token_losses contracts: masking, normalization, vocabulary padding,
parameter validation, teacher gradients, consistency with LossSpec, and the TAID schedule."""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch
from torch import Tensor

from core.distill import (
    LOSS_NAMES,
    LossConfigError,
    TaidInterpolation,
    amid_loss,
    distillation_loss,
    token_losses,
    validate_loss_params,
)
from core.distill.losses import default_loss_params
from core.distill.spec import LossName, LossSpec
from tests.core.distill.test_losses_reference import single_thread  # noqa: F401  (autouse fixture)

CONFIGS = [(name, {}) for name in LOSS_NAMES] + [
    ("amid", {"alpha": 2.0, "lam": 0.3, "order": "rq", "divergence": "ab"}),
    ("amid", {"alpha": -3.0, "lam": 0.5, "order": "qr"}),
]


def _batch(dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = 2.0 * torch.randn(3, 5, 20, generator=generator)
    teacher = 2.0 * torch.randn(3, 5, 20, generator=generator)
    labels = torch.randint(0, 20, (3, 5), generator=generator)
    labels[0, :2] = -100
    labels[2, 4] = -100
    return student.to(dtype), teacher.to(dtype), labels


@pytest.mark.parametrize(("name", "params"), CONFIGS)
def test_loss_is_mean_of_token_losses_over_counted_positions(name: str, params: dict) -> None:
    student, teacher, labels = _batch()
    # Garbage at ignored positions must not leak into the loss or the gradient.
    student[labels == -100] = torch.nan
    teacher[0, 0] = -math.inf
    leaf = student.clone().requires_grad_()
    loss = distillation_loss(name, leaf, teacher, labels, **params)
    keep = labels != -100
    expected = token_losses(name, student[keep], teacher[keep], **params).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.isfinite(leaf.grad).all()
    assert torch.equal(leaf.grad[~keep], torch.zeros_like(leaf.grad[~keep]))


@pytest.mark.parametrize(("name", "params"), CONFIGS)
def test_all_masked_is_exactly_zero_with_zero_gradient(name: str, params: dict) -> None:
    student, teacher, labels = _batch()
    student[..., :3] = -math.inf
    teacher[..., 2:6] = -math.inf
    leaf = student.clone().requires_grad_()
    for normalizer in (None, 0, 17):
        loss = distillation_loss(
            name, leaf, teacher, torch.full_like(labels, -100), normalizer=normalizer, **params
        )
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, leaf)
        assert torch.equal(grad, torch.zeros_like(grad))


def test_custom_ignore_index() -> None:
    student, teacher, labels = _batch()
    labels[labels == -100] = 7
    labels[1, 1] = 7
    keep = labels != 7
    loss = distillation_loss("fkl", student, teacher, labels, ignore_index=7)
    torch.testing.assert_close(loss, token_losses("fkl", student[keep], teacher[keep]).mean())


@pytest.mark.parametrize(("name", "params"), CONFIGS)
def test_normalizer_makes_gradient_accumulation_exact(name: str, params: dict) -> None:
    student, teacher, labels = _batch(torch.float64)
    whole = student.clone().requires_grad_()
    distillation_loss(name, whole, teacher, labels, **params).backward()
    parts = student.clone().requires_grad_()
    total = int((labels != -100).sum())
    # Micro-batches of unequal token counts, each divided by the step's total count.
    for rows, normalizer in ((slice(0, 1), total), (slice(1, 3), torch.tensor(float(total)))):
        distillation_loss(
            name, parts[rows], teacher[rows], labels[rows], normalizer=normalizer, **params
        ).backward()
    torch.testing.assert_close(parts.grad, whole.grad, rtol=1e-12, atol=1e-15)


def test_bad_normalizer_is_rejected() -> None:
    student, teacher, labels = _batch()
    for bad in (-1, math.nan, math.inf, 0):
        with pytest.raises(LossConfigError) as info:
            distillation_loss("fkl", student, teacher, labels, normalizer=bad)
        assert info.value.param == "normalizer"


def test_padded_teacher_vocabulary_is_cut() -> None:
    student, teacher, labels = _batch()
    padded = torch.cat([teacher, torch.full((3, 5, 12), 50.0)], dim=-1)
    padded[..., -1] = -math.inf
    for name, params in CONFIGS:
        torch.testing.assert_close(
            distillation_loss(name, student, padded, labels, **params),
            distillation_loss(name, student, teacher, labels, **params),
        )


def test_smaller_teacher_vocabulary_is_an_error() -> None:
    student, teacher, labels = _batch()
    with pytest.raises(LossConfigError) as info:
        distillation_loss("amid", student, teacher[..., :-1], labels)
    assert info.value.param == "teacher_logits"


def test_mismatched_positions_are_an_error() -> None:
    student, teacher, labels = _batch()
    with pytest.raises(ValueError, match="labels"):
        distillation_loss("fkl", student, teacher, labels[:, :-1])


@pytest.mark.parametrize(
    ("name", "params", "param"),
    [
        ("nope", {}, "name"),
        ("amid", {"lam": 1.5}, "lam"),
        ("amid", {"lam": -0.1}, "lam"),
        ("amid", {"lam": True}, "lam"),
        ("amid", {"lam": "0.1"}, "lam"),
        ("amid", {"alpha": math.nan}, "alpha"),
        ("amid", {"alpha": math.inf}, "alpha"),
        ("amid", {"order": "pq"}, "order"),
        ("amid", {"divergence": "js"}, "divergence"),
        ("amid", {"lambda": 0.1}, "lambda"),
        ("amid", {"ab_beta": -math.inf}, "ab_beta"),
        ("ab", {"ab_alpha": math.nan}, "ab_alpha"),
        ("jsd", {"beta": 1.01}, "beta"),
        ("skl", {"skew": -0.5}, "skew"),
        ("srkl", {"skew": 2}, "skew"),
        ("taid", {"t": 1.2}, "t"),
        ("fkl", {"temperature": 0.0}, "temperature"),
        ("tvd", {"temperature": -1.0}, "temperature"),
        ("fkl", {"beta": 0.5}, "beta"),
        ("rkl", {"alpha": 0.5}, "alpha"),
    ],
)
def test_bad_params_are_rejected_naming_the_param(name: str, params: dict, param: str) -> None:
    student, teacher, labels = _batch()
    calls = [
        lambda: validate_loss_params(name, params),
        lambda: token_losses(name, student[0], teacher[0], **params),
        lambda: distillation_loss(name, student, teacher, labels, **params),
    ]
    for call in calls:
        with pytest.raises(LossConfigError) as info:
            call()
        assert isinstance(info.value, ValueError)
        assert info.value.param == param
        assert param in str(info.value)


def test_validation_fills_defaults_and_converts_numbers() -> None:
    params = validate_loss_params("amid", {"alpha": 2, "order": "rq"})
    assert params == {
        "temperature": 1.0,
        "alpha": 2.0,
        "lam": 0.1,
        "divergence": "kl",
        "order": "rq",
        "ab_alpha": 0.2,
        "ab_beta": 0.7,
    }
    assert isinstance(params["alpha"], float)
    assert validate_loss_params("taid", {}) == {"temperature": 1.0, "t": 0.4}


def test_loss_names_and_params_match_loss_spec() -> None:
    assert set(LOSS_NAMES) == set(get_args(LossName))
    for name in LOSS_NAMES:
        spec_params = LossSpec(name=name).loss_params()
        # Every key LossSpec produces is accepted, and LossSpec's defaults are the losses' defaults.
        assert validate_loss_params(name, spec_params) == default_loss_params(name), name
        assert set(spec_params) == set(default_loss_params(name)), name


@pytest.mark.parametrize(
    "key", ["temperature", "lam", "beta", "skew", "taid_t_start", "taid_momentum", "taid_beta_lr"]
)
def test_loss_spec_and_losses_share_each_range(key: str) -> None:
    # One table: a value just outside the range is refused by the spec and by the losses (or TAID's schedule).
    from pydantic import ValidationError

    from core.distill.losses.params import LOSS_PARAMS, TAID_SCHEDULE_PARAMS

    table_key = {"taid_t_start": "t", "taid_momentum": "momentum", "taid_beta_lr": "beta_lr"}.get(key, key)
    param = LOSS_PARAMS.get(table_key) or TAID_SCHEDULE_PARAMS[table_key]
    schema = LossSpec.model_json_schema()["properties"][key]
    assert schema["default"] == param.default
    outside = []
    if param.ge is not None:
        assert schema["minimum"] == param.ge
        outside.append(param.ge - 1e-6)
    if param.gt is not None:
        assert schema["exclusiveMinimum"] == param.gt
        outside.append(param.gt)
    if param.le is not None:
        assert schema["maximum"] == param.le
        outside.append(param.le + 1e-6)
    if param.lt is not None:
        assert schema["exclusiveMaximum"] == param.lt
        outside.append(param.lt)
    assert outside
    for value in outside:
        with pytest.raises(ValidationError):
            LossSpec(**{key: value})
        if table_key in LOSS_PARAMS:
            name = next(n for n in LOSS_NAMES if table_key in default_loss_params(n))
            with pytest.raises(LossConfigError):
                validate_loss_params(name, {table_key: value})
        else:
            with pytest.raises(LossConfigError):
                TaidInterpolation(total_steps=10, **{table_key: value})


@pytest.mark.parametrize(("name", "params"), CONFIGS)
def test_teacher_gets_no_gradient(name: str, params: dict) -> None:
    student, teacher, labels = _batch()
    student.requires_grad_()
    teacher.requires_grad_()
    distillation_loss(name, student, teacher, labels, **params).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_student_independent_settings_still_backpropagate_zero() -> None:
    student, teacher, labels = _batch()
    leaf = student.clone().requires_grad_()
    for name, params in [
        ("amid", {"lam": 1.0, "order": "pr"}),
        ("amid", {"lam": 1.0, "order": "rp"}),
        ("skl", {"skew": 1.0}),
    ]:
        loss = distillation_loss(name, leaf, teacher, labels, **params)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, leaf)
        assert torch.equal(grad, torch.zeros_like(grad))


def test_amid_loss_is_distillation_loss_amid() -> None:
    student, teacher, labels = _batch()
    params = {"alpha": -0.5, "lam": 0.2, "divergence": "ab", "order": "qr", "ab_alpha": 0.3, "ab_beta": 0.5}
    torch.testing.assert_close(
        amid_loss(student, teacher, labels, temperature=1.5, normalizer=40, **params),
        distillation_loss("amid", student, teacher, labels, temperature=1.5, normalizer=40, **params),
    )


@pytest.mark.parametrize(("name", "params"), CONFIGS)
def test_token_losses_work_on_any_row_subset(name: str, params: dict) -> None:
    student, teacher, _ = _batch()
    flat_s, flat_t = student.reshape(-1, 20), teacher.reshape(-1, 20)
    full = token_losses(name, flat_s, flat_t, **params)
    rows = torch.tensor([11, 0, 7])
    torch.testing.assert_close(token_losses(name, flat_s[rows], flat_t[rows], **params), full[rows])
    torch.testing.assert_close(token_losses(name, student, teacher, **params), full.reshape(3, 5))


def test_temperature_divides_the_logits() -> None:
    student, teacher, _ = _batch(torch.float64)
    for name, params in CONFIGS:
        torch.testing.assert_close(
            token_losses(name, student, teacher, temperature=2.5, **params),
            token_losses(name, student / 2.5, teacher / 2.5, **params),
        )


def test_output_dtypes() -> None:
    student, teacher, _ = _batch()
    assert token_losses("amid", student.bfloat16(), teacher.bfloat16()).dtype == torch.float32
    assert token_losses("amid", student.half(), teacher).dtype == torch.float32
    assert token_losses("amid", student.double(), teacher).dtype == torch.float64


def _expected_taid(
    t: float, prev: float, loss: float, m: float, step: int, start: float, lr: float, mu: float, total: int
):
    m = mu * m + (1 - mu) * (prev - loss) / prev
    linear = start + (1 - start) * min(1.0, step / total)
    return min(1.0, max(linear, t + lr * (1 / (1 + math.exp(-m))) * (1 - t))), m


def test_taid_interpolation_follows_the_rule() -> None:
    taid = TaidInterpolation(t_start=0.4, beta_lr=0.1, momentum=0.9, total_steps=100)
    assert taid.t == 0.4
    assert taid.update(0, 2.0) == 0.4  # the first loss is only recorded
    t, m, prev = 0.4, 0.0, 2.0
    for step, loss in enumerate([1.5, 1.6, 1.0, 1.0, 0.2], start=1):
        t, m = _expected_taid(t, prev, loss, m, step, 0.4, 0.1, 0.9, 100)
        assert taid.update(step, loss) == pytest.approx(t, rel=1e-15)
        prev = loss
    assert t > 0.4 + 5 * 0.006  # the adaptive increment, not the linear floor, drove it


def test_taid_t_never_falls_below_the_linear_ramp_and_ends_at_one() -> None:
    taid = TaidInterpolation(0.4, 5e-4, 0.99, 50)
    previous = taid.t
    for step in range(60):
        loss = 1.0 + 0.5 * math.sin(step)  # rising and falling
        t = taid.update(step, torch.tensor(loss))
        assert previous <= t <= 1.0
        assert t >= taid.linear_t(step) or step == 0
        previous = t
    assert taid.t == 1.0


def test_taid_faster_when_the_loss_falls() -> None:
    falling = TaidInterpolation(0.4, 0.05, 0.5, 10_000)
    rising = TaidInterpolation(0.4, 0.05, 0.5, 10_000)
    for step in range(10):
        falling.update(step, 1.0 / (step + 1))
        rising.update(step, float(step + 1))
    assert falling.t > rising.t > 0.4


def test_taid_state_round_trip() -> None:
    original = TaidInterpolation(0.3, 0.01, 0.9, 100)
    for step, loss in enumerate([3.0, 2.5, 2.7, 2.0]):
        original.update(step, loss)
    state = original.state_dict()
    assert all(value is None or type(value) is float for value in state.values())
    restored = TaidInterpolation(0.3, 0.01, 0.9, 100)
    restored.load_state_dict(state)
    for step, loss in enumerate([1.9, 1.7, 1.8], start=4):
        assert restored.update(step, loss) == original.update(step, loss)
    fresh = TaidInterpolation(total_steps=10).state_dict()
    assert fresh["prev_loss"] is None
    assert fresh["t"] == 0.4


def test_taid_rejects_bad_settings_and_non_finite_losses() -> None:
    for kwargs, param in [
        ({"total_steps": 0}, "total_steps"),
        ({}, "total_steps"),
        ({"t_start": 1.5, "total_steps": 10}, "t_start"),
        ({"beta_lr": -1.0, "total_steps": 10}, "beta_lr"),
        ({"momentum": 1.0, "total_steps": 10}, "momentum"),
    ]:
        with pytest.raises(LossConfigError) as info:
            TaidInterpolation(**kwargs)
        assert info.value.param == param
    taid = TaidInterpolation(total_steps=10)
    taid.update(0, 1.0)
    with pytest.raises(ValueError, match="step 3"):
        taid.update(3, math.nan)


def test_taid_survives_a_loss_jumping_up_from_zero() -> None:
    taid = TaidInterpolation(total_steps=10)
    taid.update(0, 1e-30)
    assert 0.4 <= taid.update(1, 5.0) <= 1.0
