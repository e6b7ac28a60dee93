"""`POST /v1/jobs/{id}/resume` through a real uvicorn server (SQLite and PostgreSQL): a failed or cancelled
job with a checkpoint goes back to the queue with fresh attempts and its message is really sent; anything
else is refused with 409 `job_not_resumable` naming what is wrong. The test plays the worker by writing rows
and files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from core.db import utcnow
from core.jobs.models import Checkpoint, Job
from core.jobs.states import JobStatus
from core.queue import queue_depth
from core.storage import Storage
from tests.support.api import assert_error, dolly_lines, job_spec, upload
from tests.support.live_api import LiveApi


@pytest.fixture(scope="module")
def tenant(live_api: LiveApi) -> dict[str, str]:
    _, key = live_api.new_tenant("resume")
    with live_api.client(key) as client:
        train = upload(client, dolly_lines(4)).json()["id"]
    return {"key": key, "train": train}


def new_job(live_api: LiveApi, tenant: dict[str, str], teacher: Path, train: str | None = None) -> str:
    with live_api.client(tenant["key"]) as client:
        response = client.post("/v1/jobs", json=job_spec(str(teacher), train or tenant["train"]))
        assert response.status_code == 201, response.text
        return response.json()["id"]


def end_job(live_api: LiveApi, job_id: str, status: JobStatus, *, checkpoint: bool = True) -> None:
    """What a worker leaves behind: the job ended after two attempts, with a checkpoint at step 2."""
    values: dict[str, Any] = {"status": status, "attempts": 2, "worker_id": "w1", "finished_at": utcnow()}
    if status is JobStatus.FAILED:
        values |= {"error_code": "trainer_crashed", "error_message": "killed by SIGKILL"}
    if status is JobStatus.CANCELLED:
        values |= {"cancel_requested_at": utcnow()}
    with live_api.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))
        if checkpoint:
            storage = Storage(live_api.settings.artifacts)
            path = storage.job_dir(job_id) / "checkpoints" / "step-00000002"
            path.mkdir(parents=True)
            session.add(
                Checkpoint(
                    job_id=job_id, step=2, storage_path=storage.relative(path), size_bytes=1, metrics={}
                )
            )
        session.commit()


@pytest.mark.parametrize("status", [JobStatus.FAILED, JobStatus.CANCELLED])
def test_a_failed_or_cancelled_job_with_a_checkpoint_is_queued_again(
    live_api: LiveApi, tenant: dict[str, str], tiny_teacher_dir: Path, status: JobStatus
) -> None:
    job_id = new_job(live_api, tenant, tiny_teacher_dir)
    end_job(live_api, job_id, status)
    messages_before = queue_depth(live_api.settings)
    with live_api.client(tenant["key"]) as client:
        response = client.post(f"/v1/jobs/{job_id}/resume")
        assert response.status_code == 200, response.text
        job = response.json()
        assert (job["status"], job["attempts"], job["max_attempts"], job["error"]) == ("queued", 0, 2, None)
        assert job == client.get(f"/v1/jobs/{job_id}").json()
        events = client.get(f"/v1/jobs/{job_id}/events").json()["data"]
        assert (events[-1]["kind"], events[-1]["data"]) == ("status", {"status": "queued"})
        assert "resumed by the user" in events[-1]["message"] and "step 2" in events[-1]["message"]
        assert queue_depth(live_api.settings) == messages_before + 1  # its message was sent

        # Asking again while it is queued (a retried request) changes nothing and sends nothing.
        again = client.post(f"/v1/jobs/{job_id}/resume")
        assert again.status_code == 200 and again.json() == job
        assert len(client.get(f"/v1/jobs/{job_id}/events").json()["data"]) == len(events)
    assert queue_depth(live_api.settings) == messages_before + 1
    with live_api.session() as session:
        row = session.get(Job, job_id)
        assert row is not None and row.worker_id is None and row.finished_at is None
        assert row.cancel_requested_at is None and row.enqueued_at is not None


def test_a_job_without_a_checkpoint_is_not_resumable(
    live_api: LiveApi, tenant: dict[str, str], tiny_teacher_dir: Path
) -> None:
    job_id = new_job(live_api, tenant, tiny_teacher_dir)
    end_job(live_api, job_id, JobStatus.FAILED, checkpoint=False)
    with live_api.client(tenant["key"]) as client:
        error = assert_error(client.post(f"/v1/jobs/{job_id}/resume"), 409, "job_not_resumable", "job_id")
        assert "no checkpoint" in error["message"]
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "failed"


def test_a_checkpoint_whose_files_are_gone_does_not_count(
    live_api: LiveApi, tenant: dict[str, str], tiny_teacher_dir: Path
) -> None:
    job_id = new_job(live_api, tenant, tiny_teacher_dir)
    end_job(live_api, job_id, JobStatus.CANCELLED)
    (Storage(live_api.settings.artifacts).job_dir(job_id) / "checkpoints" / "step-00000002").rmdir()
    with live_api.client(tenant["key"]) as client:
        assert_error(client.post(f"/v1/jobs/{job_id}/resume"), 409, "job_not_resumable", "job_id")


@pytest.mark.parametrize("status", [JobStatus.SUCCEEDED, JobStatus.CANCELLING])
def test_other_states_are_not_resumable(
    live_api: LiveApi, tenant: dict[str, str], tiny_teacher_dir: Path, status: JobStatus
) -> None:
    job_id = new_job(live_api, tenant, tiny_teacher_dir)
    end_job(live_api, job_id, status)
    with live_api.client(tenant["key"]) as client:
        error = assert_error(client.post(f"/v1/jobs/{job_id}/resume"), 409, "job_not_resumable", "job_id")
        assert status.value in error["message"]


def test_a_running_job_is_returned_unchanged(
    live_api: LiveApi, tenant: dict[str, str], tiny_teacher_dir: Path
) -> None:
    job_id = new_job(live_api, tenant, tiny_teacher_dir)
    with live_api.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.RUNNING, attempts=1))
        session.commit()
    with live_api.client(tenant["key"]) as client:
        response = client.post(f"/v1/jobs/{job_id}/resume")
        assert response.status_code == 200 and response.json()["status"] == "running"
        assert response.json()["attempts"] == 1


def test_a_job_whose_training_file_was_deleted_is_not_resumable(
    live_api: LiveApi, tenant: dict[str, str], tiny_teacher_dir: Path
) -> None:
    with live_api.client(tenant["key"]) as client:
        train = upload(client, dolly_lines(4)).json()["id"]
        job_id = new_job(live_api, tenant, tiny_teacher_dir, train)
        end_job(live_api, job_id, JobStatus.FAILED)
        assert client.delete(f"/v1/files/{train}").status_code in (200, 204)  # allowed once the job ended
        error = assert_error(client.post(f"/v1/jobs/{job_id}/resume"), 409, "job_not_resumable", "data.train")
        assert train in error["message"]


def test_unknown_and_foreign_jobs_are_not_found(
    live_api: LiveApi, tenant: dict[str, str], tiny_teacher_dir: Path
) -> None:
    job_id = new_job(live_api, tenant, tiny_teacher_dir)
    end_job(live_api, job_id, JobStatus.FAILED)
    _, other_key = live_api.new_tenant("other")
    with live_api.client(other_key) as client:
        assert_error(client.post(f"/v1/jobs/{job_id}/resume"), 404, "job_not_found", "job_id")
        assert_error(client.post("/v1/jobs/job_nope/resume"), 404, "job_not_found", "job_id")
    with live_api.client(tenant["key"]) as client:
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "failed"
