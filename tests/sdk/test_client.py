"""The Python client (`distillery`) against a real API server (uvicorn, SQLite and PostgreSQL).

Network faults (a lost response, a cut download, a dropped event stream, a 503 from a proxy) are injected by
`FaultyTransport`, a wrapper around httpx's real transport: every request still reaches the real server.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import distillery
from core.db import utcnow
from core.distill.spec import JobSpec
from core.jobs.lifecycle import add_event, transition
from core.jobs.models import Checkpoint, Job
from core.jobs.states import JobStatus
from core.storage import Storage
from tests.support.api import dolly_lines
from tests.support.live_api import LiveApi


class FaultyTransport(httpx.BaseTransport):
    """Passes requests to the real server; `fault(request, n)` may replace what the client sees."""

    def __init__(self, fault: Callable[[httpx.Request, int, httpx.Response], httpx.Response | None]) -> None:
        self.inner = httpx.HTTPTransport()
        self.fault = fault
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        response = self.inner.handle_request(request)
        replaced = self.fault(request, len(self.requests), response)
        return response if replaced is None else replaced


def sdk(
    live_api: LiveApi, key: str, transport: httpx.BaseTransport | None = None, **kwargs: Any
) -> distillery.Distillery:
    http = None
    if transport is not None:
        http = httpx.Client(
            base_url=live_api.base_url, transport=transport, headers={"Authorization": f"Bearer {key}"}
        )
    return distillery.Distillery(live_api.base_url, key, http_client=http, **kwargs)


def small_spec(teacher: Path, train: str) -> dict[str, Any]:
    return {
        "teacher": {"model": str(teacher)},
        "student": {"from_teacher_layers": [0, 2]},
        "data": {"train": train, "max_length": 64, "max_prompt_length": 32},
        "training": {"max_steps": 2, "batch_size": 2},
    }


def _small_file() -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "train.jsonl"
    path.write_bytes(dolly_lines(6))
    return path


@pytest.fixture
def tenant(live_api: LiveApi) -> str:
    return live_api.new_tenant("sdk")[1]


def jobs_in_db(live_api: LiveApi, job_ids: set[str] | None = None) -> int:
    with live_api.session() as session:
        query = session.query(Job)
        return query.filter(Job.id.in_(job_ids)).count() if job_ids else query.count()


def test_files_round_trip_and_typed_errors(live_api: LiveApi, tenant: str, tmp_path: Path) -> None:
    data = tmp_path / "four.jsonl"
    data.write_bytes(dolly_lines(4))
    with sdk(live_api, tenant) as client:
        uploaded = client.files.upload(data, purpose="eval")
        assert (uploaded.records, uploaded.purpose, uploaded.filename) == (4, "eval", "four.jsonl")
        assert uploaded.sha256 == hashlib.sha256(data.read_bytes()).hexdigest()
        assert client.files.get(uploaded.id) == uploaded
        assert [f.id for f in client.files.list()] == [uploaded.id]
        assert client.files.delete(uploaded.id).deleted
        with pytest.raises(distillery.NotFoundError) as missing:
            client.files.get(uploaded.id)
        assert (missing.value.status_code, missing.value.code, missing.value.param) == (
            404,
            "file_not_found",
            "file_id",
        )
        assert missing.value.request_id
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"instruction": "x"}\nnot json\n')
        with pytest.raises(distillery.UnprocessableEntityError) as invalid:
            client.files.upload(bad)
        assert invalid.value.param == "file" and "line 2" in invalid.value.message
    with sdk(live_api, "dk_not_a_key") as client, pytest.raises(distillery.AuthenticationError):
        client.files.get("file_x")


def test_create_from_a_dict_a_model_and_a_yaml_file(
    live_api: LiveApi, tenant: str, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    data.write_bytes(dolly_lines(6))
    with sdk(live_api, tenant) as client:
        from_dict = client.jobs.create(small_spec(tiny_teacher_dir, str(data)))
        train_id = from_dict.spec["data"]["train"]
        assert train_id.startswith("file_") and client.files.get(train_id).records == 6
        assert from_dict.status == "queued" and not from_dict.is_terminal

        model = JobSpec.model_validate(small_spec(tiny_teacher_dir, train_id))
        from_model = client.jobs.create(model)
        assert from_model.spec["data"]["train"] == train_id  # a file id is kept as it is

        config = tmp_path / "job.yaml"
        config.write_text(
            yaml.safe_dump(small_spec(tiny_teacher_dir, "data/train.jsonl"))
        )  # relative to the file
        from_yaml = client.jobs.create(config)
        assert (
            from_yaml.spec["data"]["train"].startswith("file_")
            and from_yaml.spec["data"]["train"] != train_id
        )

        with pytest.raises(distillery.UnprocessableEntityError) as bad:
            client.jobs.create({**small_spec(tiny_teacher_dir, train_id), "loss": {"lam": 1.5}})
        assert bad.value.param == "loss.lam"
        listed = [job.id for job in client.jobs.list(limit=2)]  # pages of two, followed to the end
        assert listed == [from_yaml.id, from_model.id, from_dict.id]
        assert [job.id for job in client.jobs.list(status="succeeded")] == []


def test_a_lost_create_response_is_retried_without_a_second_job(
    live_api: LiveApi, tenant: str, tiny_teacher_dir: Path
) -> None:
    def lose_first_create(request: httpx.Request, n: int, response: httpx.Response) -> httpx.Response | None:
        if request.method == "POST" and request.url.path == "/v1/jobs" and n == 1:
            response.read()  # the server made the job; its answer is lost on the way back
            raise httpx.ReadError("connection reset by peer", request=request)
        return None

    with sdk(live_api, tenant) as plain:
        train = plain.files.upload(_small_file()).id
    transport = FaultyTransport(lose_first_create)
    with sdk(live_api, tenant, transport, max_retries=3) as client:
        client._options.backoff_base_s = 0.01
        job = client.jobs.create(small_spec(tiny_teacher_dir, train))
        posts = [r for r in transport.requests if r.method == "POST"]
        assert len(posts) == 2
        keys = {r.headers["idempotency-key"] for r in posts}
        assert len(keys) == 1  # the retry carried the same key
        assert [j.id for j in client.jobs.list()] == [job.id]  # one job, the one returned


def test_server_errors_are_retried_then_raised(live_api: LiveApi, tenant: str) -> None:
    def unavailable(request: httpx.Request, n: int, response: httpx.Response) -> httpx.Response | None:
        response.read()
        if n <= 2:
            return httpx.Response(
                503, json={"error": {"code": "unavailable", "message": "proxy", "param": None}}
            )
        return None

    with sdk(live_api, tenant, FaultyTransport(unavailable), max_retries=2) as client:
        client._options.backoff_base_s = 0.01
        assert list(client.files.list()) == []  # the third try reached the server
    with sdk(
        live_api, tenant, FaultyTransport(lambda *_: httpx.Response(503, json={})), max_retries=1
    ) as client:
        client._options.backoff_base_s = 0.01
        with pytest.raises(distillery.InternalServerError) as failed:
            client.files.get("file_x")
        assert failed.value.status_code == 503


def _succeeded_job(live_api: LiveApi, tenant_key: str, teacher: Path, student: Path) -> str:
    with sdk(live_api, tenant_key) as client:
        train = client.files.upload(_small_file()).id
        job_id = client.jobs.create(small_spec(teacher, train)).id
    job_dir = Storage(live_api.settings.artifacts).job_dir(job_id)
    shutil.copytree(student, job_dir / "student")
    checkpoint = job_dir / "checkpoints" / "step-00000002"
    shutil.copytree(student, checkpoint)
    with live_api.session() as session:
        session.add(
            Checkpoint(
                job_id=job_id,
                step=2,
                storage_path=Storage(live_api.settings.artifacts).relative(checkpoint),
                size_bytes=1,
                metrics={},
            )
        )
        transition(session, job_id=job_id, target=JobStatus.RUNNING, started_at=utcnow())
        for step in range(1, 131):  # more than one page of events
            add_event(session, job_id=job_id, kind="progress", message=f"event {step}", data={"n": step})
        transition(session, job_id=job_id, target=JobStatus.SUCCEEDED, finished_at=utcnow())
        session.commit()
    return job_id


def test_downloads_resume_after_a_cut_and_verify(
    live_api: LiveApi, tenant: str, tiny_teacher_dir: Path, tiny_student_dir: Path, tmp_path: Path
) -> None:
    job_id = _succeeded_job(live_api, tenant, tiny_teacher_dir, tiny_student_dir)

    cut: list[str] = []

    def cut_first_download(request: httpx.Request, n: int, response: httpx.Response) -> httpx.Response | None:
        if "/student" not in request.url.path and "/download" not in request.url.path:
            return None
        if "range" in request.headers:
            assert response.status_code == 206  # the server honours Range
            return None
        if request.url.path in cut:
            return None
        cut.append(request.url.path)
        body = response.read()  # half of it arrives, then the connection drops
        return httpx.Response(200, headers=response.headers, stream=_Cut(body[: len(body) // 2], request))

    transport = FaultyTransport(cut_first_download)
    with sdk(live_api, tenant, transport) as client:
        client._options.backoff_base_s = 0.01
        student = client.jobs.download_student(job_id, tmp_path / "out")
        ranged = [r for r in transport.requests if "range" in r.headers]
        assert len(ranged) == 1 and ranged[0].headers["range"].startswith("bytes=")
        assert ranged[0].headers["range"] != "bytes=0-"  # it asked for the rest only
        assert student == tmp_path / "out" / "student"
        assert (student / "config.json").read_bytes() == (tiny_student_dir / "config.json").read_bytes()
        assert not list((tmp_path / "out").glob(".*partial*"))

        checkpoint = client.jobs.download_checkpoint(job_id, 2, tmp_path / "ckpt")
        assert checkpoint.name == "checkpoint-00000002" and (checkpoint / "config.json").is_file()
        assert len([r for r in transport.requests if "range" in r.headers]) == 2  # resumed too
        assert [c.step for c in client.jobs.checkpoints(job_id)] == [2]


class _Cut(httpx.SyncByteStream):
    """A response body that delivers `data` and then fails like a dropped connection."""

    def __init__(self, data: bytes, request: httpx.Request) -> None:
        self.data, self.request = data, request

    def __iter__(self):
        yield self.data
        raise httpx.ReadError("connection reset", request=self.request)


def test_a_corrupted_download_is_refused(
    live_api: LiveApi, tenant: str, tiny_teacher_dir: Path, tiny_student_dir: Path, tmp_path: Path
) -> None:
    job_id = _succeeded_job(live_api, tenant, tiny_teacher_dir, tiny_student_dir)

    def flip_a_byte(request: httpx.Request, n: int, response: httpx.Response) -> httpx.Response | None:
        body = bytearray(response.read())
        if request.url.path.endswith("/student"):
            body[len(body) // 2] ^= 0xFF
            return httpx.Response(response.status_code, headers=response.headers, content=bytes(body))
        return None

    with (
        sdk(live_api, tenant, FaultyTransport(flip_a_byte)) as client,
        pytest.raises(distillery.DownloadVerificationError),
    ):
        client.jobs.download_student(job_id, tmp_path)
    assert not (tmp_path / "student").exists()


def test_events_pages_and_a_stream_that_reconnects(
    live_api: LiveApi, tenant: str, tiny_teacher_dir: Path, tiny_student_dir: Path
) -> None:
    job_id = _succeeded_job(live_api, tenant, tiny_teacher_dir, tiny_student_dir)
    with sdk(live_api, tenant) as client:
        paged = list(client.jobs.events(job_id))
        assert len(paged) > 130 and len({e.id for e in paged}) == len(paged)
        assert [e.id for e in paged] == sorted(e.id for e in paged)

    cuts = []

    def drop_stream_once(request: httpx.Request, n: int, response: httpx.Response) -> httpx.Response | None:
        if request.url.params.get("stream") != "true" or cuts:
            return None
        cuts.append(request)
        lines = []
        for line in response.iter_lines():  # the first 40 events, then the connection drops
            lines.append(line)
            if sum(1 for x in lines if x.startswith("id:")) == 40 and line == "":
                break
        response.close()
        return httpx.Response(
            200, headers=response.headers, stream=_Cut("\n".join(lines).encode() + b"\n\n", request)
        )

    transport = FaultyTransport(drop_stream_once)
    with sdk(live_api, tenant, transport) as client:
        client._options.backoff_base_s = 0.01
        streamed = list(client.jobs.events(job_id, stream=True))
    assert [e.id for e in streamed] == [e.id for e in paged]  # every event once, in order
    reconnect = [r for r in transport.requests if r.url.params.get("stream") == "true"][1]
    assert reconnect.headers["last-event-id"] == str(paged[39].id)

    with sdk(live_api, tenant) as client:
        seen: list[distillery.Event] = []
        job = client.jobs.wait(job_id, timeout=30, on_event=seen.append)
        assert job.status == "succeeded" and job.is_terminal and len(seen) == len(paged)
