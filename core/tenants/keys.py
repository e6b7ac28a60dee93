"""API keys: every key belongs to a tenant and is stored only as its SHA-256; the plaintext is shown once.

A key is active until it is revoked (`revoked_at` in the past; a rotation may set it in the future, a grace
period during which the old key still works) or until it expires (`expires_at`). The `admin` scope may
create tenants and manage every tenant's keys; other keys manage only their own tenant's.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db import utcnow
from core.errors import Conflict, InvalidRequest, NotFound, ServiceError
from core.pagination import newest_first_page
from core.tenants.models import ApiKey, Tenant

KEY_PREFIX = "dk_"
ADMIN_SCOPE = "admin"
SCOPES = frozenset({ADMIN_SCOPE})
# Recording every use would make each authenticated GET a write; a minute's precision is enough.
LAST_USED_PRECISION = timedelta(minutes=1)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key that authenticated the request and its tenant."""

    tenant: Tenant
    key_id: str
    scopes: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return ADMIN_SCOPE in self.scopes


def hash_api_key(plaintext: str) -> str:
    """The hex SHA-256 stored for a key (keys are long random strings, so no salt or slow hash is needed)."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def scopes_of(key: ApiKey) -> frozenset[str]:
    return frozenset(key.scopes.split())


def key_state(key: ApiKey, now: datetime | None = None) -> str:
    """`active`, `revoked` or `expired` at `now`."""
    now = now or utcnow()
    if key.revoked_at is not None and key.revoked_at <= now:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "active"


# ------------------------------------------------------------------------------------------ tenants
def get_or_create_tenant(session: Session, name: str) -> Tenant:
    """The tenant called `name`, created if missing (flushed, not committed; may roll back the session)."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is not None:
        return tenant
    tenant = Tenant(name=name)
    session.add(tenant)
    try:
        session.flush()
    except IntegrityError:  # created concurrently by another process (SQLite has no usable SAVEPOINT)
        session.rollback()
        return session.scalars(select(Tenant).where(Tenant.name == name)).one()
    return tenant


def find_tenant(session: Session, *, name_or_id: str) -> Tenant | None:
    """The tenant with this id, else the one with this name."""
    return session.get(Tenant, name_or_id) or session.scalar(select(Tenant).where(Tenant.name == name_or_id))


def create_tenant(
    session: Session, *, name: str, key_name: str | None = None, expires_at: datetime | None = None
) -> tuple[Tenant, ApiKey, str]:
    """Create a new tenant and its first key; 409 when the name is taken. Commits."""
    if session.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
        raise Conflict("tenant_exists", f"a tenant named {name!r} already exists", param="name")
    tenant = Tenant(name=name)
    session.add(tenant)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise Conflict("tenant_exists", f"a tenant named {name!r} already exists", param="name") from None
    key, plaintext = _new_key(session, tenant.id, name=key_name, scopes=(), expires_at=expires_at)
    session.commit()
    return tenant, key, plaintext


# ------------------------------------------------------------------------------------ creating keys
def _check_new_key(scopes: tuple[str, ...] | list[str], expires_at: datetime | None) -> None:
    unknown = sorted(set(scopes) - SCOPES)
    if unknown:
        raise InvalidRequest("invalid_scope", f"unknown scope {unknown[0]!r}", param="scopes")
    if expires_at is not None and expires_at <= utcnow():
        raise InvalidRequest("invalid_expiry", "expires_at must be in the future", param="expires_at")


def _new_key(
    session: Session,
    tenant_id: str,
    *,
    name: str | None,
    scopes: tuple[str, ...] | list[str],
    expires_at: datetime | None,
    plaintext: str | None = None,
) -> tuple[ApiKey, str]:
    _check_new_key(scopes, expires_at)
    plaintext = plaintext or KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        tenant_id=tenant_id,
        key_hash=hash_api_key(plaintext),
        prefix=plaintext[:12],
        name=name,
        scopes=" ".join(sorted(set(scopes))),
        expires_at=expires_at,
    )
    session.add(key)
    session.flush()
    return key, plaintext


def create_api_key(
    session: Session,
    *,
    tenant_name: str,
    name: str | None = None,
    scopes: tuple[str, ...] | list[str] = (),
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Create a key (and its tenant if needed), commit, and return it with its plaintext."""
    _check_new_key(scopes, expires_at)
    tenant = get_or_create_tenant(session, tenant_name)
    key, plaintext = _new_key(session, tenant.id, name=name, scopes=scopes, expires_at=expires_at)
    session.commit()
    return key, plaintext


def issue_api_key(
    session: Session,
    *,
    tenant_id: str,
    name: str | None = None,
    scopes: tuple[str, ...] | list[str] = (),
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Create a key for an existing tenant (404 when there is none), commit, return it and its plaintext."""
    if session.get(Tenant, tenant_id) is None:
        raise NotFound("tenant_not_found", f"no tenant {tenant_id!r}", param="tenant_id")
    key, plaintext = _new_key(session, tenant_id, name=name, scopes=scopes, expires_at=expires_at)
    session.commit()
    return key, plaintext


def ensure_bootstrap_key(session: Session, key: str, *, tenant_name: str = "default") -> ApiKey:
    """Make sure the configured bootstrap key exists as an admin key of tenant `default`; idempotent, commits.

    A bootstrap key stored before scopes existed is given the admin scope; a revoked one stays revoked.
    """
    existing = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key)))
    if existing is not None:
        if ADMIN_SCOPE not in scopes_of(existing):
            existing.scopes = " ".join(sorted(scopes_of(existing) | {ADMIN_SCOPE}))
            session.commit()
        return existing
    tenant = get_or_create_tenant(session, tenant_name)
    try:
        api_key, _ = _new_key(
            session, tenant.id, name="bootstrap", scopes=(ADMIN_SCOPE,), expires_at=None, plaintext=key
        )
        session.commit()
    except IntegrityError:  # another process (an API replica) stored it first
        session.rollback()
        api_key = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key))).one()
    return api_key


# ---------------------------------------------------------------------------------- authentication
def authenticate_key(session: Session, plaintext: str) -> Principal:
    """The caller behind a bearer key; 401 (`invalid_api_key`, `api_key_revoked`, `api_key_expired`)
    otherwise. Records the key's use at most once a minute."""
    row = None
    if plaintext:
        row = session.execute(
            select(ApiKey, Tenant)
            .join(Tenant, Tenant.id == ApiKey.tenant_id)
            .where(ApiKey.key_hash == hash_api_key(plaintext))
        ).first()
    if row is None:
        raise ServiceError("invalid_api_key", "the API key is not valid", param="Authorization", status=401)
    key, tenant = row
    now = utcnow()
    state = key_state(key, now)
    if state != "active":
        when = key.revoked_at if state == "revoked" else key.expires_at
        assert when is not None
        raise ServiceError(
            f"api_key_{state}",
            f"the API key {'was revoked' if state == 'revoked' else 'expired'} at {when.isoformat()}",
            param="Authorization",
            status=401,
        )
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_PRECISION:
        # Conditional, so concurrent requests in the same minute do not all write.
        session.execute(
            update(ApiKey)
            .where(ApiKey.id == key.id)
            .where((ApiKey.last_used_at.is_(None)) | (ApiKey.last_used_at < now - LAST_USED_PRECISION))
            .values(last_used_at=now)
        )
        session.commit()
    return Principal(tenant=tenant, key_id=key.id, scopes=scopes_of(key))


def authenticate(session: Session, plaintext: str) -> Tenant | None:
    """The tenant owning an active key, or None; records the key's use at most once a minute."""
    try:
        return authenticate_key(session, plaintext).tenant
    except ServiceError:
        return None


# ---------------------------------------------------------------------------------- managing keys
def get_api_key(session: Session, *, key_id: str, tenant_id: str | None = None) -> ApiKey:
    """One key by id; with `tenant_id`, another tenant's key is refused with 403. 404 when missing."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound("api_key_not_found", f"no API key {key_id!r}", param="key_id")
    if tenant_id is not None and key.tenant_id != tenant_id:
        raise ServiceError("forbidden", "this API key belongs to another tenant", param="key_id", status=403)
    return key


def list_api_keys(
    session: Session, *, tenant_id: str, limit: int = 20, after: str | None = None
) -> tuple[list[ApiKey], bool]:
    """One page of a tenant's keys (revoked and expired ones included), newest first."""
    query = select(ApiKey).where(ApiKey.tenant_id == tenant_id)
    return newest_first_page(session, query, ApiKey, tenant_id=tenant_id, after=after, limit=limit)


def all_api_keys(session: Session, *, tenant_id: str | None = None) -> list[ApiKey]:
    """Every key (of one tenant, when given), oldest first, with its tenant loaded: for the CLI."""
    query = select(ApiKey).join(Tenant, Tenant.id == ApiKey.tenant_id)
    if tenant_id is not None:
        query = query.where(ApiKey.tenant_id == tenant_id)
    return list(session.scalars(query.order_by(Tenant.name, ApiKey.created_at, ApiKey.id)))


def revoke(session: Session, *, key: ApiKey, at: datetime | None = None) -> ApiKey:
    """Revoke `key` now (or at `at`); a revocation already in effect is kept, a later one brought forward.
    Commits."""
    at = at or utcnow()
    if key.revoked_at is None or key.revoked_at > at:
        key.revoked_at = at
    session.commit()
    return key


def revoke_api_key(session: Session, *, key_id: str) -> bool:
    """Revoke a key by id; returns whether an active key was revoked. Commits."""
    now = utcnow()
    changed = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, (ApiKey.revoked_at.is_(None)) | (ApiKey.revoked_at > now))
        .values(revoked_at=now)
    ).rowcount
    session.commit()
    return changed == 1


def rotate(
    session: Session,
    *,
    key: ApiKey,
    grace: timedelta = timedelta(0),
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """A new key with the old one's tenant, name and scopes; the old one is revoked after `grace`.

    The new key expires at `expires_at` when given, else after the old key's lifetime (when it had one).
    409 when the old key is already revoked or rotated. Commits.
    """
    if key.revoked_at is not None:
        raise Conflict("api_key_revoked", f"API key {key.id} is already revoked or rotated", param="key_id")
    now = utcnow()
    if expires_at is None and key.expires_at is not None:
        expires_at = now + (key.expires_at - key.created_at)
    new_key, plaintext = _new_key(
        session, key.tenant_id, name=key.name, scopes=sorted(scopes_of(key)), expires_at=expires_at
    )
    key.revoked_at = now + grace
    session.commit()
    return new_key, plaintext
