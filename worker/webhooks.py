"""The webhook delivery task, consumed from its own queue (`DISTILL_WEBHOOK_QUEUE`) by a worker that trains
nothing (`distill webhook-worker`), so a delivery never waits for a training job. Thin: an id in, one
attempt by core.webhooks.delivery; the next attempt is scheduled on the row and sent by the reaper's
dispatcher. Never raises: a failure is recorded on the delivery or, when the database is unreachable, the
delivery stays pending and its message is sent again later."""

from __future__ import annotations

import logging

from core.config import get_settings
from core.webhooks.delivery import DELIVER_WEBHOOK_TASK, attempt_delivery
from worker.celery_app import app

log = logging.getLogger(__name__)


@app.task(name=DELIVER_WEBHOOK_TASK, acks_late=True, ignore_result=True)
def deliver_webhook(delivery_id: str) -> str:
    """Make the due attempt of one webhook delivery (a no-op for a duplicate message)."""
    try:
        return attempt_delivery(get_settings(), delivery_id)
    except Exception:
        log.exception("webhook delivery %s: the attempt failed", delivery_id)
        return "error"
