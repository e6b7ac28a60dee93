"""`/v1/jobs`: create (validated, then queued), list, get, cancel and resume distillation jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status

from api.deps import SessionDep, SettingsDep, TenantDep
from api.schemas import ErrorResponse, JobId, JobOut, Page, cursor_query
from core.distill.spec import JobSpec
from core.jobs import service
from core.jobs.states import JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": JobOut, "description": "A job with this Idempotency-Key already exists."}},
)
def create_job(
    spec: JobSpec,
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
        session=session, settings=settings, tenant_id=tenant.id, spec=spec, idempotency_key=idempotency_key
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    return JobOut.of(job)


@router.get("")
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, cursor_query("A job id from `next_cursor`.")] = None,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this state.")] = None,
) -> Page[JobOut]:
    """List the tenant's jobs, newest first."""
    rows, has_more = service.list_jobs(
        session=session, tenant_id=tenant.id, limit=limit, after=after, status=status
    )
    return Page(
        data=[JobOut.of(j) for j in rows], has_more=has_more, next_cursor=rows[-1].id if has_more else None
    )


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
    "/{job_id}/resume",
    responses={409: {"model": ErrorResponse, "description": "Not failed or cancelled, or no checkpoint."}},
)
def resume_job(session: SessionDep, settings: SettingsDep, tenant: TenantDep, job_id: JobId) -> JobOut:
    """Resume a failed or cancelled job from its last checkpoint (queued again, with fresh attempts)."""
    return JobOut.of(
        service.resume_job(session=session, settings=settings, tenant_id=tenant.id, job_id=job_id)
    )
