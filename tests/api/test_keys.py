"""`/v1/keys` and `/v1/tenants` through a real server on SQLite and PostgreSQL: creating, listing, revoking,
rotating and expiring keys, and what a key without the admin scope may not do."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from sqlalchemy import update

from core.db import utcnow
from core.tenants.keys import ensure_bootstrap_key
from core.tenants.models import ApiKey
from tests.support.api import assert_error
from tests.support.live_api import LiveApi

KEY_FIELDS = {
    "id",
    "tenant_id",
    "name",
    "prefix",
    "scopes",
    "status",
    "created_at",
    "last_used_at",
    "expires_at",
    "revoked_at",
}


def _admin_key(live_api: LiveApi) -> str:
    """A bootstrap key of this server's database, as `distill serve` and DISTILL_BOOTSTRAP_API_KEY make."""
    plaintext = f"dk_bootstrap_{uuid.uuid4().hex}"
    with live_api.session() as session:
        ensure_bootstrap_key(session, plaintext)
    return plaintext


def _backdate_expiry(live_api: LiveApi, key_id: str) -> None:
    """Let a key's expiry pass (as time would)."""
    with live_api.session() as session:
        session.execute(
            update(ApiKey).where(ApiKey.id == key_id).values(expires_at=utcnow() - timedelta(seconds=1))
        )
        session.commit()


def test_create_list_and_use_keys(live_api: LiveApi) -> None:
    tenant_id, key = live_api.new_tenant("keys")
    with live_api.client(key) as client:
        created = client.post("/v1/keys", json={"name": "ci", "expires_in_days": 30})
        assert created.status_code == 201, created.text
        body = created.json()
        assert set(body) == KEY_FIELDS | {"key", "rotated_from"}
        assert body["key"].startswith("dk_") and body["key"].startswith(body["prefix"])
        assert body["tenant_id"] == tenant_id and body["name"] == "ci" and body["scopes"] == []
        assert body["status"] == "active" and body["last_used_at"] is None and body["revoked_at"] is None
        expires = datetime.fromisoformat(body["expires_at"]) - datetime.fromisoformat(body["created_at"])
        assert abs(expires - timedelta(days=30)) < timedelta(seconds=5)
        unnamed = client.post("/v1/keys")  # no body at all: an unnamed key that never expires
        assert unnamed.status_code == 201 and unnamed.json()["expires_at"] is None

    with live_api.client(body["key"]) as new_client:
        assert new_client.get("/v1/files").status_code == 200

    with live_api.client(key) as client:
        listed = client.get("/v1/keys")
        assert listed.status_code == 200
        page = listed.json()
        assert [k["id"] for k in page["data"]][:2] == [unnamed.json()["id"], body["id"]]  # newest first
        assert len(page["data"]) == 3 and not page["has_more"]
        for row in page["data"]:
            assert set(row) == KEY_FIELDS  # never the key itself nor its hash
            assert body["key"] not in listed.text
        used = {row["id"]: row["last_used_at"] for row in page["data"]}
        assert used[body["id"]] is not None and used[unnamed.json()["id"]] is None

        first = client.get("/v1/keys", params={"limit": 2}).json()
        assert first["has_more"] and first["next_cursor"] == first["data"][-1]["id"]
        rest = client.get("/v1/keys", params={"limit": 2, "after": first["next_cursor"]}).json()
        assert [k["id"] for k in first["data"] + rest["data"]] == [k["id"] for k in page["data"]]
        assert_error(client.get("/v1/keys", params={"after": "key_nope"}), 422, "invalid_cursor", "after")

        shown = client.get(f"/v1/keys/{body['id']}")
        assert shown.status_code == 200 and shown.json()["name"] == "ci"
        assert_error(client.get("/v1/keys/key_unknown"), 404, "api_key_not_found", "key_id")


def test_bad_key_requests_name_the_field(live_api: LiveApi) -> None:
    _, key = live_api.new_tenant("keys")
    past = (utcnow() - timedelta(hours=1)).isoformat()
    with live_api.client(key) as client:
        assert_error(client.post("/v1/keys", json={"expires_at": past}), 422, "invalid_expiry", "expires_at")
        assert_error(
            client.post("/v1/keys", json={"expires_at": "2030-01-01T00:00:00"}), 422, param="expires_at"
        )  # no time zone
        both = {"expires_in_days": 1, "expires_at": (utcnow() + timedelta(days=2)).isoformat()}
        assert_error(client.post("/v1/keys", json=both), 422, "invalid_expiry", "expires_at")
        assert_error(client.post("/v1/keys", json={"expires_in_days": 0}), 422, param="expires_in_days")
        assert_error(client.post("/v1/keys", json={"name": "a\x00b"}), 422, param="name")
        assert_error(client.post("/v1/keys", json={"scopes": ["root"]}), 422, param="scopes.0")
        assert_error(client.post("/v1/keys", json={"colour": "red"}), 422, param="colour")


def test_revoked_and_expired_keys_are_refused(live_api: LiveApi) -> None:
    _, key = live_api.new_tenant("keys")
    with live_api.client(key) as client:
        doomed = client.post("/v1/keys", json={"name": "doomed"}).json()
        expiring = client.post("/v1/keys", json={"name": "expiring", "expires_in_days": 1}).json()
        revoked = client.delete(f"/v1/keys/{doomed['id']}")
        assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
        revoked_at = revoked.json()["revoked_at"]
        again = client.delete(f"/v1/keys/{doomed['id']}")  # idempotent: the first revocation stands
        assert again.status_code == 200 and again.json()["revoked_at"] == revoked_at

    with live_api.client(doomed["key"]) as client:
        error = assert_error(client.get("/v1/jobs"), 401, "api_key_revoked", "Authorization")
        assert "revoked" in error["message"]

    with live_api.client(expiring["key"]) as client:
        assert client.get("/v1/jobs").status_code == 200
    _backdate_expiry(live_api, expiring["id"])
    with live_api.client(expiring["key"]) as client:
        assert_error(client.get("/v1/jobs"), 401, "api_key_expired", "Authorization")
    with live_api.client(key) as client:
        statuses = {row["name"]: row["status"] for row in client.get("/v1/keys").json()["data"]}
        assert statuses == {"doomed": "revoked", "expiring": "expired", None: "active"}

    with live_api.client(key) as client:  # a key may revoke itself
        (me,) = [row for row in client.get("/v1/keys").json()["data"] if row["status"] == "active"]
        assert client.delete(f"/v1/keys/{me['id']}").status_code == 200
        assert_error(client.get("/v1/keys"), 401, "api_key_revoked")


def test_rotation_replaces_a_key_with_an_optional_grace_period(live_api: LiveApi) -> None:
    _, key = live_api.new_tenant("keys")
    with live_api.client(key) as client:
        old = client.post("/v1/keys", json={"name": "deploy", "expires_in_days": 10}).json()
        rotated = client.post(f"/v1/keys/{old['id']}/rotate")
        assert rotated.status_code == 201, rotated.text
        new = rotated.json()
        assert new["rotated_from"] == old["id"] and new["id"] != old["id"] and new["key"] != old["key"]
        assert new["name"] == "deploy" and new["scopes"] == old["scopes"]
        lifetime = datetime.fromisoformat(new["expires_at"]) - datetime.fromisoformat(new["created_at"])
        assert abs(lifetime - timedelta(days=10)) < timedelta(seconds=5)  # the old key's lifetime
        assert_error(client.post(f"/v1/keys/{old['id']}/rotate"), 409, "api_key_revoked", "key_id")

        graceful = client.post(f"/v1/keys/{new['id']}/rotate", json={"grace_period_s": 3600}).json()
        assert_error(
            client.post(f"/v1/keys/{graceful['id']}/rotate", json={"grace_period_s": -1}),
            422,
            param="grace_period_s",
        )
    with live_api.client(old["key"]) as client:
        assert_error(client.get("/v1/files"), 401, "api_key_revoked")
    with live_api.client(new["key"]) as client:  # inside its grace period: still works
        assert client.get("/v1/files").status_code == 200
        shown = client.get(f"/v1/keys/{new['id']}").json()
        assert shown["status"] == "active"
        revoked_at = datetime.fromisoformat(shown["revoked_at"])
        assert revoked_at > datetime.now(timezone.utc) + timedelta(minutes=59)
    with live_api.client(graceful["key"]) as client:
        assert client.get("/v1/files").status_code == 200


def test_admin_keys_create_tenants_and_manage_every_tenants_keys(live_api: LiveApi) -> None:
    admin = _admin_key(live_api)
    other_tenant, other_key = live_api.new_tenant("other")
    _, plain_key = live_api.new_tenant("plain")
    name = f"newco-{uuid.uuid4().hex[:8]}"

    with live_api.client(plain_key) as plain:
        assert_error(plain.post("/v1/tenants", json={"name": name}), 403, "forbidden")
        assert_error(plain.get("/v1/keys", params={"tenant_id": other_tenant}), 403, "forbidden", "tenant_id")
        assert_error(plain.post("/v1/keys", json={"tenant_id": other_tenant}), 403, "forbidden", "tenant_id")
        assert_error(plain.post("/v1/keys", json={"scopes": ["admin"]}), 403, "forbidden", "scopes")
    with live_api.client(other_key) as other:
        other_key_id = other.get("/v1/keys").json()["data"][0]["id"]
    with live_api.client(plain_key) as plain:
        assert_error(plain.get(f"/v1/keys/{other_key_id}"), 403, "forbidden", "key_id")
        assert_error(plain.delete(f"/v1/keys/{other_key_id}"), 403, "forbidden", "key_id")
        assert_error(plain.post(f"/v1/keys/{other_key_id}/rotate"), 403, "forbidden", "key_id")

    with live_api.client(admin) as client:
        created = client.post("/v1/tenants", json={"name": name, "key_name": "first"})
        assert created.status_code == 201, created.text
        tenant = created.json()
        assert tenant["name"] == name and tenant["key"]["tenant_id"] == tenant["id"]
        assert tenant["key"]["scopes"] == [] and tenant["key"]["name"] == "first"
        assert_error(client.post("/v1/tenants", json={"name": name}), 409, "tenant_exists", "name")
        assert_error(client.post("/v1/tenants", json={"name": "  "}), 422, param="name")

        listed = client.get("/v1/keys", params={"tenant_id": other_tenant}).json()["data"]
        assert [row["id"] for row in listed] == [other_key_id]
        for_other = client.post("/v1/keys", json={"tenant_id": other_tenant, "name": "from admin"})
        assert for_other.status_code == 201 and for_other.json()["tenant_id"] == other_tenant
        assert_error(
            client.post("/v1/keys", json={"tenant_id": "ten_unknown"}), 404, "tenant_not_found", "tenant_id"
        )
        second_admin = client.post("/v1/keys", json={"name": "ops", "scopes": ["admin"]}).json()
        assert second_admin["scopes"] == ["admin"]
        assert client.delete(f"/v1/keys/{other_key_id}").json()["status"] == "revoked"

    with live_api.client(tenant["key"]["key"]) as newco:
        assert newco.get("/v1/files").status_code == 200
        assert_error(newco.post("/v1/tenants", json={"name": name + "-2"}), 403, "forbidden")
    with live_api.client(other_key) as other:
        assert_error(other.get("/v1/files"), 401, "api_key_revoked")

    # A key without the admin scope cannot take over an admin key of its own tenant by rotating it.
    with live_api.client(admin) as client:
        admin_tenant = client.get("/v1/keys").json()["data"][0]["tenant_id"]
        plain_in_admin_tenant = client.post("/v1/keys", json={"tenant_id": admin_tenant}).json()["key"]
    with live_api.client(plain_in_admin_tenant) as plain:
        assert_error(plain.post(f"/v1/keys/{second_admin['id']}/rotate"), 403, "forbidden", "key_id")
        assert_error(plain.delete(f"/v1/keys/{second_admin['id']}"), 403, "forbidden", "key_id")


def test_a_bootstrap_key_from_before_scopes_becomes_admin(live_api: LiveApi) -> None:
    plaintext = _admin_key(live_api)
    with live_api.session() as session:
        key = ensure_bootstrap_key(session, plaintext)
        key.scopes = ""  # as stored before migration 0002
        session.commit()
        assert ensure_bootstrap_key(session, plaintext).scopes == "admin"
        key.revoked_at = utcnow()
        session.commit()
        assert ensure_bootstrap_key(session, plaintext).revoked_at is not None  # revoked stays revoked
