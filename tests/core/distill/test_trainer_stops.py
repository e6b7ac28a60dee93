"""Stops that stop: a cancel or pause during an evaluation or a generation ends it at the next batch or
token, the run checkpoints its last complete step, and a resume from that checkpoint still reproduces the
uninterrupted run exactly. Work is counted in batches and forward passes, never in seconds."""

from __future__ import annotations

import pytest
from transformers import LlamaForCausalLM

from core.distill.checkpoint import list_checkpoints, load_trainer_state
from core.distill.evaluation import GenerationSettings, Stopped, generate_responses
from core.distill.layout import checkpoint_path
from core.distill.models import load_causal_lm
from core.distill.objective import Objective
from core.distill.trainer import train
from tests.core.distill._trainer_utils import Recorder, tiny_spec, write_subset

LOSSES = ("loss", "kd_loss", "ce_loss", "grad_norm", "lr")


@pytest.fixture(scope="module")
def data(tmp_path_factory, dolly_train_path, dolly_test_path):
    root = tmp_path_factory.mktemp("stop-data")
    return write_subset(dolly_train_path, root / "train.jsonl", 10), write_subset(
        dolly_test_path, root / "eval.jsonl", 5
    )


class StopLater(Recorder):
    """Once step `after_step` is done, answers `should_stop` with no `grace` times, then yes."""

    def __init__(self, *, after_step: int, grace: int) -> None:
        super().__init__()
        self.after_step, self.grace = after_step, grace
        self.armed = False
        self.polls = 0

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        super().on_step(step, metrics)
        self.armed = self.armed or step >= self.after_step

    def should_stop(self) -> bool:
        if not self.armed:
            return False
        self.polls += 1
        return self.polls > self.grace


@pytest.fixture
def count_calls(monkeypatch):
    """Counts calls of a method while `callbacks.armed` (patched on its class)."""

    def install(cls: type, name: str, callbacks: StopLater) -> list[int]:
        calls = [0]
        original = getattr(cls, name)

        def counted(self, *args, **kwargs):
            calls[0] += callbacks.armed
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, counted)
        return calls

    return install


def same_losses(a: dict[str, float], b: dict[str, float]) -> bool:
    return {k: a[k] for k in LOSSES} == {k: b[k] for k in LOSSES}


# ------------------------------------------------------------------------------------------ evaluation
def test_a_stop_during_an_evaluation_ends_it_after_one_batch(tmp_path, tiny_teacher_dir, data, count_calls):
    train_path, eval_path = data
    spec = tiny_spec(
        tiny_teacher_dir,
        None,
        train_path,
        eval_path,
        training={"max_steps": 4, "batch_size": 3, "eval_every": 2, "checkpoint_every": 0},
        evaluation={"max_records": 5, "batch_size": 1, "max_new_tokens": 4},
    )
    full = Recorder()
    train(spec, output_dir=tmp_path / "full", callbacks=full, device="cpu")
    assert [step for step, _, _ in full.evals] == [0, 2, 4]

    # The first poll after step 2 comes before the evaluation's first batch, the second before its second.
    stopping = StopLater(after_step=2, grace=1)
    batches = count_calls(Objective, "teacher_targets", stopping)
    result = train(spec, output_dir=tmp_path / "stopped", callbacks=stopping, device="cpu")
    assert batches == [1]  # one of 5 loss batches, and none of the 5 generation batches
    assert result.stopped and result.step == 2 and result.student_dir is None
    assert [step for step, _, _ in stopping.evals] == [0]  # the cut evaluation is not reported
    assert result.checkpoint == checkpoint_path(tmp_path / "stopped", 2)
    assert load_trainer_state(result.checkpoint)["eval_pending"] is True

    # The resume runs the interrupted evaluation first, then continues exactly as the full run did.
    resumed = Recorder()
    done = train(
        spec, output_dir=tmp_path / "stopped", callbacks=resumed, resume_from=result.checkpoint, device="cpu"
    )
    assert [step for step, _, _ in resumed.evals] == [2, 4]
    assert resumed.evals[0][1] == full.evals[1][1]
    assert sorted(resumed.steps) == [3, 4] and all(
        same_losses(resumed.steps[s], full.steps[s]) for s in (3, 4)
    )
    assert resumed.evals[1][1] == full.evals[2][1]
    assert not done.stopped and done.student_dir is not None


def test_a_stop_during_the_baseline_evaluation_leaves_no_checkpoint(tmp_path, tiny_teacher_dir, data):
    train_path, eval_path = data
    spec = tiny_spec(
        tiny_teacher_dir,
        None,
        train_path,
        eval_path,
        training={"max_steps": 4, "eval_every": 2},
        evaluation={"max_records": 5, "batch_size": 1},
    )
    stopping = StopLater(after_step=0, grace=2)
    stopping.armed = True
    result = train(spec, output_dir=tmp_path, callbacks=stopping, device="cpu")
    assert result.stopped and result.step == 0 and result.checkpoint is None
    assert stopping.polls == 3 and not stopping.evals and not stopping.steps
    assert list_checkpoints(tmp_path) == []


# ------------------------------------------------------------------------------------------ generation
def test_generation_stops_at_the_next_token(tiny_student_dir, count_calls):
    model = load_causal_lm(tiny_student_dir).train()
    settings = GenerationSettings(max_new_tokens=20, batch_size=2)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12], [13]]
    stopping = StopLater(after_step=0, grace=3)  # yes at the third token of the first batch
    forwards = count_calls(LlamaForCausalLM, "forward", stopping)
    stopping.armed = True
    with pytest.raises(Stopped):
        generate_responses(model, prompts, settings, pad_id=0, eos_id=1, should_stop=stopping.should_stop)
    assert forwards == [3] and stopping.polls == 4  # one poll before the batch, one after each token
    assert model.training  # put back in training mode


def test_a_stop_during_on_policy_generation_rolls_the_step_back(
    tmp_path, tiny_teacher_dir, data, count_calls
):
    """Step 3 is stopped after its first generated token: nothing of it is kept, the checkpoint is the
    state after step 2 (RNG streams, data position, strategy), and a resume reproduces steps 3 and 4."""
    train_path, _ = data
    spec = tiny_spec(
        tiny_teacher_dir,
        None,
        train_path,
        strategy={"name": "on_policy", "max_new_tokens": 6},
        training={"max_steps": 4, "batch_size": 3, "checkpoint_every": 2},
    )
    full = Recorder()
    train(spec, output_dir=tmp_path / "full", callbacks=full, device="cpu")

    # Polls after step 2: between steps, before step 3's generation batch, after its first token.
    stopping = StopLater(after_step=2, grace=2)
    forwards = count_calls(LlamaForCausalLM, "forward", stopping)
    result = train(spec, output_dir=tmp_path / "stopped", callbacks=stopping, device="cpu")
    assert forwards == [1] and stopping.polls == 3
    assert result.stopped and result.step == 2 and sorted(stopping.steps) == [1, 2]
    assert result.checkpoint == checkpoint_path(tmp_path / "stopped", 2)

    stopped_state = load_trainer_state(result.checkpoint)
    full_state = load_trainer_state(checkpoint_path(tmp_path / "full", 2))
    for part in ("data", "scheduler", "step", "eval_pending"):
        assert stopped_state[part] == full_state[part], part
    generator = stopped_state["strategy"].pop("generator")
    assert generator.equal(full_state["strategy"].pop("generator"))
    assert stopped_state["strategy"] == full_state["strategy"]
    assert stopped_state["rng"]["python"] == full_state["rng"]["python"]
    assert stopped_state["rng"]["torch"].equal(full_state["rng"]["torch"])

    resumed = Recorder()
    train(
        spec, output_dir=tmp_path / "stopped", callbacks=resumed, resume_from=result.checkpoint, device="cpu"
    )
    assert sorted(resumed.steps) == [3, 4]
    assert all(same_losses(resumed.steps[s], full.steps[s]) for s in (3, 4))
