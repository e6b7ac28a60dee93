"""`/v1/files` through a real uvicorn server: validated uploads, size limits, listing, deletion."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import pytest

from tests.support.api import assert_error, dolly_lines, upload
from tests.support.live_api import UPLOAD_LIMIT, LiveApi


def test_upload_counts_records_and_hashes(live_api: LiveApi) -> None:
    _, key = live_api.new_tenant()
    content = dolly_lines(20)
    with live_api.client(key) as client:
        response = upload(client, content, filename="dolly.jsonl", purpose="eval")
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["records"] == 20
        assert body["format"] == "instruction"
        assert body["purpose"] == "eval"
        assert body["filename"] == "dolly.jsonl"
        assert body["size_bytes"] == len(content)
        assert body["sha256"] == hashlib.sha256(content).hexdigest()
        fetched = client.get(f"/v1/files/{body['id']}")
        assert fetched.status_code == 200 and fetched.json() == body


def test_malformed_lines_are_reported_by_number(live_api: LiveApi) -> None:
    _, key = live_api.new_tenant()
    good = json.dumps({"instruction": "Say hi", "output": "hi"}).encode()
    content = b"\n".join([good, b"{not json", good, json.dumps({"instruction": "no output"}).encode(), good])
    with live_api.client(key) as client:
        error = assert_error(upload(client, content), 422, "invalid_file", "file")
        assert "line(s) 2, 4" in error["message"]
        assert client.get("/v1/files").json()["data"] == []


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["empty", "blank-lines"])
def test_empty_upload_is_refused(live_api: LiveApi, content: bytes) -> None:
    _, key = live_api.new_tenant()
    with live_api.client(key) as client:
        assert_error(upload(client, content), 422, "empty_file", "file")


def test_bad_multipart_fields(live_api: LiveApi) -> None:
    _, key = live_api.new_tenant()
    with live_api.client(key) as client:
        assert_error(client.post("/v1/files", data={"purpose": "train"}), 422, "invalid_request", "file")
        assert_error(upload(client, dolly_lines(2), purpose="bogus"), 422, "invalid_request", "purpose")
        assert_error(client.post("/v1/files", json={"file": "x"}), 422, "invalid_request", "file")


def test_too_large_upload_with_content_length(live_api: LiveApi) -> None:
    _, key = live_api.new_tenant()
    content = dolly_lines(400)
    assert len(content) > 2 * UPLOAD_LIMIT
    with live_api.client(key) as client:
        assert_error(upload(client, content), 413, "file_too_large", "file")


def test_too_large_upload_streamed_without_length(live_api: LiveApi) -> None:
    # A chunked body has no Content-Length: the limit must be enforced while the body arrives.
    _, key = live_api.new_tenant()
    boundary = "distill-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    content = dolly_lines(400)

    def body() -> Iterator[bytes]:
        yield head
        for start in range(0, len(content), 16 * 1024):
            yield content[start : start + 16 * 1024]
        yield tail

    with live_api.client(key) as client:
        response = client.post(
            "/v1/files", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        assert_error(response, 413, "file_too_large", "file")


def test_file_just_under_the_limit_is_accepted_and_one_byte_over_refused(live_api: LiveApi) -> None:
    _, key = live_api.new_tenant()
    line = json.dumps({"text": "x" * 100}).encode() + b"\n"
    fits = line * (UPLOAD_LIMIT // len(line))
    over = fits + b" " * (UPLOAD_LIMIT - len(fits) + 1)
    with live_api.client(key) as client:
        assert upload(client, fits).status_code == 201
        assert_error(upload(client, over), 413, "file_too_large", "file")


def test_list_pages_and_delete(live_api: LiveApi) -> None:
    _, key = live_api.new_tenant()
    with live_api.client(key) as client:
        ids = [upload(client, dolly_lines(n)).json()["id"] for n in (1, 2, 3)]
        first = client.get("/v1/files", params={"limit": 2}).json()
        assert [f["id"] for f in first["data"]] == ids[::-1][:2] and first["has_more"] is True
        second = client.get("/v1/files", params={"limit": 2, "after": first["next_cursor"]}).json()
        assert [f["id"] for f in second["data"]] == [ids[0]] and second["has_more"] is False
        assert client.delete(f"/v1/files/{ids[1]}").json() == {"id": ids[1], "deleted": True}
        assert_error(client.get(f"/v1/files/{ids[1]}"), 404, "file_not_found")
        assert_error(client.delete(f"/v1/files/{ids[1]}"), 404, "file_not_found")
        assert_error(client.get("/v1/files", params={"after": "file_nope"}), 422, "invalid_cursor", "after")
        assert_error(client.get("/v1/files", params={"limit": 0}), 422, "invalid_request", "limit")
