"""Checkpoints: layout, pruning, stop requests, and resuming exactly where the run left off."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.distill.checkpoint import (
    MANIFEST,
    STATE_JSON,
    STATE_TENSORS,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    verify_checkpoint,
)
from core.distill.layout import checkpoint_path, checkpoint_step
from core.distill.spec import JobSpec
from core.distill.trainer import train
from tests.core.distill._trainer_utils import Recorder, tiny_spec, write_subset


@pytest.fixture(scope="module")
def data(tmp_path_factory, dolly_train_path, dolly_test_path):
    root = tmp_path_factory.mktemp("resume-data")
    return write_subset(dolly_train_path, root / "train.jsonl", 10), write_subset(
        dolly_test_path, root / "eval.jsonl", 3
    )


LOSSES = ("loss", "kd_loss", "ce_loss", "grad_norm", "lr")


@pytest.mark.parametrize(
    ("strategy", "loss"),
    [("off_policy", "amid"), ("on_policy", "taid")],
)
def test_resume_reproduces_the_uninterrupted_run(
    tmp_path, tiny_teacher_dir, tiny_student_dir, data, strategy, loss
):
    """6 steps with a checkpoint at 3, then a resume from 3: steps 4..6 match to float tolerance.

    Batches of 3 over 10 examples cross an epoch boundary after the checkpoint, the on-policy case samples
    from the global RNG, TAID carries its interpolation state, and an eval at step 3 runs in between.
    """
    train_path, eval_path = data
    spec = tiny_spec(
        tiny_teacher_dir,
        tiny_student_dir,
        train_path,
        eval_path,
        loss={"name": loss},
        strategy={"name": strategy, "max_new_tokens": 6},
        training={"max_steps": 6, "batch_size": 3, "checkpoint_every": 3, "eval_every": 3, "warmup_steps": 1},
    )
    full = Recorder()
    train(spec, output_dir=tmp_path / "full", callbacks=full, device="cpu")
    checkpoint = tmp_path / "full" / "checkpoints" / "step-00000003"
    assert [step for step, _ in full.checkpoints] == [3, 6]

    resumed = Recorder()
    result = train(
        spec, output_dir=tmp_path / "resumed", callbacks=resumed, resume_from=checkpoint, device="cpu"
    )
    assert resumed.started == [(6, 3)]
    assert sorted(resumed.steps) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in LOSSES + (("taid_t",) if loss == "taid" else ()):
            assert resumed.steps[step][key] == pytest.approx(full.steps[step][key], rel=1e-5, abs=1e-7), (
                step,
                key,
            )
    assert result.step == 6
    final_full = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "student")
    final_resumed = AutoModelForCausalLM.from_pretrained(result.student_dir)
    for (name, a), (_, b) in zip(
        final_full.state_dict().items(), final_resumed.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoint_layout_and_pruning(tmp_path, tiny_teacher_dir, data):
    train_path, _ = data
    spec = tiny_spec(
        tiny_teacher_dir,
        None,
        train_path,
        training={"max_steps": 6, "checkpoint_every": 2, "keep_checkpoints": 2},
    )
    train(spec, output_dir=tmp_path, device="cpu")
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 6]
    latest = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoints" / "step-00000006"
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        STATE_TENSORS,
        STATE_JSON,
        MANIFEST,
    ):
        assert (latest / name).is_file(), name
    assert not (latest / "trainer_state.pt").exists()  # nothing pickled
    assert verify_checkpoint(latest) is None
    assert JobSpec.model_validate(json.loads((latest / "spec.json").read_text())) == spec
    state = load_trainer_state(latest)
    assert state["step"] == 6 and {"optimizer", "scheduler", "rng", "data", "strategy"} <= state.keys()
    assert not [
        p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")
    ]  # no temp dirs left
    assert AutoModelForCausalLM.from_pretrained(latest).config.num_hidden_layers == 2


def test_should_stop_writes_a_checkpoint_and_returns(tmp_path, tiny_teacher_dir, data):
    train_path, _ = data
    spec = tiny_spec(tiny_teacher_dir, None, train_path, training={"max_steps": 10, "checkpoint_every": 0})
    recorder = Recorder(stop_after=2)
    result = train(spec, output_dir=tmp_path, callbacks=recorder, device="cpu")
    assert result.stopped and result.step == 2 and result.student_dir is None
    assert sorted(recorder.steps) == [1, 2]
    assert result.checkpoint == tmp_path / "checkpoints" / "step-00000002" == latest_checkpoint(tmp_path)
    assert recorder.checkpoints == [(2, result.checkpoint)]
    assert not (tmp_path / "student").exists()

    # The stopped run continues from its checkpoint to the end.
    rest = Recorder()
    done = train(spec, output_dir=tmp_path, callbacks=rest, resume_from=result.checkpoint, device="cpu")
    assert sorted(rest.steps) == list(range(3, 11)) and not done.stopped
    assert (tmp_path / "student" / "model.safetensors").is_file()


def test_checkpoint_step_is_read_from_the_directory_name(tmp_path):
    assert checkpoint_step(checkpoint_path(tmp_path, 42)) == 42
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        checkpoint_step(tmp_path / "student")
