"""`/v1/sweeps`: a job per point of a grid over spec fields, ranked by a metric; list, get and cancel."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field

from api.deps import SessionDep, SettingsDep, TenantDep
from api.schemas import ID_MAX_LENGTH, ID_PATTERN, ErrorResponse, Page, cursor_query
from core.distill.spec import JobSpec
from core.jobs.models import Job, Sweep
from core.jobs.states import JobStatus
from core.sweeps import service
from core.sweeps.grid import MAX_CHILDREN
from core.sweeps.views import sweep_view

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"])

SweepId = Annotated[str, Path(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN)]
GridPath = Annotated[str, Field(min_length=1, max_length=200)]


class SweepCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: JobSpec = Field(description="The base job spec every child starts from.")
    grid: dict[GridPath, Annotated[list[Any], Field(max_length=MAX_CHILDREN)]] = Field(
        max_length=16,
        description="Dotted spec paths (`loss.alpha`, `training.learning_rate`) to the values tried, e.g. "
        '`{"loss.alpha": [-1, 0.5], "loss.lam": [0.1, 0.3]}`; the children are the cartesian product (at '
        "most 64). A section path (`loss`) takes objects, each merged into the base spec's section.",
    )
    metric: str = Field(
        default="eval_kd_loss",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="The metric ranking the children (their last value): eval_kd_loss, eval_rouge_l, ...",
    )
    mode: Literal["min", "max"] = Field(default="min", description="Whether lower or higher is better.")
    max_parallel: int | None = Field(
        default=None,
        ge=1,
        le=MAX_CHILDREN,
        description="At most this many children run at once (default all).",
    )


class SweepJobOut(BaseModel):
    id: str
    params: dict[str, Any] = Field(description="The grid values this job was made with.")
    status: JobStatus
    metrics: dict[str, Any] = Field(description="Each metric's last value (null when not finite).")


class SweepBest(BaseModel):
    job_id: str
    params: dict[str, Any]
    value: float


class SweepOut(BaseModel):
    id: str
    status: Literal["running", "cancelling", "paused", "succeeded", "failed", "cancelled"] = Field(
        description="running while a child is queued or active; paused when only paused children remain."
    )
    metric: str
    mode: Literal["min", "max"]
    max_parallel: int | None
    grid: dict[str, list[Any]]
    spec: dict[str, Any] = Field(description="The base spec, as given.")
    counts: dict[str, int] = Field(description="The children by status.")
    jobs: list[SweepJobOut] = Field(description="The children in grid order (the last path varies fastest).")
    best: SweepBest | None = Field(
        description="The child with the best last value of `metric`; null until one has it."
    )
    created_at: datetime
    cancelled_at: datetime | None

    @classmethod
    def of(cls, sweep: Sweep, children: list[Job]) -> SweepOut:
        return cls.model_validate(sweep_view(sweep, children))


def _one(session: SessionDep, sweep: Sweep) -> SweepOut:
    return SweepOut.of(sweep, service.children_of(session=session, sweep_ids=[sweep.id])[sweep.id])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": SweepOut, "description": "A sweep with this Idempotency-Key already exists."}},
)
def create_sweep(
    body: SweepCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    idempotency_key: Annotated[
        str | None, Header(min_length=1, max_length=255, pattern=r"^[\x20-\x7e]+$")
    ] = None,
) -> SweepOut:
    """Create a sweep: every child spec is validated first (`param` names the child), then all its jobs."""
    sweep, created = service.create_sweep(
        session=session,
        settings=settings,
        tenant_id=tenant.id,
        spec=body.spec,
        grid=body.grid,
        metric=body.metric,
        mode=body.mode,
        max_parallel=body.max_parallel,
        idempotency_key=idempotency_key,
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    return _one(session, sweep)


@router.get("")
def list_sweeps(
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, cursor_query("A sweep id from `next_cursor`.")] = None,
) -> Page[SweepOut]:
    """List the tenant's sweeps, newest first."""
    rows, has_more = service.list_sweeps(session=session, tenant_id=tenant.id, limit=limit, after=after)
    children = service.children_of(session=session, sweep_ids=[sweep.id for sweep in rows])
    return Page(
        data=[SweepOut.of(sweep, children[sweep.id]) for sweep in rows],
        has_more=has_more,
        next_cursor=rows[-1].id if has_more else None,
    )


@router.get("/{sweep_id}")
def get_sweep(session: SessionDep, tenant: TenantDep, sweep_id: SweepId) -> SweepOut:
    """Get a sweep: its status, the children's counts, params, status and metrics, and the best child."""
    return _one(session, service.get_sweep(session=session, tenant_id=tenant.id, sweep_id=sweep_id))


@router.post(
    "/{sweep_id}/cancel",
    responses={409: {"model": ErrorResponse, "description": "Every job of the sweep has ended."}},
)
def cancel_sweep(session: SessionDep, tenant: TenantDep, sweep_id: SweepId) -> SweepOut:
    """Cancel every child that has not ended; no held child is started afterwards."""
    return _one(session, service.cancel_sweep(session=session, tenant_id=tenant.id, sweep_id=sweep_id))
