"""`distill train` and `distill eval` on the tiny models, run in-process through the real dispatcher."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from cli.main import main
from tests.core.distill._trainer_utils import write_subset


@pytest.fixture()
def config(tmp_path, tiny_teacher_dir, dolly_train_path, dolly_test_path) -> Path:
    """A YAML spec with paths relative to its own folder, as the examples are written."""
    write_subset(dolly_train_path, tmp_path / "train.jsonl", 8)
    write_subset(dolly_test_path, tmp_path / "test.jsonl", 2)
    spec = {
        "teacher": {"model": str(tiny_teacher_dir)},
        "student": {"from_teacher_layers": [0, 2]},
        "data": {"train": "train.jsonl", "eval": "test.jsonl", "max_length": 64, "max_prompt_length": 40},
        "loss": {"name": "amid", "alpha": 0.5, "lam": 0.1},
        "training": {"max_steps": 4, "batch_size": 2, "checkpoint_every": 2, "eval_every": 2},
        "evaluation": {"max_records": 2, "max_new_tokens": 4},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_train_writes_metrics_checkpoints_and_a_loadable_student(tmp_path, config, capsys):
    out = tmp_path / "run"
    assert main(["train", str(config), "--output-dir", str(out), "--device", "cpu"]) == 0
    assert "done at step 4" in capsys.readouterr().out

    records = _records(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2, 4]
    assert all("loss" in r and "lr" in r for r in records if r["kind"] == "step")
    assert all("eval_rouge_l" in r and "samples" in r for r in records if r["kind"] == "eval")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 2

    # A second plain run must not silently mix with the first; --resume continues (here: nothing left to do).
    assert main(["train", str(config), "--output-dir", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", str(config), "--output-dir", str(out), "--resume", "--device", "cpu"]) == 0
    assert len(_records(out / "metrics.jsonl")) == len(records)  # appended nothing: already at max_steps


def test_invalid_spec_prints_field_paths_and_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "teacher": {"model": "t"},
                "student": {"from_teacher_layers": [0]},
                "data": {"train": "x.jsonl"},
                "loss": {"lam": 1.5, "nmae": "fkl"},
                "training": {"max_steps": 0},
            }
        ),
        encoding="utf-8",
    )
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "invalid job spec" in err
    assert re.search(r"loss\.lam: .*less than or equal to 1", err)
    assert "loss.nmae: Extra inputs are not permitted" in err
    assert "training.max_steps:" in err


def test_missing_or_broken_yaml_exits_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "absent.yaml")]) == 2
    broken = tmp_path / "broken.yaml"
    broken.write_text("teacher: [unclosed\n", encoding="utf-8")
    assert main(["train", str(broken)]) == 2


def test_eval_prints_rouge_l(tiny_student_dir, dolly_test_path, capsys):
    argv = ["eval", "--model", str(tiny_student_dir), "--data", str(dolly_test_path), "--max-records", "3"]
    assert main([*argv, "--max-new-tokens", "4", "--device", "cpu"]) == 0
    greedy = re.search(r"ROUGE-L: (\d+\.\d+)\s+\(3 records, greedy\)", capsys.readouterr().out)
    assert greedy is not None and 0.0 <= float(greedy.group(1)) <= 100.0
    sampled = [*argv, "--max-new-tokens", "4", "--do-sample", "--temperature", "0.8", "--seeds", "1", "2"]
    assert main(sampled) == 0
    assert "seeds [1, 2]" in capsys.readouterr().out


def test_example_specs_are_valid(repo_root):
    from core.distill.spec import JobSpec

    spec = JobSpec.from_yaml(repo_root / "examples" / "smollm2-dolly.yaml")
    assert spec.loss.name == "amid" and spec.student.from_teacher_layers == [0, 6, 12, 18, 24, 29]
    assert Path(spec.data.train).is_absolute() and Path(spec.data.train).is_file()


def test_tiny_model_writes_a_loadable_model_and_refuses_to_overwrite(tmp_path, capsys):
    target = tmp_path / "models" / "tiny"
    assert main(["tiny-model", str(target), "--layers", "2", "--hidden-size", "32"]) == 0
    model = AutoModelForCausalLM.from_pretrained(target)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    assert main(["tiny-model", str(target)]) == 2
    assert "not empty" in capsys.readouterr().err
