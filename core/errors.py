"""Errors the services raise for a caller's mistake or a conflict; the API turns each into its one error
shape `{"error": {"code", "message", "param"}}` with `status` as the HTTP status."""

from __future__ import annotations

import re

# A dotted field path named in a message, e.g. "... needs data.eval ...".
_DOTTED_FIELD = re.compile(r"\b([a-z_]+(?:\.[a-z_]+)+)\b")
# An absolute filesystem path of two or more parts (`/srv/models/tiny/config.json`), not an API route.
_SERVER_PATH = re.compile(r"(?<![\w.~/-])/(?!v1/)(?:[\w.@+-]+/)+([\w.@+-]*)")


class ServiceError(Exception):
    status = 400

    def __init__(self, code: str, message: str, *, param: str | None = None, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        if status is not None:
            self.status = status


class InvalidRequest(ServiceError):
    status = 422


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class PayloadTooLarge(ServiceError):
    status = 413


class Unavailable(ServiceError):
    status = 503


class StorageFull(ServiceError):
    """The artifact storage has no room left (disk full or quota exceeded): HTTP 507."""

    status = 507

    def __init__(self, message: str = "the server's storage is full; try again later") -> None:
        super().__init__("storage_full", message)


class StorageUnavailable(ServiceError):
    """The artifact storage failed for another reason (I/O error, read-only, permissions): HTTP 503."""

    status = 503

    def __init__(self, message: str = "the server's storage is unavailable; try again later") -> None:
        super().__init__("storage_unavailable", message)


def without_server_paths(text: str) -> str:
    """`text` with every absolute filesystem path cut to its last part (`.../config.json`): messages that
    tenants read (events, a job's error, library errors passed on) must not show the server's folders."""
    return _SERVER_PATH.sub(lambda match: f".../{match.group(1)}", text)


def param_from_message(message: str) -> str | None:
    """The first dotted field path a message names: the best `param` for a whole-object validation error."""
    match = _DOTTED_FIELD.search(message)
    return match.group(1) if match else None
