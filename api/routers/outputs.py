"""What a job produces: its event log (list or live SSE), metric series, checkpoints and final student."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import FileResponse, StreamingResponse

from api.deps import SessionDep, SettingsDep, TenantDep
from api.schemas import (
    INT32_MAX,
    INT64_MAX,
    CheckpointOut,
    ErrorResponse,
    EventOut,
    JobId,
    MetricPoint,
    MetricsOut,
    Page,
    Step,
    json_safe,
)
from api.sse import job_event_stream
from core.archive import Archive, directory_archive
from core.distill import layout
from core.errors import Conflict, InvalidRequest, NotFound
from core.jobs import service
from core.jobs.states import JobStatus
from core.storage import Storage, storage_errors

router = APIRouter(prefix="/v1/jobs/{job_id}", tags=["job outputs"])

# Metric names as the trainer writes them (`loss`, `eval_rouge_l`, ...); Metric.name is 64 characters.
_METRIC_NAME = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")

_TAR_RESPONSES = {
    200: {"content": {"application/gzip": {}}, "description": "A .tar.gz of a Hugging Face model directory."},
    409: {"model": ErrorResponse},
}


@router.get(
    "/events",
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "JSON page, or SSE with stream=true."}
    },
)
def list_job_events(
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    job_id: JobId,
    after: Annotated[
        int | None, Query(ge=0, le=INT64_MAX, description="An event id; only later events.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    stream: Annotated[bool, Query(description="Stream as server-sent events until the job ends.")] = False,
    last_event_id: Annotated[
        int | None, Header(ge=0, le=INT64_MAX, description="Resume a stream after this event id.")
    ] = None,
) -> Page[EventOut]:
    """A job's events in order; `stream=true` sends them as server-sent events until the job ends."""
    service.get_job(session=session, tenant_id=tenant.id, job_id=job_id)
    after_id = after if after is not None else last_event_id
    if stream:
        return StreamingResponse(  # type: ignore[return-value]
            job_event_stream(settings.database_url, job_id, after_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    rows, has_more = service.list_events(session=session, job_id=job_id, after_id=after_id, limit=limit)
    return Page(
        data=[EventOut.of(e) for e in rows],
        has_more=has_more,
        next_cursor=str(rows[-1].id) if has_more else None,
    )


@router.get("/metrics")
def job_metrics(
    session: SessionDep,
    tenant: TenantDep,
    job_id: JobId,
    names: Annotated[str | None, Query(max_length=2000, description="Comma-separated metric names.")] = None,
    from_step: Annotated[int, Query(ge=0, le=INT32_MAX)] = 0,
) -> MetricsOut:
    """Metric series by name, each as (step, value) points in step order."""
    service.get_job(session=session, tenant_id=tenant.id, job_id=job_id)
    wanted = [n.strip() for n in names.split(",") if n.strip()] if names else None
    if names is not None and not wanted:
        raise InvalidRequest("invalid_names", "names must list at least one metric name", param="names")
    for name in wanted or ():
        if not _METRIC_NAME.match(name):
            raise InvalidRequest(
                "invalid_names",
                "a metric name is 1-64 letters, digits or _ . : / - (got one that is not)",
                param="names",
            )
    series = service.metric_series(session=session, job_id=job_id, names=wanted, from_step=from_step)
    return MetricsOut(
        job_id=job_id,
        series={
            name: [MetricPoint(step=s, value=json_safe(v)) for s, v in points]
            for name, points in series.items()
        },
    )


@router.get("/checkpoints")
def job_checkpoints(session: SessionDep, tenant: TenantDep, job_id: JobId) -> Page[CheckpointOut]:
    """A job's saved checkpoints, oldest first."""
    service.get_job(session=session, tenant_id=tenant.id, job_id=job_id)
    rows = service.list_checkpoints(session=session, job_id=job_id)
    return Page(data=[CheckpointOut.of(row) for row in rows])


def _archive_response(archive: Archive, filename: str) -> FileResponse:
    return FileResponse(
        archive.path,
        media_type="application/gzip",
        filename=filename,
        headers={"X-Content-SHA256": archive.sha256},
    )


@router.get("/checkpoints/{step}/download", response_class=FileResponse, responses=_TAR_RESPONSES)
def download_checkpoint(
    session: SessionDep, settings: SettingsDep, tenant: TenantDep, job_id: JobId, step: Step
) -> FileResponse:
    """Download one checkpoint as a streamed .tar.gz (size and SHA-256 in the headers)."""
    service.get_job(session=session, tenant_id=tenant.id, job_id=job_id)
    checkpoint = service.get_checkpoint(session=session, job_id=job_id, step=step)
    storage = Storage(settings.artifacts)
    directory = storage.resolve(checkpoint.storage_path)
    if not directory.is_dir():
        raise NotFound("checkpoint_missing", f"the files of checkpoint {step} are gone", param="step")
    name = layout.checkpoint_download_name(step)
    with storage_errors("building the checkpoint archive"):
        archive = directory_archive(directory, storage.job_dir(job_id) / "archives" / f"{name}.tar.gz", name)
    return _archive_response(archive, f"{job_id}-{name}.tar.gz")


@router.get("/student", response_class=FileResponse, responses=_TAR_RESPONSES)
def download_student(
    session: SessionDep, settings: SettingsDep, tenant: TenantDep, job_id: JobId
) -> FileResponse:
    """Download the distilled student (a Hugging Face directory) as a streamed .tar.gz."""
    job = service.get_job(session=session, tenant_id=tenant.id, job_id=job_id)
    if job.status != JobStatus.SUCCEEDED:
        raise Conflict(
            "student_not_ready", f"the student is available once the job succeeds (it is {job.status.value})"
        )
    storage = Storage(settings.artifacts)
    directory = layout.student_dir(storage.job_dir(job_id))
    if not (directory / "config.json").is_file():
        raise NotFound("student_missing", "the job succeeded but its student directory is missing")
    name = layout.STUDENT_DIR
    with storage_errors("building the student archive"):
        archive = directory_archive(directory, storage.job_dir(job_id) / "archives" / f"{name}.tar.gz", name)
    return _archive_response(archive, f"{job_id}-{name}.tar.gz")
