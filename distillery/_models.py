"""The API's objects as typed pydantic models. Unknown fields are kept (`extra="allow"`), so a newer
server never breaks an older client."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class File(_Model):
    id: str
    filename: str
    purpose: str
    size_bytes: int
    sha256: str
    records: int
    format: str | None = None
    created_at: datetime


class FileDeleted(_Model):
    id: str
    deleted: bool = True


class Progress(_Model):
    step: int
    total_steps: int
    percent: float
    eta_seconds: float | None = None


class JobError(_Model):
    code: str
    message: str


class Job(_Model):
    id: str
    status: str
    spec: dict[str, Any]
    progress: Progress
    latest_metrics: dict[str, Any] = Field(default_factory=dict)
    error: JobError | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    attempts: int = 0
    max_attempts: int = 0
    created_at: datetime
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def is_terminal(self) -> bool:
        """Whether the job has ended (succeeded, failed or cancelled)."""
        return self.status in TERMINAL_STATUSES


class Event(_Model):
    id: int
    job_id: str
    kind: str
    message: str
    data: dict[str, Any] | None = None
    created_at: datetime


class Checkpoint(_Model):
    step: int
    size_bytes: int
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    download_url: str


class MetricPoint(_Model):
    step: int
    value: float | None = None


class Metrics(_Model):
    job_id: str
    series: dict[str, list[MetricPoint]]

    def last(self, name: str) -> float | None:
        """The last value of metric `name`, or None."""
        points = self.series.get(name) or []
        return points[-1].value if points else None


class SweepJob(_Model):
    """One child of a sweep: its grid values, status and each metric's last value."""

    id: str
    params: dict[str, Any] = Field(default_factory=dict)
    status: str
    metrics: dict[str, Any] = Field(default_factory=dict)


class SweepBest(_Model):
    job_id: str
    params: dict[str, Any] = Field(default_factory=dict)
    value: float


class Sweep(_Model):
    """A job per point of a grid over spec fields, ranked by `metric` (`mode` min or max)."""

    id: str
    status: str
    metric: str
    mode: str
    max_parallel: int | None = None
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    spec: dict[str, Any] = Field(default_factory=dict)
    counts: dict[str, int] = Field(default_factory=dict)
    jobs: list[SweepJob] = Field(default_factory=list)
    best: SweepBest | None = None
    created_at: datetime
    cancelled_at: datetime | None = None

    @property
    def is_done(self) -> bool:
        """Whether no child is queued or running any more (every one ended, or paused)."""
        return self.status not in ("running", "cancelling")

    def ranked(self) -> list[SweepJob]:
        """The children best first by the sweep's metric (grid order among equals); those without it last."""

        def key(job: SweepJob) -> tuple[int, float]:
            value = job.metrics.get(self.metric)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return (1, 0.0)
            return (0, value if self.mode == "min" else -value)

        return sorted(self.jobs, key=key)
