"""Grid expansion on its own: the cartesian product in order, section values merged, errors naming the child
and the field; and the shipped example sweep, read as the SDK and CLI read it, expands into valid specs."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import InvalidRequest
from core.sweeps.grid import MAX_CHILDREN, expand, with_value
from distillery._base import load_sweep

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "sweep-alpha.yaml"
BASE = {
    "teacher": {"model": "tiny"},
    "student": {"from_teacher_layers": [0, 1]},
    "data": {"train": "file_x", "max_length": 64, "max_prompt_length": 32},
    "loss": {"name": "amid", "alpha": 0.5, "lam": 0.1},
}


def test_the_product_in_grid_order_with_sections_merged() -> None:
    grid = {"loss": [{"alpha": -1.0}, {"name": "fkl"}], "training.seed": [1, 2], "kd_ratio": [0.5]}
    children = expand(BASE, grid)
    assert [params for params, _ in children] == [
        {"loss": {"alpha": -1.0}, "training.seed": 1, "kd_ratio": 0.5},
        {"loss": {"alpha": -1.0}, "training.seed": 2, "kd_ratio": 0.5},
        {"loss": {"name": "fkl"}, "training.seed": 1, "kd_ratio": 0.5},
        {"loss": {"name": "fkl"}, "training.seed": 2, "kd_ratio": 0.5},
    ]
    specs = [spec for _, spec in children]
    assert [(s.loss.name, s.loss.alpha, s.loss.lam) for s in specs] == [("amid", -1.0, 0.1)] * 2 + [
        ("fkl", 0.5, 0.1)
    ] * 2
    assert [s.training.seed for s in specs] == [1, 2, 1, 2] and {s.kd_ratio for s in specs} == {0.5}
    assert BASE["loss"] == {"name": "amid", "alpha": 0.5, "lam": 0.1}  # the base is not changed


def test_with_value_creates_missing_sections_and_replaces_lists() -> None:
    assert with_value({}, "training.learning_rate", 1e-3) == {"training": {"learning_rate": 1e-3}}
    spec = with_value(BASE, "student.from_teacher_layers", [0, 2, 3])
    assert spec["student"] == {"from_teacher_layers": [0, 2, 3]}


@pytest.mark.parametrize(
    ("grid", "param"),
    [
        ({"loss.alpha": [0.0, float("nan")]}, "grid.loss.alpha.1"),
        ({"training": [1]}, "grid.training.0"),
        ({"teacher.model.name": ["x"]}, "grid.teacher.model.name"),
        ({"loss.alpha": [0.0] * 0}, "grid.loss.alpha"),
        ({"loss.alpha": [float(i) for i in range(MAX_CHILDREN + 1)]}, "grid"),
        ({"loss.lam": [0.5, -0.5]}, "children[1].loss.lam"),
        ({"student.model": [None, "other"]}, "children[1].student"),
        ({"data.max_prompt_length": [16, 64]}, "children[1].data"),
    ],
)
def test_errors_name_the_path_or_the_child_and_field(grid: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        expand(BASE, grid)
    assert raised.value.param == param, raised.value.message
    assert raised.value.status == 422


def test_the_example_sweep_expands_into_valid_children() -> None:
    body, base = load_sweep(EXAMPLE, None, metric=None, mode=None, max_parallel=None)
    assert base == EXAMPLE.parent
    assert (body["metric"], body["mode"], body["max_parallel"]) == ("eval_rouge_l", "max", 2)
    for field in ("train", "eval"):  # local files the client uploads first
        assert (base / body["spec"]["data"][field]).resolve().is_file()
    spec = {**body["spec"], "data": {**body["spec"]["data"], "train": "file_train", "eval": "file_eval"}}
    children = expand(spec, body["grid"])
    losses = [(child.loss.name, child.loss.alpha, child.loss.lam) for _, child in children]
    assert losses == [("amid", a, 0.1) for a in (-3.0, -1.0, 0.0, 0.5, 1.0)] + [("fkl", 0.5, 0.1)]
    for _, child in children:
        assert child.teacher.model == "SmolLM2-135M-Instruct"
        assert child.student.from_teacher_layers == [0, 6, 12, 18, 24, 29]
        assert (child.training.max_steps, child.training.eval_every) == (60, 60)
