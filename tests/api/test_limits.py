"""Per-key rate limits (in-process, in Redis, and the fallback when Redis is down), CORS, the /docs switch,
request ids and JSON logs, each against a real server started with the settings under test."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from api.ratelimit import RateLimiter
from cli.processes import ServiceProcess, stop_all, wait_until_healthy
from core.config import Settings
from core.tenants.keys import authenticate_key
from migrations.runner import upgrade_database
from tests.support.api import assert_error
from tests.support.live_api import DatabaseFactory, LiveApi, free_port, serve_in_thread, service_settings
from tests.support.services import REDIS_URL, REPO_ROOT, require_redis


@contextmanager
def server(tmp_path: Path, database_url: str, **values: Any) -> Iterator[LiveApi]:
    """A real uvicorn server on a migrated database, with settings `values`."""
    upgrade_database(database_url)
    home = tmp_path / uuid.uuid4().hex[:8]
    settings = service_settings(home, database_url, **values)
    base_url, stop = serve_in_thread(settings)
    try:
        yield LiveApi(settings=settings, base_url=base_url)
    finally:
        stop()


def _key_id(api: LiveApi, key: str) -> str:
    with api.session() as session:
        return authenticate_key(session, key).key_id


# ------------------------------------------------------------------------------------- rate limits
def test_a_key_over_its_limit_gets_429_with_retry_after(tmp_path: Path, db_url: str) -> None:
    with server(tmp_path, db_url, rate_limit_per_minute=3) as api:
        _, key = api.new_tenant()
        _, neighbour = api.new_tenant()
        with api.client(key) as client:
            for remaining in (2, 1, 0):
                response = client.get("/v1/files")
                assert response.status_code == 200
                assert response.headers["RateLimit-Limit"] == "3"
                assert response.headers["RateLimit-Remaining"] == str(remaining)
                assert 1 <= int(response.headers["RateLimit-Reset"]) <= 60
                assert "Retry-After" not in response.headers
            limited = client.post("/v1/keys")  # every authenticated route counts
            error = assert_error(limited, 429, "rate_limited")
            assert "3 requests a minute" in error["message"]
            assert 1 <= int(limited.headers["Retry-After"]) <= 60
            assert limited.headers["RateLimit-Remaining"] == "0"
            assert limited.headers["RateLimit-Limit"] == "3"
        with api.client(neighbour) as client:  # counts are per key
            assert client.get("/v1/files").headers["RateLimit-Remaining"] == "2"
        with api.client() as anonymous:  # no key, nothing counted: no RateLimit headers
            assert "RateLimit-Limit" not in anonymous.get("/healthz").headers
            assert "RateLimit-Limit" not in anonymous.get("/v1/files").headers


def test_a_limit_of_zero_turns_limits_off(tmp_path: Path, make_database: DatabaseFactory) -> None:
    with server(tmp_path, make_database("sqlite"), rate_limit_per_minute=0) as api:
        _, key = api.new_tenant()
        with api.client(key) as client:
            for _ in range(5):
                response = client.get("/v1/files")
                assert response.status_code == 200 and "RateLimit-Limit" not in response.headers


@pytest.mark.redis
def test_api_processes_share_counts_through_redis(tmp_path: Path, make_database: DatabaseFactory) -> None:
    require_redis()
    url = make_database("sqlite")
    with (
        server(tmp_path, url, rate_limit_per_minute=3, rate_limit_redis_url=REDIS_URL) as first,
        server(tmp_path, url, rate_limit_per_minute=3, rate_limit_redis_url=REDIS_URL) as second,
    ):
        _, key = first.new_tenant()
        with first.client(key) as a, second.client(key) as b:
            assert a.get("/v1/files").headers["RateLimit-Remaining"] == "2"
            assert b.get("/v1/files").headers["RateLimit-Remaining"] == "1"
            assert a.get("/v1/files").headers["RateLimit-Remaining"] == "0"
            assert_error(b.get("/v1/files"), 429, "rate_limited")
        counter = f"distill:ratelimit:{_key_id(first, key)}"
        client = redis.Redis.from_url(REDIS_URL)
        try:
            assert int(client.get(counter)) == 4
            assert 0 < client.pttl(counter) <= 60_000
        finally:
            client.delete(counter)
            client.close()


@pytest.mark.redis
def test_the_redis_window_expires() -> None:
    require_redis()
    prefix = f"distill-test:{uuid.uuid4().hex}"
    one, two = (RateLimiter(2, window_s=0.5, redis_url=REDIS_URL, prefix=prefix) for _ in range(2))
    assert one.backend == "redis"
    assert [d.allowed for d in (one.hit("k"), two.hit("k"), one.hit("k"))] == [True, True, False]
    assert two.hit("other").remaining == 1
    time.sleep(0.6)
    assert one.hit("k").remaining == 1  # a new window


def test_an_unreachable_redis_falls_back_to_counting_in_process(caplog: pytest.LogCaptureFixture) -> None:
    limiter = RateLimiter(2, redis_url=f"redis://127.0.0.1:{free_port()}/0", retry_redis_after_s=60)
    with caplog.at_level(logging.WARNING, logger="api.ratelimit"):
        decisions = [limiter.hit("key_a") for _ in range(3)]
        limiter.hit("key_b")
    assert [d.allowed for d in decisions] == [True, True, False]
    assert decisions[2].reset_s >= 1 and decisions[2].headers()["Retry-After"] == str(decisions[2].reset_s)
    assert limiter.backend == "memory (redis unreachable)"
    warnings = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
    assert len(warnings) == 1  # once per outage, not once per request


def test_the_api_keeps_answering_when_the_limits_redis_is_down(
    tmp_path: Path, make_database: DatabaseFactory
) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    with server(
        tmp_path, make_database("sqlite"), rate_limit_per_minute=2, rate_limit_redis_url=closed
    ) as api:
        _, key = api.new_tenant()
        with api.client(key) as client:
            assert [client.get("/v1/files").status_code for _ in range(2)] == [200, 200]
            assert_error(client.get("/v1/files"), 429, "rate_limited")


# ------------------------------------------------------------------------------- CORS and /docs
def test_cors_headers_only_for_configured_origins(
    tmp_path: Path, make_database: DatabaseFactory, live_api: LiveApi
) -> None:
    origin = "https://app.example.com"
    with server(tmp_path, make_database("sqlite"), cors_origins=f"{origin}/, https://other.example") as api:
        _, key = api.new_tenant()
        with api.client(key) as client:
            allowed = client.get("/v1/files", headers={"Origin": origin})
            assert allowed.headers["access-control-allow-origin"] == origin
            exposed = allowed.headers["access-control-expose-headers"].lower()
            assert "x-request-id" in exposed and "ratelimit-remaining" in exposed and "retry-after" in exposed
            refused = client.get("/v1/files", headers={"Origin": "https://evil.example"})
            assert refused.status_code == 200 and "access-control-allow-origin" not in refused.headers
        with api.client() as browser:
            preflight = browser.options(
                "/v1/jobs",
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization, content-type",
                },
            )
            assert preflight.status_code == 200
            assert preflight.headers["access-control-allow-origin"] == origin
            assert "POST" in preflight.headers["access-control-allow-methods"]
            assert "x-request-id" in preflight.headers
    _, key = live_api.new_tenant()
    with live_api.client(key) as client:  # no DISTILL_CORS_ORIGINS: no CORS headers at all
        response = client.get("/v1/files", headers={"Origin": origin})
        assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


def test_docs_can_be_turned_off(tmp_path: Path, make_database: DatabaseFactory) -> None:
    with server(tmp_path, make_database("sqlite"), docs_enabled=False) as api, api.client() as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert_error(client.get(path), 404, "not_found")
        assert client.get("/healthz").status_code == 200
    production = {"environment": "production", "bootstrap_api_key": "dk_" + "x" * 40}
    assert Settings(**production).docs_enabled is False
    assert Settings(**production, docs_enabled=True).docs_enabled is True
    assert Settings().docs_enabled is True


# ------------------------------------------------------------------------------------- request ids
def test_request_ids_are_echoed_or_made(live_api: LiveApi) -> None:
    _, key = live_api.new_tenant()
    with live_api.client(key) as client:
        sent = "trace-4f2a:01.x_y"
        assert client.get("/v1/files", headers={"X-Request-ID": sent}).headers["X-Request-ID"] == sent
        error = assert_error(client.get("/v1/jobs/job_unknown", headers={"X-Request-ID": sent}), 404)
        assert error["request_id"] == sent
        made = {client.get("/v1/files").headers["X-Request-ID"] for _ in range(3)}
        assert len(made) == 3 and all(rid.startswith("req_") for rid in made)
        for insane in ("x" * 129, "two words", "na\xefve".encode("latin-1"), "a/b", ""):
            rid = client.get("/v1/files", headers={"X-Request-ID": insane}).headers["X-Request-ID"]
            assert rid != insane and rid.startswith("req_")
    with live_api.client() as anonymous:
        error = assert_error(anonymous.get("/v1/files", headers={"X-Request-ID": "anon-1"}), 401)
        assert error["request_id"] == "anon-1"


def test_an_unexpected_error_carries_the_request_id(tmp_path: Path) -> None:
    app = create_app(service_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}"))

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom", headers={"X-Request-ID": "boom-1"})
        error = assert_error(response, 500, "internal_error")
        assert error["request_id"] == "boom-1" and response.headers["X-Request-ID"] == "boom-1"


def test_json_logs_from_a_real_api_process(tmp_path: Path, make_database: DatabaseFactory) -> None:
    url = make_database("sqlite")
    upgrade_database(url)
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")},
        "DISTILL_HOME": str(tmp_path / "home"),
        "DISTILL_DATABASE_URL": url,
        "DISTILL_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        "DISTILL_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    }
    command = [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--port", str(port)]
    api = ServiceProcess("api", command, env=env, log_path=tmp_path / "api.log", cwd=REPO_ROOT)
    try:
        problem = wait_until_healthy(f"http://127.0.0.1:{port}/healthz", [api], timeout_s=60)
        assert problem is None, f"{problem}\n{api.output()}"
        answer = httpx.get(f"http://127.0.0.1:{port}/v1/jobs", headers={"X-Request-ID": "json-log-1"})
        assert answer.status_code == 401
    finally:
        stop_all([api], grace_s=10)
    lines = [line for line in api.output(tail=500).splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message", "request_id"} <= set(r) for r in records)
    assert any(r["logger"].startswith("uvicorn") and "Uvicorn running" in r["message"] for r in records)
    (access,) = [r for r in records if r["request_id"] == "json-log-1"]
    assert access["logger"] == "distill.access" and access["level"] == "INFO"
    assert access["method"] == "GET" and access["path"] == "/v1/jobs" and access["status"] == 401
    assert isinstance(access["duration_ms"], float) and access["duration_ms"] >= 0
    assert not [r for r in records if r["logger"] == "uvicorn.access"]  # replaced by distill.access
