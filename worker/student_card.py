"""The model card and `distillery.json` of a job's student, written by the trainer process once training has
succeeded (before `result.json`), so that the student the API serves carries both (`core.distill.model_card`).

The card names what the tenant gave: the job's stored spec (uploaded file ids, models as named under the
model roots), not the spec the trainer read, whose file ids were replaced by server paths.
"""

from __future__ import annotations

from pathlib import Path

from core.config import Settings
from core.db import session_scope
from core.distill.model_card import DataFile, teacher_license, write_student_card
from core.distill.model_checks import shown_model
from core.distill.spec import JobSpec
from core.files import service as files_service
from core.jobs.models import Job


def write_job_student_card(
    *,
    settings: Settings,
    job_id: str,
    trained_spec: JobSpec,
    student_dir: Path,
    steps: int,
    metrics: dict[str, float],
) -> None:
    """README.md and distillery.json in `student_dir`, from the job's row and its data files' rows."""
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} no longer exists")
        given = JobSpec.model_validate(job.spec)
        data_files: dict[str, DataFile] = {}
        for field in ("train", "eval"):
            file_id = getattr(given.data, field)
            if file_id is None:
                continue
            row = files_service.get_file(session=session, tenant_id=job.tenant_id, file_id=file_id)
            data_files[field] = DataFile(
                id=row.id, filename=row.filename, sha256=row.sha256, records=row.records
            )
    roots = settings.model_roots
    teacher = given.teacher.model_copy(update={"model": shown_model(given.teacher.model, roots)})
    student = given.student
    if student.model is not None:
        student = student.model_copy(update={"model": shown_model(student.model, roots)})
    write_student_card(
        student_dir,
        given.model_copy(update={"teacher": teacher, "student": student}),
        job_id=job_id,
        data_files=data_files,
        steps=steps,
        metrics=metrics,
        # The trainer's spec names the teacher folder it actually loaded.
        teacher_license=teacher_license(trained_spec.teacher.model),
    )
