"""Distillery's Python client: `Distillery` and `AsyncDistillery` over the REST API.

    from distillery import Distillery
    client = Distillery()                      # DISTILL_API_URL, DISTILL_API_KEY
    job = client.jobs.create("job.yaml")       # local data files are uploaded first
    job = client.jobs.wait(job.id, on_event=print)
    sweep = client.sweeps.create("job.yaml", {"loss.alpha": [-1, 0.5]}, max_parallel=2)
    sweep = client.sweeps.wait(sweep.id)      # sweep.best: the child with the best eval_kd_loss
    client.jobs.download_student(job.id, "out/")

Needs only httpx and pydantic (PyYAML to read YAML specs).
"""

from distillery._async_client import AsyncDistillery
from distillery._client import Distillery
from distillery._errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    DistilleryError,
    DownloadVerificationError,
    InternalServerError,
    JobWaitTimeout,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    SweepWaitTimeout,
    UnprocessableEntityError,
)
from distillery._models import (
    TERMINAL_STATUSES,
    Checkpoint,
    Event,
    File,
    FileDeleted,
    Job,
    Metrics,
    Sweep,
    SweepBest,
    SweepJob,
)

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AsyncDistillery",
    "AuthenticationError",
    "BadRequestError",
    "Checkpoint",
    "ConflictError",
    "Distillery",
    "DistilleryError",
    "DownloadVerificationError",
    "Event",
    "File",
    "FileDeleted",
    "InternalServerError",
    "Job",
    "JobWaitTimeout",
    "Metrics",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "Sweep",
    "SweepBest",
    "SweepJob",
    "SweepWaitTimeout",
    "TERMINAL_STATUSES",
    "UnprocessableEntityError",
    "__version__",
]
