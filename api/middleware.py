"""The request context: an id for every request (the caller's sane `X-Request-ID`, else a new one), echoed
on the response, in error bodies and in every log record; the `RateLimit-*` headers of an authenticated
request; and one access-log record per request.

A pure ASGI middleware (BaseHTTPMiddleware would buffer streaming responses such as the student download
and the event stream). It sits outside Starlette's exception middleware, so it also turns an unhandled
exception into the app's 500 answer itself: otherwise that answer would leave without the id header.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.ratelimit import RateLimitDecision
from core.logs import request_id

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

access_logger = logging.getLogger("distill.access")


def new_request_id() -> str:
    return f"req_{secrets.token_hex(12)}"


def incoming_request_id(scope: Scope) -> str | None:
    """The caller's `X-Request-ID` when it is short and plain (letters, digits, `._:-`), else None."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = value.decode("latin-1").strip()
            return candidate if _SANE_REQUEST_ID.fullmatch(candidate) else None
    return None


class RequestContext:
    """Request id, rate-limit headers and the access log, for every HTTP request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = incoming_request_id(scope) or new_request_id()
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = rid
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_context(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started, status = True, message["status"]
                message.setdefault("headers", [])
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = rid
                decision = state.get("rate_limit")
                if isinstance(decision, RateLimitDecision):
                    for name, value in decision.headers().items():
                        headers[name] = value
            await send(message)

        try:
            await self.app(scope, receive, send_with_context)
        except Exception as exc:
            if response_started:
                raise
            await self._unhandled(scope, receive, send_with_context, exc)
        finally:
            self._log_access(scope, state, status, started)
            request_id.reset(token)

    async def _unhandled(self, scope: Scope, receive: Receive, send: Send, exc: Exception) -> None:
        """Answer as the app's handler for `Exception` would (it logs the error), with the id header."""
        app = scope.get("app")
        handler = getattr(app, "exception_handlers", {}).get(Exception)
        if handler is None:
            raise exc
        response = await handler(Request(scope, receive), exc)
        await response(scope, receive, send)

    @staticmethod
    def _log_access(scope: Scope, state: dict[str, Any], status: int, started: float) -> None:
        duration_ms = round((time.perf_counter() - started) * 1000, 2)
        method, path = scope["method"], scope["path"]
        access_logger.info(
            "%s %s %d %.1fms",
            method,
            path,
            status,
            duration_ms,
            extra={
                "method": method,
                "path": path,
                "status": status,
                "duration_ms": duration_ms,
                "tenant_id": state.get("tenant_id"),
            },
        )
