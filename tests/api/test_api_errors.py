"""Authentication, the one error shape for every failure (unknown routes, wrong methods, a crash, a lost
queue), health and readiness, and the auth service itself."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core.db import get_sessionmaker, utcnow
from core.jobs.models import Job
from core.tenants.keys import authenticate, create_api_key, ensure_bootstrap_key, hash_api_key, revoke_api_key
from core.tenants.models import ApiKey
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


def test_unknown_routes_and_methods_use_the_error_shape(live_api: LiveApi) -> None:
    _, key = live_api.new_tenant()
    with live_api.client(key) as client:
        assert_error(client.get("/v1/nothing-here"), 404, "not_found")
        assert_error(client.get("/v1/jobs/job_unknown"), 404, "job_not_found", "job_id")
        assert_error(client.delete("/v1/jobs"), 405, "method_not_allowed")
        assert_error(client.put("/v1/files"), 405, "method_not_allowed")


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

        tenant = authenticate(session, plaintext)
        assert tenant is not None and tenant.name == "acme"
        session.expire_all()
        first_use = session.get(ApiKey, key.id).last_used_at
        assert first_use is not None
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
        assert session.query(Job).count() == 0
        assert utcnow() > first_use
