"""The FastAPI application factory: `uvicorn api.main:create_app --factory`.

The app never creates tables (migrations are a separate step: `distill db upgrade`); at start-up it only
stores the bootstrap API key when one is configured and the schema exists.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import BodyTooLarge, UploadTooLarge, error_response, install_error_handlers
from api.metrics import install_metrics
from api.middleware import REQUEST_ID_HEADER, RequestContext
from api.ratelimit import RATE_LIMIT_HEADERS, RateLimiter
from api.routers import files, health, jobs, keys, outputs, sweeps, tenants, webhooks
from api.ui import install_dashboard
from core.config import Settings, get_settings
from core.db import get_engine, get_sessionmaker
from core.logs import configure_logging
from core.tenants.keys import ensure_bootstrap_key

logger = logging.getLogger(__name__)

# Multipart boundaries and headers around the file; the exact file-size check happens while storing it.
MULTIPART_OVERHEAD = 64 * 1024
# Every other body is a small JSON document (a job spec is a few KB): nothing bigger is read or parsed.
MAX_BODY_BYTES = 1024 * 1024


class BodySizeLimit:
    """Refuse a request body over its limit (413) as it arrives, before it is spooled or parsed in full:
    an upload may reach the upload limit, any other body `MAX_BODY_BYTES`."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, path: str = "/v1/files", max_body_bytes: int = MAX_BODY_BYTES
    ) -> None:
        self.app, self.max_bytes, self.path, self.max_body_bytes = app, max_bytes, path, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope["method"] == "POST" and scope["path"].rstrip("/") == self.path
        limit = self.max_bytes + MULTIPART_OVERHEAD if upload else self.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            if upload:
                message = f"the upload is larger than the {self.max_bytes}-byte limit"
                response = error_response(413, "file_too_large", message, "file")
            else:
                message = f"the request body is larger than the {self.max_body_bytes}-byte limit"
                response = error_response(413, "body_too_large", message)
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise UploadTooLarge(self.max_bytes) if upload else BodyTooLarge(self.max_body_bytes)
            return message

        await self.app(scope, counting_receive, send)


def _store_bootstrap_key(settings: Settings) -> None:
    if not settings.bootstrap_api_key:
        return
    try:
        with get_sessionmaker(settings.database_url)() as session:
            ensure_bootstrap_key(session, settings.bootstrap_api_key)
    except SQLAlchemyError:
        logger.exception("could not store the bootstrap API key; has `distill db upgrade` run?")


def _warm_database_pool(settings: Settings, connections: int = 10) -> None:
    """Open pooled connections before the first request: a burst of clients on a cold pool otherwise pays
    for many new PostgreSQL connections (a server process each) at once, seconds of queueing on small hosts."""
    engine = get_engine(settings.database_url)
    opened = []
    try:
        pool_size = getattr(engine.pool, "size", lambda: 1)()  # SingletonThreadPool etc. have no size
        for _ in range(min(connections, pool_size)):
            opened.append(engine.connect())
    except SQLAlchemyError:
        logger.warning("database not reachable at start-up; connections will be opened on demand")
    finally:
        for connection in opened:
            connection.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (default: from the environment)."""
    settings = settings or get_settings()
    if settings.log_format == "json":
        configure_logging("json", settings.log_level)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        _store_bootstrap_key(settings)
        _warm_database_pool(settings)
        yield

    app = FastAPI(
        title="Distillery",
        version="0.1.0",
        summary="Knowledge distillation for LLMs as a service.",
        lifespan=lifespan,
        # Off in production by default (DISTILL_DOCS_ENABLED): the routes are then simply absent (404).
        docs_url="/docs" if settings.docs_enabled else None,
        redoc_url="/redoc" if settings.docs_enabled else None,
        openapi_url="/openapi.json" if settings.docs_enabled else None,
    )
    app.state.settings = settings
    app.state.rate_limiter = RateLimiter(
        settings.rate_limit_per_minute, window_s=60.0, redis_url=settings.rate_limit_redis_url
    )
    install_error_handlers(app)
    for router in (files.router, jobs.router, outputs.router, keys.router, tenants.router, health.router):
        app.include_router(router)
    app.include_router(webhooks.router)
    app.include_router(sweeps.router)
    install_dashboard(app)  # GET /ui: the static dashboard (api/ui)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    install_metrics(app, settings)  # GET /metrics; counts every answer, a 413 included
    _add_request_context(app, settings)
    return app


def _add_request_context(app: FastAPI, settings: Settings) -> None:
    """CORS, then the request context outermost (Starlette runs the last added middleware first): every
    answer, a CORS preflight, a 413 or a 500 included, carries the request id."""
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=[
                REQUEST_ID_HEADER,
                *RATE_LIMIT_HEADERS,
                "X-Content-SHA256",
                "Content-Disposition",
            ],
            max_age=600,
        )
    app.add_middleware(RequestContext)
