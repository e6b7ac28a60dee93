"""Property-based fuzzing of the whole OpenAPI surface with Schemathesis, against a live uvicorn server on
SQLite and on PostgreSQL: valid and invalid requests alike (boundary values, wrong types, out-of-range
numbers, odd characters, missing parameters) never get a 5xx, and every 4xx is in the one error shape.

The schema is the app's own (`create_app().openapi()`), one test per operation; each request goes to the
live server of the `live_api` fixture. Examples are bounded per operation so the file stays well under two
minutes on two cores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from api.main import create_app
from core.config import Settings
from tests.support.api import dolly_lines, job_spec, upload
from tests.support.live_api import LiveApi

MAX_EXAMPLES = 20

schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())
# The key is the fixture's, set on every case: a generated Authorization header would make almost every
# request a 401 that never reaches the route.
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], with_security_parameters=False
)


@dataclass(frozen=True)
class Tenant:
    key: str
    ids: dict[str, str]  # path parameter -> an id that exists


@pytest.fixture(scope="module")
def tenant(live_api: LiveApi, tiny_teacher_dir: Path) -> Tenant:
    """A tenant with a file and a cancelled job: real ids get past the lookup to the code behind it (a
    random id stops at 404), and an ended job's event stream ends instead of waiting for a worker."""
    _, key = live_api.new_tenant("fuzz")
    with live_api.client(key) as client:
        train = upload(client, dolly_lines(2)).json()["id"]
        job = client.post("/v1/jobs", json=job_spec(tiny_teacher_dir.name, train)).json()["id"]
        assert client.post(f"/v1/jobs/{job}/cancel").json()["status"] == "cancelled"
    return Tenant(key=key, ids={"job_id": job, "file_id": train})


def assert_error_shape(response: Any) -> None:
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"code", "message", "param"} <= set(error), error
    assert isinstance(error["code"], str) and error["code"], error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["param"] is None or isinstance(error["param"], str), error


@schema.parametrize()
@schema.given(use_real_ids=st.booleans())
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_every_4xx_in_the_error_shape(
    case: Any, use_real_ids: bool, live_api: LiveApi, tenant: Tenant
) -> None:
    if use_real_ids and case.path_parameters:
        case.path_parameters.update({k: v for k, v in tenant.ids.items() if k in case.path_parameters})
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {tenant.key}"}
    response = case.call(base_url=live_api.base_url, timeout=30)
    request = f"{case.method} {response.request.url} body={case.body!r:.300}"
    assert response.status_code < 500, f"{request} -> {response.status_code} {response.text[:500]}"
    if response.status_code >= 400:
        assert_error_shape(response)
