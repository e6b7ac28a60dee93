"""Data strategies: the seeded data order, the replay buffer, θ, and on-policy / adaptive training runs."""

from __future__ import annotations

import pytest
import torch

from core.distill import trainer as trainer_module
from core.distill.data import Example
from core.distill.evaluation import EvalResult
from core.distill.spec import StrategySpec
from core.distill.strategies import DataOrder, DataStrategy, ReplayBuffer, Source
from core.distill.trainer import train
from tests.core.distill._trainer_utils import Recorder, tiny_spec, write_subset


def test_data_order_visits_every_example_once_per_epoch_and_resumes():
    order = DataOrder(5, seed=3)
    first_epoch, second_epoch = order.take(5), order.take(5)
    assert sorted(first_epoch) == sorted(second_epoch) == list(range(5))
    assert first_epoch != second_epoch  # a fresh permutation per epoch (fixed by the seed)
    order.take(2)
    state = order.state_dict()
    expected = order.take(7)
    again = DataOrder(5, seed=3)
    again.load_state_dict(state)
    assert again.take(7) == expected
    assert DataOrder(5, seed=3).take(5) == first_epoch


def _example(i: int) -> Example:
    return Example(input_ids=[1, i], labels=[-100, i], prompt_ids=[1], reference="")


def test_replay_buffer_keeps_the_newest_and_round_trips():
    buffer = ReplayBuffer(3)
    buffer.add([_example(i) for i in range(5)])
    assert len(buffer) == 3 and buffer.full
    drawn = buffer.sample(10, torch.Generator().manual_seed(0))
    assert {e.input_ids[1] for e in drawn} <= {2, 3, 4}
    copy = ReplayBuffer(3)
    copy.load_state_dict(buffer.state_dict())
    assert copy.sample(10, torch.Generator().manual_seed(0)) == drawn


def test_theta_rises_only_when_the_validation_loss_rises_enough():
    strategy = DataStrategy(StrategySpec(name="adaptive", loss_rise_tolerance=0.1), total_steps=10, seed=0)
    assert not strategy.after_eval(2.0)  # first validation: nothing to compare with
    assert not strategy.after_eval(2.05)  # rose by less than the tolerance
    assert strategy.after_eval(2.3)
    assert strategy.theta == pytest.approx(0.1)
    assert not strategy.after_eval(1.0)
    for loss in (2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0):
        strategy.after_eval(loss)
    assert strategy.theta == 1.0  # capped


def test_adaptive_choice_follows_theta_and_the_buffer():
    strategy = DataStrategy(StrategySpec(name="adaptive", replay_capacity=2), total_steps=100, seed=0)
    assert {strategy.choose(s) for s in range(1, 50)} == {Source.DATASET}  # θ = 0
    strategy.theta = 1.0
    assert {strategy.choose(s) for s in range(1, 50)} == {Source.STUDENT}  # buffer not full
    strategy.buffer.add([_example(1), _example(2)])
    late = [strategy.choose(100) for _ in range(50)]  # θ·(1 − 99/100) is tiny: mostly replay
    assert late.count(Source.REPLAY) > 40 and Source.DATASET not in late
    assert DataStrategy(StrategySpec(name="on_policy"), total_steps=5, seed=0).choose(1) is Source.STUDENT
    assert DataStrategy(StrategySpec(name="off_policy"), total_steps=5, seed=0).choose(1) is Source.DATASET


@pytest.fixture(scope="module")
def data(tmp_path_factory, dolly_train_path, dolly_test_path):
    root = tmp_path_factory.mktemp("strategy-data")
    return write_subset(dolly_train_path, root / "train.jsonl", 12), write_subset(
        dolly_test_path, root / "eval.jsonl", 2
    )


def test_on_policy_trains_on_student_samples(tmp_path, tiny_teacher_dir, tiny_student_dir, data, monkeypatch):
    built = []
    original = trainer_module.build_student_example

    def spy(prompt_ids, response_ids, eos_id, max_length):
        example = original(prompt_ids, response_ids, eos_id, max_length)
        built.append((list(prompt_ids), list(response_ids), example))
        return example

    monkeypatch.setattr(trainer_module, "build_student_example", spy)
    spec = tiny_spec(
        tiny_teacher_dir,
        tiny_student_dir,
        data[0],
        strategy={"name": "on_policy", "max_new_tokens": 5, "temperature": 1.0},
        training={"max_steps": 3, "batch_size": 2},
    )
    recorder = Recorder()
    train(spec, output_dir=tmp_path, callbacks=recorder, device="cpu")
    assert [recorder.steps[s]["on_policy"] for s in (1, 2, 3)] == [1.0, 1.0, 1.0]
    assert len(built) == 6
    for prompt, response, example in built:
        assert 1 <= len(response) <= 5
        assert example.input_ids[: len(prompt)] == prompt
        assert example.labels[: len(prompt)] == [-100] * len(prompt)
        assert example.labels[len(prompt) :] == example.input_ids[len(prompt) :]
    assert all(recorder.steps[s]["kd_loss"] > 0 for s in (1, 2, 3))


def test_adaptive_raises_theta_fills_the_buffer_and_replays(tmp_path, tiny_teacher_dir, data, monkeypatch):
    """Validation losses that keep rising push θ up; the student then generates, and later replays."""
    losses = iter(float(i) for i in range(100))

    def rising_eval(*args, **kwargs):
        loss = next(losses)
        metrics = {"eval_ce_loss": loss, "eval_kd_loss": loss, "eval_loss": loss, "eval_rouge_l": 0.0}
        return EvalResult(metrics=metrics, samples=[])

    monkeypatch.setattr(trainer_module, "evaluate", rising_eval)
    spec = tiny_spec(
        tiny_teacher_dir,
        None,
        data[0],
        data[1],
        strategy={"name": "adaptive", "replay_capacity": 4, "threshold_increment": 0.25, "max_new_tokens": 4},
        training={"max_steps": 14, "batch_size": 2, "eval_every": 1},
    )
    recorder = Recorder()
    train(spec, output_dir=tmp_path, callbacks=recorder, device="cpu")
    thetas = [recorder.steps[s]["theta"] for s in range(1, 15)]
    # Step metrics come before that step's eval: θ is 0 at step 1, then rises after every eval (0, 1, 2, ...).
    assert thetas[:3] == pytest.approx([0.0, 0.25, 0.5])
    assert thetas == sorted(thetas) and thetas[-1] == 1.0
    assert sum(recorder.steps[s]["on_policy"] for s in recorder.steps) >= 2
    assert sum(recorder.steps[s]["replayed"] for s in recorder.steps) >= 1
    assert recorder.steps[14]["replay_size"] == 4
    assert any(kind == "strategy" for kind, _ in recorder.events)
