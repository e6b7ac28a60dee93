"""Request dependencies: settings, a database session per request, and the tenant of the bearer key."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from core.config import Settings
from core.db import get_sessionmaker
from core.errors import ServiceError
from core.tenants.keys import authenticate
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


def get_tenant(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    if credentials is None or not credentials.credentials:
        raise ServiceError(
            "missing_api_key",
            "send an API key as 'Authorization: Bearer <key>'",
            param="Authorization",
            status=401,
        )
    tenant = authenticate(session, credentials.credentials)
    if tenant is None:
        raise ServiceError("invalid_api_key", "the API key is not valid", param="Authorization", status=401)
    return tenant


TenantDep = Annotated[Tenant, Depends(get_tenant)]
