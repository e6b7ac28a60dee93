"""Typed errors mirroring the API's error shape `{"error": {"code", "message", "param"}}`."""

from __future__ import annotations

from typing import Any


class DistilleryError(Exception):
    """Base class of every error this client raises."""


class APIConnectionError(DistilleryError):
    """The server could not be reached (connection refused, reset, DNS) after all retries."""


class APITimeoutError(APIConnectionError):
    """The request timed out after all retries."""


class APIError(DistilleryError):
    """The API answered with an error status; `code`, `message` and `param` come from its error body."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        request_id: str | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        where = f" (param: {param})" if param else ""
        super().__init__(f"{status_code} {code}: {message}{where}")
        self.status_code = status_code
        self.code = code
        self.message = message
        self.param = param
        self.request_id = request_id
        self.body = body
        self.headers = headers or {}


class BadRequestError(APIError):
    """400: the request could not be read (e.g. invalid JSON)."""


class AuthenticationError(APIError):
    """401: no API key, or a key that is unknown, revoked or expired."""


class PermissionDeniedError(APIError):
    """403: the key may not do this."""


class NotFoundError(APIError):
    """404: no such object for this tenant (or no such endpoint)."""


class ConflictError(APIError):
    """409: the object is not in a state that allows this (e.g. cancelling a finished job)."""


class PayloadTooLargeError(APIError):
    """413: an upload or body over the server's limit."""


class UnprocessableEntityError(APIError):
    """422: a field is invalid; `param` names it (e.g. `loss.lam`)."""


class RateLimitError(APIError):
    """429: too many requests; `retry_after` seconds is the server's advice."""

    @property
    def retry_after(self) -> float | None:
        value = self.headers.get("retry-after")
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None


class InternalServerError(APIError):
    """5xx: the server failed or is unavailable (retried automatically before this is raised)."""


class JobWaitTimeout(DistilleryError):
    """`jobs.wait` gave up before the job ended; `job` is its last known state."""

    def __init__(self, job: Any, timeout: float) -> None:
        super().__init__(f"job {job.id} is still {job.status} after {timeout:g} s")
        self.job = job


class SweepWaitTimeout(DistilleryError):
    """`sweeps.wait` gave up while children were still queued or running; `sweep` is its last state."""

    def __init__(self, sweep: Any, timeout: float) -> None:
        super().__init__(f"sweep {sweep.id} is still {sweep.status} after {timeout:g} s")
        self.sweep = sweep


class DownloadVerificationError(DistilleryError):
    """A downloaded archive's size or SHA-256 differs from what the server announced."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def error_from_response(status_code: int, body: Any, headers: dict[str, str]) -> APIError:
    """The typed error for an error response (any body: the error shape, other JSON or text)."""
    detail = body.get("error") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        code = str(detail.get("code") or "error")
        message = str(detail.get("message") or "")
        param = detail.get("param")
        request_id = detail.get("request_id")
    else:
        code, message, param, request_id = "http_error", str(body)[:500], None, None
    request_id = request_id or headers.get("x-request-id")
    cls = _BY_STATUS.get(status_code, InternalServerError if status_code >= 500 else APIError)
    return cls(
        status_code, code, message, param=param, request_id=request_id, body=body, headers=dict(headers)
    )
