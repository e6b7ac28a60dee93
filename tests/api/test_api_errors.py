"""Authentication, the one error shape for every failure (unknown routes, wrong methods, a crash, a lost
queue), health and readiness, and the auth service itself."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.main import create_app
from core.db import get_sessionmaker, utcnow
from core.jobs.models import Job
from core.jobs.states import JobStatus
from core.tenants.keys import authenticate, create_api_key, ensure_bootstrap_key, hash_api_key, revoke_api_key
from core.tenants.models import ApiKey, Tenant
from migrations.runner import upgrade_database
from tests.support.api import assert_error, dolly_lines, job_spec, upload
from tests.support.live_api import DatabaseFactory, LiveApi, service_settings


def test_missing_or_bad_key_is_401(live_api: LiveApi) -> None:
    with live_api.client() as anonymous:
        error = assert_error(anonymous.get("/v1/jobs"), 401, "missing_api_key", "Authorization")
        assert "Bearer" in error["message"]
        assert anonymous.get("/v1/jobs").headers["www-authenticate"] == "Bearer"
        assert_error(anonymous.post("/v1/files"), 401, "missing_api_key")
        assert_error(
            anonymous.get("/v1/jobs", headers={"Authorization": "Basic abc"}), 401, "missing_api_key"
        )
    with live_api.client("dk_not-a-real-key") as impostor:
        assert_error(impostor.get("/v1/files"), 401, "invalid_api_key", "Authorization")
    tenant_id, key = live_api.new_tenant()
    with live_api.session() as session:
        key_id = session.query(ApiKey.id).filter(ApiKey.tenant_id == tenant_id).scalar()
        assert revoke_api_key(session, key_id=key_id)
    with live_api.client(key) as revoked:
        assert_error(revoked.get("/v1/jobs"), 401, "api_key_revoked")


def test_unknown_routes_and_methods_use_the_error_shape(live_api: LiveApi, tiny_teacher_dir: Path) -> None:
    _, owner_key = live_api.new_tenant("owner")
    with live_api.client(owner_key) as owner:
        train = upload(owner, dolly_lines(2)).json()["id"]
        created = owner.post("/v1/jobs", json=job_spec(str(tiny_teacher_dir), train))
        assert created.status_code == 201, created.text
        existing = created.json()["id"]
    _, key = live_api.new_tenant()
    with live_api.client(key) as client:
        assert_error(client.get("/v1/nothing-here"), 404, "not_found")
        unknown = assert_error(client.get("/v1/jobs/job_unknown"), 404, "job_not_found", "job_id")
        # A job that exists, but is another tenant's, gets the very same answer as one that never did.
        foreign = assert_error(client.get(f"/v1/jobs/{existing}"), 404, "job_not_found", "job_id")
        assert foreign["message"] == unknown["message"].replace("job_unknown", existing)
        assert_error(client.delete("/v1/jobs"), 405, "method_not_allowed")
        assert_error(client.put("/v1/files"), 405, "method_not_allowed")
    with live_api.client(owner_key) as owner:
        assert owner.get(f"/v1/jobs/{existing}").status_code == 200  # it does exist


def test_health_readiness_and_docs(live_api: LiveApi) -> None:
    with live_api.client() as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}
        assert client.get("/docs").status_code == 200
        paths = client.get("/openapi.json").json()["paths"]
        for path in ("/v1/files", "/v1/jobs", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/student"):
            assert path in paths


def test_readiness_names_what_failed(tmp_path: Path) -> None:
    settings = service_settings(tmp_path, f"sqlite:///{tmp_path / 'never-migrated.db'}")
    settings.broker_url = "redis://127.0.0.1:1/0"
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
        error = assert_error(response, 503, "not_ready")
        checks = response.json()["checks"]
        assert checks["database"].startswith("schema at none") and "distill db upgrade" in checks["database"]
        assert checks["broker"] != "ok"
        assert "database" in error["message"] and "broker" in error["message"]
        assert client.get("/healthz").status_code == 200


def test_unexpected_errors_are_500_without_internals(tmp_path: Path) -> None:
    settings = service_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    app = create_app(settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals")

    with TestClient(app, raise_server_exceptions=False) as client:
        error = assert_error(client.get("/boom"), 500, "internal_error")
        assert "secret" not in error["message"] and "Traceback" not in client.get("/boom").text


def test_lost_queue_fails_the_job_and_answers_503(
    live_api: LiveApi, tiny_teacher_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broker_down(*_args: object) -> None:
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr("core.jobs.service.enqueue_job", broker_down)
    _, key = live_api.new_tenant()
    with live_api.client(key) as client:
        train = upload(client, dolly_lines(2)).json()["id"]
        assert_error(
            client.post("/v1/jobs", json=job_spec(str(tiny_teacher_dir), train)), 503, "enqueue_failed"
        )
        (job,) = client.get("/v1/jobs").json()["data"]
        assert job["status"] == "failed"
        assert job["error"]["code"] == "enqueue_failed" and "broker unreachable" in job["error"]["message"]


def test_auth_service(make_database: DatabaseFactory) -> None:
    url = make_database("sqlite")
    upgrade_database(url)
    with get_sessionmaker(url)() as session:
        key, plaintext = create_api_key(session, tenant_name="acme", name="ci")
        assert plaintext.startswith("dk_") and len(plaintext) > 40
        assert key.key_hash == hash_api_key(plaintext) and plaintext not in (key.key_hash, key.prefix)
        second, _ = create_api_key(session, tenant_name="acme")
        assert second.tenant_id == key.tenant_id  # the tenant is reused

        used_from = utcnow()
        tenant = authenticate(session, plaintext)
        used_until = utcnow()
        assert tenant is not None and tenant.name == "acme"
        session.expire_all()
        first_use = session.get(ApiKey, key.id).last_used_at
        assert first_use is not None
        assert used_from <= first_use <= used_until  # the time of this use, read back as aware UTC
        authenticate(session, plaintext)
        session.expire_all()
        assert session.get(ApiKey, key.id).last_used_at == first_use  # not rewritten within a minute
        session.get(ApiKey, key.id).last_used_at = first_use - timedelta(minutes=2)
        session.commit()
        authenticate(session, plaintext)
        session.expire_all()
        assert session.get(ApiKey, key.id).last_used_at > first_use - timedelta(minutes=1)
        assert authenticate(session, "") is None and authenticate(session, plaintext + "x") is None

        boot = ensure_bootstrap_key(session, "bootstrap-secret")
        assert ensure_bootstrap_key(session, "bootstrap-secret").id == boot.id
        assert authenticate(session, "bootstrap-secret").name == "default"
        assert boot.tenant_id != key.tenant_id

        # A new bootstrap secret (the setting changed) gives a new key for the same `default` tenant and
        # leaves the rows already there as they were: that tenant's job, and the other tenant's keys.
        default_tenant = boot.tenant_id
        job = Job(tenant_id=default_tenant, spec={}, total_steps=4, max_attempts=1)
        session.add(job)
        session.commit()
        job_id = job.id
        acme_keys = _key_rows(session, key.tenant_id)
        assert len(acme_keys) == 2

        rotated = ensure_bootstrap_key(session, "bootstrap-secret-2")
        assert rotated.id != boot.id and rotated.tenant_id == default_tenant
        assert authenticate(session, "bootstrap-secret-2").name == "default"
        session.expire_all()
        assert _key_rows(session, key.tenant_id) == acme_keys
        assert [(j.id, j.tenant_id, j.status) for j in session.query(Job)] == [
            (job_id, default_tenant, JobStatus.QUEUED)
        ]
        assert sorted(session.scalars(select(Tenant.name))) == ["acme", "default"]


def _key_rows(session: Session, tenant_id: str) -> dict[str, tuple[object, ...]]:
    """A tenant's keys by id: what a stray update or delete would change."""
    rows = session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id))
    return {k.id: (k.key_hash, k.prefix, k.name, k.created_at, k.revoked_at) for k in rows}
