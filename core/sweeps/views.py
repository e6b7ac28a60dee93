"""A sweep's public representation (`GET /v1/sweeps/{id}`): its status derived from its children, their
counts by status, each child's grid values, status and latest metrics, and the best child by the metric."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from core.jobs.models import Job, Sweep
from core.jobs.states import JobStatus
from core.jobs.views import json_safe


def sweep_status(sweep: Sweep, children: Sequence[Job]) -> str:
    """`running` while any child is queued or active (`cancelling` once the sweep was cancelled), `paused`
    when the only children that have not ended are paused; once all ended: `cancelled` if the sweep was
    cancelled, `succeeded` if any child succeeded, else `failed` when any child failed and `cancelled` when
    the children were all cancelled one by one."""
    statuses = {job.status for job in children}
    open_statuses = {status for status in statuses if not status.is_terminal}
    if open_statuses:
        if sweep.cancelled_at is not None:
            return "cancelling"
        return "paused" if open_statuses == {JobStatus.PAUSED} else "running"
    if sweep.cancelled_at is not None:
        return "cancelled"
    if JobStatus.SUCCEEDED in statuses:
        return "succeeded"
    return "failed" if JobStatus.FAILED in statuses else "cancelled"


def metric_value(job: Job, metric: str) -> float | None:
    """The child's last value of `metric`, if it has logged a finite one."""
    value = (job.latest_metrics or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def best_child(sweep: Sweep, children: Sequence[Job]) -> dict[str, Any] | None:
    """The child with the lowest (`mode` min) or highest (max) last value of the metric; a tie goes to
    the earlier child in grid order; None while no child has logged the metric."""
    best: tuple[float, Job] | None = None
    for job in children:
        value = metric_value(job, sweep.metric)
        if value is None:
            continue
        if best is None or (value < best[0] if sweep.mode == "min" else value > best[0]):
            best = (value, job)
    if best is None:
        return None
    value, job = best
    return {"job_id": job.id, "params": job.sweep_params or {}, "value": value}


def sweep_view(sweep: Sweep, children: Sequence[Job]) -> dict[str, Any]:
    """The sweep as the API shows it; `children` in grid order."""
    counts = {status.value: 0 for status in JobStatus}
    for job in children:
        counts[job.status.value] += 1
    return {
        "id": sweep.id,
        "status": sweep_status(sweep, children),
        "metric": sweep.metric,
        "mode": sweep.mode,
        "max_parallel": sweep.max_parallel,
        "grid": sweep.grid,
        "spec": sweep.spec,
        "counts": counts,
        "jobs": [
            {
                "id": job.id,
                "params": job.sweep_params or {},
                "status": job.status.value,
                "metrics": json_safe(job.latest_metrics or {}),
            }
            for job in children
        ],
        "best": best_child(sweep, children),
        "created_at": sweep.created_at,
        "cancelled_at": sweep.cancelled_at,
    }
