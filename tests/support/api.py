"""Small helpers shared by the API tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

DOLLY_TRAIN = Path(__file__).resolve().parents[2] / "data" / "dolly" / "train.jsonl"


def assert_error(
    response: httpx.Response, status: int, code: str | None = None, param: str | None = None
) -> dict:
    """The response is `status` with the one error shape (and the given code and param)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "param", "request_id"}, error
    assert error["request_id"] == response.headers.get("x-request-id"), (error, response.headers)
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def dolly_lines(count: int) -> bytes:
    """The first `count` records of the bundled Dolly training file, as JSONL bytes."""
    with DOLLY_TRAIN.open("rb") as handle:
        return b"".join(handle.readline() for _ in range(count))


def upload(
    client: httpx.Client, content: bytes, filename: str = "train.jsonl", **data: str
) -> httpx.Response:
    return client.post("/v1/files", files={"file": (filename, content, "application/jsonl")}, data=data)


def job_spec(teacher: str, train: str, **sections: Any) -> dict[str, Any]:
    """A small valid spec; `sections` replace or extend top-level sections."""
    spec: dict[str, Any] = {
        "teacher": {"model": teacher},
        "student": {"from_teacher_layers": [0, 2]},
        "data": {"train": train, "max_length": 64, "max_prompt_length": 32},
        "training": {"max_steps": 4, "batch_size": 2},
    }
    for name, value in sections.items():
        spec[name] = {**spec.get(name, {}), **value} if isinstance(value, dict) else value
    return spec
