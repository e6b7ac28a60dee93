"""`JobSpec`: the one validated description of a distillation job.

The CLI reads it from YAML, the API accepts it as JSON, and every checkpoint carries a copy. Field names
are a contract shared by the CLI, the API and stored jobs: refine types and defaults, keep the names.
Every model forbids unknown keys so that a typo is an error naming the field, not a silently ignored
setting.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.distill.losses.params import (
    DIVERGENCES,
    LOSS_NAMES,
    LOSS_PARAMS,
    ORDERS,
    TAID_SCHEDULE_PARAMS,
    LossConfig,
    LossParam,
    loss_param_names,
)

LossName = Literal[LOSS_NAMES]  # type: ignore[valid-type]
DTypeName = Literal["auto", "float32", "bfloat16", "float16"]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherSpec(_Spec):
    model: str = Field(min_length=1, description="Local Hugging Face directory, GGUF directory or hub id.")
    gguf_file: str | None = Field(default=None, description="GGUF file name inside `model`, if any.")
    dtype: DTypeName = Field(
        default="auto",
        description="Teacher weights' dtype: auto = bfloat16 on CUDA, float32 on CPU.",
    )


class StudentSpec(_Spec):
    model: str | None = Field(default=None, description="Pretrained student: directory, GGUF dir or hub id.")
    gguf_file: str | None = None
    from_teacher_layers: list[int] | None = Field(
        default=None,
        description="Build the student from the teacher: embeddings, final norm, head and these layers.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> StudentSpec:
        if (self.model is None) == (self.from_teacher_layers is None):
            raise ValueError("give exactly one of 'model' or 'from_teacher_layers'")
        if self.from_teacher_layers is not None:
            layers = self.from_teacher_layers
            if not layers:
                raise ValueError("from_teacher_layers must name at least one layer")
            if any(i < 0 for i in layers):
                raise ValueError("from_teacher_layers holds negative layer indices")
            if len(set(layers)) != len(layers):
                raise ValueError("from_teacher_layers repeats a layer")
        if self.gguf_file is not None and self.model is None:
            raise ValueError("gguf_file needs 'model'")
        return self


class DataSpec(_Spec):
    train: str = Field(min_length=1, description="JSONL path (CLI) or uploaded file id (API).")
    eval: str | None = Field(default=None, description="Optional JSONL path or file id for evaluation.")
    format: Literal["instruction", "chat", "text"] = "instruction"
    max_length: int = Field(default=512, ge=8, le=131072)
    max_prompt_length: int = Field(default=256, ge=1, le=131072)
    skip_invalid: bool = Field(default=False, description="Skip (and count) malformed records.")

    @model_validator(mode="after")
    def _prompt_fits(self) -> DataSpec:
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        return self


def _param_field(param: LossParam) -> Any:
    return Field(default=param.default, description=param.description, **param.bounds())


class LossSpec(_Spec):
    """The distillation loss and its parameters. λ (`lam`) is always the weight on the TEACHER.

    Names, defaults and ranges come from `core.distill.losses.params`, the losses' own table."""

    name: LossName = "amid"
    alpha: float = _param_field(LOSS_PARAMS["alpha"])
    lam: float = _param_field(LOSS_PARAMS["lam"])
    divergence: Literal[DIVERGENCES] = _param_field(LOSS_PARAMS["divergence"])  # type: ignore[valid-type]
    order: Literal[ORDERS] = _param_field(LOSS_PARAMS["order"])  # type: ignore[valid-type]
    temperature: float = _param_field(LOSS_PARAMS["temperature"])
    ab_alpha: float = _param_field(LOSS_PARAMS["ab_alpha"])
    ab_beta: float = _param_field(LOSS_PARAMS["ab_beta"])
    beta: float = _param_field(LOSS_PARAMS["beta"])
    skew: float = _param_field(LOSS_PARAMS["skew"])
    taid_t_start: float = _param_field(LOSS_PARAMS["t"])
    taid_beta_lr: float = _param_field(TAID_SCHEDULE_PARAMS["beta_lr"])
    taid_momentum: float = _param_field(TAID_SCHEDULE_PARAMS["momentum"])
    fused: bool = Field(default=True, description="Use the chunked fused loss (memory-bounded).")
    chunk_size: int | None = Field(default=None, ge=1, description="Tokens per chunk of the fused loss.")

    @field_validator(
        "alpha",
        "ab_alpha",
        "ab_beta",
        "temperature",
        "lam",
        "beta",
        "skew",
        "taid_t_start",
        "taid_beta_lr",
        "taid_momentum",
    )
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    def loss_config(self) -> LossConfig:
        """The loss and its parameters as the losses take them; already valid, so not checked again."""
        fields = {"t": "taid_t_start"}
        params = {key: getattr(self, fields.get(key, key)) for key in loss_param_names(self.name)}
        return LossConfig(self.name, MappingProxyType(params))

    def loss_params(self) -> dict[str, Any]:
        """The keyword parameters `distillation_loss(self.name, ...)` takes for this loss."""
        return dict(self.loss_config().params)


class StrategySpec(_Spec):
    """Where each step's responses come from: the dataset, the student, or the adaptive mix."""

    name: Literal["off_policy", "on_policy", "adaptive"] = "off_policy"
    replay_capacity: int = Field(default=1000, ge=1)
    threshold_increment: float = Field(default=0.1, gt=0.0, le=1.0)
    loss_rise_tolerance: float = Field(default=0.1, ge=0.0, description="Validation-loss rise that bumps θ.")
    max_new_tokens: int | None = Field(default=None, ge=1, description="Default: max_length − prompt.")
    temperature: float = Field(default=1.0, gt=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)


class TrainingSpec(_Spec):
    max_steps: int = Field(default=200, ge=1, le=10_000_000)
    batch_size: int = Field(default=8, ge=1, le=4096)
    grad_accum: int = Field(default=1, ge=1, le=4096)
    learning_rate: float = Field(default=1.0e-4, gt=0.0, le=1.0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    max_grad_norm: float = Field(default=1.0, ge=0.0, description="0 disables clipping.")
    seed: int = Field(default=10, ge=0)
    checkpoint_every: int = Field(default=50, ge=0, description="0 means never (the final student is kept).")
    eval_every: int = Field(default=50, ge=0, description="0 means never.")
    precision: Literal["auto", "float32", "bf16"] = Field(
        default="auto", description="auto = bf16 autocast on CUDA, float32 on CPU."
    )
    gradient_checkpointing: bool = False
    keep_checkpoints: int | None = Field(
        default=2,
        ge=1,
        description="Keep the newest N checkpoints that verify; null keeps all. With 1, a corrupt latest "
        "checkpoint leaves nothing to resume from.",
    )

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainingSpec:
        if self.warmup_steps > self.max_steps:
            raise ValueError("warmup_steps exceeds max_steps")
        return self


class EvaluationSpec(_Spec):
    """Validation during training: CE/KD loss on `data.eval`, ROUGE-L of generated responses."""

    max_records: int = Field(default=64, ge=1, description="Eval records used per evaluation.")
    max_new_tokens: int = Field(default=128, ge=1, le=4096)
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    batch_size: int = Field(default=8, ge=1)
    num_samples_logged: int = Field(default=3, ge=0, le=50)


class JobSpec(_Spec):
    teacher: TeacherSpec
    student: StudentSpec
    data: DataSpec
    loss: LossSpec = Field(default_factory=LossSpec)
    kd_ratio: float = Field(default=1.0, ge=0.0, le=1.0, description="kd_ratio·KD + (1 − kd_ratio)·CE.")
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)

    @model_validator(mode="after")
    def _adaptive_needs_eval(self) -> JobSpec:
        # θ of the adaptive strategy only rises after validations; without them it is off_policy in disguise.
        if self.strategy.name == "adaptive" and (self.data.eval is None or self.training.eval_every == 0):
            raise ValueError("strategy 'adaptive' needs data.eval and training.eval_every > 0")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> JobSpec:
        """Read a spec from YAML; relative data and model paths are resolved against the file's folder."""
        path = Path(path)
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        spec = cls.model_validate(raw)
        return spec.resolve_paths(path.parent)

    def resolve_paths(self, base: Path) -> JobSpec:
        """Make relative local paths absolute against `base`; hub ids (no such local path) are left alone."""

        def resolve(value: str | None) -> str | None:
            if value is None or Path(value).is_absolute():
                return value
            candidate = base / value
            return str(candidate.resolve()) if candidate.exists() else value

        data = self.data.model_copy(
            update={"train": resolve(self.data.train), "eval": resolve(self.data.eval)}
        )
        teacher = self.teacher.model_copy(update={"model": resolve(self.teacher.model)})
        student = self.student.model_copy(update={"model": resolve(self.student.model)})
        return self.model_copy(update={"data": data, "teacher": teacher, "student": student})
