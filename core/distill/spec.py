"""`JobSpec`: the one validated description of a distillation job.

The CLI reads it from YAML, the API accepts it as JSON, and every checkpoint carries a copy. Field names
are a contract shared by the CLI, the API and stored jobs: refine types and defaults, keep the names.
Every model forbids unknown keys so that a typo is an error naming the field, not a silently ignored
setting. Every number has bounds the trainer can use, numbers are finite, integers and booleans are
strict (`true` is not `1`, `4.0` is not a step count), and every string is bounded and free of control
characters: what the spec accepts, the trainer and both databases accept too.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

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

MAX_PATH_CHARS = 4096  # PATH_MAX
MAX_NAME_BYTES = 255  # NAME_MAX: one path component
MAX_SEED = 2**32 - 1  # what every random generator the trainer seeds accepts
MAX_STEPS = 10_000_000


def _plain_text(value: str) -> str:
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise ValueError("must not hold control characters (NUL, newline, ...)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (`"\ud800"` in JSON)
        raise ValueError("must be valid Unicode text") from exc
    return value


def _path_text(value: str) -> str:
    _plain_text(value)
    if any(len(part.encode("utf-8")) > MAX_NAME_BYTES for part in value.split("/")):
        raise ValueError(f"each part of a path must be at most {MAX_NAME_BYTES} bytes long")
    return value


# A local path, a file id or a hub id.
PathText = Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS), AfterValidator(_path_text)]
# Floats accept JSON integers but not booleans; non-finite values are refused by `_Spec`'s config.
Number = Annotated[float, Field(strict=True)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TeacherSpec(_Spec):
    model: PathText = Field(description="Local Hugging Face directory, GGUF directory or hub id.")
    gguf_file: PathText | None = Field(default=None, description="GGUF file name inside `model`, if any.")
    dtype: DTypeName = Field(
        default="auto",
        description="Teacher weights' dtype: auto = bfloat16 on CUDA, float32 on CPU.",
    )


class StudentSpec(_Spec):
    model: PathText | None = Field(
        default=None, description="Pretrained student: directory, GGUF dir or hub id."
    )
    gguf_file: PathText | None = None
    from_teacher_layers: list[Annotated[StrictInt, Field(ge=0, le=4095)]] | None = Field(
        default=None,
        max_length=4096,
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
    train: PathText = Field(description="JSONL path (CLI) or uploaded file id (API).")
    eval: PathText | None = Field(default=None, description="Optional JSONL path or file id for evaluation.")
    format: Literal["instruction", "chat", "text"] = "instruction"
    max_length: StrictInt = Field(default=512, ge=8, le=131072)
    max_prompt_length: StrictInt = Field(default=256, ge=1, le=131072)
    skip_invalid: StrictBool = Field(default=False, description="Skip (and count) malformed records.")

    @model_validator(mode="after")
    def _prompt_fits(self) -> DataSpec:
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        return self


def _param_field(param: LossParam) -> Any:
    strict = {} if param.choices is not None else {"strict": True}
    return Field(default=param.default, description=param.description, **strict, **param.bounds())


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
    fused: StrictBool = Field(default=True, description="Use the chunked fused loss (memory-bounded).")
    chunk_size: StrictInt | None = Field(
        default=None, ge=1, le=1 << 20, description="Tokens per chunk of the fused loss."
    )

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
    replay_capacity: StrictInt = Field(default=1000, ge=1, le=1_000_000)
    threshold_increment: Number = Field(default=0.1, gt=0.0, le=1.0)
    loss_rise_tolerance: Number = Field(
        default=0.1, ge=0.0, le=100.0, description="Validation-loss rise that bumps θ."
    )
    max_new_tokens: StrictInt | None = Field(
        default=None, ge=1, le=131072, description="Default: max_length − prompt."
    )
    temperature: Number = Field(default=1.0, gt=0.0, le=100.0)
    top_p: Number = Field(default=1.0, gt=0.0, le=1.0)


class TrainingSpec(_Spec):
    max_steps: StrictInt = Field(default=200, ge=1, le=MAX_STEPS)
    batch_size: StrictInt = Field(default=8, ge=1, le=4096)
    grad_accum: StrictInt = Field(default=1, ge=1, le=4096)
    learning_rate: Number = Field(default=1.0e-4, gt=0.0, le=1.0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: StrictInt = Field(default=0, ge=0, le=MAX_STEPS)
    weight_decay: Number = Field(default=0.01, ge=0.0, le=1.0)
    max_grad_norm: Number = Field(default=1.0, ge=0.0, le=1e6, description="0 disables clipping.")
    seed: StrictInt = Field(default=10, ge=0, le=MAX_SEED)
    checkpoint_every: StrictInt = Field(
        default=50, ge=0, le=MAX_STEPS, description="0 means never (the final student is kept)."
    )
    eval_every: StrictInt = Field(default=50, ge=0, le=MAX_STEPS, description="0 means never.")
    precision: Literal["auto", "float32", "bf16"] = Field(
        default="auto", description="auto = bf16 autocast on CUDA, float32 on CPU."
    )
    gradient_checkpointing: StrictBool = False
    keep_checkpoints: StrictInt | None = Field(
        default=2,
        ge=1,
        le=100_000,
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

    max_records: StrictInt = Field(
        default=64, ge=1, le=1_000_000, description="Eval records used per evaluation."
    )
    max_new_tokens: StrictInt = Field(default=128, ge=1, le=4096)
    do_sample: StrictBool = False
    temperature: Number = Field(default=1.0, gt=0.0, le=100.0)
    top_p: Number = Field(default=1.0, gt=0.0, le=1.0)
    batch_size: StrictInt = Field(default=8, ge=1, le=4096)
    num_samples_logged: StrictInt = Field(default=3, ge=0, le=50)


class ResourcesSpec(_Spec):
    """The devices a job trains on: `devices` ranks per machine, launched by `torch.distributed.run`.

    `ddp` replicates the student on every rank; `fsdp` (FSDP2) shards it, its gradients and its optimizer
    state. The global batch (`training.batch_size` × `grad_accum`), the loss normalization and the data
    order are those of one device. Several machines (`nnodes` > 1) are for `distill train` run on each of
    them with the same `rdzv_endpoint`; the service trains a job on one machine."""

    devices: StrictInt = Field(default=1, ge=1, le=64, description="Ranks (devices) per machine.")
    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp", description="ddp replicates the student; fsdp shards it (FSDP2)."
    )
    nnodes: StrictInt = Field(default=1, ge=1, le=1024, description="Machines (distill train only).")
    rdzv_endpoint: Annotated[str, Field(min_length=3, max_length=300), AfterValidator(_plain_text)] | None = (
        Field(default=None, description="host:port of the rendezvous when nnodes > 1 (distill train only).")
    )
    # The service checks it against DISTILL_QUEUES when the job is created; `distill train` ignores it.
    queue: Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_plain_text)] | None = Field(
        default=None,
        description="The device class (worker queue) to run on, one of the service's DISTILL_QUEUES; "
        "default: the default queue.",
    )

    @property
    def world_size(self) -> int:
        return self.devices * self.nnodes

    @model_validator(mode="after")
    def _rendezvous(self) -> ResourcesSpec:
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError("resources.rdzv_endpoint (host:port) is needed when resources.nnodes > 1")
        return self


def _tracking_name(value: str) -> str:
    _plain_text(value)
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def _model_name(value: str) -> str:
    _tracking_name(value)
    # MLflow's own rule for registered model names: no '/' or ':', and not a relative path part.
    if "/" in value or ":" in value:
        raise ValueError("must not hold '/' or ':'")
    if value == "." or value.startswith(".."):
        raise ValueError("must not be '.' or start with '..'")
    return value


# MLflow stores experiment and registered model names in 256 characters, run names in 250.
TrackingName = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_tracking_name)]
RunName = Annotated[str, Field(min_length=1, max_length=250), AfterValidator(_tracking_name)]
ModelName = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_model_name)]


class MlflowSpec(_Spec):
    """Log the job to MLflow: params, tags and metrics into one run, and the student as a `transformers`
    model. The tracking server is the service's (DISTILL_MLFLOW_TRACKING_URI), never one the spec names:
    a job must not make workers call arbitrary URLs."""

    experiment: TrackingName = Field(default="distillery", description="Experiment name (created if new).")
    run_name: RunName | None = Field(default=None, description="Run name; default MLflow's generated one.")
    register_as: ModelName | None = Field(
        default=None, description="Register the student as a new version of this registered model."
    )


class TrackingSpec(_Spec):
    """Experiment trackers the job reports to (the service only; `distill train` ignores it)."""

    mlflow: MlflowSpec | None = None


class JobSpec(_Spec):
    teacher: TeacherSpec
    student: StudentSpec
    data: DataSpec
    loss: LossSpec = Field(default_factory=LossSpec)
    kd_ratio: Number = Field(default=1.0, ge=0.0, le=1.0, description="kd_ratio·KD + (1 − kd_ratio)·CE.")
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    tracking: TrackingSpec | None = Field(default=None, description="Experiment tracking (MLflow).")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    @model_validator(mode="after")
    def _batch_splits_across_ranks(self) -> JobSpec:
        ranks = self.resources.world_size
        if self.training.batch_size % ranks:
            raise ValueError(
                f"training.batch_size ({self.training.batch_size}) must be a multiple of the {ranks} ranks "
                "(resources.devices × resources.nnodes): each rank takes an equal slice of every micro-batch"
            )
        return self

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
