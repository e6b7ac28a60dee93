"""`/v1/keys`: a tenant's own API keys (create, list, show, revoke, rotate); admin keys manage any tenant's."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, status
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from api.deps import PrincipalDep, SessionDep
from api.schemas import Page
from core.db import utcnow
from core.errors import InvalidRequest, ServiceError
from core.tenants import keys
from core.tenants.models import ApiKey

router = APIRouter(prefix="/v1/keys", tags=["keys"])

_ID_PATTERN = r"^[A-Za-z0-9_-]+$"
# Printable text only: a NUL or control character would reach the database otherwise.
KeyName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
KeyId = Annotated[str, Path(min_length=1, max_length=64, pattern=_ID_PATTERN)]
MAX_GRACE_S = 7 * 24 * 3600


class KeyOut(BaseModel):
    id: str
    tenant_id: str
    name: str | None
    prefix: str = Field(description="The key's first characters, to recognise it.")
    scopes: list[str]
    status: Literal["active", "revoked", "expired"]
    created_at: datetime
    last_used_at: datetime | None = Field(description="To the minute.")
    expires_at: datetime | None
    revoked_at: datetime | None = Field(description="In the future while a rotated key's grace period runs.")

    @classmethod
    def of(cls, key: ApiKey) -> KeyOut:
        return cls(
            id=key.id,
            tenant_id=key.tenant_id,
            name=key.name,
            prefix=key.prefix,
            scopes=sorted(keys.scopes_of(key)),
            status=keys.key_state(key),  # type: ignore[arg-type]
            created_at=key.created_at,
            last_used_at=key.last_used_at,
            expires_at=key.expires_at,
            revoked_at=key.revoked_at,
        )


class KeyCreated(KeyOut):
    key: str = Field(description="The key itself. It is shown only in this response.")
    rotated_from: str | None = Field(default=None, description="The key this one replaces (rotation).")

    @classmethod
    def made(cls, key: ApiKey, plaintext: str, rotated_from: str | None = None) -> KeyCreated:
        return cls(**KeyOut.of(key).model_dump(), key=plaintext, rotated_from=rotated_from)


class Expiry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expires_in_days: int | None = Field(
        default=None, ge=1, le=3650, description="Expire after this many days."
    )
    expires_at: AwareDatetime | None = Field(default=None, description="Expire at this time (with a zone).")

    def resolve(self) -> datetime | None:
        if self.expires_in_days is not None and self.expires_at is not None:
            raise InvalidRequest(
                "invalid_expiry", "give expires_in_days or expires_at, not both", param="expires_at"
            )
        if self.expires_in_days is not None:
            return utcnow() + timedelta(days=self.expires_in_days)
        return self.expires_at


class KeyCreate(Expiry):
    name: KeyName | None = None
    scopes: list[Literal["admin"]] = Field(default_factory=list, description="`admin`: admin keys only.")
    tenant_id: str | None = Field(
        default=None, max_length=64, pattern=_ID_PATTERN, description="Another tenant's (admin keys only)."
    )


class KeyRotate(Expiry):
    grace_period_s: int = Field(
        default=0, ge=0, le=MAX_GRACE_S, description="The old key keeps working this long (default: none)."
    )


def _visible_key(session: Session, principal: keys.Principal, key_id: str) -> ApiKey:
    """The key, when the caller may manage it: its own tenant's, or any for an admin key (else 403)."""
    return keys.get_api_key(
        session, key_id=key_id, tenant_id=None if principal.is_admin else principal.tenant.id
    )


def _managed_key(session: Session, principal: keys.Principal, key_id: str) -> ApiKey:
    """A key the caller may revoke or rotate: as `_visible_key`, and an admin key only by an admin key
    (rotating it hands out a new admin key)."""
    key = _visible_key(session, principal, key_id)
    if keys.ADMIN_SCOPE in keys.scopes_of(key) and not principal.is_admin:
        raise ServiceError(
            "forbidden", "only an admin key may manage an admin key", param="key_id", status=403
        )
    return key


def _target_tenant(principal: keys.Principal, tenant_id: str | None) -> str:
    if tenant_id is None or tenant_id == principal.tenant.id:
        return principal.tenant.id
    if not principal.is_admin:
        raise ServiceError(
            "forbidden", "only an admin key may manage another tenant's keys", param="tenant_id", status=403
        )
    return tenant_id


@router.post("", status_code=status.HTTP_201_CREATED)
def create_key(session: SessionDep, principal: PrincipalDep, body: KeyCreate | None = None) -> KeyCreated:
    """Create a key for the caller's tenant; the response is the only time the key itself is shown."""
    body = body or KeyCreate()
    tenant_id = _target_tenant(principal, body.tenant_id)
    if body.scopes and not principal.is_admin:
        raise ServiceError("forbidden", "only an admin key may create admin keys", param="scopes", status=403)
    key, plaintext = keys.issue_api_key(
        session, tenant_id=tenant_id, name=body.name, scopes=body.scopes, expires_at=body.resolve()
    )
    return KeyCreated.made(key, plaintext)


@router.get("")
def list_keys(
    session: SessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[
        str | None,
        Query(min_length=1, max_length=64, pattern=_ID_PATTERN, description="A key id from `next_cursor`."),
    ] = None,
    tenant_id: Annotated[
        str | None,
        Query(max_length=64, pattern=_ID_PATTERN, description="Another tenant's (admin keys only)."),
    ] = None,
) -> Page[KeyOut]:
    """List the tenant's keys, newest first, revoked and expired ones included (never the keys themselves)."""
    rows, has_more = keys.list_api_keys(
        session, tenant_id=_target_tenant(principal, tenant_id), limit=limit, after=after
    )
    return Page(
        data=[KeyOut.of(k) for k in rows], has_more=has_more, next_cursor=rows[-1].id if has_more else None
    )


@router.get("/{key_id}")
def get_key(session: SessionDep, principal: PrincipalDep, key_id: KeyId) -> KeyOut:
    """Get one key's metadata."""
    return KeyOut.of(_visible_key(session, principal, key_id))


@router.delete("/{key_id}")
def revoke_key(session: SessionDep, principal: PrincipalDep, key_id: KeyId) -> KeyOut:
    """Revoke a key now (a key may revoke itself); idempotent."""
    return KeyOut.of(keys.revoke(session, key=_managed_key(session, principal, key_id)))


@router.post("/{key_id}/rotate", status_code=status.HTTP_201_CREATED)
def rotate_key(
    session: SessionDep, principal: PrincipalDep, key_id: KeyId, body: KeyRotate | None = None
) -> KeyCreated:
    """Replace a key: a new one with the same name and scopes; the old one is revoked after the grace period."""
    body = body or KeyRotate()
    old = _managed_key(session, principal, key_id)
    new, plaintext = keys.rotate(
        session, key=old, grace=timedelta(seconds=body.grace_period_s), expires_at=body.resolve()
    )
    return KeyCreated.made(new, plaintext, rotated_from=old.id)
