"""The training loop on tiny random models: learning, accumulation, fused vs naive, errors, callbacks."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from core.distill.data import IGNORE_INDEX, collate
from core.distill.models import TokenizerMismatchError
from core.distill.objective import Objective
from core.distill.spec import JobSpec
from core.distill.tiny import make_tiny_model, make_tiny_tokenizer
from core.distill.trainer import TrainingError, _setup, _train_step, train
from tests.core.distill._trainer_utils import Recorder, tiny_spec, write_subset


@pytest.fixture(scope="module")
def train4(tmp_path_factory, dolly_train_path) -> Path:
    return write_subset(dolly_train_path, tmp_path_factory.mktemp("data") / "train4.jsonl", 4)


@pytest.fixture(scope="module")
def train16(tmp_path_factory, dolly_train_path) -> Path:
    return write_subset(dolly_train_path, tmp_path_factory.mktemp("data") / "train16.jsonl", 16)


def test_tiny_run_lowers_the_kd_loss_and_saves_a_loadable_student(
    tmp_path, tiny_teacher_dir, tiny_student_dir, train4, monkeypatch
):
    """The same 4 examples every step: the distillation loss must fall, and every metric is reported."""
    spec = tiny_spec(
        tiny_teacher_dir, tiny_student_dir, train4, training={"max_steps": 12, "learning_rate": 1e-2}
    )
    batch_tokens: list[tuple[int, int]] = []  # (attention tokens, loss tokens) of each collated batch

    def counting_collate(examples, pad_token_id):
        batch = collate(examples, pad_token_id)
        loss_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        batch_tokens.append((int(batch["attention_mask"].sum()), loss_tokens))
        return batch

    monkeypatch.setattr("core.distill.trainer.collate", counting_collate)
    recorder = TimedRecorder()
    result = train(spec, output_dir=tmp_path, callbacks=recorder, device="cpu")

    assert recorder.started == [(12, 0)]
    assert sorted(recorder.steps) == list(range(1, 13))
    first, last = recorder.steps[1], recorder.steps[12]
    assert last["kd_loss"] < 0.5 * first["kd_loss"]
    for key in (
        "loss",
        "kd_loss",
        "ce_loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "teacher_time_s",
        "student_time_s",
    ):
        assert key in last and last[key] == last[key]  # present and not NaN
    assert first["loss"] == pytest.approx(first["kd_loss"])  # kd_ratio 1

    # Every step's metrics mean what they say (a time or a rate of 0, a wrong lr would pass the above).
    assert len(batch_tokens) == 12  # one batch a step (batch 4, no accumulation, no eval)
    for step, metrics in recorder.steps.items():
        tokens, loss_tokens = batch_tokens[step - 1]
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
            assert math.isfinite(metrics[key]) and metrics[key] >= 0, (step, key, metrics[key])
        assert metrics["loss"] == pytest.approx(metrics["kd_loss"]), step  # kd_ratio 1, every step
        assert metrics["grad_norm"] > 0, step
        # The same 4 examples every step: the same loss tokens, counted from the batch the step ran on.
        assert metrics["response_tokens"] == loss_tokens == batch_tokens[0][1] > 0, step
        assert loss_tokens < tokens <= spec.training.batch_size * spec.data.max_length, step
        # Cosine decay from the peak over 12 steps, no warm-up; each step reports the lr it ran with.
        expected_lr = 1e-2 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 12))
        assert metrics["lr"] == pytest.approx(expected_lr, rel=1e-6), step
        # Times are real durations inside the step, which the callbacks' clock brackets.
        teacher_s, student_s = metrics["teacher_time_s"], metrics["student_time_s"]
        assert teacher_s > 0 and student_s > 0, step
        step_s = recorder.step_wall_s[step]  # from the previous callback to this step's on_step
        assert teacher_s + student_s < step_s, (step, teacher_s, student_s, step_s)
        # tokens_per_s = the step's tokens / the step's duration, which lies between the forward and
        # backward passes alone and the wall time around the whole step.
        rate = metrics["tokens_per_s"]
        assert tokens / step_s <= rate <= tokens / (teacher_s + student_s), (step, rate, tokens)
        # The step's own duration: the forward and backward passes plus the optimizer, within the wall time.
        assert teacher_s + student_s < metrics["step_time_s"] <= step_s, step
        assert rate == pytest.approx(tokens / metrics["step_time_s"]), step
    assert [recorder.steps[s]["lr"] for s in range(1, 13)] == sorted(
        (recorder.steps[s]["lr"] for s in range(1, 13)), reverse=True
    )
    assert result.step == 12 and not result.stopped
    assert result.student_dir == tmp_path / "student"
    loaded = AutoModelForCausalLM.from_pretrained(result.student_dir)
    assert loaded.config.num_hidden_layers == 2
    assert not (tmp_path / "checkpoints").exists()  # checkpoint_every 0


class TimedRecorder(Recorder):
    """A Recorder that also notes, for each step, the wall time since the previous callback (on_start for
    step 1): an upper bound on the step's own duration."""

    def __init__(self) -> None:
        super().__init__()
        self.step_wall_s: dict[int, float] = {}
        self._last = time.perf_counter()

    def on_start(self, *, total_steps: int, start_step: int) -> None:
        super().on_start(total_steps=total_steps, start_step=start_step)
        self._last = time.perf_counter()

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        self.step_wall_s[step] = now - self._last
        super().on_step(step, metrics)
        self._last = time.perf_counter()


def _one_step(spec, tmp_path, device="cpu"):
    """Run one optimizer step of `spec`; return its metrics and the gradients the optimizer saw."""
    run = _setup(spec, tmp_path, Recorder(), None, torch.device(device))
    grads: dict[str, torch.Tensor] = {}

    def capture(optimizer, args, kwargs) -> None:
        grads.update(
            {n: p.grad.detach().clone() for n, p in run.student.named_parameters() if p.grad is not None}
        )

    run.optimizer.register_step_pre_hook(capture)
    metrics = _train_step(run, 1)
    return metrics, grads


def _assert_same_step(a, b, rtol=1e-4, atol=1e-6):
    (metrics_a, grads_a), (metrics_b, grads_b) = a, b
    for key in ("loss", "kd_loss", "ce_loss", "grad_norm", "response_tokens"):
        assert metrics_a[key] == pytest.approx(metrics_b[key], rel=rtol, abs=atol), key
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)


def test_grad_accumulation_equals_one_large_batch(tmp_path, tiny_teacher_dir, tiny_student_dir, train16):
    """batch 4 × accum 1 and batch 2 × accum 2 see the same 4 examples: same loss, same gradients."""
    common = {"max_grad_norm": 0.0}
    one = tiny_spec(tiny_teacher_dir, tiny_student_dir, train16, training=common | {"batch_size": 4})
    two = tiny_spec(
        tiny_teacher_dir, tiny_student_dir, train16, training=common | {"batch_size": 2, "grad_accum": 2}
    )
    _assert_same_step(_one_step(one, tmp_path / "a"), _one_step(two, tmp_path / "b"))


@pytest.mark.parametrize("loss", ["amid", "taid", "fkl"])
def test_fused_and_naive_steps_agree(tmp_path, tiny_teacher_dir, tiny_student_dir, train16, loss):
    specs = [
        tiny_spec(
            tiny_teacher_dir,
            tiny_student_dir,
            train16,
            loss={"name": loss, "fused": fused},
            kd_ratio=0.7,
            training={"max_grad_norm": 0.0},
        )
        for fused in (True, False)
    ]
    fused_step, naive_step = (_one_step(s, tmp_path / str(i)) for i, s in enumerate(specs))
    _assert_same_step(fused_step, naive_step)


def test_teacher_with_padded_vocabulary_is_cut_to_the_student(
    tmp_path, tiny_tokenizer_dir, tiny_student_dir, train16
):
    teacher = make_tiny_model(
        tmp_path / "padded",
        hidden_size=48,
        num_layers=2,
        seed=3,
        tokenizer=tiny_tokenizer_dir,
        pad_vocab_to=400,
    )
    steps = [
        _one_step(
            tiny_spec(
                teacher, tiny_student_dir, train16, loss={"fused": fused}, training={"max_grad_norm": 0.0}
            ),
            tmp_path / f"run{fused}",
        )
        for fused in (True, False)
    ]
    assert steps[0][0]["kd_loss"] > 0
    _assert_same_step(*steps)


def test_tokenizer_mismatch_is_refused_before_training(tmp_path, tiny_teacher_dir, train4):
    other_tokenizer = make_tiny_tokenizer(tmp_path / "tok", vocab_size=300)
    student = make_tiny_model(tmp_path / "student", hidden_size=32, num_layers=2, tokenizer=other_tokenizer)
    recorder = Recorder()
    with pytest.raises(TokenizerMismatchError):
        train(tiny_spec(tiny_teacher_dir, student, train4), output_dir=tmp_path / "run", callbacks=recorder)
    assert recorder.started == [] and recorder.steps == {}


def test_non_finite_loss_names_the_step(tmp_path, tiny_teacher_dir, train4, monkeypatch):
    original = Objective.student_losses
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(Objective, "student_losses", poisoned)
    recorder = Recorder()
    with pytest.raises(TrainingError, match="step 3"):
        train(
            tiny_spec(tiny_teacher_dir, None, train4), output_dir=tmp_path, callbacks=recorder, device="cpu"
        )
    assert sorted(recorder.steps) == [1, 2]
    assert not (tmp_path / "student").exists()


def test_taid_interpolation_rises(tmp_path, tiny_teacher_dir, train4):
    spec = tiny_spec(
        tiny_teacher_dir, None, train4, loss={"name": "taid", "taid_t_start": 0.4}, training={"max_steps": 6}
    )
    recorder = Recorder()
    train(spec, output_dir=tmp_path, callbacks=recorder, device="cpu")
    ts = [recorder.steps[s]["taid_t"] for s in range(1, 7)]
    assert ts[0] == pytest.approx(0.4)
    assert all(b >= a for a, b in zip(ts, ts[1:], strict=False)) and ts[-1] > ts[0]


def test_evaluation_reports_metrics_and_samples(tmp_path, tiny_teacher_dir, train4, dolly_test_path):
    spec = tiny_spec(
        tiny_teacher_dir,
        None,
        train4,
        dolly_test_path,
        training={"max_steps": 4, "eval_every": 2},
        evaluation={"max_records": 3, "num_samples_logged": 2},
    )
    recorder = Recorder()
    result = train(spec, output_dir=tmp_path, callbacks=recorder, device="cpu")
    assert [step for step, _, _ in recorder.evals] == [0, 2, 4]  # the baseline, then every 2 steps
    step, metrics, samples = recorder.evals[-1]
    assert {"eval_ce_loss", "eval_kd_loss", "eval_rouge_l"} <= metrics.keys()
    assert 0.0 <= metrics["eval_rouge_l"] <= 100.0 and metrics["eval_kd_loss"] >= 0
    assert len(samples) == 2 and {"prompt", "reference", "generated"} <= samples[0].keys()
    assert result.metrics["eval_rouge_l"] == metrics["eval_rouge_l"]


def test_adaptive_strategy_needs_eval_data(tmp_path, tiny_teacher_dir, train4):
    # The spec is the one place that refuses it: the trainer only ever receives a validated JobSpec.
    raw = tiny_spec(tiny_teacher_dir, None, train4).model_dump(mode="json")
    raw["strategy"] = {"name": "adaptive"}
    with pytest.raises(ValidationError, match="adaptive"):
        JobSpec.model_validate(raw)
    raw["data"]["eval"] = str(train4)
    raw["training"]["eval_every"] = 0
    with pytest.raises(ValidationError, match="eval_every"):
        JobSpec.model_validate(raw)


def test_gradient_checkpointing_gives_the_same_step(tmp_path, tiny_teacher_dir, tiny_student_dir, train16):
    steps = [
        _one_step(
            tiny_spec(
                tiny_teacher_dir,
                tiny_student_dir,
                train16,
                training={"max_grad_norm": 0.0, "gradient_checkpointing": enabled},
            ),
            tmp_path / str(enabled),
        )
        for enabled in (False, True)
    ]
    _assert_same_step(*steps)
