"""API keys: every key belongs to a tenant and is stored only as its SHA-256; the plaintext is shown once."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db import utcnow
from core.tenants.models import ApiKey, Tenant

KEY_PREFIX = "dk_"
# Recording every use would make each authenticated GET a write; a minute's precision is enough.
LAST_USED_PRECISION = timedelta(minutes=1)


def hash_api_key(plaintext: str) -> str:
    """The hex SHA-256 stored for a key (keys are long random strings, so no salt or slow hash is needed)."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


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


def _store_key(session: Session, tenant: Tenant, plaintext: str, name: str | None) -> ApiKey:
    key = ApiKey(tenant_id=tenant.id, key_hash=hash_api_key(plaintext), prefix=plaintext[:12], name=name)
    session.add(key)
    session.flush()
    return key


def create_api_key(session: Session, *, tenant_name: str, name: str | None = None) -> tuple[ApiKey, str]:
    """Create a key (and its tenant if needed), commit, and return it with its plaintext."""
    tenant = get_or_create_tenant(session, tenant_name)
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    key = _store_key(session, tenant, plaintext, name)
    session.commit()
    return key, plaintext


def ensure_bootstrap_key(session: Session, key: str, *, tenant_name: str = "default") -> ApiKey:
    """Make sure the configured bootstrap key exists (for tenant `default`); idempotent, commits."""
    existing = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key)))
    if existing is not None:
        return existing
    tenant = get_or_create_tenant(session, tenant_name)
    try:
        api_key = _store_key(session, tenant, key, "bootstrap")
        session.commit()
    except IntegrityError:  # another process (an API replica) stored it first
        session.rollback()
        api_key = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key))).one()
    return api_key


def authenticate(session: Session, plaintext: str) -> Tenant | None:
    """The tenant owning an unrevoked key, or None; records the key's use at most once a minute."""
    if not plaintext:
        return None
    row = session.execute(
        select(ApiKey.id, ApiKey.last_used_at, Tenant)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.key_hash == hash_api_key(plaintext), ApiKey.revoked_at.is_(None))
    ).first()
    if row is None:
        return None
    key_id, last_used_at, tenant = row
    now = utcnow()
    if last_used_at is None or now - last_used_at >= LAST_USED_PRECISION:
        # Conditional, so concurrent requests in the same minute do not all write.
        session.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id)
            .where((ApiKey.last_used_at.is_(None)) | (ApiKey.last_used_at < now - LAST_USED_PRECISION))
            .values(last_used_at=now)
        )
        session.commit()
    return tenant


def revoke_api_key(session: Session, *, key_id: str) -> bool:
    """Revoke a key by id; returns whether an active key was revoked. Commits."""
    changed = session.execute(
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
    ).rowcount
    session.commit()
    return changed == 1
