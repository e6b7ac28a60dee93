"""worker.student_card on a real database (SQLite): the card names what the tenant gave (file ids with their
stored SHA-256 and record counts, the teacher by its name under the model roots), never the paths the
trainer read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from core.db import session_scope
from core.distill.spec import JobSpec
from core.files.models import File
from core.jobs.models import Job
from core.jobs.states import JobStatus
from core.tenants.models import Tenant
from tests.support.services import make_settings, sqlite_database
from worker.student_card import write_job_student_card


def test_the_card_names_the_uploads_and_the_teacher_as_given(tmp_path: Path) -> None:
    models = tmp_path / "models"
    teacher = models / "org" / "teacher"
    teacher.mkdir(parents=True)
    (teacher / "LICENSE").write_text("terms\n", encoding="utf-8")
    settings = make_settings(tmp_path, database_url=sqlite_database(tmp_path / "db"), model_roots=[models])
    stored = {
        # As the API stores it: the bare name resolved under the model roots, data as file ids.
        "teacher": {"model": str(settings.model_roots[0] / "org" / "teacher")},
        "student": {"from_teacher_layers": [0, 1]},
        "data": {"train": "file_train", "eval": "file_eval", "max_length": 64, "max_prompt_length": 32},
        "loss": {"name": "jsd", "beta": 0.3},
    }
    with session_scope(settings.database_url) as session:
        tenant = Tenant(name="acme")
        session.add(tenant)
        session.flush()
        for file_id, name, records in (("file_train", "train.jsonl", 32), ("file_eval", "eval.jsonl", 5)):
            session.add(
                File(
                    id=file_id,
                    tenant_id=tenant.id,
                    filename=name,
                    size_bytes=10,
                    sha256=file_id[-1] * 64,
                    records=records,
                    storage_path=f"files/{file_id}.jsonl",
                )
            )
        job = Job(
            tenant_id=tenant.id,
            status=JobStatus.RUNNING,
            spec=stored,
            total_steps=200,
            max_attempts=3,
            latest_metrics={},
        )
        session.add(job)
        session.flush()
        job_id = job.id
    server_path = str(tmp_path / "artifacts" / "files")
    trained = JobSpec.model_validate(
        stored
        | {"data": stored["data"] | {"train": f"{server_path}/t.jsonl", "eval": f"{server_path}/e.jsonl"}}
    )
    student = tmp_path / "student"
    student.mkdir()

    write_job_student_card(
        settings=settings,
        job_id=job_id,
        trained_spec=trained,
        student_dir=student,
        steps=200,
        metrics={"loss": 0.75, "eval_rouge_l": 21.0},
    )

    record = json.loads((student / "distillery.json").read_text(encoding="utf-8"))
    assert record["job_id"] == job_id and record["steps"] == 200
    assert record["spec"]["teacher"]["model"] == "org/teacher"
    assert (record["spec"]["data"]["train"], record["spec"]["data"]["eval"]) == ("file_train", "file_eval")
    assert record["data_files"] == {
        "train": {"id": "file_train", "filename": "train.jsonl", "sha256": "n" * 64, "records": 32},
        "eval": {"id": "file_eval", "filename": "eval.jsonl", "sha256": "l" * 64, "records": 5},
    }
    assert record["metrics"] == {"loss": 0.75, "eval_rouge_l": 21.0}
    card = (student / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "org/teacher"
    assert front["license"] == "other"  # the teacher ships a LICENSE file
    assert "β = 0.3 (the teacher's weight)" in card
    assert str(tmp_path) not in card + json.dumps(record)


def test_a_job_that_vanished_is_an_error(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, database_url=sqlite_database(tmp_path / "db"))
    spec = JobSpec.model_validate(
        {"teacher": {"model": "t"}, "student": {"from_teacher_layers": [0]}, "data": {"train": "f"}}
    )
    with pytest.raises(LookupError, match="job_missing"):
        write_job_student_card(
            settings=settings,
            job_id="job_missing",
            trained_spec=spec,
            student_dir=tmp_path,
            steps=1,
            metrics={},
        )
