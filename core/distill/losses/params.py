"""Loss names, their parameters with defaults and ranges, and validation that names the offending one.

This is the one definition: `JobSpec`'s `loss` section (core/distill/spec.py) builds its fields from
`LOSS_PARAMS` and `TAID_SCHEDULE_PARAMS`, and the loss functions validate with the same table.
A validated `LossConfig` is what the trainer hands the losses, so that nothing re-checks it per chunk.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Real
from types import MappingProxyType
from typing import Any

DIVERGENCES: tuple[str, ...] = ("kl", "ab")
ORDERS: tuple[str, ...] = ("pr", "qr", "rp", "rq")


@dataclass(frozen=True)
class LossParam:
    """One parameter: its default, what it means, and the closed/open bounds or choices it must meet."""

    default: float | str
    description: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None

    def bounds(self) -> dict[str, float]:
        """The bounds as pydantic `Field` keywords (ge, gt, le, lt)."""
        return {
            k: v
            for k, v in (("ge", self.ge), ("gt", self.gt), ("le", self.le), ("lt", self.lt))
            if v is not None
        }


# Weights of one distribution in a mixture or interpolation: anything outside [0, 1] is not a distribution.
LOSS_PARAMS: Mapping[str, LossParam] = MappingProxyType(
    {
        "temperature": LossParam(1.0, "Softmax temperature of both models' logits.", gt=0.0, le=100.0),
        # Bounded so that a typo like 1e30 is refused when the job is submitted instead of failing as a NaN
        # loss mid-training: α to ±10^4 (the losses are tested finite in float32 up to there), the α-β
        # divergence's exponents to ±100.
        "alpha": LossParam(0.5, "AMiD mixture α (a real number in [-10000, 10000]).", ge=-1e4, le=1e4),
        "lam": LossParam(0.1, "AMiD teacher weight λ in [0, 1].", ge=0.0, le=1.0),
        "divergence": LossParam(
            "kl", "AMiD's divergence between the models and the assistant.", choices=DIVERGENCES
        ),
        "order": LossParam(
            "pr", "AMiD's argument order (p, q: teacher, student; r: assistant).", choices=ORDERS
        ),
        "ab_alpha": LossParam(0.2, "α-β divergence's α (not the mixture α).", ge=-100.0, le=100.0),
        "ab_beta": LossParam(0.7, "α-β divergence's β.", ge=-100.0, le=100.0),
        "beta": LossParam(0.5, "Generalized JSD weight on the teacher.", ge=0.0, le=1.0),
        "skew": LossParam(0.1, "DistiLLM skew for skl / srkl.", ge=0.0, le=1.0),
        "t": LossParam(
            0.4, "TAID's starting interpolation t (0: the student, 1: the teacher).", ge=0.0, le=1.0
        ),
    }
)

# What each loss takes besides `temperature`, which every loss takes.
LOSS_TAKES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "fkl": (),
        "rkl": (),
        "jsd": ("beta",),
        "skl": ("skew",),
        "srkl": ("skew",),
        "tvd": (),
        "ab": ("ab_alpha", "ab_beta"),
        "taid": ("t",),
        "amid": ("alpha", "lam", "divergence", "order", "ab_alpha", "ab_beta"),
    }
)
LOSS_NAMES: tuple[str, ...] = tuple(LOSS_TAKES)

# TAID's schedule of t (TaidInterpolation), beside the loss's own `t`.
TAID_SCHEDULE_PARAMS: Mapping[str, LossParam] = MappingProxyType(
    {
        "beta_lr": LossParam(5e-4, "TAID's adaptive step size for t.", ge=0.0, le=1.0),
        "momentum": LossParam(0.99, "TAID's momentum of the relative loss change.", ge=0.0, lt=1.0),
    }
)


class LossConfigError(ValueError):
    """A loss name or parameter that the losses cannot use; `param` names the offending parameter."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class LossConfig:
    """A loss name with its complete, validated parameters (temperature included). Build it with
    `loss_config` (validates) or from an already validated `JobSpec` (`LossSpec.loss_config()`)."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def temperature(self) -> float:
        return float(self.params["temperature"])

    def specific(self) -> dict[str, Any]:
        """The parameters besides temperature, as the per-token loss functions take them."""
        return {k: v for k, v in self.params.items() if k != "temperature"}


def loss_param_names(name: str) -> tuple[str, ...]:
    """Every parameter loss `name` takes, temperature first."""
    if name not in LOSS_TAKES:
        raise LossConfigError("name", f"unknown loss {name!r}; expected one of {', '.join(LOSS_NAMES)}")
    return ("temperature", *LOSS_TAKES[name])


def default_loss_params(name: str) -> dict[str, Any]:
    """All parameters of loss `name` with their default values."""
    return {key: LOSS_PARAMS[key].default for key in loss_param_names(name)}


def validate_loss_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Return `params` for loss `name` with defaults filled in, numbers as floats.

    Raises:
        LossConfigError: unknown loss or parameter, a value outside its range (a weight outside [0, 1],
            temperature <= 0), an unknown divergence or order, or a non-finite number.
    """
    result = default_loss_params(name)
    for key, value in params.items():
        if key not in result:
            allowed = ", ".join(sorted(result))
            raise LossConfigError(key, f"not a parameter of loss {name!r} (it takes {allowed})")
        result[key] = check_param(key, value, LOSS_PARAMS[key])
    return result


def loss_config(name: str, params: Mapping[str, Any] | None = None) -> LossConfig:
    """A validated `LossConfig` (see `validate_loss_params`)."""
    return LossConfig(name, MappingProxyType(validate_loss_params(name, params or {})))


def check_param(key: str, value: Any, param: LossParam) -> Any:
    """`value` if it meets `param`'s choices or bounds (numbers as float); LossConfigError naming `key`."""
    if param.choices is not None:
        if value not in param.choices:
            raise LossConfigError(key, f"got {value!r}, expected one of {', '.join(param.choices)}")
        return value
    # bool is a Real subclass, but `lam=True` is surely a mistake rather than 1.0.
    if isinstance(value, bool) or not isinstance(value, Real):
        raise LossConfigError(key, f"expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise LossConfigError(key, f"must be finite, got {number}")
    if not _within(number, param):
        raise LossConfigError(key, f"must be {_describe_bounds(param)}, got {number}")
    return number


def _within(number: float, param: LossParam) -> bool:
    return (
        (param.ge is None or number >= param.ge)
        and (param.gt is None or number > param.gt)
        and (param.le is None or number <= param.le)
        and (param.lt is None or number < param.lt)
    )


def _describe_bounds(param: LossParam) -> str:
    low = f"[{param.ge:g}" if param.ge is not None else f"({param.gt:g}" if param.gt is not None else None
    high = f"{param.le:g}]" if param.le is not None else f"{param.lt:g})" if param.lt is not None else None
    if low and high:
        return f"in {low}, {high}"
    if low:
        return f">= {param.ge:g}" if param.ge is not None else f"> {param.gt:g}"
    return f"<= {param.le:g}" if param.le is not None else f"< {param.lt:g}"
