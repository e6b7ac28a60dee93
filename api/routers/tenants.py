"""`/v1/tenants`: creating a tenant and its first key (admin keys only)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, status
from pydantic import BaseModel, Field, StringConstraints

from api.deps import AdminDep, SessionDep
from api.routers.keys import Expiry, KeyCreated, KeyName
from core.tenants import keys

router = APIRouter(prefix="/v1/tenants", tags=["tenants"])

TenantName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$"),
]


class TenantCreate(Expiry):
    name: TenantName
    key_name: KeyName | None = Field(default=None, description="A label for the tenant's first key.")


class TenantCreated(BaseModel):
    id: str
    name: str
    created_at: datetime
    key: KeyCreated = Field(description="The tenant's first key (not an admin key); shown only here.")


@router.post("", status_code=status.HTTP_201_CREATED)
def create_tenant(session: SessionDep, _admin: AdminDep, body: TenantCreate) -> TenantCreated:
    """Create a tenant and its first key; 409 when the name is taken."""
    tenant, key, plaintext = keys.create_tenant(
        session, name=body.name, key_name=body.key_name, expires_at=body.resolve()
    )
    return TenantCreated(
        id=tenant.id, name=tenant.name, created_at=tenant.created_at, key=KeyCreated.made(key, plaintext)
    )
