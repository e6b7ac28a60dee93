"""One error shape for every 4xx/5xx: `{"error": {"code", "message", "param"}}`.

`param` is the dotted path of the offending field (`loss.lam`, `data.train`, `limit`) or null. Service
errors, FastAPI's validation errors, unknown routes, wrong methods and unexpected exceptions all pass here.
An unexpected exception is answered by `UnexpectedErrors`, with a complete response that leaves the
keep-alive connection usable.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import ServiceError, param_from_message
from core.logs import current_request_id

logger = logging.getLogger(__name__)

_LOCATIONS = {"body", "query", "path", "header", "cookie"}
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
    507: "storage_full",
}


class UploadTooLarge(HTTPException):
    """Raised while the request body is read, as soon as it passes the upload limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"the upload is larger than the {limit}-byte limit")


class BodyTooLarge(HTTPException):
    """Raised while a (non-upload) request body is read, as soon as it passes the body limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"the request body is larger than the {limit}-byte limit")


def error_body(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "param": param, "request_id": current_request_id()}}


def error_response(
    status: int, code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message, param), status_code=status, headers=headers)


def _param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = list(loc)
    if parts and parts[0] in _LOCATIONS:
        parts = parts[1:]
    return ".".join(str(part) for part in parts) or None


async def _service_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return error_response(exc.status, exc.code, exc.message, exc.param, headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if not errors:
        return error_response(422, "invalid_request", "the request is invalid")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first.get("msg", ""))
        return error_response(400, "invalid_json", f"the body is not valid JSON: {detail}")
    param = _param(first.get("loc", ())) or param_from_message(str(first.get("msg", "")))
    messages = [f"{_param(e.get('loc', ())) or 'body'}: {e.get('msg', 'invalid')}" for e in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return error_response(422, "invalid_request", "; ".join(messages) + more, param)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = _HTTP_CODES.get(status, "http_error" if status < 500 else "internal_error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if status == 404 and message == "Not Found":
        message = "no such endpoint"
    param = None
    if isinstance(exc, UploadTooLarge):
        code, param = "file_too_large", "file"
    elif isinstance(exc, BodyTooLarge):
        code = "body_too_large"
    return error_response(status, code, message, param, dict(exc.headers or {}))


def _internal_error() -> JSONResponse:
    return error_response(500, "internal_error", "an unexpected error occurred; it has been logged")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _internal_error()


class UnexpectedErrors:
    """Answer an exception no handler knows with a complete 500 in the error shape, and swallow it.

    Starlette's own last-resort handler answers and then re-raises, and the server closes a connection
    whose application raised: the client's next request on that keep-alive connection would be reset.
    Once a response has started (a stream), the exception is re-raised: the connection must be cut."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if started:
                raise
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            await _internal_error()(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers; call before adding other middleware so that `UnexpectedErrors` sits closest
    to the routes (the `Exception` handler still covers what outer middleware raises)."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(UnexpectedErrors)
