"""The distillation recipe: set up, train, evaluate, checkpoint, save. Configured only by a `JobSpec`.

    result = train(spec, output_dir=Path("runs/x"), callbacks=MyCallbacks(),
                   resume_from=latest_checkpoint(Path("runs/x")))

One optimizer step = `grad_accum` micro-batches of `batch_size` examples. Every loss is a sum over response
tokens divided by the number of response tokens in the whole step, so accumulating micro-batches gives the
gradient of the one large batch. The student trains in float32 (bf16 autocast on CUDA); the teacher runs in
eval mode without gradients, in its own dtype.

With `spec.resources.devices` > 1, `train` runs in each of the ranks torchrun started and the ranks split
every micro-batch (`core.distill.distributed`: same global batch, normalization and data order as on one
device); only rank 0 calls the callbacks and writes checkpoints and the student.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.distill import distributed, layout
from core.distill.callbacks import TrainerCallbacks
from core.distill.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_spec,
    load_trainer_state,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_aside_checkpoint,
    set_rng_state,
    storage_errors,
    sweep_leftovers,
    verify_checkpoint,
)
from core.distill.data import DistillDataset, Example, build_student_example, collate, load_records
from core.distill.evaluation import EvalResult, GenerationSettings, Stopped, evaluate, generate_responses
from core.distill.losses import TaidInterpolation
from core.distill.models import (
    check_tokenizers_compatible,
    effective_vocab_size,
    load_causal_lm,
    load_tokenizer,
    save_student,
    student_from_teacher_layers,
)
from core.distill.objective import Objective, count_loss_tokens, supports_fused
from core.distill.schedule import build_optimizer, build_scheduler
from core.distill.spec import JobSpec
from core.distill.strategies import DataOrder, DataStrategy, Source

__all__ = ["TrainResult", "TrainingError", "latest_checkpoint", "train"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, an unusable configuration); the message names the cause."""


@dataclass
class TrainResult:
    """Where a run ended. `student_dir` is None when the run was stopped before `max_steps`."""

    step: int
    metrics: dict[str, float]
    student_dir: Path | None
    stopped: bool = False
    checkpoint: Path | None = None


@dataclass
class _Run:
    """Everything the loop touches, built once by `_setup`."""

    spec: JobSpec
    output_dir: Path
    device: torch.device
    ranks: distributed.Ranks
    tokenizer: Any
    teacher: nn.Module
    student: nn.Module
    # What a training step calls: the student's loss module, under DDP or FSDP on several ranks.
    trainable: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_examples: list[Example]
    eval_examples: list[Example]
    order: DataOrder
    strategy: DataStrategy
    taid: TaidInterpolation | None
    callbacks: TrainerCallbacks
    step: int = 0
    last_metrics: dict[str, float] = field(default_factory=dict)
    # The evaluation of `step` was stopped before it finished: a resume runs it before the next step.
    eval_pending: bool = False

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------- setup
def _pick_device(device: str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast_dtype(spec: JobSpec, device: torch.device) -> torch.dtype | None:
    precision = spec.training.precision
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _teacher_dtype(spec: JobSpec, device: torch.device) -> torch.dtype:
    if spec.teacher.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[spec.teacher.dtype]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load_examples(spec: JobSpec, tokenizer: Any) -> tuple[list[Example], list[Example], str]:
    """Training examples, the first `evaluation.max_records` eval examples, and a line for the event log."""
    data = spec.data
    lengths = {"max_length": data.max_length, "max_prompt_length": data.max_prompt_length}
    loaded = load_records(data.train, data.format, skip_invalid=data.skip_invalid)
    train_set = DistillDataset(loaded.records, tokenizer, data.format, **lengths)
    if not train_set.examples:
        raise TrainingError(f"{data.train}: no example keeps a response token within max_length")
    eval_examples: list[Example] = []
    if data.eval is not None:
        eval_loaded = load_records(data.eval, data.format, skip_invalid=data.skip_invalid)
        records = eval_loaded.records[: spec.evaluation.max_records]
        eval_examples = DistillDataset(records, tokenizer, data.format, **lengths).examples
    message = (
        f"{len(train_set)} training examples ({loaded.skipped} invalid lines skipped, {train_set.dropped} "
        f"without a response token after truncation); {len(eval_examples)} eval examples"
    )
    return train_set.examples, eval_examples, message


def _setup(
    spec: JobSpec,
    output_dir: Path,
    callbacks: TrainerCallbacks,
    resume_from: Path | None,
    device: torch.device,
    ranks: distributed.Ranks | None = None,
) -> _Run:
    ranks = ranks or distributed.Ranks()
    _seed_everything(spec.training.seed)
    event = callbacks.on_event

    event("load", f"loading tokenizer and teacher {spec.teacher.model}")
    tokenizer = load_tokenizer(spec.teacher.model, spec.teacher.gguf_file)
    if spec.student.model is not None:
        # Checked before any model is loaded: a mismatch is a configuration error, not a training failure.
        check_tokenizers_compatible(tokenizer, load_tokenizer(spec.student.model, spec.student.gguf_file))
    if tokenizer.eos_token_id is None:
        raise TrainingError("the tokenizer has no eos token")

    # Loaded straight in its own dtype (a float32 copy of a large teacher may not fit); a student cut from
    # a bf16 teacher starts from its bf16-rounded weights, in float32.
    teacher = load_causal_lm(
        spec.teacher.model, spec.teacher.gguf_file, dtype=_teacher_dtype(spec, device), device=device
    )
    if resume_from is not None:
        event("load", f"loading student from checkpoint {resume_from}")
        student = load_causal_lm(resume_from, dtype=torch.float32, device=device)
    elif spec.student.from_teacher_layers is not None:
        student = student_from_teacher_layers(teacher, spec.student.from_teacher_layers, dtype=torch.float32)
    else:
        student = load_causal_lm(
            spec.student.model, spec.student.gguf_file, dtype=torch.float32, device=device
        )
    teacher.eval().requires_grad_(False)
    student.train()
    if spec.training.gradient_checkpointing:
        # transformers 5 renamed the switch; 4.x only has the old name.
        enable = (
            getattr(student, "activation_checkpointing_enable", None) or student.gradient_checkpointing_enable
        )
        enable()
    vocab_size = effective_vocab_size(teacher, student, tokenizer)

    train_examples, eval_examples, message = _load_examples(spec, tokenizer)
    event("data", message)

    sample_ids = torch.tensor([train_examples[0].input_ids[:16]], device=device)
    fused = spec.loss.fused and supports_fused(student, sample_ids) and supports_fused(teacher, sample_ids)
    if spec.loss.fused and not fused:
        event(
            "warning", "a model post-processes its logits (bias, soft-capping, scaling): using the naive loss"
        )
    objective = Objective(
        spec, vocab_size=vocab_size, fused=fused, autocast_dtype=_autocast_dtype(spec, device)
    )
    if ranks.rank > 0:
        # Each rank samples its own on-policy responses; rank 0 keeps the one-device stream.
        torch.manual_seed(spec.training.seed + ranks.rank)

    t = spec.training
    trainable = distributed.wrap_student(student, objective, ranks, device)
    # Over the wrapped module's parameters: under FSDP they are the student's shards.
    optimizer = build_optimizer(trainable, learning_rate=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = build_scheduler(
        optimizer, name=t.scheduler, warmup_steps=t.warmup_steps, total_steps=t.max_steps
    )
    taid = None
    if spec.loss.name == "taid":
        taid = TaidInterpolation(
            spec.loss.taid_t_start, spec.loss.taid_beta_lr, spec.loss.taid_momentum, t.max_steps
        )
    run = _Run(
        spec=spec,
        output_dir=output_dir,
        device=device,
        ranks=ranks,
        tokenizer=tokenizer,
        teacher=teacher,
        student=student,
        trainable=trainable,
        objective=objective,
        optimizer=optimizer,
        scheduler=scheduler,
        train_examples=train_examples,
        eval_examples=eval_examples,
        order=DataOrder(len(train_examples), seed=t.seed),
        strategy=DataStrategy(spec.strategy, total_steps=t.max_steps, seed=t.seed),
        taid=taid,
        callbacks=callbacks,
    )
    if resume_from is not None:
        _restore(run, resume_from)
    return run


def _trainer_state(run: _Run, optimizer: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's trainer state (collective: every rank's RNG streams go into it)."""
    return {
        "step": run.step,
        "optimizer": optimizer,
        "scheduler": run.scheduler.state_dict(),
        "rng": rng_state(),
        "rng_ranks": run.ranks.gather([rng_state()]) if run.ranks.is_distributed else None,
        "data": run.order.state_dict(),
        "strategy": run.strategy.state_dict(),
        "taid": run.taid.state_dict() if run.taid is not None else None,
        "metrics": run.last_metrics,
        "eval_pending": run.eval_pending,
    }


def _restore(run: _Run, checkpoint: Path) -> None:
    state = load_trainer_state(checkpoint)
    stored = load_checkpoint_spec(checkpoint)
    if stored.model_dump(exclude={"training"}) != run.spec.model_dump(exclude={"training"}):
        run.callbacks.on_event(
            "warning", f"resuming {checkpoint} with a spec that differs from its spec.json"
        )
    run.step = int(state["step"])
    distributed.load_optimizer_state(run.trainable, run.optimizer, state["optimizer"], checkpoint)
    run.scheduler.load_state_dict(state["scheduler"])
    run.order.load_state_dict(state["data"])
    run.strategy.load_state_dict(state["strategy"])
    if run.taid is not None and state["taid"] is not None:
        run.taid.load_state_dict(state["taid"])
    run.last_metrics = dict(state.get("metrics") or {})
    run.eval_pending = bool(state.get("eval_pending", False))
    # Last: everything above may draw random numbers; the loop must continue the saved streams.
    streams = state.get("rng_ranks")
    if run.ranks.is_distributed and streams is not None and len(streams) == run.ranks.world_size:
        set_rng_state(streams[run.ranks.rank])
    else:
        set_rng_state(state["rng"])


def _set_aside_corrupt(output_dir: Path, resume_from: Path | None, callbacks: TrainerCallbacks) -> None:
    """Rename the checkpoints newer than `resume_from` (all, when starting afresh) that fail verification,
    with a warning each: they are never resumed from, and their steps are written again."""
    after = -1 if resume_from is None else layout.parse_checkpoint_name(Path(resume_from).name)
    if after is None:  # resuming from a directory outside the run's checkpoints/
        return
    for step, path in list_checkpoints(output_dir):
        if step > after and (problem := verify_checkpoint(path)) is not None:
            callbacks.on_checkpoint_set_aside(step, set_aside_checkpoint(path), problem)


def _step_snapshot(run: _Run) -> dict[str, Any]:
    """What an on-policy step changes before its first backward pass (see `_rollback`)."""
    return {"rng": rng_state(), "data": run.order.state_dict(), "strategy": run.strategy.state_dict()}


def _rollback(run: _Run, snapshot: dict[str, Any]) -> None:
    """Undo a step stopped while it generated: the model and optimizer were not touched yet, so putting the
    data position, the strategy and the RNG streams back gives exactly the state after the previous step."""
    run.order.load_state_dict(snapshot["data"])
    run.strategy.load_state_dict(snapshot["strategy"])
    set_rng_state(snapshot["rng"])


# -------------------------------------------------------------------------------------------- one step
def _student_examples(run: _Run, examples: list[Example]) -> list[Example]:
    """On-policy samples: the student's responses to the batch's prompts, labelled like dataset examples."""
    strategy, data = run.spec.strategy, run.spec.data
    prompts = [ex.prompt_ids for ex in examples]
    longest = max(len(p) for p in prompts)
    settings = GenerationSettings(
        max_new_tokens=strategy.max_new_tokens or max(1, data.max_length - longest),
        do_sample=True,
        temperature=strategy.temperature,
        top_p=strategy.top_p,
        batch_size=len(prompts),
    )
    eos = run.tokenizer.eos_token_id
    with distributed.whole_student(run.trainable):
        responses = generate_responses(
            run.student, prompts, settings, pad_id=run.pad_id, eos_id=eos, should_stop=_stop_check(run)
        )
    return [
        build_student_example(p, r, eos, data.max_length) for p, r in zip(prompts, responses, strict=True)
    ]


def _stop_check(run: _Run) -> Any:
    """What evaluations and generations poll: the callbacks' `should_stop` on one rank. Several ranks never
    stop inside one (they would leave it at different points): their stop is agreed after every step."""
    return None if run.ranks.is_distributed else run.callbacks.should_stop


def _step_batches(run: _Run, source: Source) -> tuple[list[dict[str, torch.Tensor]], float]:
    """This rank's share of the step's micro-batches from `source` (on the device), and seconds spent
    generating. Every rank draws the whole micro-batch and keeps its slice, so the data order, the strategy
    and the replay buffer are those of one device, on every rank."""
    batch_size, generation_s, ranks = run.spec.training.batch_size, 0.0, run.ranks
    batches = []
    for _ in range(run.spec.training.grad_accum):
        # The dataset position advances whatever the source, as DistiLLM's loop over its dataloader does.
        examples = ranks.shard([run.train_examples[i] for i in run.order.take(batch_size)])
        if source is Source.STUDENT:
            start = time.perf_counter()
            examples = _student_examples(run, examples)
            generation_s += time.perf_counter() - start
            if run.spec.strategy.name == "adaptive":
                run.strategy.buffer.add(ranks.gather(examples))
        elif source is Source.REPLAY:
            examples = ranks.shard(run.strategy.buffer.sample(batch_size, run.strategy.generator))
        batches.append({k: v.to(run.device) for k, v in collate(examples, run.pad_id).items()})
    return batches, generation_s


def _train_step(run: _Run, step: int) -> dict[str, float]:
    """One optimizer step (1-based `step`); returns its metrics."""
    started = time.perf_counter()
    source = run.strategy.choose(step)
    batches, generation_s = _step_batches(run, source)
    # The normalizer is the whole step's count, over every rank: the ranks' gradients then sum to the
    # one-device gradient.
    local_tokens = [
        sum(count_loss_tokens(b) for b in batches),
        sum(int(b["attention_mask"].sum()) for b in batches),
    ]
    loss_tokens, tokens = run.ranks.sum(local_tokens)
    normalizer = float(max(1.0, loss_tokens))
    overrides = {"t": run.taid.t} if run.taid is not None else {}
    lr = run.scheduler.get_last_lr()[0]

    sums = [0.0, 0.0, 0.0]
    teacher_s = student_s = 0.0
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        targets = run.objective.teacher_targets(run.teacher, batch)
        teacher_s += time.perf_counter() - start
        start = time.perf_counter()
        with distributed.accumulating(run.trainable, last=i == len(batches) - 1):
            scaled, loss, kd, ce = run.trainable(run.teacher, targets, batch, normalizer, overrides)
            if not run.ranks.is_distributed and not torch.isfinite(loss):
                raise TrainingError(f"non-finite loss ({loss.item()}) at step {step}")
            scaled.backward()
        student_s += time.perf_counter() - start
        for j, term in enumerate((loss, kd, ce)):
            sums[j] += term.item()
    totals = dict(zip(("loss", "kd_loss", "ce_loss"), run.ranks.sum(sums), strict=True))
    if not math.isfinite(totals["loss"]):  # every rank sees the same sum, so every rank stops here
        raise TrainingError(f"non-finite loss ({totals['loss']}) at step {step}")

    max_norm = run.spec.training.max_grad_norm
    params = [p for p in run.trainable.parameters() if p.requires_grad]
    grad_norm = distributed.clip_gradients(params, max_norm if max_norm > 0 else math.inf)
    if not math.isfinite(grad_norm):
        raise TrainingError(f"non-finite gradient norm ({grad_norm}) at step {step}")
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)

    step_time_s = time.perf_counter() - started
    metrics = totals | {
        "lr": lr,
        "grad_norm": grad_norm,
        "step_time_s": step_time_s,
        "tokens_per_s": tokens / step_time_s,
        "teacher_time_s": teacher_s,
        "student_time_s": student_s,
        "response_tokens": normalizer,
    }
    if run.spec.strategy.name != "off_policy":
        metrics |= {"generation_time_s": generation_s, "on_policy": float(source is Source.STUDENT)}
        metrics |= {"replayed": float(source is Source.REPLAY)} | run.strategy.stats()
    if run.taid is not None:
        metrics["taid_t"] = run.taid.t
        run.taid.update(step, totals["loss"])
    return metrics


# ------------------------------------------------------------------------------------ eval, checkpoint
def _evaluate(run: _Run, step: int) -> EvalResult:
    """Evaluate at `step`; raises `Stopped` (leaving `eval_pending` set) when a stop arrives meanwhile."""
    e = run.spec.evaluation
    settings = GenerationSettings(
        max_new_tokens=e.max_new_tokens,
        do_sample=e.do_sample,
        temperature=e.temperature,
        top_p=e.top_p,
        batch_size=e.batch_size,
    )
    overrides = {"t": run.taid.t} if run.taid is not None else {}
    run.eval_pending = True
    # Every rank evaluates the whole set (under FSDP they all take part in every forward pass); rank 0's
    # metrics are everyone's, so the strategy's θ never differs between ranks.
    with distributed.whole_student(run.trainable):
        result = evaluate(
            run.student,
            run.teacher,
            run.objective,
            run.tokenizer,
            run.eval_examples,
            settings,
            num_samples=e.num_samples_logged,
            seeds=(run.spec.training.seed,),
            loss_overrides=overrides,
            should_stop=_stop_check(run),
        )
    result.metrics = run.ranks.broadcast(result.metrics)
    run.eval_pending = False
    if run.strategy.after_eval(result.metrics["eval_loss"]):
        run.callbacks.on_event(
            "strategy", f"validation loss rose at step {step}: θ = {run.strategy.theta:.2f}"
        )
    result.metrics |= run.strategy.stats()
    run.callbacks.on_eval(step, result.metrics, result.samples)
    return result


def _checkpoint(run: _Run) -> Path:
    """Checkpoint the current step (collective: under FSDP every rank writes its optimizer shards and
    sends rank 0 its weights; rank 0 writes the rest). Returns the path on every rank."""
    optimizer = distributed.optimizer_state(run.trainable, run.optimizer)
    sharded = None
    if distributed.is_sharded(run.trainable):
        # Tensors only into the sharded files; the param groups (numbers) go into trainer_state.json.
        sharded = layout.checkpoints_dir(run.output_dir) / f".sharded-{layout.checkpoint_name(run.step)}"
        distributed.save_sharded({"state": optimizer["state"]}, sharded, run.ranks)
        optimizer = {"param_groups": optimizer["param_groups"]}
    state = _trainer_state(run, optimizer)
    student = distributed.full_student(run.trainable, run.student, run.ranks)
    path = None
    if run.ranks.is_main:
        path = save_checkpoint(
            run.output_dir,
            run.step,
            student=student,
            tokenizer=run.tokenizer,
            spec=run.spec,
            trainer_state=state,
            sharded=sharded,
        )
        sweep_leftovers(run.output_dir)
        keep = run.spec.training.keep_checkpoints
        if keep is not None:
            for skipped in prune_checkpoints(run.output_dir, keep=keep, current=path):
                run.callbacks.on_checkpoint_set_aside(skipped.step, skipped.path, skipped.problem)
        run.callbacks.on_checkpoint(run.step, path, dict(run.last_metrics))
    return run.ranks.broadcast(path)


def _stopped(run: _Run, last_checkpoint: Path | None) -> TrainResult:
    """End a stopped run with a checkpoint of its current step (none before the first step)."""
    if run.step > 0 and (last_checkpoint is None or layout.checkpoint_step(last_checkpoint) != run.step):
        last_checkpoint = _checkpoint(run)
    run.callbacks.on_event("stopped", f"stopped at step {run.step}")
    return TrainResult(run.step, dict(run.last_metrics), None, stopped=True, checkpoint=last_checkpoint)


# ------------------------------------------------------------------------------------------------ train
def train(
    spec: JobSpec,
    *,
    output_dir: Path,
    callbacks: TrainerCallbacks | None = None,
    resume_from: Path | None = None,
    device: str | None = None,
) -> TrainResult:
    """Distill `spec.teacher` into the student; checkpoints under `output_dir/checkpoints`, the final
    student in `output_dir/student`. Raises `TrainingError` on a non-finite loss (naming the step),
    `TokenizerMismatchError` before training when the tokenizers disagree, `CheckpointError` when
    `resume_from` does not verify, and `StorageFullError` when the disk fills up while saving.

    A stop (`callbacks.should_stop()`) is honoured between steps, and within an evaluation or a generation
    at the next batch or token: the run then checkpoints its last complete step and returns `stopped`.

    Under torchrun (`spec.resources`), every rank calls `train`; `callbacks` and `resume_from` are only
    read on rank 0, whose stop decision every rank follows (after each step, not within an evaluation or a
    generation).
    Raises `LaunchError` when the launched ranks do not match `spec.resources`."""
    output_dir = Path(output_dir)
    ranks, torch_device = distributed.Ranks.start(spec.resources, _pick_device(device))
    try:
        return _train(spec, output_dir, callbacks or TrainerCallbacks(), resume_from, torch_device, ranks)
    finally:
        ranks.close()


def _train(
    spec: JobSpec,
    output_dir: Path,
    callbacks: TrainerCallbacks,
    resume_from: Path | None,
    device: torch.device,
    ranks: distributed.Ranks,
) -> TrainResult:
    if not ranks.is_main:
        callbacks = TrainerCallbacks()  # only rank 0 reports
    # Rank 0's choice: it alone may have fetched the checkpoints (object storage) or set some aside.
    resume_from = ranks.broadcast(resume_from)
    problem = None
    if ranks.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            problem = verify_checkpoint(resume_from)
        if problem is None:
            _set_aside_corrupt(output_dir, resume_from, callbacks)
    problem = ranks.broadcast(problem)
    if problem is not None:
        raise CheckpointError(f"cannot resume from {resume_from}: {problem}")
    run = _setup(spec, output_dir, callbacks, resume_from, device, ranks)
    t = spec.training
    evaluating = t.eval_every > 0 and bool(run.eval_examples)
    run.eval_pending = run.eval_pending and evaluating
    callbacks.on_start(total_steps=t.max_steps, start_step=run.step)
    # Only an on-policy or adaptive step generates, and so only such a step can be stopped halfway.
    generates = spec.strategy.name != "off_policy"

    last_checkpoint: Path | None = None
    try:
        if evaluating and (run.step == 0 or run.eval_pending):
            # The baseline before any update, or the evaluation a stop interrupted before the checkpoint.
            run.last_metrics |= _evaluate(run, run.step).metrics
        while run.step < t.max_steps:
            snapshot = _step_snapshot(run) if generates else None
            try:
                metrics = _train_step(run, run.step + 1)
            except Stopped:
                if snapshot is not None:
                    _rollback(run, snapshot)
                raise
            run.step += 1
            run.last_metrics |= metrics
            callbacks.on_step(run.step, metrics)
            if evaluating and (run.step % t.eval_every == 0 or run.step == t.max_steps):
                run.last_metrics |= _evaluate(run, run.step).metrics
            if t.checkpoint_every > 0 and run.step % t.checkpoint_every == 0:
                last_checkpoint = _checkpoint(run)
            if run.step < t.max_steps and ranks.agree(callbacks.should_stop()):
                return _stopped(run, last_checkpoint)
    except Stopped:
        return _stopped(run, last_checkpoint)

    student = distributed.full_student(run.trainable, run.student, ranks)
    student_dir = layout.student_dir(output_dir)
    if ranks.is_main:
        with storage_errors("the final student"):
            student_dir = save_student(student, run.tokenizer, student_dir)
        callbacks.on_event("done", f"saved the student to {student_dir}")
    ranks.barrier()
    return TrainResult(
        run.step, dict(run.last_metrics), student_dir, stopped=False, checkpoint=last_checkpoint
    )
