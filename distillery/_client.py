"""The synchronous client: `Distillery(base_url=..., api_key=...)`."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from distillery import _base
from distillery._errors import (
    APIConnectionError,
    APITimeoutError,
    DistilleryError,
    JobWaitTimeout,
    SweepWaitTimeout,
)
from distillery._models import Checkpoint, Event, File, FileDeleted, Job, Metrics, Sweep


class Distillery:
    """A client of the Distillery API.

    Args:
        base_url: the API's address; default `DISTILL_API_URL`, else http://127.0.0.1:8000.
        api_key: an API key (`dk_...`); default `DISTILL_API_KEY`.
        timeout: seconds per request (streams wait as long as the server keeps sending).
        max_retries: retries of a request after a connection error, a 408/429 or a 5xx answer, with
            jittered exponential backoff (or the server's Retry-After). POSTs carry an Idempotency-Key, the
            same on every retry, so a retried create never makes two jobs.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 4,
        http_client: httpx.Client | None = None,
    ) -> None:
        self._options = _base.resolve_options(base_url, api_key, timeout=timeout, max_retries=max_retries)
        self._http = http_client or httpx.Client(
            base_url=self._options.base_url, timeout=timeout, headers=_base.client_headers(self._options)
        )
        self.files = Files(self)
        self.jobs = Jobs(self)
        self.sweeps = Sweeps(self)

    @property
    def base_url(self) -> str:
        return self._options.base_url

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Distillery:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------------- transport
    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        files: Any = None,
        data: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        """Send a request with retries; the decoded JSON of a success, a typed error otherwise."""
        headers = _base.request_headers(method, idempotency_key, headers)
        attempt = 0
        while True:
            response: httpx.Response | None = None
            try:
                if files is not None:
                    for handle in _file_handles(files):
                        handle.seek(0)
                response = self._http.request(
                    method,
                    path,
                    params=_base.clean_params(params or {}),
                    json=json_body,
                    files=files,
                    data=data,
                    headers=headers,
                )
            except httpx.TimeoutException as exc:
                if attempt >= self._options.max_retries:
                    raise APITimeoutError(f"{method} {path}: timed out after {attempt + 1} tries") from exc
            except httpx.TransportError as exc:
                if attempt >= self._options.max_retries:
                    raise APIConnectionError(f"{method} {path}: {exc}") from exc
            else:
                if not _base.should_retry(response) or attempt >= self._options.max_retries:
                    _base.raise_for_status(response)
                    return response.json() if response.content else None
            time.sleep(_base.retry_delay(self._options, attempt, response))
            attempt += 1

    def _page_iter(self, path: str, params: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        params = dict(params)
        while True:
            page = self.request("GET", path, params=params)
            yield from page["data"]
            if not page.get("has_more") or not page.get("next_cursor"):
                return
            params["after"] = page["next_cursor"]


def _file_handles(files: Any) -> list[Any]:
    values = files.values() if isinstance(files, Mapping) else [f for _, f in files]
    return [value[1] for value in values if isinstance(value, tuple) and hasattr(value[1], "seek")]


class Files:
    """`client.files`: JSONL data uploads."""

    def __init__(self, client: Distillery) -> None:
        self._client = client

    def upload(self, path: str | os.PathLike[str], *, purpose: str = "train") -> File:
        """Upload a JSONL file (validated line by line by the server)."""
        path = Path(path)
        with path.open("rb") as handle:
            body = self._client.request(
                "POST",
                "/v1/files",
                files={"file": (path.name, handle, "application/jsonl")},
                data={"purpose": purpose},
            )
        return File.model_validate(body)

    def list(self, *, limit: int = 100) -> Iterator[File]:
        """Every file of the tenant, newest first (pages are followed as you iterate)."""
        for item in self._client._page_iter("/v1/files", {"limit": limit}):
            yield File.model_validate(item)

    def get(self, file_id: str) -> File:
        return File.model_validate(self._client.request("GET", f"/v1/files/{file_id}"))

    def delete(self, file_id: str) -> FileDeleted:
        return FileDeleted.model_validate(self._client.request("DELETE", f"/v1/files/{file_id}"))


class Jobs:
    """`client.jobs`: create, follow, control and download distillation jobs."""

    def __init__(self, client: Distillery) -> None:
        self._client = client

    def create(
        self,
        spec: Any,
        *,
        idempotency_key: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Job:
        """Create a job from a dict, a JobSpec-shaped model or a YAML/JSON path.

        Local files named by `data.train` / `data.eval` are uploaded first and replaced by their ids
        (relative paths in a YAML file are relative to that file).
        """
        raw, base = _base.load_spec(spec)
        uploads = {
            field: self._client.files.upload(path, purpose=field).id
            for field, path in _base.local_data_files(raw, base).items()
        }
        body = _base.with_file_ids(raw, uploads)
        if metadata is not None:
            body = {**body, "metadata": dict(metadata)}
        created = self._client.request("POST", "/v1/jobs", json_body=body, idempotency_key=idempotency_key)
        return Job.model_validate(created)

    def list(
        self, *, status: str | None = None, metadata: Mapping[str, str] | None = None, limit: int = 100
    ) -> Iterator[Job]:
        """The tenant's jobs, newest first, optionally of one status and matching `metadata`."""
        params = {"limit": limit, "status": status, **_base.metadata_params(metadata)}
        for item in self._client._page_iter("/v1/jobs", params):
            yield Job.model_validate(item)

    def get(self, job_id: str) -> Job:
        return Job.model_validate(self._client.request("GET", f"/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> Job:
        return Job.model_validate(self._client.request("POST", f"/v1/jobs/{job_id}/cancel"))

    def pause(self, job_id: str) -> Job:
        """Checkpoint a running job and stop it (`paused`); `resume` continues from there."""
        return Job.model_validate(self._client.request("POST", f"/v1/jobs/{job_id}/pause"))

    def resume(self, job_id: str) -> Job:
        """Queue a paused (or failed/cancelled, checkpointed) job again; it continues from its checkpoint."""
        return Job.model_validate(self._client.request("POST", f"/v1/jobs/{job_id}/resume"))

    def metrics(self, job_id: str, *, names: Sequence[str] | None = None, from_step: int = 0) -> Metrics:
        params = {"names": ",".join(names) if names else None, "from_step": from_step or None}
        return Metrics.model_validate(
            self._client.request("GET", f"/v1/jobs/{job_id}/metrics", params=params)
        )

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        page = self._client.request("GET", f"/v1/jobs/{job_id}/checkpoints")
        return [Checkpoint.model_validate(item) for item in page["data"]]

    def events(self, job_id: str, *, stream: bool = False, after: int | None = None) -> Iterator[Event]:
        """The job's events in order. `stream=True` follows them live (server-sent events) until the job
        ends, reconnecting with Last-Event-ID after a dropped connection, so no event is missed or repeated."""
        if not stream:
            return self._event_pages(job_id, after)
        return self._event_stream(job_id, after)

    def _event_pages(self, job_id: str, after: int | None) -> Iterator[Event]:
        params: dict[str, Any] = {"limit": 1000, "after": after}
        while True:
            page = self._client.request("GET", f"/v1/jobs/{job_id}/events", params=params)
            for item in page["data"]:
                yield Event.model_validate(item)
            if not page.get("has_more"):
                return
            params["after"] = page["next_cursor"]

    def _event_stream(self, job_id: str, after: int | None, read_timeout: float = 60.0) -> Iterator[Event]:
        client, decoder, failures = self._client, _base.SSEDecoder(after), 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if decoder.last_event_id is not None:
                headers["Last-Event-ID"] = str(decoder.last_event_id)
            progressed = False
            try:
                timeout = httpx.Timeout(client._options.timeout, read=read_timeout)
                with client._http.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    params={"stream": "true"},
                    headers=headers,
                    timeout=timeout,
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        if not _base.should_retry(response):
                            _base.raise_for_status(response)
                        raise httpx.TransportError(f"the stream answered {response.status_code}")
                    for line in response.iter_lines():
                        for event in decoder.feed(line):
                            progressed = True
                            yield event
                return  # the server ends the stream once the job has ended and every event was sent
            except (httpx.TransportError, _base.StreamError) as exc:
                failures = 0 if progressed else failures + 1
                if failures > client._options.max_retries:
                    raise APIConnectionError(f"the event stream of job {job_id} kept failing: {exc}") from exc
                time.sleep(_base.retry_delay(client._options, failures, None))

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> Job:
        """Block until the job ends (following its event stream); returns the final job.

        A paused job has not ended: this keeps waiting until it is resumed (or cancelled) and ends.
        Raises `JobWaitTimeout` (holding the last state) after `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        read_timeout = 30.0 if timeout is None else max(1.0, min(30.0, timeout))
        stream = self._event_stream(job_id, None, read_timeout=read_timeout)
        try:
            for event in stream:
                if on_event is not None:
                    on_event(event)
                if deadline is not None and time.monotonic() > deadline:
                    break
        except APIConnectionError:
            if deadline is None or time.monotonic() <= deadline:
                raise
        finally:
            with contextlib.suppress(Exception):
                stream.close()  # type: ignore[attr-defined]
        job = self.get(job_id)
        while not job.is_terminal:
            if deadline is not None and time.monotonic() > deadline:
                raise JobWaitTimeout(job, timeout or 0.0)
            time.sleep(1.0)
            job = self.get(job_id)
        return job

    def download_student(
        self, job_id: str, dest: str | os.PathLike[str] = ".", *, unpack: bool = True
    ) -> Path:
        """Download the distilled student (Hugging Face directory) into `dest`, verifying its SHA-256 and
        resuming an interrupted transfer; returns the unpacked directory (or the archive)."""
        return self._download(f"/v1/jobs/{job_id}/student", Path(dest), "student.tar.gz", unpack)

    def download_checkpoint(
        self, job_id: str, step: int, dest: str | os.PathLike[str] = ".", *, unpack: bool = True
    ) -> Path:
        """Download the checkpoint of `step` (like `download_student`)."""
        name = f"checkpoint-{step:08d}.tar.gz"
        return self._download(f"/v1/jobs/{job_id}/checkpoints/{step}/download", Path(dest), name, unpack)

    def _download(self, path: str, dest: Path, name: str, unpack: bool) -> Path:
        client = self._client
        dest.mkdir(parents=True, exist_ok=True)
        partial, meta_path = dest / f".{name}.partial", dest / f".{name}.partial.json"
        meta: dict[str, Any] = {}
        if partial.is_file() and meta_path.is_file():
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        else:
            partial.unlink(missing_ok=True)
        attempt = 0
        while True:
            offset = partial.stat().st_size if partial.is_file() else 0
            headers: dict[str, str] = {}
            if offset and meta.get("etag"):
                headers = {"Range": f"bytes={offset}-", "If-Range": meta["etag"]}
            try:
                with client._http.stream("GET", path, headers=headers) as response:
                    if response.status_code == 416:  # the partial file is longer than the archive: restart
                        partial.unlink(missing_ok=True)
                        meta = {}
                        continue
                    if response.status_code >= 400:
                        response.read()
                        _base.raise_for_status(response)
                    resumed = response.status_code == 206
                    meta = {
                        "etag": response.headers.get("etag"),
                        "sha256": response.headers.get("x-content-sha256"),
                        "size": _base.total_size(response, offset if resumed else 0),
                    }
                    meta_path.write_text(json.dumps(meta), encoding="utf-8")
                    with partial.open("ab" if resumed else "wb") as handle:
                        for chunk in response.iter_bytes():
                            handle.write(chunk)
                break
            except httpx.TransportError as exc:
                if attempt >= client._options.max_retries:
                    raise APIConnectionError(f"download of {path} kept failing: {exc}") from exc
                time.sleep(_base.retry_delay(client._options, attempt, None))
                attempt += 1
        _base.verify_archive(partial, meta.get("sha256"), meta.get("size"))
        archive = dest / name
        os.replace(partial, archive)
        meta_path.unlink(missing_ok=True)
        if not unpack:
            return archive
        try:
            return _base.unpack(archive, dest)
        except Exception as exc:
            raise DistilleryError(f"could not unpack {archive}: {exc}") from exc


class Sweeps:
    """`client.sweeps`: a job per point of a grid over spec fields, ranked by a metric."""

    def __init__(self, client: Distillery) -> None:
        self._client = client

    def create(
        self,
        spec: Any,
        grid: Mapping[str, Sequence[Any]] | None = None,
        *,
        metric: str | None = None,
        mode: str | None = None,
        max_parallel: int | None = None,
        idempotency_key: str | None = None,
    ) -> Sweep:
        """Create a sweep from a base spec (a dict, a JobSpec-shaped model or a YAML/JSON path; local data
        files are uploaded first, as by `jobs.create`) and a grid of dotted spec paths to the values tried,
        e.g. `{"loss.alpha": [-1, 0.5], "loss.lam": [0.1, 0.3]}`; or from a sweep file holding `spec`,
        `grid` and optionally `metric` (default eval_kd_loss), `mode` (min) and `max_parallel` (all).
        A path may name a whole section (`loss`): its values are objects merged into the base's section."""
        body, base = _base.load_sweep(spec, grid, metric=metric, mode=mode, max_parallel=max_parallel)
        uploads = {
            field: self._client.files.upload(path, purpose=field).id
            for field, path in _base.local_data_files(body["spec"], base).items()
        }
        body["spec"] = _base.with_file_ids(body["spec"], uploads)
        created = self._client.request("POST", "/v1/sweeps", json_body=body, idempotency_key=idempotency_key)
        return Sweep.model_validate(created)

    def list(self, *, limit: int = 100) -> Iterator[Sweep]:
        """The tenant's sweeps, newest first (pages are followed as you iterate)."""
        for item in self._client._page_iter("/v1/sweeps", {"limit": limit}):
            yield Sweep.model_validate(item)

    def get(self, sweep_id: str) -> Sweep:
        return Sweep.model_validate(self._client.request("GET", f"/v1/sweeps/{sweep_id}"))

    def cancel(self, sweep_id: str) -> Sweep:
        """Cancel every child that has not ended."""
        return Sweep.model_validate(self._client.request("POST", f"/v1/sweeps/{sweep_id}/cancel"))

    def wait(
        self,
        sweep_id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = 2.0,
        on_update: Callable[[Sweep], None] | None = None,
    ) -> Sweep:
        """Poll until no child is queued or running; returns the sweep (its `best` child, if any).

        Raises `SweepWaitTimeout` (holding the last state) after `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            sweep = self.get(sweep_id)
            if on_update is not None:
                on_update(sweep)
            if sweep.is_done:
                return sweep
            if deadline is not None and time.monotonic() > deadline:
                raise SweepWaitTimeout(sweep, timeout or 0.0)
            time.sleep(poll_interval)
