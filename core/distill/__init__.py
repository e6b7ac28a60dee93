"""The distillation engine: losses, fused loss, data, models, trainer.

The public loss API is re-exported here lazily, so that importing a light module of this package (e.g.
`core.distill.spec` from the API process) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.distill.fused import fused_distillation_loss
    from core.distill.losses import (
        LOSS_NAMES,
        LossConfigError,
        TaidInterpolation,
        amid_loss,
        assistant_logprobs,
        distillation_loss,
        token_losses,
        validate_loss_params,
    )

_EXPORTS = {
    "LOSS_NAMES": "core.distill.losses",
    "LossConfigError": "core.distill.losses",
    "TaidInterpolation": "core.distill.losses",
    "amid_loss": "core.distill.losses",
    "assistant_logprobs": "core.distill.losses",
    "distillation_loss": "core.distill.losses",
    "token_losses": "core.distill.losses",
    "validate_loss_params": "core.distill.losses",
    "fused_distillation_loss": "core.distill.fused",
}

__all__ = [
    "LOSS_NAMES",
    "LossConfigError",
    "TaidInterpolation",
    "amid_loss",
    "assistant_logprobs",
    "distillation_loss",
    "fused_distillation_loss",
    "token_losses",
    "validate_loss_params",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
