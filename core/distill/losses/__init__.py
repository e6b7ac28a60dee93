"""Distillation losses: AMiD's α-mixture assistant, AMiD itself and the baselines, as pure tensor functions.

λ (`lam`) is always the weight on the TEACHER. All math is done in log space, in float32 or float64.
"""

from core.distill.losses.amid import amid_token_losses
from core.distill.losses.divergences import ab_divergence, kl_divergence, total_variation
from core.distill.losses.mixture import assistant_logprobs
from core.distill.losses.params import (
    DIVERGENCES,
    LOSS_NAMES,
    ORDERS,
    LossConfigError,
    default_loss_params,
    validate_loss_params,
)
from core.distill.losses.registry import amid_loss, distillation_loss, token_losses
from core.distill.losses.taid import TaidInterpolation, taid_token_losses

__all__ = [
    "DIVERGENCES",
    "LOSS_NAMES",
    "ORDERS",
    "LossConfigError",
    "TaidInterpolation",
    "ab_divergence",
    "amid_loss",
    "amid_token_losses",
    "assistant_logprobs",
    "default_loss_params",
    "distillation_loss",
    "kl_divergence",
    "taid_token_losses",
    "token_losses",
    "total_variation",
    "validate_loss_params",
]
