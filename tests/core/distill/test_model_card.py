"""The student's model card and distillery.json: front matter that parses, the facts they must carry, and
no absolute path anywhere."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.distill.model_card import (
    DataFile,
    distillery_record,
    local_data_file,
    model_card,
    public_name,
    teacher_license,
    write_student_card,
)
from core.distill.spec import JobSpec, StudentSpec

SHA = "ab" * 32
DATA = {
    "train": DataFile(id="file_train1", filename="dolly | train.jsonl", sha256=SHA, records=1000),
    "eval": DataFile(id="file_eval1", filename="test.jsonl", sha256="cd" * 32, records=500),
}
METRICS = {"loss": 1.234567891, "kd_loss": 0.5, "eval_rouge_l": 12.5, "grad_norm": float("nan")}


def make_spec(**loss: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "teacher": {"model": "/srv/distill/models/org/SmolLM2-135M-Instruct"},
            "student": {"from_teacher_layers": [0, 6, 12]},
            "data": {"train": "/srv/artifacts/files/t/file_train1.jsonl", "eval": "file_eval1"},
            "loss": loss or {"name": "amid", "alpha": -0.5, "lam": 0.25},
            "training": {"max_steps": 40, "batch_size": 4, "learning_rate": 5e-4},
        }
    )


def card(spec: JobSpec | None = None, **kwargs: Any) -> str:
    values: dict[str, Any] = {
        "job_id": "job_123",
        "data_files": DATA,
        "steps": 40,
        "metrics": METRICS,
        "teacher_license": "apache-2.0",
    } | kwargs
    return model_card(spec or make_spec(), **values)


def front_matter(text: str) -> dict[str, Any]:
    assert text.startswith("---\n")
    head, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(head)


def test_front_matter_is_hugging_face_metadata() -> None:
    meta = front_matter(card())
    assert meta["library_name"] == "transformers"
    assert meta["license"] == "apache-2.0"
    # The teacher as a name, never the server's folder; the layers were cut from it.
    assert meta["base_model"] == "SmolLM2-135M-Instruct"
    assert meta["tags"] == ["distillation", "distillery", "amid"]


def test_unknown_license_is_left_out_and_said_so() -> None:
    text = card(teacher_license=None)
    assert "license" not in front_matter(text)
    assert "unknown; check the teacher's terms" in text


def test_a_pretrained_student_is_the_base_model() -> None:
    spec = make_spec().model_copy(update={"student": StudentSpec(model="/srv/models/tiny-student")})
    text = card(spec)
    assert front_matter(text)["base_model"] == "tiny-student"
    assert "the pretrained model `tiny-student`" in text


def test_no_absolute_path_anywhere(tmp_path: Path) -> None:
    text = card()
    record = distillery_record(make_spec(), job_id="job_123", data_files=DATA, steps=40, metrics=METRICS)
    for shown in (text, json.dumps(record)):
        assert "/srv" not in shown
        assert not re.search(r"(^|[\s`\"'(])/[A-Za-z]", shown), shown
    assert record["spec"]["teacher"]["model"] == "SmolLM2-135M-Instruct"
    assert (record["spec"]["data"]["train"], record["spec"]["data"]["eval"]) == (
        "file_train1.jsonl",
        "file_eval1",
    )


def test_amid_names_alpha_as_the_mixture_and_lambda_as_the_teacher_weight() -> None:
    text = card()
    assert "α = -0.5 (the α-mixture" in text
    assert "λ = 0.25 (the teacher's weight" in text
    assert "layers 0, 6, 12" in text


@pytest.mark.parametrize("name", ["fkl", "rkl", "tvd", "jsd", "skl", "srkl", "ab", "taid"])
def test_other_losses_have_no_alpha_or_lambda(name: str) -> None:
    text = card(make_spec(name=name))
    assert "λ" not in text and "α =" not in text and "mixture" not in text
    assert front_matter(text)["tags"][-1] == name
    assert "temperature 1" in text


def test_training_data_and_metrics_tables() -> None:
    text = card()
    assert f"| train | `file_train1` | dolly \\| train.jsonl | `{SHA}` | 1,000 |" in text
    assert "| eval | `file_eval1` | test.jsonl |" in text
    assert "## Final metrics (step 40)" in text
    assert "| loss | 1.23457 |" in text
    assert "| grad_norm | nan |" in text
    assert "40 of 40" in text
    assert "job `job_123`" in text


def test_record_holds_the_facts_as_json() -> None:
    record = distillery_record(make_spec(), job_id="job_123", data_files=DATA, steps=40, metrics=METRICS)
    assert set(record) == {
        "job_id", "spec", "data_files", "steps", "metrics", "distillery_version", "created_at"
    }  # fmt: skip
    assert record["job_id"] == "job_123" and record["steps"] == 40
    assert record["data_files"]["train"]["sha256"] == SHA
    assert record["metrics"]["grad_norm"] is None  # NaN is not JSON
    assert JobSpec.model_validate(record["spec"]).loss.lam == 0.25  # the full spec, valid as it stands
    json.dumps(record, allow_nan=False)


def test_teacher_license_from_its_card_or_license_file(tmp_path: Path) -> None:
    assert teacher_license(tmp_path / "missing") is None
    assert teacher_license("HuggingFaceTB/SmolLM2-135M") is None
    assert teacher_license(tmp_path) is None
    (tmp_path / "LICENSE").write_text("Some terms\n")
    assert teacher_license(tmp_path) == "other"
    (tmp_path / "README.md").write_text("---\nlicense: llama3.2\ntags: [x]\n---\n# A model\n")
    assert teacher_license(tmp_path) == "llama3.2"
    assert "`llama3.2`, as the teacher declares it" in card(teacher_license="llama3.2")
    assert "its LICENSE file" in card(teacher_license="other")


def test_public_names() -> None:
    assert public_name("/models/org/name") == "name"
    assert public_name("C:\\models\\name") == "name"
    assert public_name("org/name") == "org/name"
    assert public_name("file_abc") == "file_abc"
    assert public_name(None) is None


def test_local_files_are_hashed_and_counted_like_uploads(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": "d"}\nnot json\n')
    file = local_data_file(path)
    assert file == {
        "id": None,
        "filename": "train.jsonl",
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "records": 2,
    }


def test_write_student_card_writes_both_files(tmp_path: Path) -> None:
    write_student_card(
        tmp_path,
        make_spec(),
        job_id=None,
        data_files=DATA,
        steps=3,
        metrics={"loss": 2.0},
        teacher_license=None,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "distillery.json"]
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "(`distill train`)" in text and "job `" not in text
    record = json.loads((tmp_path / "distillery.json").read_text(encoding="utf-8"))
    assert record["job_id"] is None and record["steps"] == 3 and record["metrics"] == {"loss": 2.0}
