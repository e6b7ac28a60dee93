"""Request dependencies: settings, a database session per request, and the caller behind the bearer key
(authenticated, then counted against its rate limit)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.ratelimit import RateLimiter
from core.config import Settings
from core.db import get_sessionmaker
from core.errors import ServiceError
from core.tenants.keys import Principal, authenticate_key
from core.tenants.models import Tenant

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer dk_...`")


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_db(settings: SettingsDep) -> Iterator[Session]:
    session = get_sessionmaker(settings.database_url)()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_db)]


def get_principal(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None or not credentials.credentials:
        raise ServiceError(
            "missing_api_key",
            "send an API key as 'Authorization: Bearer <key>'",
            param="Authorization",
            status=401,
        )
    principal = authenticate_key(session, credentials.credentials)
    request.state.tenant_id = principal.tenant.id  # for the access log
    limiter: RateLimiter | None = getattr(request.app.state, "rate_limiter", None)
    decision = limiter.hit(principal.key_id) if limiter is not None else None
    if decision is not None:
        request.state.rate_limit = decision  # api.middleware adds its headers to the response
        if not decision.allowed:
            raise ServiceError(
                "rate_limited",
                f"more than {decision.limit} requests a minute with this API key; "
                f"retry in {decision.reset_s} s",
                status=429,
            )
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def get_tenant(principal: PrincipalDep) -> Tenant:
    return principal.tenant


TenantDep = Annotated[Tenant, Depends(get_tenant)]


def get_admin(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise ServiceError("forbidden", "this needs an API key with the admin scope", status=403)
    return principal


AdminDep = Annotated[Principal, Depends(get_admin)]
