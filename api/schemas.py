"""Response models (pydantic v2), and the request models beyond `JobSpec` itself and multipart uploads."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Path, Query
from pydantic import BaseModel, Field

from core.distill.spec import JobSpec
from core.errors import without_server_paths
from core.files.models import File
from core.jobs.models import Checkpoint, Job, JobEvent
from core.jobs.service import MAX_METADATA_KEYS, MAX_METADATA_VALUE_CHARS, METADATA_KEY_PATTERN
from core.jobs.states import JobStatus
from core.jobs.views import job_view, json_safe

T = TypeVar("T")

# What the database columns hold: PostgreSQL INTEGER (steps) and BIGINT (event ids). A larger number in a
# request is the caller's mistake (422), never a database error.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

# Ids are `<kind>_<hex>`; the pattern also keeps NUL and other control characters away from the database.
ID_PATTERN = r"^[A-Za-z0-9_-]+$"
ID_MAX_LENGTH = 64

JobId = Annotated[str, Path(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN)]
FileId = Annotated[str, Path(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN)]
Step = Annotated[int, Path(ge=0, le=INT32_MAX, description="A training step.")]


def cursor_query(description: str) -> Any:
    """The `after` query parameter of the keyset-paginated lists: an id from `next_cursor`."""
    return Query(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN, description=description)


class ErrorDetail(BaseModel):
    code: str
    message: str
    param: str | None = None
    request_id: str | None = Field(default=None, description="The request's X-Request-ID, for support.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Page(BaseModel, Generic[T]):
    data: list[T]
    has_more: bool = False
    next_cursor: str | None = Field(default=None, description="Pass as `after` to get the next page.")


class FileOut(BaseModel):
    id: str
    filename: str
    purpose: str
    size_bytes: int
    sha256: str
    records: int
    format: str | None
    created_at: datetime

    @classmethod
    def of(cls, row: File) -> FileOut:
        return cls.model_validate(row, from_attributes=True)


class FileDeleted(BaseModel):
    id: str
    deleted: bool = True


class Progress(BaseModel):
    step: int
    total_steps: int
    percent: float
    eta_seconds: float | None = Field(description="From the pace of the current attempt; null when unknown.")


class JobError(BaseModel):
    code: str
    message: str


# The rules are core.jobs.service.check_metadata's (which also refuses control characters); declared here
# for the OpenAPI schema.
JobMetadata = Annotated[
    dict[str, Annotated[str, Field(max_length=MAX_METADATA_VALUE_CHARS)]],
    Field(
        max_length=MAX_METADATA_KEYS, json_schema_extra={"propertyNames": {"pattern": METADATA_KEY_PATTERN}}
    ),
]


class JobCreate(JobSpec):
    """The body of `POST /v1/jobs`: a `JobSpec`, and the job's `metadata`."""

    metadata: JobMetadata | None = Field(
        default=None,
        description=(
            "Your labels, string to string: at most 16 keys of 1 to 64 letters, digits or `_ . - : / @ +`, "
            "values of at most 512 characters. Shown with the job; `GET /v1/jobs?metadata[KEY]=VALUE` filters."
        ),
    )

    def job_spec(self) -> JobSpec:
        """The spec alone (what the job stores as its `spec`)."""
        return JobSpec.model_validate(self.model_dump(exclude={"metadata"}))


class JobOut(BaseModel):
    id: str
    status: JobStatus
    spec: dict[str, Any]
    sweep_id: str | None = Field(default=None, description="The sweep that created the job, if any.")
    progress: Progress
    latest_metrics: dict[str, Any]
    error: JobError | None
    metadata: dict[str, str] = Field(description="The labels given at creation.")
    attempts: int
    max_attempts: int
    worker_id: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested_at: datetime | None
    heartbeat_at: datetime | None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls.model_validate(job_view(job))  # core.jobs.views: also the webhooks' `data`


def _public(value: Any) -> Any:
    """Event data as a tenant may read it: no server paths in any string."""
    if isinstance(value, str):
        return without_server_paths(value)
    if isinstance(value, dict):
        return {key: _public(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_public(item) for item in value]
    return value


class EventOut(BaseModel):
    id: int
    job_id: str
    kind: str
    step: int | None = Field(default=None, description="The training step the event reports, if any.")
    message: str
    data: dict[str, Any] | None
    created_at: datetime

    @classmethod
    def of(cls, row: JobEvent) -> EventOut:
        return cls(
            id=row.id,
            job_id=row.job_id,
            kind=row.kind,
            step=row.step,
            message=without_server_paths(row.message),
            data=_public(json_safe(row.data)),
            created_at=row.created_at,
        )


class MetricPoint(BaseModel):
    step: int
    value: float | None = Field(description="null for a non-finite value (NaN, inf).")


class MetricsOut(BaseModel):
    job_id: str
    series: dict[str, list[MetricPoint]]


class CheckpointOut(BaseModel):
    step: int
    size_bytes: int
    metrics: dict[str, Any]
    created_at: datetime
    download_url: str

    @classmethod
    def of(cls, row: Checkpoint) -> CheckpointOut:
        return cls(
            step=row.step,
            size_bytes=row.size_bytes,
            metrics=json_safe(row.metrics or {}),
            created_at=row.created_at,
            download_url=f"/v1/jobs/{row.job_id}/checkpoints/{row.step}/download",
        )


class CheckResult(BaseModel):
    status: str
    checks: dict[str, str]
