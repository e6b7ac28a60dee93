"""`distill train` leaves a model card and distillery.json in the student it saves (run in-process)."""

from __future__ import annotations

import hashlib
import json
import shutil

import yaml
from transformers import AutoModelForCausalLM

from cli.main import main
from tests.core.distill._trainer_utils import write_subset


def test_train_writes_the_students_card(tmp_path, tiny_teacher_dir, dolly_train_path, dolly_test_path):
    teacher = tmp_path / "models" / "my-teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    (teacher / "README.md").write_text("---\nlicense: mit\n---\n# A tiny teacher\n", encoding="utf-8")
    write_subset(dolly_train_path, tmp_path / "train.jsonl", 8)
    write_subset(dolly_test_path, tmp_path / "test.jsonl", 2)
    spec = {
        "teacher": {"model": "models/my-teacher"},
        "student": {"from_teacher_layers": [1, 3]},
        "data": {"train": "train.jsonl", "eval": "test.jsonl", "max_length": 64, "max_prompt_length": 40},
        "loss": {"name": "fkl"},
        "training": {"max_steps": 3, "batch_size": 2, "checkpoint_every": 0, "eval_every": 3},
        "evaluation": {"max_records": 2, "max_new_tokens": 4},
    }
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(spec), encoding="utf-8")
    out = tmp_path / "run"

    assert main(["train", str(config), "--output-dir", str(out), "--device", "cpu"]) == 0

    student = out / "student"
    record = json.loads((student / "distillery.json").read_text(encoding="utf-8"))
    assert record["job_id"] is None
    assert record["steps"] == 3
    assert record["spec"]["teacher"]["model"] == "my-teacher"  # never the absolute path YAML resolved
    assert record["spec"]["student"]["from_teacher_layers"] == [1, 3]
    train = record["data_files"]["train"]
    assert train == {
        "id": None,
        "filename": "train.jsonl",
        "sha256": hashlib.sha256((tmp_path / "train.jsonl").read_bytes()).hexdigest(),
        "records": 8,
    }
    assert record["data_files"]["eval"]["records"] == 2
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["kind"] == "eval" and record["metrics"]["eval_rouge_l"] == final["eval_rouge_l"]
    assert isinstance(record["metrics"]["loss"], float)

    card = (student / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "mit" and front["base_model"] == "my-teacher"
    assert front["tags"] == ["distillation", "distillery", "fkl"]
    assert train["sha256"] in card
    assert str(tmp_path) not in card and str(tmp_path) not in json.dumps(record)

    assert AutoModelForCausalLM.from_pretrained(student).config.num_hidden_layers == 2
