"""`/v1/webhooks`: endpoints that receive signed job events (Standard Webhooks), their secrets and their
deliveries."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, status
from pydantic import BaseModel, ConfigDict, Field

from api.deps import SessionDep, SettingsDep, TenantDep
from api.schemas import ID_MAX_LENGTH, ID_PATTERN, Page, cursor_query
from core.webhooks import service
from core.webhooks.destinations import MAX_URL_LENGTH
from core.webhooks.models import DeliveryStatus, Webhook, WebhookDelivery

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

WebhookId = Annotated[str, Path(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN)]
MAX_GRACE_S = 7 * 24 * 3600
_EVENTS_HELP = f"Event types to receive (default: all): {', '.join(service.EVENT_TYPES)}."


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=MAX_URL_LENGTH, description="An http(s) URL on a public host.")
    events: list[Annotated[str, Field(max_length=64)]] | None = Field(
        default=None, max_length=len(service.EVENT_TYPES), description=_EVENTS_HELP
    )


class WebhookRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_period_s: int = Field(
        default=0,
        ge=0,
        le=MAX_GRACE_S,
        description="The old secret also signs for this long (default: none).",
    )


class WebhookOut(BaseModel):
    id: str
    url: str
    events: list[str]
    created_at: datetime
    updated_at: datetime
    previous_secret_expires_at: datetime | None = Field(
        description="Until then deliveries carry a second signature, made with the secret before the last rotation."
    )

    @classmethod
    def of(cls, row: Webhook) -> WebhookOut:
        return cls.model_validate(row, from_attributes=True)


class WebhookCreated(WebhookOut):
    secret: str = Field(description="The signing secret (`whsec_...`). It is shown only in this response.")

    @classmethod
    def of(cls, row: Webhook) -> WebhookCreated:
        return cls.model_validate(row, from_attributes=True)


class WebhookDeleted(BaseModel):
    id: str
    deleted: bool = True


class DeliveryAttempt(BaseModel):
    attempt: int
    at: datetime
    status_code: int | None = Field(description="The endpoint's HTTP status; null when none came back.")
    error: str | None = Field(description="Why the attempt failed; null for a 2xx.")
    duration_ms: int


class DeliveryOut(BaseModel):
    id: str = Field(description="The `webhook-id` header, the same on every attempt.")
    webhook_id: str
    event_type: str
    job_id: str | None
    status: DeliveryStatus
    payload: dict[str, Any] = Field(description="The body sent: `type`, `timestamp` and `data`.")
    attempts: list[DeliveryAttempt]
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None

    @classmethod
    def of(cls, row: WebhookDelivery) -> DeliveryOut:
        return cls.model_validate(row, from_attributes=True)


@router.post("", status_code=status.HTTP_201_CREATED)
def create_webhook(
    session: SessionDep, settings: SettingsDep, tenant: TenantDep, body: WebhookCreate
) -> WebhookCreated:
    """Register a webhook; the response is the only time its signing secret is shown."""
    row = service.create_webhook(
        session=session, settings=settings, tenant_id=tenant.id, url=body.url, events=body.events
    )
    return WebhookCreated.of(row)


@router.get("")
def list_webhooks(
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, cursor_query("A webhook id from `next_cursor`.")] = None,
) -> Page[WebhookOut]:
    """List the tenant's webhooks, newest first (never their secrets)."""
    rows, has_more = service.list_webhooks(session=session, tenant_id=tenant.id, limit=limit, after=after)
    return Page(
        data=[WebhookOut.of(r) for r in rows],
        has_more=has_more,
        next_cursor=rows[-1].id if has_more else None,
    )


@router.get("/{webhook_id}")
def get_webhook(session: SessionDep, tenant: TenantDep, webhook_id: WebhookId) -> WebhookOut:
    """Get one webhook (never its secret)."""
    return WebhookOut.of(service.get_webhook(session=session, tenant_id=tenant.id, webhook_id=webhook_id))


@router.delete("/{webhook_id}")
def delete_webhook(session: SessionDep, tenant: TenantDep, webhook_id: WebhookId) -> WebhookDeleted:
    """Delete a webhook and its deliveries; pending ones are not attempted again."""
    service.delete_webhook(session=session, tenant_id=tenant.id, webhook_id=webhook_id)
    return WebhookDeleted(id=webhook_id)


@router.post("/{webhook_id}/rotate", status_code=status.HTTP_201_CREATED)
def rotate_secret(
    session: SessionDep, tenant: TenantDep, webhook_id: WebhookId, body: WebhookRotate | None = None
) -> WebhookCreated:
    """Replace the signing secret; the new one is shown only in this response."""
    body = body or WebhookRotate()
    row = service.rotate_secret(
        session=session, tenant_id=tenant.id, webhook_id=webhook_id, grace_period_s=body.grace_period_s
    )
    return WebhookCreated.of(row)


@router.get("/{webhook_id}/deliveries")
def list_deliveries(
    session: SessionDep,
    tenant: TenantDep,
    webhook_id: WebhookId,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, cursor_query("A delivery id from `next_cursor`.")] = None,
    status: DeliveryStatus | None = None,
) -> Page[DeliveryOut]:
    """A webhook's deliveries with every attempt, newest first."""
    rows, has_more = service.list_deliveries(
        session=session, tenant_id=tenant.id, webhook_id=webhook_id, limit=limit, after=after, status=status
    )
    return Page(
        data=[DeliveryOut.of(r) for r in rows],
        has_more=has_more,
        next_cursor=rows[-1].id if has_more else None,
    )
