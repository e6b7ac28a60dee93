"""What a job produces: its event log (list or live SSE), metric series, checkpoints and final student."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse, Response, StreamingResponse

from api.deps import SessionDep, SettingsDep, TenantDep
from api.errors import error_response
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
from core.storage import Storage, open_storage, storage_errors

router = APIRouter(prefix="/v1/jobs/{job_id}", tags=["job outputs"])

# Metric names as the trainer writes them (`loss`, `eval_rouge_l`, ...); Metric.name is 64 characters.
_METRIC_NAME = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")

# One span of a Range header: `bytes=first-last`, `bytes=first-` or `bytes=-suffix_length`.
_BYTE_RANGE = re.compile(r"\s*bytes\s*=\s*(\d{0,19})\s*-\s*(\d{0,19})\s*", re.ASCII | re.IGNORECASE)

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


def _archive_response(storage: Storage, archive: Archive, filename: str, request: Request) -> Response:
    """The archive as a download: a local store's file as a FileResponse (Range, HEAD, If-Range), an
    object store's streamed from it, a requested byte range included (206)."""
    headers = {"X-Content-SHA256": archive.sha256}
    local = storage.local_file(archive.key)
    if local is not None:
        return FileResponse(local, media_type="application/gzip", filename=filename, headers=headers)
    size = archive.size_bytes
    headers |= {
        "Accept-Ranges": "bytes",
        "ETag": f'"{archive.sha256}"',
        "Content-Disposition": f'attachment; filename="{filename}"',
    }
    if_range = request.headers.get("if-range")
    span = None if if_range not in (None, headers["ETag"]) else request.headers.get("range")
    wanted = byte_range(span, size) if span else None
    if wanted == "unsatisfiable":
        return error_response(
            416,
            "range_not_satisfiable",
            f"the requested range is outside the file's {size} bytes",
            param="Range",
            headers={"Content-Range": f"bytes */{size}"},
        )
    start, end = wanted if isinstance(wanted, tuple) else (0, size - 1)
    with storage_errors("reading the archive"):
        chunks = storage.open_range(archive.key, start, end) if size else iter(())
    headers["Content-Length"] = str(end - start + 1)
    status = 200
    if isinstance(wanted, tuple):
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return StreamingResponse(chunks, status_code=status, media_type="application/gzip", headers=headers)


def byte_range(header: str, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """The inclusive (first, last) byte of one `Range: bytes=...` span within `size` bytes; None for a
    header to ignore (not bytes, several spans, malformed: RFC 9110 lets a server send the whole file);
    "unsatisfiable" for a span that starts past the end."""
    match = _BYTE_RANGE.fullmatch(header)
    if match is None or not any(match.groups()):
        return None
    first, last = match.groups()
    if not first:  # the last N bytes
        count = int(last)
        if count == 0:
            return "unsatisfiable"
        return (max(size - count, 0), size - 1) if size else "unsatisfiable"
    start, end = int(first), int(last) if last else size - 1
    if start >= size:
        return "unsatisfiable"
    if end < start:
        return None
    return start, min(end, size - 1)


@router.get("/checkpoints/{step}/download", response_class=FileResponse, responses=_TAR_RESPONSES)
def download_checkpoint(
    request: Request, session: SessionDep, settings: SettingsDep, tenant: TenantDep, job_id: JobId, step: Step
) -> Response:
    """Download one checkpoint as a streamed .tar.gz (size and SHA-256 in the headers; Range supported)."""
    service.get_job(session=session, tenant_id=tenant.id, job_id=job_id)
    checkpoint = service.get_checkpoint(session=session, job_id=job_id, step=step)
    storage = open_storage(settings)
    name = layout.checkpoint_download_name(step)
    with storage_errors("building the checkpoint archive"):
        if not storage.exists(checkpoint.storage_path):
            raise NotFound("checkpoint_missing", f"the files of checkpoint {step} are gone", param="step")
        archive_key = storage.relative(storage.job_dir(job_id) / "archives" / f"{name}.tar.gz")
        archive = directory_archive(storage, checkpoint.storage_path, archive_key, name)
    return _archive_response(storage, archive, f"{job_id}-{name}.tar.gz", request)


@router.get("/student", response_class=FileResponse, responses=_TAR_RESPONSES)
def download_student(
    request: Request, session: SessionDep, settings: SettingsDep, tenant: TenantDep, job_id: JobId
) -> Response:
    """Download the distilled student (a Hugging Face directory) as a streamed .tar.gz (Range supported)."""
    job = service.get_job(session=session, tenant_id=tenant.id, job_id=job_id)
    if job.status != JobStatus.SUCCEEDED:
        raise Conflict(
            "student_not_ready", f"the student is available once the job succeeds (it is {job.status.value})"
        )
    storage = open_storage(settings)
    directory = storage.relative(layout.student_dir(storage.job_dir(job_id)))
    name = layout.STUDENT_DIR
    with storage_errors("building the student archive"):
        if not storage.exists(f"{directory}/config.json"):
            raise NotFound("student_missing", "the job succeeded but its student directory is missing")
        archive_key = storage.relative(storage.job_dir(job_id) / "archives" / f"{name}.tar.gz")
        archive = directory_archive(storage, directory, archive_key, name)
    return _archive_response(storage, archive, f"{job_id}-{name}.tar.gz", request)
