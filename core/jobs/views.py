"""A job's public representation, shared by the API (`GET /v1/jobs/{id}`, api/schemas.JobOut) and the
webhook payloads (their `data`), so the two can never drift apart."""

from __future__ import annotations

import math
from typing import Any

from pydantic_core import to_jsonable_python

from core.db import utcnow
from core.errors import without_server_paths
from core.jobs.models import Job
from core.jobs.states import JobStatus


def json_safe(value: Any) -> Any:
    """NaN and ±inf (a diverged loss) become null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value


def job_view(job: Job) -> dict[str, Any]:
    """The job as the API shows it: status, progress with its ETA, latest metrics, error, attempts, times."""
    step, total = job.current_step, max(job.total_steps, 1)
    eta = None
    if job.status == JobStatus.RUNNING and job.started_at is not None and 0 < step < total:
        elapsed = (utcnow() - job.started_at).total_seconds()
        eta = round(elapsed / step * (total - step), 1) if elapsed > 0 else None
    error = None
    if job.error_code is not None:
        # Worker messages may quote a library that names files: no server path reaches a tenant.
        error = {"code": job.error_code, "message": without_server_paths(job.error_message or "")}
    return {
        "id": job.id,
        "status": job.status,
        "spec": job.spec,
        "sweep_id": job.sweep_id,  # a sweep's child (GET /v1/sweeps/{id}), else null
        "progress": {
            "step": step,
            "total_steps": job.total_steps,
            "percent": round(100.0 * min(step, total) / total, 2),
            "eta_seconds": eta,
        },
        "latest_metrics": json_safe(job.latest_metrics or {}),
        "error": error,
        "metadata": dict(job.user_metadata or {}),
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "worker_id": job.worker_id,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "cancel_requested_at": job.cancel_requested_at,
        "heartbeat_at": job.heartbeat_at,
    }


def job_document(job: Job) -> dict[str, Any]:
    """`job_view` as JSON-ready values, written exactly as the API's response writes them."""
    return to_jsonable_python(job_view(job))
