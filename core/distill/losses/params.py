"""Loss names, their parameters with defaults, and validation that names the offending parameter.

The parameter names are the keys `LossSpec.loss_params()` (core/distill/spec.py) produces; keep both in step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

LOSS_NAMES: tuple[str, ...] = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd", "ab", "taid", "amid")
DIVERGENCES: tuple[str, ...] = ("kl", "ab")
ORDERS: tuple[str, ...] = ("pr", "qr", "rp", "rq")

_COMMON: dict[str, Any] = {"temperature": 1.0}
_SPECIFIC: dict[str, dict[str, Any]] = {
    "fkl": {},
    "rkl": {},
    "tvd": {},
    "jsd": {"beta": 0.5},
    "skl": {"skew": 0.1},
    "srkl": {"skew": 0.1},
    "ab": {"ab_alpha": 0.2, "ab_beta": 0.7},
    "taid": {"t": 0.4},
    "amid": {"alpha": 0.5, "lam": 0.1, "divergence": "kl", "order": "pr", "ab_alpha": 0.2, "ab_beta": 0.7},
}
# Weights of one distribution in a mixture or interpolation: anything outside [0, 1] is not a distribution.
_UNIT_INTERVAL = frozenset({"lam", "beta", "skew", "t"})
_CHOICES: dict[str, tuple[str, ...]] = {"divergence": DIVERGENCES, "order": ORDERS}


class LossConfigError(ValueError):
    """A loss name or parameter that the losses cannot use; `param` names the offending parameter."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def default_loss_params(name: str) -> dict[str, Any]:
    """All parameters of loss `name` with their default values."""
    if name not in _SPECIFIC:
        raise LossConfigError("name", f"unknown loss {name!r}; expected one of {', '.join(LOSS_NAMES)}")
    return _COMMON | _SPECIFIC[name]


def validate_loss_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Return `params` for loss `name` with defaults filled in, numbers as floats.

    Raises:
        LossConfigError: unknown loss or parameter, a weight (lam, beta, skew, t) outside [0, 1],
            temperature <= 0, an unknown divergence or order, or a non-finite number.
    """
    result = default_loss_params(name)
    for key, value in params.items():
        if key not in result:
            allowed = ", ".join(sorted(result))
            raise LossConfigError(key, f"not a parameter of loss {name!r} (it takes {allowed})")
        result[key] = _check(key, value)
    return result


def _check(key: str, value: Any) -> Any:
    if key in _CHOICES:
        if value not in _CHOICES[key]:
            raise LossConfigError(key, f"got {value!r}, expected one of {', '.join(_CHOICES[key])}")
        return value
    # bool is a Real subclass, but `lam=True` is surely a mistake rather than 1.0.
    if isinstance(value, bool) or not isinstance(value, Real):
        raise LossConfigError(key, f"expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise LossConfigError(key, f"must be finite, got {number}")
    if key in _UNIT_INTERVAL and not 0.0 <= number <= 1.0:
        raise LossConfigError(key, f"must lie in [0, 1], got {number}")
    if key == "temperature" and number <= 0.0:
        raise LossConfigError(key, f"must be > 0, got {number}")
    return number
