"""Evaluation: ROUGE-L F1, batched generation, and the validation loop run during training.

ROUGE-L follows the `rouge` package's default tokenization: lowercase, every run of characters other than
a-z and 0-9 becomes a space, split on whitespace, no stemming. Scores are F1 in [0, 1]; the metrics the
trainer and the CLI report (`eval_rouge_l`) are the same F1 × 100, the scale the papers use.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from core.distill.data import Example, collate, collate_prompts
from core.distill.objective import Objective, count_loss_tokens

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
ShouldStop = Callable[[], bool]


class Stopped(Exception):
    """A stop (cancel or pause) was requested during an evaluation or a generation; its results are
    incomplete and were dropped."""


class _StopRequested(StoppingCriteria):
    """Ends `generate` at the next token once `should_stop()` says so (it is asked once per token)."""

    def __init__(self, should_stop: ShouldStop) -> None:
        self.should_stop = should_stop
        self.triggered = False

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.triggered = self.triggered or bool(self.should_stop())
        return torch.full((input_ids.shape[0],), self.triggered, dtype=torch.bool, device=input_ids.device)


def _check(should_stop: ShouldStop | None) -> None:
    if should_stop is not None and should_stop():
        raise Stopped


# --------------------------------------------------------------------------------------------- ROUGE-L
def rouge_tokens(text: str) -> list[str]:
    """Lowercased alphanumeric words of `text`."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len a · len b) time, O(len b) memory)."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0] * (len(b) + 1)
        for j, token_b in enumerate(b, start=1):
            current[j] = previous[j - 1] + 1 if token_a == token_b else max(previous[j], current[j - 1])
        previous = current
    return previous[-1]


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """ROUGE-L F1 in [0, 1] against one reference, or the best over several."""
    if isinstance(references, str):
        references = [references]
    if not references:
        raise ValueError("rouge_l needs at least one reference")
    pred = rouge_tokens(prediction)
    best = 0.0
    for reference in references:
        ref = rouge_tokens(reference)
        lcs = lcs_length(pred, ref)
        if lcs:
            precision, recall = lcs / len(pred), lcs / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


# ------------------------------------------------------------------------------------------ generation
@dataclass(frozen=True)
class GenerationSettings:
    """How responses are decoded: greedy, or sampled with temperature and nucleus top-p."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8


def _generation_config(
    settings: GenerationSettings, *, pad_id: int, eos_id: int | list[int]
) -> GenerationConfig:
    # Every knob is explicit: generate() fills unset ones from the model's own generation_config (a
    # checkpoint's top_k=50 or repetition penalty would silently change what "top-p 1" means).
    sampling = {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
    if not settings.do_sample:
        sampling = {}
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        **sampling,
    )


@torch.no_grad()
def generate_responses(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings,
    *,
    pad_id: int,
    eos_id: int | list[int],
    should_stop: ShouldStop | None = None,
) -> list[list[int]]:
    """Response token ids for each prompt (left-padded batches), cut after the first eos (kept).

    `should_stop` is asked before each batch and after each generated token; when it says yes, `Stopped`
    is raised (within one token of the request)."""
    eos_ids = {eos_id} if isinstance(eos_id, int) else set(eos_id)
    config = _generation_config(settings, pad_id=pad_id, eos_id=eos_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    responses: list[list[int]] = []
    stop = _StopRequested(should_stop) if should_stop is not None else None
    try:
        for start in range(0, len(prompts), settings.batch_size):
            _check(should_stop)
            input_ids, attention_mask = collate_prompts(
                [list(p) for p in prompts[start : start + settings.batch_size]], pad_id
            )
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([stop] if stop is not None else []),
            )
            if stop is not None and stop.triggered:
                raise Stopped
            for row in output[:, input_ids.shape[1] :].tolist():
                cut = next((i + 1 for i, tok in enumerate(row) if tok in eos_ids), len(row))
                responses.append(row[:cut])
    finally:
        model.train(was_training)
    return responses


def rouge_l_of_model(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    settings: GenerationSettings,
    *,
    seeds: Sequence[int] = (0,),
    should_stop: ShouldStop | None = None,
) -> tuple[float, list[str]]:
    """Mean ROUGE-L F1 × 100 of generated responses, averaged over `seeds`; also the first seed's texts."""
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    prompts = [ex.prompt_ids for ex in examples]
    scores, first_texts = [], []
    for i, seed in enumerate(seeds):
        # Sampling draws from the global generator; fork it so evaluation never shifts training's stream.
        with torch.random.fork_rng(devices=_cuda_devices(model)):
            torch.manual_seed(seed)
            responses = generate_responses(
                model, prompts, settings, pad_id=pad_id, eos_id=eos_id, should_stop=should_stop
            )
        texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
        if i == 0:
            first_texts = texts
        scores.extend(rouge_l(t, ex.reference) for t, ex in zip(texts, examples, strict=True))
    return 100.0 * sum(scores) / max(1, len(scores)), first_texts


def _cuda_devices(model: nn.Module) -> list[int]:
    device = next(model.parameters()).device
    return [device.index or 0] if device.type == "cuda" else []


# ------------------------------------------------------------------------------------- validation loop
@dataclass
class EvalResult:
    """Validation metrics (`eval_ce_loss`, `eval_kd_loss`, `eval_loss`, `eval_rouge_l`) and a few samples."""

    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)


@torch.no_grad()
def evaluate(
    student: nn.Module,
    teacher: nn.Module,
    objective: Objective,
    tokenizer: Any,
    examples: Sequence[Example],
    settings: GenerationSettings,
    *,
    num_samples: int = 3,
    seeds: Sequence[int] = (0,),
    loss_overrides: dict[str, Any] | None = None,
    should_stop: ShouldStop | None = None,
) -> EvalResult:
    """CE and KD loss (per response token) on `examples`, ROUGE-L of the student's responses, and samples.

    Raises `Stopped` when `should_stop` says yes between two batches or two generated tokens."""
    device = next(student.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = student.training
    student.eval()
    kd_sum = ce_sum = 0.0
    tokens = 0
    try:
        for start in range(0, len(examples), settings.batch_size):
            _check(should_stop)
            batch = collate(list(examples[start : start + settings.batch_size]), pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            count = count_loss_tokens(batch)
            if count == 0:
                continue
            targets = objective.teacher_targets(teacher, batch)
            terms = objective.student_losses(
                student, teacher, targets, batch, normalizer=1.0, **(loss_overrides or {})
            )
            kd_sum += terms.kd.item()
            ce_sum += terms.ce.item()
            tokens += count
    finally:
        student.train(was_training)
    kd, ce = kd_sum / max(1, tokens), ce_sum / max(1, tokens)
    rouge, texts = rouge_l_of_model(
        student, tokenizer, examples, settings, seeds=seeds, should_stop=should_stop
    )
    metrics = {
        "eval_ce_loss": ce,
        "eval_kd_loss": kd,
        "eval_loss": objective.kd_ratio * kd + (1.0 - objective.kd_ratio) * ce,
        "eval_rouge_l": rouge,
    }
    samples = [
        {
            "prompt": tokenizer.decode(ex.prompt_ids, skip_special_tokens=True),
            "reference": ex.reference,
            "generated": text,
        }
        for ex, text in zip(examples[:num_samples], texts[:num_samples], strict=True)
    ]
    return EvalResult(metrics=metrics, samples=samples)
