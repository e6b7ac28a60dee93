"""Sending webhook deliveries: the dispatcher that puts due deliveries on the webhook queue, and one
attempt (signed POST, outcome recorded, the next attempt scheduled) that the Celery task runs.

- Dispatch: the reaper calls `dispatch_due` every `webhook_dispatch_interval_s`. A pending delivery whose
  attempt is due and whose message for that attempt has not been sent yet is sent now; one sent longer
  than `RESEND_AFTER_S` ago and still not attempted, while the queue holds fewer messages than there are
  such deliveries, is sent again (a broker that lost it). `enqueued_at` moves forward by a conditional
  UPDATE before the send, so of two reapers only one sends. One sender, in creation order: with a single
  consumer thread a receiver gets one job's events in the order they happened (retries aside; Standard
  Webhooks receivers should not rely on order, the body's `timestamp` tells it).
- Attempt: a conditional UPDATE claims the delivery for the attempt's duration (`locked_until`), so a
  duplicate message does nothing; the URL is checked again (core.webhooks.destinations), the body is
  POSTed with the Standard Webhooks headers, a 2xx succeeds, anything else is retried after
  `RETRY_STEPS` × `webhook_retry_base_s` (5 s, 30 s, 2 min, 10 min, 30 min, 1 h, 2 h, 4 h, 6 h, 6 h, 6 h at
  the default 5 s: 12 attempts over about 26 hours), then the delivery has failed.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import func, or_, select, update

from core.config import Settings
from core.db import session_scope, utcnow
from core.queue import celery_client, queue_depth
from core.webhooks.destinations import DestinationRefused, check_url
from core.webhooks.models import DeliveryStatus, Webhook, WebhookDelivery
from core.webhooks.signing import signed_headers

log = logging.getLogger(__name__)

DELIVER_WEBHOOK_TASK = "distill.deliver_webhook"
RETRY_STEPS = (1, 6, 24, 120, 360, 720, 1440, 2880, 4320, 4320, 4320)
MAX_ATTEMPTS = len(RETRY_STEPS) + 1
RESEND_AFTER_S = 300.0
LEASE_MARGIN_S = 30.0
MAX_ERROR_CHARS = 500
DISPATCH_BATCH = 500
USER_AGENT = "Distillery-Webhooks/1"


def retry_delay_s(settings: Settings, failed_attempts: int) -> float | None:
    """How long to wait after the `failed_attempts`-th failed attempt; None when it was the last."""
    if failed_attempts >= MAX_ATTEMPTS:
        return None
    return settings.webhook_retry_base_s * RETRY_STEPS[failed_attempts - 1]


def send_delivery(settings: Settings, delivery_id: str) -> None:
    """Put one delivery on the webhook queue (by task name: no worker code is imported)."""
    celery_client(settings).send_task(DELIVER_WEBHOOK_TASK, args=[delivery_id], queue=settings.webhook_queue)


# ------------------------------------------------------------------------------------------ dispatch
def _due(now: datetime) -> tuple[Any, ...]:
    return (
        WebhookDelivery.status == DeliveryStatus.PENDING,
        WebhookDelivery.next_attempt_at <= now,
        or_(WebhookDelivery.locked_until.is_(None), WebhookDelivery.locked_until < now),
    )


# No message sent yet for the attempt now due.
_UNSENT = or_(
    WebhookDelivery.enqueued_at.is_(None), WebhookDelivery.enqueued_at < WebhookDelivery.next_attempt_at
)


def _webhook_queue_depth(settings: Settings) -> int:
    return queue_depth(settings, queues=[settings.webhook_queue])


def dispatch_due(settings: Settings, *, now: datetime | None = None) -> list[str]:
    """Send the deliveries whose attempt is due (see the module note); returns the ids sent."""
    now = now or utcnow()
    due = _due(now)
    waiting = (*due, ~_UNSENT)
    with session_scope(settings.database_url) as session:
        order = (WebhookDelivery.created_at, WebhookDelivery.id)
        unsent = list(
            session.scalars(
                select(WebhookDelivery.id).where(*due, _UNSENT).order_by(*order).limit(DISPATCH_BATCH)
            )
        )
        stale = WebhookDelivery.enqueued_at < now - timedelta(seconds=RESEND_AFTER_S)
        lost = list(
            session.scalars(
                select(WebhookDelivery.id).where(*waiting, stale).order_by(*order).limit(DISPATCH_BATCH)
            )
        )
        sent_waiting = 0
        if lost:
            query = select(func.count()).select_from(WebhookDelivery).where(*waiting)
            sent_waiting = session.scalar(query) or 0
    if lost:
        try:
            depth = _webhook_queue_depth(settings)
        except Exception as exc:
            log.warning("webhooks: the queue cannot be read (%s); nothing sent again", exc)
            lost = []
        else:
            if depth >= sent_waiting:
                lost = []  # every message may still be waiting: a slow consumer, not a lost message
    candidates = [(delivery_id, _UNSENT) for delivery_id in unsent]
    candidates += [(delivery_id, stale) for delivery_id in lost]
    taken: list[str] = []
    with session_scope(settings.database_url) as session:
        for delivery_id, condition in candidates:
            moved = session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id, *due, condition)
                .values(enqueued_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount
            if moved == 1:
                taken.append(delivery_id)
    sent: list[str] = []
    for delivery_id in taken:
        try:
            send_delivery(settings, delivery_id)
        except Exception:
            # Still pending: sent again once RESEND_AFTER_S has passed.
            log.exception("webhooks: could not send delivery %s to the queue", delivery_id)
            continue
        sent.append(delivery_id)
    if lost:
        log.warning("webhooks: sent %d deliveries again whose messages the queue lost", len(lost))
    return sent


# ------------------------------------------------------------------------------------------- attempt
def _claim(settings: Settings, delivery_id: str, now: datetime) -> datetime | None:
    lease = now + timedelta(seconds=settings.webhook_timeout_s + LEASE_MARGIN_S)
    with session_scope(settings.database_url) as session:
        claimed = session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, *_due(now))
            .values(locked_until=lease)
            .execution_options(synchronize_session=False)
        ).rowcount
    return lease if claimed == 1 else None


def _post(
    settings: Settings, url: str, secrets: list[str], delivery_id: str, body: bytes
) -> tuple[int | None, str | None]:
    """POST one signed attempt; (status code, error) — error is None for a 2xx."""
    try:
        check_url(url, settings.webhook_allow_hosts)
    except DestinationRefused as exc:
        return None, str(exc)
    headers = signed_headers(secrets, msg_id=delivery_id, timestamp=int(time.time()), body=body)
    headers |= {"content-type": "application/json", "user-agent": USER_AGENT}
    try:
        # No proxies from the environment (they would reach what the destination check refuses) and no
        # redirects (a 3xx is a failed attempt).
        with httpx.Client(
            timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False
        ) as client:
            response = client.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
    if 200 <= response.status_code < 300:
        return response.status_code, None
    return response.status_code, f"the endpoint answered HTTP {response.status_code}"


def attempt_delivery(settings: Settings, delivery_id: str) -> str:
    """Make the due attempt of one delivery; returns `succeeded`, `retrying`, `failed`, or `skipped` when
    the delivery is not due, already held by another attempt, finished or deleted."""
    started = utcnow()
    lease = _claim(settings, delivery_id, started)
    if lease is None:
        return "skipped"
    with session_scope(settings.database_url) as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        webhook = session.get(Webhook, delivery.webhook_id) if delivery is not None else None
        if delivery is None or webhook is None:
            return "skipped"
        secrets = [webhook.secret]
        expires = webhook.previous_secret_expires_at
        if webhook.previous_secret and expires is not None and expires > started:
            secrets.append(webhook.previous_secret)
        url = webhook.url
        body = json.dumps(delivery.payload, separators=(",", ":"), ensure_ascii=False).encode()
    clock = time.monotonic()
    status_code, error = _post(settings, url, secrets, delivery_id, body)
    duration_ms = round((time.monotonic() - clock) * 1000)
    now = utcnow()
    with session_scope(settings.database_url) as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None or delivery.locked_until != lease:
            return "skipped"  # deleted meanwhile, or our lease ran out and another attempt took over
        delivery.attempt_count += 1
        entry = {
            "attempt": delivery.attempt_count,
            "at": started.isoformat().replace("+00:00", "Z"),
            "status_code": status_code,
            "error": error,
            "duration_ms": duration_ms,
        }
        delivery.attempts = [*delivery.attempts, entry]
        delivery.last_status_code, delivery.last_error = status_code, error
        delivery.locked_until = None
        if error is None:
            delivery.status, delivery.delivered_at = DeliveryStatus.SUCCEEDED, now
            delivery.next_attempt_at = None
            return "succeeded"
        delay = retry_delay_s(settings, delivery.attempt_count)
        if delay is None:
            delivery.status, delivery.next_attempt_at = DeliveryStatus.FAILED, None
            log.warning("webhook delivery %s failed after %d attempts: %s", delivery_id, MAX_ATTEMPTS, error)
            return "failed"
        delivery.next_attempt_at = now + timedelta(seconds=delay)
        return "retrying"
