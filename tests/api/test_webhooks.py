"""`/v1/webhooks` through a real uvicorn server on SQLite and PostgreSQL: the secret shown once, rotation,
tenant isolation, pages, URLs refused unless DISTILL_WEBHOOK_ALLOW_HOSTS allows them, events validated;
deliveries recorded with job events; single attempts against a real HTTP receiver that verifies each
signature with the `standardwebhooks` library; the dispatcher sending due deliveries to a real broker."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from standardwebhooks import Webhook as StandardWebhook

from core.config import Settings
from core.db import get_sessionmaker, utcnow
from core.webhooks import delivery, service
from core.webhooks.models import DeliveryStatus, WebhookDelivery
from core.webhooks.service import EVENT_TYPES
from core.webhooks.signing import sign
from tests.support.api import assert_error, dolly_lines, job_spec, upload
from tests.support.live_api import LiveApi, serve_in_thread
from tests.support.webhook_receiver import Receiver

PUBLIC_URL = "https://93.184.216.34/hooks/distill"  # a public address: no name to resolve


@pytest.fixture(scope="module")
def acme(live_api: LiveApi) -> dict[str, str]:
    """A tenant with an uploaded training file."""
    _, key = live_api.new_tenant("acme")
    with live_api.client(key) as client:
        train = upload(client, dolly_lines(16)).json()["id"]
    return {"key": key, "train": train}


@pytest.fixture(scope="module")
def allowing_api(live_api: LiveApi) -> Iterator[LiveApi]:
    """A second server on the same database whose settings allow loopback and 10.0.0.0/8 (and `localhost`)."""
    settings = live_api.settings.model_copy(
        update={"webhook_allow_hosts": ["127.0.0.1", "10.0.0.0/8", "localhost"]}
    )
    base_url, stop = serve_in_thread(settings)
    yield LiveApi(settings=settings, base_url=base_url)
    stop()


def _fresh_client(live_api: LiveApi, api: LiveApi | None = None) -> httpx.Client:
    _, key = live_api.new_tenant("hooks")
    return (api or live_api).client(key)


def _create(client: httpx.Client, url: str = PUBLIC_URL, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/webhooks", json={"url": url, **body})
    assert response.status_code == 201, response.text
    return response.json()


def _deliveries(client: httpx.Client, webhook_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/webhooks/{webhook_id}/deliveries", params={"limit": 100})
    assert response.status_code == 200, response.text
    return response.json()["data"]


# ---------------------------------------------------------------------------------------------- CRUD
def test_the_secret_is_shown_once(live_api: LiveApi) -> None:
    with _fresh_client(live_api) as client:
        created = _create(client, events=["job.failed", "job.succeeded"])
        assert created["id"].startswith("wh_")
        assert created["url"] == PUBLIC_URL
        assert created["events"] == ["job.succeeded", "job.failed"]  # the documented order
        assert created["secret"].startswith("whsec_")
        assert len(base64.b64decode(created["secret"].removeprefix("whsec_"))) == 32
        shown = client.get(f"/v1/webhooks/{created['id']}").json()
        assert "secret" not in shown
        assert shown == {key: value for key, value in created.items() if key != "secret"}
        listed = client.get("/v1/webhooks").json()
        assert [w["id"] for w in listed["data"]] == [created["id"]]
        assert "secret" not in listed["data"][0]
        everything = _create(client)
        assert everything["events"] == list(EVENT_TYPES)
        assert everything["secret"] != created["secret"]


def test_rotation_returns_a_new_secret_once(live_api: LiveApi) -> None:
    with _fresh_client(live_api) as client:
        created = _create(client)
        rotated = client.post(f"/v1/webhooks/{created['id']}/rotate")
        assert rotated.status_code == 201, rotated.text
        first = rotated.json()
        assert first["id"] == created["id"] and first["secret"].startswith("whsec_")
        assert first["secret"] != created["secret"]
        assert first["previous_secret_expires_at"] is None  # no grace: the old secret stopped at once
        graced = client.post(f"/v1/webhooks/{created['id']}/rotate", json={"grace_period_s": 3600}).json()
        assert graced["secret"] not in (first["secret"], created["secret"])
        assert graced["previous_secret_expires_at"] is not None
        assert "secret" not in client.get(f"/v1/webhooks/{created['id']}").json()
        assert_error(
            client.post(f"/v1/webhooks/{created['id']}/rotate", json={"grace_period_s": -1}),
            422,
            param="grace_period_s",
        )


def test_delete_and_tenant_isolation(live_api: LiveApi) -> None:
    with _fresh_client(live_api) as client, _fresh_client(live_api) as other:
        created = _create(client)
        for method, path in [
            ("GET", f"/v1/webhooks/{created['id']}"),
            ("DELETE", f"/v1/webhooks/{created['id']}"),
            ("POST", f"/v1/webhooks/{created['id']}/rotate"),
            ("GET", f"/v1/webhooks/{created['id']}/deliveries"),
        ]:
            assert_error(other.request(method, path), 404, "webhook_not_found", "webhook_id")
        assert other.get("/v1/webhooks").json()["data"] == []
        deleted = client.delete(f"/v1/webhooks/{created['id']}")
        assert deleted.status_code == 200 and deleted.json() == {"id": created["id"], "deleted": True}
        assert_error(client.get(f"/v1/webhooks/{created['id']}"), 404, "webhook_not_found", "webhook_id")
        assert_error(client.delete(f"/v1/webhooks/{created['id']}"), 404, "webhook_not_found")


def test_pages(live_api: LiveApi) -> None:
    with _fresh_client(live_api) as client:
        ids = [_create(client)["id"] for _ in range(3)]
        first = client.get("/v1/webhooks", params={"limit": 2}).json()
        assert first["has_more"] and len(first["data"]) == 2
        rest = client.get("/v1/webhooks", params={"limit": 2, "after": first["next_cursor"]}).json()
        assert not rest["has_more"]
        assert [w["id"] for w in first["data"] + rest["data"]] == ids[::-1]  # newest first
        assert_error(client.get("/v1/webhooks", params={"after": "wh_nope"}), 422, "invalid_cursor", "after")


REFUSED_URLS = [
    ("loopback", "http://127.0.0.1:8080/hook"),
    ("loopback-name", "http://localhost:9000/hook"),
    ("loopback-v6", "http://[::1]/hook"),
    ("mapped-loopback", "http://[::ffff:127.0.0.1]/hook"),
    ("private-10", "http://10.1.2.3/hook"),
    ("private-192", "https://192.168.0.10/hook"),
    ("link-local-metadata", "http://169.254.169.254/latest/meta-data/"),
    ("unspecified", "http://0.0.0.0/hook"),
    ("scheme", "ftp://93.184.216.34/hook"),
    ("no-host", "http:///hook"),
    ("not-a-url", "hook"),
    ("space", "https://93.184.216.34/a hook"),
    ("unresolvable", "https://no-such-host.invalid/hook"),
]


@pytest.mark.parametrize("url", [u for _, u in REFUSED_URLS], ids=[name for name, _ in REFUSED_URLS])
def test_urls_refused(live_api: LiveApi, url: str) -> None:
    with _fresh_client(live_api) as client:
        assert_error(client.post("/v1/webhooks", json={"url": url}), 422, "invalid_url", "url")
        assert client.get("/v1/webhooks").json()["data"] == []


def test_allow_hosts_permit_private_destinations(live_api: LiveApi, allowing_api: LiveApi) -> None:
    with _fresh_client(live_api, allowing_api) as client:
        for url in ("http://127.0.0.1:8080/hook", "http://10.1.2.3/hook", "http://localhost:9000/hook"):
            assert client.post("/v1/webhooks", json={"url": url}).status_code == 201, url
        # Only what the setting names: another private network is still refused.
        assert_error(client.post("/v1/webhooks", json={"url": "http://192.168.0.10/"}), 422, param="url")
        assert_error(client.post("/v1/webhooks", json={"url": "http://[::1]/"}), 422, param="url")


BAD_BODIES = [
    ("unknown-event", {"url": PUBLIC_URL, "events": ["job.exploded"]}, "events"),
    ("no-events", {"url": PUBLIC_URL, "events": []}, "events"),
    ("events-not-a-list", {"url": PUBLIC_URL, "events": "job.succeeded"}, "events"),
    ("missing-url", {"events": ["job.succeeded"]}, "url"),
    ("url-not-a-string", {"url": 42}, "url"),
    ("url-too-long", {"url": PUBLIC_URL + "/" + "a" * 2100}, "url"),
    ("unknown-field", {"url": PUBLIC_URL, "secret": "whsec_mine"}, "secret"),
]


@pytest.mark.parametrize(("body", "param"), [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES])
def test_invalid_bodies_name_the_field(live_api: LiveApi, body: dict[str, Any], param: str) -> None:
    with _fresh_client(live_api) as client:
        assert_error(client.post("/v1/webhooks", json=body), 422, param=param)


# ------------------------------------------------------------------------------ deliveries recorded
def test_job_events_become_deliveries(
    live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path
) -> None:
    with live_api.client(acme["key"]) as client:
        every = _create(client)
        only_success = _create(client, events=["job.succeeded"])
        job = client.post("/v1/jobs", json=job_spec(str(tiny_teacher_dir), acme["train"])).json()
        cancelled = client.post(f"/v1/jobs/{job['id']}/cancel").json()
        assert cancelled["status"] == "cancelled"
        deliveries = _deliveries(client, every["id"])[::-1]  # oldest first
        assert [d["event_type"] for d in deliveries] == ["job.queued", "job.cancelled"]
        for item in deliveries:
            assert item["id"].startswith("msg_") and item["webhook_id"] == every["id"]
            assert item["status"] == "pending" and item["attempts"] == [] and item["job_id"] == job["id"]
            assert item["payload"]["type"] == item["event_type"]
        queued, ended = (d["payload"] for d in deliveries)
        # `data` is the job as GET /v1/jobs/{id} showed it at the event.
        assert queued["data"] == job
        assert ended["data"] == client.get(f"/v1/jobs/{job['id']}").json() == cancelled
        assert queued["timestamp"] < ended["timestamp"]
        assert _deliveries(client, only_success["id"]) == []


# ---------------------------------------------------------------------------------------- attempts
def _pending_delivery(live_api: LiveApi, acme: dict[str, str], teacher: Path, url: str) -> tuple[str, str]:
    """A webhook (allowed to reach 127.0.0.1) for only `job.queued`, and the delivery a new job makes."""
    settings = live_api.settings.model_copy(update={"webhook_allow_hosts": ["127.0.0.1"]})
    with live_api.session() as session:
        tenant_id = _tenant_of(live_api, acme["key"])
        webhook = service.create_webhook(
            session=session, settings=settings, tenant_id=tenant_id, url=url, events=["job.queued"]
        )
        secret, webhook_id = webhook.secret, webhook.id
    with live_api.client(acme["key"]) as client:
        client.post("/v1/jobs", json=job_spec(str(teacher), acme["train"])).raise_for_status()
        [pending] = _deliveries(client, webhook_id)
    return secret, pending["id"]


def _tenant_of(live_api: LiveApi, key: str) -> str:
    from core.tenants.keys import authenticate_key

    with live_api.session() as session:
        return authenticate_key(session, key).tenant.id


def _settings(live_api: LiveApi) -> Settings:
    return live_api.settings.model_copy(
        update={"webhook_allow_hosts": ["127.0.0.1"], "webhook_retry_base_s": 0.5, "webhook_timeout_s": 5.0}
    )


def _row(live_api: LiveApi, delivery_id: str) -> WebhookDelivery:
    with get_sessionmaker(live_api.settings.database_url)() as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None
        return row


def test_an_attempt_is_signed_and_recorded(
    live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path
) -> None:
    with Receiver() as receiver:
        receiver.secret, delivery_id = _pending_delivery(live_api, acme, tiny_teacher_dir, receiver.url)
        assert delivery.attempt_delivery(_settings(live_api), delivery_id) == "succeeded"
        assert delivery.attempt_delivery(_settings(live_api), delivery_id) == "skipped"  # a duplicate message
    [request] = receiver.received
    assert request.verified, request.error
    assert request.headers["webhook-id"] == delivery_id
    assert request.headers["content-type"] == "application/json"
    assert request.payload["type"] == "job.queued" and request.payload["data"]["status"] == "queued"
    # Our signature is exactly the library's.
    timestamp = int(request.headers["webhook-timestamp"])
    ours = sign(receiver.secret, msg_id=delivery_id, timestamp=timestamp, body=request.body)
    assert request.headers["webhook-signature"] == ours
    row = _row(live_api, delivery_id)
    assert row.status == DeliveryStatus.SUCCEEDED and row.delivered_at is not None
    assert row.attempt_count == 1 and row.last_status_code == 200 and row.last_error is None
    assert [(a["attempt"], a["status_code"], a["error"]) for a in row.attempts] == [(1, 200, None)]


def test_failures_are_retried_later_then_fail(
    live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path
) -> None:
    settings = _settings(live_api)
    with Receiver(statuses=[503, 500]) as receiver:
        receiver.secret, delivery_id = _pending_delivery(live_api, acme, tiny_teacher_dir, receiver.url)
        before = utcnow()
        assert delivery.attempt_delivery(settings, delivery_id) == "retrying"
        row = _row(live_api, delivery_id)
        assert row.status == DeliveryStatus.PENDING and row.attempt_count == 1
        assert row.last_status_code == 503 and row.last_error == "the endpoint answered HTTP 503"
        assert row.next_attempt_at is not None
        assert before + timedelta(seconds=0.5) <= row.next_attempt_at <= utcnow() + timedelta(seconds=0.5)
        assert delivery.attempt_delivery(settings, delivery_id) == "skipped"  # not due yet
        # The last attempt of the schedule: a failure now ends the delivery.
        with get_sessionmaker(settings.database_url).begin() as session:
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id)
                .values(attempt_count=delivery.MAX_ATTEMPTS - 1, next_attempt_at=utcnow())
            )
        assert delivery.attempt_delivery(settings, delivery_id) == "failed"
    row = _row(live_api, delivery_id)
    assert row.status == DeliveryStatus.FAILED and row.next_attempt_at is None
    assert row.attempt_count == delivery.MAX_ATTEMPTS and len(row.attempts) == 2
    assert [r.answered for r in receiver.received] == [503, 500]
    assert all(r.verified for r in receiver.received)
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 1  # the same message id each time


def test_an_unreachable_or_refused_destination_is_a_failed_attempt(
    live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path
) -> None:
    with Receiver() as receiver:
        url = receiver.url
    # Nothing listens there any more: a connection error, recorded, retried later.
    _, delivery_id = _pending_delivery(live_api, acme, tiny_teacher_dir, url)
    assert delivery.attempt_delivery(_settings(live_api), delivery_id) == "retrying"
    row = _row(live_api, delivery_id)
    assert row.last_status_code is None and row.last_error.startswith("ConnectError")
    # The destination is checked again at each attempt: without the allowance it is refused, unsent.
    with get_sessionmaker(live_api.settings.database_url).begin() as session:
        session.execute(
            update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(next_attempt_at=utcnow())
        )
    assert delivery.attempt_delivery(live_api.settings, delivery_id) == "retrying"
    assert "loopback" in _row(live_api, delivery_id).last_error


def test_a_rotated_secret_signs_beside_the_new_one_during_its_grace(
    live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path
) -> None:
    with Receiver() as receiver:
        old, delivery_id = _pending_delivery(live_api, acme, tiny_teacher_dir, receiver.url)
        webhook_id = _row(live_api, delivery_id).webhook_id
        with live_api.client(acme["key"]) as client:
            new = client.post(f"/v1/webhooks/{webhook_id}/rotate", json={"grace_period_s": 600}).json()
        receiver.secret = new["secret"]
        assert delivery.attempt_delivery(_settings(live_api), delivery_id) == "succeeded"
    [request] = receiver.received
    assert request.verified, request.error
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    StandardWebhook(old).verify(request.body, request.headers)  # the old secret still verifies


# ---------------------------------------------------------------------------------------- dispatch
def test_the_dispatcher_sends_each_due_delivery_once(
    live_api: LiveApi, acme: dict[str, str], tiny_teacher_dir: Path
) -> None:
    settings = live_api.settings.model_copy(
        update={"webhook_queue": f"distill-webhooks-{uuid.uuid4().hex[:8]}"}
    )
    _, first = _pending_delivery(live_api, acme, tiny_teacher_dir, PUBLIC_URL)
    _, second = _pending_delivery(live_api, acme, tiny_teacher_dir, PUBLIC_URL)
    sent = delivery.dispatch_due(settings)
    assert {first, second} <= set(sent)
    assert delivery._webhook_queue_depth(settings) == len(sent)  # on the webhook queue of the real broker
    assert not {first, second} & set(delivery.dispatch_due(settings))  # already sent: not again
    assert _row(live_api, first).enqueued_at is not None
    # A retry whose time has come is sent again.
    with get_sessionmaker(settings.database_url).begin() as session:
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == first)
            .values(next_attempt_at=utcnow() + timedelta(seconds=1), attempt_count=1)
        )
    assert first not in delivery.dispatch_due(settings)
    assert first in delivery.dispatch_due(settings, now=utcnow() + timedelta(seconds=2))
    # A message the broker lost is sent again once it has waited RESEND_AFTER_S, and only when the queue
    # holds fewer messages than there are deliveries waiting for theirs.
    later = utcnow() + timedelta(seconds=delivery.RESEND_AFTER_S + 1)
    assert second not in delivery.dispatch_due(settings, now=later)  # its message still waits in the queue
    _purge(settings)
    assert second in delivery.dispatch_due(settings, now=later)


def _purge(settings: Settings) -> None:
    """The broker loses every message of the webhook queue."""
    from kombu import Connection

    from core.queue import celery_config

    options = celery_config(settings).get("broker_transport_options") or {}
    with Connection(settings.broker_url, transport_options=options) as connection:
        connection.default_channel.queue_purge(settings.webhook_queue)
    assert delivery._webhook_queue_depth(settings) == 0
