"""Distillation losses: AMiD's α-mixture assistant, AMiD itself and the baselines, as pure tensor functions.

λ (`lam`) is always the weight on the TEACHER. All math is done in log space, in float32 or float64.

Exports load lazily: `core.distill.losses.params` (names, defaults, ranges; no torch) is read by `JobSpec`
in the API process, which must not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.distill.losses.amid import amid_token_losses
    from core.distill.losses.divergences import ab_divergence, kl_divergence, total_variation
    from core.distill.losses.mixture import assistant_logprobs
    from core.distill.losses.params import (
        DIVERGENCES,
        LOSS_NAMES,
        ORDERS,
        LossConfig,
        LossConfigError,
        default_loss_params,
        loss_config,
        validate_loss_params,
    )
    from core.distill.losses.registry import (
        amid_loss,
        configured_token_losses,
        distillation_loss,
        token_losses,
    )
    from core.distill.losses.taid import TaidInterpolation, taid_token_losses

_EXPORTS = {
    "amid_token_losses": "amid",
    "ab_divergence": "divergences",
    "kl_divergence": "divergences",
    "total_variation": "divergences",
    "assistant_logprobs": "mixture",
    "DIVERGENCES": "params",
    "LOSS_NAMES": "params",
    "ORDERS": "params",
    "LossConfig": "params",
    "LossConfigError": "params",
    "default_loss_params": "params",
    "loss_config": "params",
    "validate_loss_params": "params",
    "amid_loss": "registry",
    "configured_token_losses": "registry",
    "distillation_loss": "registry",
    "token_losses": "registry",
    "TaidInterpolation": "taid",
    "taid_token_losses": "taid",
}

__all__ = [
    "DIVERGENCES",
    "LOSS_NAMES",
    "LossConfig",
    "LossConfigError",
    "ORDERS",
    "TaidInterpolation",
    "ab_divergence",
    "amid_loss",
    "amid_token_losses",
    "assistant_logprobs",
    "configured_token_losses",
    "default_loss_params",
    "distillation_loss",
    "kl_divergence",
    "loss_config",
    "taid_token_losses",
    "token_losses",
    "total_variation",
    "validate_loss_params",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
