"""A catalogue of bad inputs, each answered with its 4xx in the one error shape naming the field, on SQLite
and PostgreSQL: NUL characters and overlong strings in ids, cursors, names and file names; integers beyond
what the database columns hold; non-finite, unbounded and wrongly typed spec values; oversized bodies;
model references that are relative, too long or that leak out of MODEL_ROOTS through a symlinked file.
Then what must hold around errors: a 500 leaves the keep-alive connection usable, a full disk is named."""

from __future__ import annotations

import errno
import http.client
import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from core.jobs.models import Checkpoint
from core.storage import Storage
from tests.support.api import assert_error, dolly_lines, job_spec, upload
from tests.support.live_api import LiveApi

INT32_OVER = 2**31  # one past PostgreSQL INTEGER (steps)
INT64_OVER = 2**63  # one past BIGINT (event ids)
HUGE = 10**30


@dataclass(frozen=True)
class Ctx:
    """What the requests refer to: a tenant's key, an uploaded file, a job, and model folder names."""

    key: str
    train: str
    job: str
    teacher: str  # a bare name under MODEL_ROOTS
    linked_model: str  # a model folder under MODEL_ROOTS whose tokenizer file links outside
    server_paths: tuple[str, ...]  # no message may show these


@pytest.fixture(scope="module")
def ctx(live_api: LiveApi, tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    root = tiny_teacher_dir.parent
    outside = tmp_path_factory.mktemp("outside-model-roots")
    (outside / "secret.json").write_text("{}")
    linked = root / f"linked-file-{uuid.uuid4().hex[:8]}"
    shutil.copytree(tiny_teacher_dir, linked)
    (linked / "tokenizer.json").unlink()
    (linked / "tokenizer.json").symlink_to(outside / "secret.json")
    _, key = live_api.new_tenant("bad-inputs")
    with live_api.client(key) as client:
        train = upload(client, dolly_lines(4)).json()["id"]
        response = client.post("/v1/jobs", json=job_spec(tiny_teacher_dir.name, train))
        assert response.status_code == 201, response.text
    yield Ctx(
        key=key,
        train=train,
        job=response.json()["id"],
        teacher=tiny_teacher_dir.name,
        linked_model=linked.name,
        server_paths=(str(root), str(outside), str(live_api.settings.home)),
    )
    shutil.rmtree(linked)


@dataclass(frozen=True)
class Case:
    """One bad request: how to make it from the context, and the status, code and param it must get."""

    name: str
    request: Callable[[Ctx], tuple[str, str, dict[str, Any]]]
    status: int
    param: str | None
    code: str | None = None
    # A message must name no server path; a few cases also say what the message must mention.
    mentions: tuple[str, ...] = field(default=())


def get(path: str, **kwargs: Any) -> Callable[[Ctx], tuple[str, str, dict[str, Any]]]:
    return lambda c: ("GET", path.format(job=c.job, file=c.train), kwargs)


def raw_spec(c: Ctx, **sections: Any) -> dict[str, Any]:
    """A POST /v1/jobs request whose body is a valid spec changed by `sections`, serialised with Python's
    json module: `float("inf")` becomes the bare token Infinity, a lone surrogate its escape."""
    teacher = sections.pop("teacher", {})  # job_spec's own first parameter has this name
    spec = job_spec(c.teacher, c.train, **sections)
    spec["teacher"] = {**spec["teacher"], **teacher}
    return {"content": json.dumps(spec).encode(), "headers": {"Content-Type": "application/json"}}


def spec_case(
    name: str, param: str, code: str | None = None, mentions: tuple[str, ...] = (), **sections: Any
) -> Case:
    def request(c: Ctx) -> tuple[str, str, dict[str, Any]]:
        resolved = {k: v(c) if callable(v) else v for k, v in sections.items()}
        return "POST", "/v1/jobs", raw_spec(c, **resolved)

    return Case(name, request, 422, param, code, mentions)


def multipart(filename: bytes, content: bytes) -> dict[str, Any]:
    """A multipart upload written by hand: clients percent-encode odd file names, browsers and scripts may
    send them raw (a NUL, a newline)."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        [
            f"--{boundary}\r\n".encode(),
            b'Content-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n',
            b"Content-Type: application/jsonl\r\n\r\n",
            content,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    return {"content": body, "headers": {"Content-Type": f"multipart/form-data; boundary={boundary}"}}


def upload_case(name: str, filename: bytes, content: bytes, status: int, code: str) -> Case:
    return Case(name, lambda c: ("POST", "/v1/files", multipart(filename, content)), status, "file", code)


LINES = dolly_lines(2)

CASES = [
    # ---- ids in the path: NUL, overlong, characters no id has
    Case("job-id-nul", get("/v1/jobs/job_%00x"), 422, "job_id"),
    Case("job-id-overlong", get("/v1/jobs/" + "j" * 65), 422, "job_id"),
    Case("job-id-space", get("/v1/jobs/job%20x"), 422, "job_id"),
    Case("cancel-job-id-nul", lambda c: ("POST", "/v1/jobs/job%00/cancel", {}), 422, "job_id"),
    Case("events-job-id-nul", get("/v1/jobs/job%00/events"), 422, "job_id"),
    Case("stream-job-id-nul", get("/v1/jobs/job%00/events", params={"stream": "true"}), 422, "job_id"),
    Case("metrics-job-id-nul", get("/v1/jobs/%00/metrics"), 422, "job_id"),
    Case("checkpoints-job-id-overlong", get("/v1/jobs/" + "x" * 300 + "/checkpoints"), 422, "job_id"),
    Case("student-job-id-nul", get("/v1/jobs/job_%00/student"), 422, "job_id"),
    Case("file-id-nul", get("/v1/files/file_%00"), 422, "file_id"),
    Case("file-id-overlong", get("/v1/files/" + "f" * 65), 422, "file_id"),
    Case("delete-file-id-nul", lambda c: ("DELETE", "/v1/files/file%00", {}), 422, "file_id"),
    Case("unknown-job", get("/v1/jobs/job_unknown"), 404, "job_id", "job_not_found"),
    Case("unknown-file", get("/v1/files/file_unknown"), 404, "file_id", "file_not_found"),
    # ---- cursors and list parameters
    Case("jobs-after-nul", get("/v1/jobs", params={"after": "job_\x00"}), 422, "after"),
    Case("jobs-after-overlong", get("/v1/jobs", params={"after": "j" * 65}), 422, "after"),
    Case("jobs-after-unknown", get("/v1/jobs", params={"after": "job_nope"}), 422, "after", "invalid_cursor"),
    Case("files-after-nul", get("/v1/files", params={"after": "\x00"}), 422, "after"),
    Case("files-after-newline", get("/v1/files", params={"after": "file_\n"}), 422, "after"),
    Case("jobs-limit-zero", get("/v1/jobs", params={"limit": 0}), 422, "limit"),
    Case("jobs-limit-huge", get("/v1/jobs", params={"limit": HUGE}), 422, "limit"),
    Case("files-limit-not-int", get("/v1/files", params={"limit": "ten"}), 422, "limit"),
    Case("jobs-status-unknown", get("/v1/jobs", params={"status": "sleeping"}), 422, "status"),
    # ---- event ids beyond BIGINT, on the list and on the stream (never 200 and then a cut stream)
    Case("events-after-int64", get("/v1/jobs/{job}/events", params={"after": INT64_OVER}), 422, "after"),
    Case("events-after-huge", get("/v1/jobs/{job}/events", params={"after": HUGE}), 422, "after"),
    Case("events-after-negative", get("/v1/jobs/{job}/events", params={"after": -1}), 422, "after"),
    Case("events-after-not-int", get("/v1/jobs/{job}/events", params={"after": "1e3x"}), 422, "after"),
    Case("events-limit-huge", get("/v1/jobs/{job}/events", params={"limit": HUGE}), 422, "limit"),
    Case("events-stream-not-bool", get("/v1/jobs/{job}/events", params={"stream": "maybe"}), 422, "stream"),
    Case(
        "events-last-event-id-int64",
        get("/v1/jobs/{job}/events", headers={"Last-Event-ID": str(INT64_OVER)}),
        422,
        "last-event-id",
    ),
    Case(
        "stream-last-event-id-huge",
        get("/v1/jobs/{job}/events", params={"stream": "true"}, headers={"Last-Event-ID": str(HUGE)}),
        422,
        "last-event-id",
    ),
    Case(
        "stream-after-int64",
        get("/v1/jobs/{job}/events", params={"stream": "true", "after": INT64_OVER}),
        422,
        "after",
    ),
    # ---- metrics: steps beyond INTEGER, names with NUL or beyond the column
    Case(
        "metrics-from-step-int32",
        get("/v1/jobs/{job}/metrics", params={"from_step": INT32_OVER}),
        422,
        "from_step",
    ),
    Case(
        "metrics-from-step-huge", get("/v1/jobs/{job}/metrics", params={"from_step": HUGE}), 422, "from_step"
    ),
    Case(
        "metrics-from-step-negative",
        get("/v1/jobs/{job}/metrics", params={"from_step": -5}),
        422,
        "from_step",
    ),
    Case(
        "metrics-name-nul",
        get("/v1/jobs/{job}/metrics", params={"names": "loss,\x00"}),
        422,
        "names",
        "invalid_names",
    ),
    Case("metrics-name-overlong", get("/v1/jobs/{job}/metrics", params={"names": "m" * 65}), 422, "names"),
    Case("metrics-names-empty", get("/v1/jobs/{job}/metrics", params={"names": " , "}), 422, "names"),
    Case(
        "metrics-names-too-long", get("/v1/jobs/{job}/metrics", params={"names": "a," * 1001}), 422, "names"
    ),
    # ---- checkpoint steps
    Case("checkpoint-step-int32", get(f"/v1/jobs/{{job}}/checkpoints/{INT32_OVER}/download"), 422, "step"),
    Case("checkpoint-step-huge", get(f"/v1/jobs/{{job}}/checkpoints/{HUGE}/download"), 422, "step"),
    Case("checkpoint-step-negative", get("/v1/jobs/{job}/checkpoints/-1/download"), 422, "step"),
    Case("checkpoint-step-not-int", get("/v1/jobs/{job}/checkpoints/ten/download"), 422, "step"),
    Case(
        "checkpoint-step-absent",
        get("/v1/jobs/{job}/checkpoints/7/download"),
        404,
        "step",
        "checkpoint_not_found",
    ),
    Case("student-not-ready", get("/v1/jobs/{job}/student"), 409, None, "student_not_ready"),
    # ---- uploads
    upload_case("upload-filename-nul", b"train\x00.jsonl", LINES, 422, "invalid_filename"),
    upload_case("upload-filename-tab", b"a\tb.jsonl", LINES, 422, "invalid_filename"),
    upload_case("upload-filename-300-chars", b"n" * 300 + b".jsonl", LINES, 422, "invalid_filename"),
    upload_case("upload-not-jsonl", b"x.jsonl", b"{not json}\n", 422, "invalid_file"),
    upload_case("upload-empty", b"x.jsonl", b"", 422, "empty_file"),
    upload_case("upload-too-large", b"x.jsonl", LINES * 200, 413, "file_too_large"),
    Case(
        "upload-purpose-unknown",
        lambda c: ("POST", "/v1/files", {"files": {"file": ("x.jsonl", LINES)}, "data": {"purpose": "test"}}),
        422,
        "purpose",
    ),
    Case("upload-no-file", lambda c: ("POST", "/v1/files", {"data": {"purpose": "train"}}), 422, "file"),
    # ---- request bodies
    Case(
        "body-50mb-refused-unread",
        lambda c: (
            "POST",
            "/v1/jobs",
            {"content": b" " * (50 << 20), "headers": {"Content-Type": "application/json"}},
        ),
        413,
        None,
        "body_too_large",
    ),
    Case(
        "body-2mb-chunked",
        lambda c: (
            "POST",
            "/v1/jobs",
            {
                "content": iter([b"[" + b"0," * (1 << 20) + b"0]"]),
                "headers": {"Content-Type": "application/json"},
            },
        ),
        413,
        None,
        "body_too_large",
    ),
    Case(
        "body-not-json",
        lambda c: ("POST", "/v1/jobs", {"content": b"{", "headers": {"Content-Type": "application/json"}}),
        400,
        None,
        "invalid_json",
    ),
    Case("body-array", lambda c: ("POST", "/v1/jobs", {"json": [1, 2]}), 422, None),
    Case(
        "idempotency-key-overlong",
        lambda c: (
            "POST",
            "/v1/jobs",
            {"json": job_spec(c.teacher, c.train), "headers": {"Idempotency-Key": "k" * 256}},
        ),
        422,
        "idempotency-key",
    ),
    Case(
        "idempotency-key-not-ascii",
        lambda c: (
            "POST",
            "/v1/jobs",
            {"json": job_spec(c.teacher, c.train), "headers": {"Idempotency-Key": b"k\xe9y"}},
        ),
        422,
        "idempotency-key",
    ),
    # ---- spec numbers: unbounded, non-finite, wrong types
    spec_case("seed-1e30", "training.seed", training={"seed": HUGE}),
    spec_case("seed-negative", "training.seed", training={"seed": -1}),
    spec_case("seed-float", "training.seed", training={"seed": 1.5}),
    spec_case("eval-batch-1e9", "evaluation.batch_size", evaluation={"batch_size": 10**9}),
    spec_case("eval-max-records-huge", "evaluation.max_records", evaluation={"max_records": HUGE}),
    spec_case("batch-size-true", "training.batch_size", training={"batch_size": True}),
    spec_case("batch-size-float", "training.batch_size", training={"batch_size": 2.0}),
    spec_case("max-steps-huge", "training.max_steps", training={"max_steps": HUGE}),
    spec_case("warmup-huge", "training.warmup_steps", training={"warmup_steps": HUGE}),
    spec_case("checkpoint-every-huge", "training.checkpoint_every", training={"checkpoint_every": HUGE}),
    spec_case("eval-every-huge", "training.eval_every", training={"eval_every": HUGE}),
    spec_case("keep-checkpoints-huge", "training.keep_checkpoints", training={"keep_checkpoints": HUGE}),
    spec_case("weight-decay-infinity", "training.weight_decay", training={"weight_decay": float("inf")}),
    spec_case("weight-decay-huge", "training.weight_decay", training={"weight_decay": 1e30}),
    spec_case("max-grad-norm-nan", "training.max_grad_norm", training={"max_grad_norm": float("nan")}),
    spec_case("max-grad-norm-infinity", "training.max_grad_norm", training={"max_grad_norm": float("inf")}),
    spec_case("learning-rate-zero", "training.learning_rate", training={"learning_rate": 0}),
    spec_case("temperature-infinity", "loss.temperature", loss={"temperature": float("inf")}),
    spec_case("alpha-1e30", "loss.alpha", loss={"alpha": 1e30}),
    spec_case("alpha-minus-infinity", "loss.alpha", loss={"alpha": float("-inf")}),
    spec_case("lam-true", "loss.lam", loss={"lam": True}),
    spec_case("chunk-size-huge", "loss.chunk_size", loss={"chunk_size": HUGE}),
    spec_case("taid-beta-lr-huge", "loss.taid_beta_lr", loss={"taid_beta_lr": 1e30}),
    spec_case("fused-int", "loss.fused", loss={"fused": 1}),
    spec_case("kd-ratio-string", "kd_ratio", kd_ratio="1"),
    spec_case("skip-invalid-int", "data.skip_invalid", data={"skip_invalid": 1}),
    spec_case("do-sample-string", "evaluation.do_sample", evaluation={"do_sample": "true"}),
    spec_case(
        "eval-temperature-infinity", "evaluation.temperature", evaluation={"temperature": float("inf")}
    ),
    spec_case("strategy-temperature-huge", "strategy.temperature", strategy={"temperature": 1e30}),
    spec_case("replay-capacity-huge", "strategy.replay_capacity", strategy={"replay_capacity": HUGE}),
    spec_case(
        "loss-rise-tolerance-infinity",
        "strategy.loss_rise_tolerance",
        strategy={"loss_rise_tolerance": float("inf")},
    ),
    spec_case("layers-true", "student.from_teacher_layers.0", student={"from_teacher_layers": [True]}),
    spec_case("layers-float", "student.from_teacher_layers.1", student={"from_teacher_layers": [0, 1.0]}),
    spec_case("layers-huge", "student.from_teacher_layers.0", student={"from_teacher_layers": [HUGE]}),
    spec_case(
        "layers-beyond-teacher",
        "student.from_teacher_layers",
        "invalid_layers",
        student={"from_teacher_layers": [0, 99]},
    ),
    # ---- spec strings: NUL, control characters, lone surrogates, overlong names
    spec_case("teacher-model-nul", "teacher.model", teacher={"model": "tiny\x00teacher"}),
    spec_case("teacher-model-newline", "teacher.model", teacher={"model": "tiny\nteacher"}),
    spec_case("teacher-model-300-chars", "teacher.model", teacher={"model": "m" * 300}),
    spec_case("teacher-model-5000-chars", "teacher.model", teacher={"model": "a/" * 2500}),
    spec_case("teacher-model-empty", "teacher.model", teacher={"model": ""}),
    spec_case("teacher-model-lone-surrogate", "teacher.model", teacher={"model": "tiny\ud800"}),
    spec_case("teacher-gguf-nul", "teacher.gguf_file", teacher={"gguf_file": "m\x00.gguf"}),
    spec_case("student-model-nul", "student.model", student={"from_teacher_layers": None, "model": "s\x00"}),
    spec_case("data-train-nul", "data.train", data={"train": "file_\x00"}),
    spec_case("data-eval-nul", "data.eval", data={"eval": "\x00"}),
    spec_case("data-train-unknown", "data.train", "file_not_found", data={"train": "file_unknown"}),
    spec_case("unknown-key-with-nul", "loss.a\x00b", loss={"a\x00b": 1}),
    # ---- model references: relative to the server's folders, or leaking out through a symlinked file
    spec_case("teacher-model-dot-relative", "teacher.model", "invalid_model", teacher={"model": "./tiny"}),
    spec_case("teacher-model-dotdot-relative", "teacher.model", "invalid_model", teacher={"model": "../etc"}),
    spec_case(
        "teacher-model-home-relative", "teacher.model", "invalid_model", teacher={"model": "~/models/x"}
    ),
    spec_case(
        "teacher-model-symlinked-file",
        "teacher.model",
        "invalid_model",
        mentions=("tokenizer.json", "links outside"),
        teacher=lambda c: {"model": c.linked_model},
    ),
    spec_case(
        "teacher-model-outside-roots",
        "teacher.model",
        "invalid_model",
        mentions=("outside",),
        teacher={"model": "/etc"},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_a_4xx_naming_the_field(live_api: LiveApi, ctx: Ctx, case: Case) -> None:
    method, url, kwargs = case.request(ctx)
    with live_api.client(ctx.key) as client:
        response = client.request(method, url, **kwargs)
        error = assert_error(response, case.status, case.code, case.param)
        for server_path in ctx.server_paths:
            assert server_path not in error["message"], error
        for mention in case.mentions:
            assert mention in error["message"], error
        # The connection is still good for the next request.
        assert client.get("/v1/jobs", params={"limit": 1}).status_code == 200


def test_catalogue_is_large_and_distinct() -> None:
    names = [case.name for case in CASES]
    assert len(names) >= 60 and len(set(names)) == len(names)


def test_bad_inputs_left_no_job_or_file(live_api: LiveApi, ctx: Ctx) -> None:
    # Runs after the catalogue (file order): only the fixture's own job and file exist.
    with live_api.client(ctx.key) as client:
        assert [job["id"] for job in client.get("/v1/jobs").json()["data"]] == [ctx.job]
        assert [file["id"] for file in client.get("/v1/files").json()["data"]] == [ctx.train]


def test_a_500_leaves_the_keep_alive_connection_usable(
    live_api: LiveApi, ctx: Ctx, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**_kwargs: object) -> None:
        raise RuntimeError("a bug inside the route")

    monkeypatch.setattr("core.jobs.service.list_checkpoints", broken)
    address = urlsplit(live_api.base_url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    headers = {"Authorization": f"Bearer {ctx.key}"}
    try:
        connection.request("GET", f"/v1/jobs/{ctx.job}/checkpoints", headers=headers)
        first = connection.getresponse()
        body = json.loads(first.read())
        assert first.status == 500 and body["error"]["code"] == "internal_error", body
        assert "a bug" not in body["error"]["message"]
        assert (first.getheader("connection") or "").lower() != "close"
        socket_before = connection.sock
        connection.request("GET", f"/v1/jobs/{ctx.job}", headers=headers)
        second = connection.getresponse()
        assert second.status == 200, second.read()
        assert json.loads(second.read())["id"] == ctx.job
        assert connection.sock is socket_before  # the same connection, not a silent reconnect
    finally:
        connection.close()


def test_a_full_disk_is_named_on_upload(live_api: LiveApi, ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/secret/server/path")

    monkeypatch.setattr("core.files.service.os.replace", no_space)
    with live_api.client(ctx.key) as client:
        error = assert_error(upload(client, LINES), 507, "storage_full")
        assert "storage is full" in error["message"] and "/secret" not in error["message"]
        monkeypatch.setattr("core.files.service.os.replace", _raises(errno.EIO))
        error = assert_error(upload(client, LINES), 503, "storage_unavailable")
        assert "/secret" not in error["message"]
        assert [f["id"] for f in client.get("/v1/files").json()["data"]] == [ctx.train]
    assert not any((Storage(live_api.settings.artifacts).root / "tmp").iterdir())  # no partial upload left


def _raises(code: int) -> Callable[..., None]:
    def fail(*_args: object) -> None:
        raise OSError(code, "I/O error", "/secret/server/path")

    return fail


def test_a_full_disk_is_named_when_building_an_archive(
    live_api: LiveApi, ctx: Ctx, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = Storage(live_api.settings.artifacts)
    directory = storage.job_dir(ctx.job) / "checkpoints" / "step-00000003"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    with live_api.session() as session:
        session.add(
            Checkpoint(job_id=ctx.job, step=3, storage_path=storage.relative(directory), size_bytes=2)
        )
        session.commit()

    def no_space(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("api.routers.outputs.directory_archive", no_space)
    with live_api.client(ctx.key) as client:
        error = assert_error(client.get(f"/v1/jobs/{ctx.job}/checkpoints/3/download"), 507, "storage_full")
        assert "archive" in error["message"]
        monkeypatch.undo()
        assert client.get(f"/v1/jobs/{ctx.job}/checkpoints/3/download").status_code == 200


def test_infinity_is_refused_on_sqlite_and_postgres_alike(live_api: LiveApi, ctx: Ctx) -> None:
    """The job SQLite once accepted with `Infinity` and then stored as a null spec: refused, and nothing
    stored; a valid spec with the same field stores it as sent."""
    with live_api.client(ctx.key) as client:
        bad = raw_spec(ctx, training={"weight_decay": float("inf")})
        assert_error(client.post("/v1/jobs", **bad), 422, param="training.weight_decay")
        good = client.post("/v1/jobs", **raw_spec(ctx, training={"weight_decay": 0.5}))
        assert good.status_code == 201, good.text
        job = client.get(f"/v1/jobs/{good.json()['id']}").json()
        assert job["spec"]["training"]["weight_decay"] == 0.5
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200


def test_events_show_no_server_paths(live_api: LiveApi, ctx: Ctx, tiny_teacher_dir: Path) -> None:
    from core.jobs.lifecycle import add_event

    config = tiny_teacher_dir / "config.json"
    with live_api.session() as session:
        add_event(
            session,
            job_id=ctx.job,
            kind="log",
            message=f"loading teacher from {tiny_teacher_dir}: OSError: {config} unreadable",
            data={"path": str(config), "nested": [f"at {tiny_teacher_dir}/x.py"], "route": "/v1/jobs"},
        )
        session.commit()
    with live_api.client(ctx.key) as client:
        (event,) = client.get(f"/v1/jobs/{ctx.job}/events").json()["data"][-1:]
    assert (
        event["message"]
        == f"loading teacher from .../{tiny_teacher_dir.name}: OSError: .../config.json unreadable"
    )
    assert event["data"] == {"path": ".../config.json", "nested": ["at .../x.py"], "route": "/v1/jobs"}
