"""Webhooks: create (URL and events checked), list, get, delete, rotate the secret, list deliveries, and
`record_event`, which core/jobs calls inside the transaction of every job event that webhooks carry.
Keyword-only functions over a session; 4xx cases raise ServiceError."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from core.config import Settings
from core.db import utcnow
from core.errors import Conflict, InvalidRequest, NotFound
from core.pagination import newest_first_page
from core.webhooks.destinations import DestinationRefused, check_url
from core.webhooks.models import DeliveryStatus, Webhook, WebhookDelivery
from core.webhooks.signing import new_secret

EVENT_TYPES = (
    "job.queued",
    "job.running",
    "job.checkpoint",
    "job.succeeded",
    "job.failed",
    "job.cancelled",
    "job.paused",
)
# Each event is one delivery per subscribed webhook: a bound on a tenant's fan-out.
MAX_WEBHOOKS_PER_TENANT = 20


def _checked_url(url: str, settings: Settings) -> str:
    try:
        return check_url(url, settings.webhook_allow_hosts)
    except DestinationRefused as exc:
        raise InvalidRequest("invalid_url", str(exc), param="url") from exc


def _checked_events(events: Sequence[str] | None) -> list[str]:
    if events is None:
        return list(EVENT_TYPES)
    if not events:
        raise InvalidRequest("invalid_events", "events must name at least one event type", param="events")
    unknown = sorted(set(events) - set(EVENT_TYPES))
    if unknown:
        raise InvalidRequest(
            "invalid_events",
            f"unknown event type(s) {', '.join(unknown)}; known: {', '.join(EVENT_TYPES)}",
            param="events",
        )
    return [event for event in EVENT_TYPES if event in events]


def create_webhook(
    *, session: Session, settings: Settings, tenant_id: str, url: str, events: Sequence[str] | None = None
) -> Webhook:
    """Store a webhook with a new secret; `events` defaults to every event type."""
    checked_events = _checked_events(events)
    checked_url = _checked_url(url, settings)
    count = session.scalar(select(func.count()).select_from(Webhook).where(Webhook.tenant_id == tenant_id))
    if (count or 0) >= MAX_WEBHOOKS_PER_TENANT:
        raise Conflict(
            "too_many_webhooks", f"a tenant may have at most {MAX_WEBHOOKS_PER_TENANT} webhooks", param="url"
        )
    webhook = Webhook(tenant_id=tenant_id, url=checked_url, events=checked_events, secret=new_secret())
    session.add(webhook)
    session.commit()
    return webhook


def get_webhook(*, session: Session, tenant_id: str, webhook_id: str) -> Webhook:
    """One of the tenant's webhooks; another tenant's id answers like a missing one."""
    row = session.scalar(select(Webhook).where(Webhook.id == webhook_id, Webhook.tenant_id == tenant_id))
    if row is None:
        raise NotFound("webhook_not_found", f"no webhook {webhook_id!r}", param="webhook_id")
    return row


def list_webhooks(
    *, session: Session, tenant_id: str, limit: int, after: str | None = None
) -> tuple[list[Webhook], bool]:
    """A page of the tenant's webhooks, newest first, and whether more follow."""
    query = select(Webhook).where(Webhook.tenant_id == tenant_id)
    return newest_first_page(session, query, Webhook, tenant_id=tenant_id, after=after, limit=limit)


def delete_webhook(*, session: Session, tenant_id: str, webhook_id: str) -> None:
    """Delete a webhook with its deliveries; a pending delivery is not attempted again."""
    session.delete(get_webhook(session=session, tenant_id=tenant_id, webhook_id=webhook_id))
    session.commit()


def rotate_secret(*, session: Session, tenant_id: str, webhook_id: str, grace_period_s: int = 0) -> Webhook:
    """A new secret; during `grace_period_s` deliveries carry a signature with the old one as well."""
    webhook = get_webhook(session=session, tenant_id=tenant_id, webhook_id=webhook_id)
    if grace_period_s > 0:
        webhook.previous_secret = webhook.secret
        webhook.previous_secret_expires_at = utcnow() + timedelta(seconds=grace_period_s)
    else:
        webhook.previous_secret = webhook.previous_secret_expires_at = None
    webhook.secret = new_secret()
    session.commit()
    return webhook


def list_deliveries(
    *,
    session: Session,
    tenant_id: str,
    webhook_id: str,
    limit: int,
    after: str | None = None,
    status: DeliveryStatus | None = None,
) -> tuple[list[WebhookDelivery], bool]:
    """A page of a webhook's deliveries with their attempts, newest first, and whether more follow."""
    get_webhook(session=session, tenant_id=tenant_id, webhook_id=webhook_id)
    query = select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
    if status is not None:
        query = query.where(WebhookDelivery.status == status)
    return newest_first_page(session, query, WebhookDelivery, tenant_id=tenant_id, after=after, limit=limit)


def record_event(
    session: Session,
    *,
    tenant_id: str,
    event_type: str,
    job_id: str | None,
    data: Callable[[], dict[str, Any]],
) -> int:
    """Add a pending delivery of `event_type` for each of the tenant's webhooks subscribed to it, inside
    the caller's transaction (flushed, not committed): the deliveries exist exactly when the event does.

    `data` builds the body's `data` (JSON-ready), called only when some webhook subscribes. The reaper's
    dispatcher sends the deliveries once committed (core.webhooks.delivery). Returns how many were added.
    """
    if event_type not in EVENT_TYPES:
        return 0
    # KEY SHARE (PostgreSQL): a webhook deleted meanwhile waits for this transaction instead of failing the
    # job's change with a foreign-key error; rotations and other readers are not blocked.
    query = select(Webhook.id, Webhook.events).where(Webhook.tenant_id == tenant_id)
    hooks = session.execute(query.with_for_update(key_share=True)).all()
    subscribed = [webhook_id for webhook_id, events in hooks if event_type in events]
    if not subscribed:
        return 0
    now = utcnow()
    payload = {"type": event_type, "timestamp": now.isoformat().replace("+00:00", "Z"), "data": data()}
    rows = [
        {
            "webhook_id": webhook_id,
            "tenant_id": tenant_id,
            "event_type": event_type,
            "job_id": job_id,
            "payload": payload,
            "status": DeliveryStatus.PENDING,
            "attempt_count": 0,
            "attempts": [],
            "next_attempt_at": now,
            "created_at": now,
        }
        for webhook_id in subscribed
    ]
    session.execute(insert(WebhookDelivery), rows)
    return len(rows)
