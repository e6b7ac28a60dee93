"""`/v1/jobs`: create (validated, then queued), list, get, cancel, pause and resume distillation jobs."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status

from api.deps import SessionDep, SettingsDep, TenantDep
from api.schemas import ErrorResponse, JobCreate, JobId, JobOut, Page, cursor_query
from core.errors import InvalidRequest
from core.jobs import service
from core.jobs.states import JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# `GET /v1/jobs?metadata[team]=nlp&metadata[run]=7`: OpenAPI's deepObject style, which FastAPI cannot declare
# as a parameter; read from the query string by `_metadata_filter` and documented here.
_METADATA_FILTER = {
    "name": "metadata",
    "in": "query",
    "required": False,
    "style": "deepObject",
    "explode": True,
    "schema": {"type": "object", "additionalProperties": {"type": "string"}},
    "description": "Only jobs whose metadata holds every given pair: `metadata[KEY]=VALUE`, repeatable.",
}
_METADATA_PARAM = re.compile(r"metadata\[(.*)\]", re.DOTALL)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": JobOut, "description": "A job with this Idempotency-Key already exists."}},
)
def create_job(
    body: JobCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    idempotency_key: Annotated[
        str | None, Header(min_length=1, max_length=255, pattern=r"^[\x20-\x7e]+$")
    ] = None,
) -> JobOut:
    """Create a distillation job; `data.train`/`data.eval` are uploaded file ids."""
    job, created = service.create_job(
        session=session,
        settings=settings,
        tenant_id=tenant.id,
        spec=body.job_spec(),
        idempotency_key=idempotency_key,
        metadata=body.metadata,
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    return JobOut.of(job)


@router.get("", openapi_extra={"parameters": [_METADATA_FILTER]})
def list_jobs(
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, cursor_query("A job id from `next_cursor`.")] = None,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this state.")] = None,
) -> Page[JobOut]:
    """List the tenant's jobs, newest first, optionally of one state and with given metadata."""
    rows, has_more = service.list_jobs(
        session=session,
        tenant_id=tenant.id,
        limit=limit,
        after=after,
        status=status,
        metadata=_metadata_filter(request),
    )
    return Page(
        data=[JobOut.of(j) for j in rows], has_more=has_more, next_cursor=rows[-1].id if has_more else None
    )


def _metadata_filter(request: Request) -> dict[str, str]:
    """The `metadata[KEY]=VALUE` query parameters as {KEY: VALUE} (checked by the service)."""
    pairs: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name != "metadata" and not name.startswith("metadata["):
            continue
        match = _METADATA_PARAM.fullmatch(name)
        if match is None:
            raise InvalidRequest(
                "invalid_metadata", "filter by metadata with metadata[KEY]=VALUE", param=name
            )
        if pairs.setdefault(match[1], value) != value:
            raise InvalidRequest(
                "invalid_metadata", f"{name} is given twice, with different values", param=name
            )
    return pairs


@router.get("/{job_id}")
def get_job(session: SessionDep, tenant: TenantDep, job_id: JobId) -> JobOut:
    """Get a job: status, progress with ETA, latest metrics and error."""
    return JobOut.of(service.get_job(session=session, tenant_id=tenant.id, job_id=job_id))


@router.post(
    "/{job_id}/cancel", responses={409: {"model": ErrorResponse, "description": "The job has ended."}}
)
def cancel_job(session: SessionDep, tenant: TenantDep, job_id: JobId) -> JobOut:
    """Cancel a job: a queued job at once, a running one within a few steps (`cancelling` meanwhile)."""
    return JobOut.of(service.cancel_job(session=session, tenant_id=tenant.id, job_id=job_id))


@router.post(
    "/{job_id}/pause",
    responses={409: {"model": ErrorResponse, "description": "The job has ended or is being cancelled."}},
)
def pause_job(session: SessionDep, tenant: TenantDep, job_id: JobId) -> JobOut:
    """Pause a job: a queued one at once, a running one after its current step (`pausing` until it has
    checkpointed, then `paused`, holding no worker); `resume` continues it from there."""
    return JobOut.of(service.pause_job(session=session, tenant_id=tenant.id, job_id=job_id))


@router.post(
    "/{job_id}/resume",
    responses={
        409: {"model": ErrorResponse, "description": "Not paused, failed or cancelled, or no checkpoint."}
    },
)
def resume_job(session: SessionDep, settings: SettingsDep, tenant: TenantDep, job_id: JobId) -> JobOut:
    """Resume a paused job where it stopped, or a failed or cancelled one from its last checkpoint (queued
    again, with fresh attempts)."""
    return JobOut.of(
        service.resume_job(session=session, settings=settings, tenant_id=tenant.id, job_id=job_id)
    )
