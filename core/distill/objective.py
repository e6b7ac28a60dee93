"""The training objective for one micro-batch: kd_ratio·KD + (1 − kd_ratio)·CE on the response tokens.

The KD term uses the chunked fused loss on the models' last hidden states and output heads when both heads
are plain linear maps of the hidden state; otherwise (a head bias, soft-capped or rescaled logits) it falls
back to full logits and `distillation_loss`. Losses are sums over the micro-batch's response tokens divided
by `normalizer`, the number of response tokens in the whole optimizer step, so gradient accumulation is
exact.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.distill.fused import fused_distillation_loss
from core.distill.losses import distillation_loss
from core.distill.spec import JobSpec

IGNORE_INDEX = -100

# Config attributes of architectures whose forward post-processes `head(hidden)` (Gemma 2/3 soft-capping,
# Cohere and Granite scaling, MiniCPM's muP scaling). The numeric check below catches the ones not listed.
_POST_PROCESSING_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "dim_model_base")


@dataclass
class LossTerms:
    """Scalar losses of one micro-batch, already divided by the step's normalizer."""

    loss: Tensor
    kd: Tensor
    ce: Tensor


def head_weight(model: nn.Module) -> Tensor:
    """The output projection's weight, shape [V, H]."""
    return model.get_output_embeddings().weight


def body_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Last hidden state of the model's body (after the final norm), shape [B, T, H]."""
    body = getattr(model, model.base_model_prefix)
    return body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def _config_post_processes(model: nn.Module) -> bool:
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):
        configs.append(model.config.get_text_config())
    return any(
        getattr(config, attr, None) is not None for config in configs for attr in _POST_PROCESSING_ATTRS
    )


@torch.no_grad()
def supports_fused(model: nn.Module, sample_ids: Tensor) -> bool:
    """True when the model's logits are exactly `hidden @ head.weight.T`, checked on `sample_ids` [1, T]."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None or _config_post_processes(model):
        return False
    if not hasattr(model, model.base_model_prefix):
        return False
    mask = torch.ones_like(sample_ids)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=sample_ids, attention_mask=mask, use_cache=False).logits.float()
        projected = head(body_hidden(model, sample_ids, mask)).float()
    finally:
        model.train(was_training)
    return bool(torch.allclose(logits, projected, rtol=1e-4, atol=1e-5))


class Objective:
    """Computes the teacher's targets and the student's losses for a micro-batch."""

    def __init__(self, spec: JobSpec, *, vocab_size: int, fused: bool, autocast_dtype: torch.dtype | None):
        """`vocab_size`: entries both models share (the teacher's extra padded entries are cut)."""
        self.loss = spec.loss.loss_config()
        self.kd_ratio = spec.kd_ratio
        self.chunk_size = spec.loss.chunk_size
        self.vocab_size = vocab_size
        self.fused = fused
        self.autocast_dtype = autocast_dtype

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def teacher_targets(self, teacher: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Teacher hidden states [B, T−1, H] (fused) or logits [B, T−1, V] (naive), predicting tokens 1..T−1."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with self._autocast(ids.device):
            if self.fused:
                return body_hidden(teacher, ids, mask)[:, :-1]
            return teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits[
                :, :-1, : self.vocab_size
            ]

    def student_losses(
        self,
        student: nn.Module,
        teacher: nn.Module,
        targets: Tensor,
        batch: dict[str, Tensor],
        *,
        normalizer: float,
        **overrides: Any,
    ) -> LossTerms:
        """Losses of the student on `batch` given `teacher_targets`; `overrides` replace loss parameters (TAID t)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = batch["labels"][:, 1:]
        # Overrides come from the trainer's own schedules (TAID's t stays in [t_start, 1]).
        loss = replace(self.loss, params={**self.loss.params, **overrides}) if overrides else self.loss
        with self._autocast(ids.device):
            if self.fused:
                hidden = body_hidden(student, ids, mask)[:, :-1]
        if self.fused:
            kd, ce = fused_distillation_loss(
                hidden,
                head_weight(student)[: self.vocab_size],
                targets,
                head_weight(teacher)[: self.vocab_size],
                labels,
                loss=loss,
                chunk_size=self.chunk_size,
                ignore_index=IGNORE_INDEX,
                normalizer=normalizer,
                with_ce=True,
            )
        else:
            with self._autocast(ids.device):
                logits = student(input_ids=ids, attention_mask=mask, use_cache=False).logits
            logits = logits[:, :-1, : self.vocab_size].float()
            kd = distillation_loss(
                loss.name,
                logits,
                targets,
                labels,
                ignore_index=IGNORE_INDEX,
                normalizer=normalizer,
                **loss.params,
            )
            ce = (
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    labels.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                / normalizer
            )
        loss = self.kd_ratio * kd + (1.0 - self.kd_ratio) * ce
        return LossTerms(loss=loss, kd=kd, ce=ce)


def count_loss_tokens(batch: dict[str, Tensor]) -> int:
    """Number of positions the losses count: shifted labels that are not IGNORE_INDEX."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
