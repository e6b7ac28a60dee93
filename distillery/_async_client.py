"""The asynchronous client: `AsyncDistillery(...)`, the same resources with `await` (and `async for`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from distillery import _base
from distillery._errors import APIConnectionError, APITimeoutError, JobWaitTimeout, SweepWaitTimeout
from distillery._models import Checkpoint, Event, File, FileDeleted, Job, Metrics, Sweep


class AsyncDistillery:
    """The asynchronous twin of `Distillery` (same arguments and environment variables)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 4,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self._options = _base.resolve_options(base_url, api_key, timeout=timeout, max_retries=max_retries)
        self._http = http_client or httpx.AsyncClient(
            base_url=self._options.base_url, timeout=timeout, headers=_base.client_headers(self._options)
        )
        self.files = AsyncFiles(self)
        self.jobs = AsyncJobs(self)
        self.sweeps = AsyncSweeps(self)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncDistillery:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        files: Any = None,
        data: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        """Send a request with retries (see `Distillery.request`)."""
        headers = _base.request_headers(method, idempotency_key, None)
        attempt = 0
        while True:
            response: httpx.Response | None = None
            try:
                response = await self._http.request(
                    method, path, params=_base.clean_params(params or {}), json=json_body, files=files,
                    data=data, headers=headers,
                )  # fmt: skip
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
            await asyncio.sleep(_base.retry_delay(self._options, attempt, response))
            attempt += 1

    async def _page_iter(self, path: str, params: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        params = dict(params)
        while True:
            page = await self.request("GET", path, params=params)
            for item in page["data"]:
                yield item
            if not page.get("has_more") or not page.get("next_cursor"):
                return
            params["after"] = page["next_cursor"]


class AsyncFiles:
    def __init__(self, client: AsyncDistillery) -> None:
        self._client = client

    async def upload(self, path: str | os.PathLike[str], *, purpose: str = "train") -> File:
        path = Path(path)
        content = path.read_bytes()  # re-sent as a whole on a retry
        body = await self._client.request(
            "POST",
            "/v1/files",
            files={"file": (path.name, content, "application/jsonl")},
            data={"purpose": purpose},
        )
        return File.model_validate(body)

    async def list(self, *, limit: int = 100) -> AsyncIterator[File]:
        async for item in self._client._page_iter("/v1/files", {"limit": limit}):
            yield File.model_validate(item)

    async def get(self, file_id: str) -> File:
        return File.model_validate(await self._client.request("GET", f"/v1/files/{file_id}"))

    async def delete(self, file_id: str) -> FileDeleted:
        return FileDeleted.model_validate(await self._client.request("DELETE", f"/v1/files/{file_id}"))


class AsyncJobs:
    def __init__(self, client: AsyncDistillery) -> None:
        self._client = client

    async def create(
        self, spec: Any, *, idempotency_key: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> Job:
        raw, base = _base.load_spec(spec)
        uploads = {
            field: (await self._client.files.upload(path, purpose=field)).id
            for field, path in _base.local_data_files(raw, base).items()
        }
        body = _base.with_file_ids(raw, uploads)
        if metadata is not None:
            body = {**body, "metadata": dict(metadata)}
        return Job.model_validate(
            await self._client.request("POST", "/v1/jobs", json_body=body, idempotency_key=idempotency_key)
        )

    async def list(
        self, *, status: str | None = None, metadata: Mapping[str, str] | None = None, limit: int = 100
    ) -> AsyncIterator[Job]:
        params = {"limit": limit, "status": status, **_base.metadata_params(metadata)}
        async for item in self._client._page_iter("/v1/jobs", params):
            yield Job.model_validate(item)

    async def get(self, job_id: str) -> Job:
        return Job.model_validate(await self._client.request("GET", f"/v1/jobs/{job_id}"))

    async def cancel(self, job_id: str) -> Job:
        return Job.model_validate(await self._client.request("POST", f"/v1/jobs/{job_id}/cancel"))

    async def pause(self, job_id: str) -> Job:
        return Job.model_validate(await self._client.request("POST", f"/v1/jobs/{job_id}/pause"))

    async def resume(self, job_id: str) -> Job:
        return Job.model_validate(await self._client.request("POST", f"/v1/jobs/{job_id}/resume"))

    async def metrics(
        self, job_id: str, *, names: Sequence[str] | None = None, from_step: int = 0
    ) -> Metrics:
        params = {"names": ",".join(names) if names else None, "from_step": from_step or None}
        return Metrics.model_validate(
            await self._client.request("GET", f"/v1/jobs/{job_id}/metrics", params=params)
        )

    async def checkpoints(self, job_id: str) -> list[Checkpoint]:
        page = await self._client.request("GET", f"/v1/jobs/{job_id}/checkpoints")
        return [Checkpoint.model_validate(item) for item in page["data"]]

    async def events(
        self, job_id: str, *, stream: bool = False, after: int | None = None
    ) -> AsyncIterator[Event]:
        """Like `Distillery.jobs.events`: pages, or the live stream with reconnects (`async for`)."""
        if not stream:
            params: dict[str, Any] = {"limit": 1000, "after": after}
            while True:
                page = await self._client.request("GET", f"/v1/jobs/{job_id}/events", params=params)
                for item in page["data"]:
                    yield Event.model_validate(item)
                if not page.get("has_more"):
                    return
                params["after"] = page["next_cursor"]
        client, decoder, failures = self._client, _base.SSEDecoder(after), 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if decoder.last_event_id is not None:
                headers["Last-Event-ID"] = str(decoder.last_event_id)
            progressed = False
            try:
                timeout = httpx.Timeout(client._options.timeout, read=60.0)
                async with client._http.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    params={"stream": "true"},
                    headers=headers,
                    timeout=timeout,
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        if not _base.should_retry(response):
                            _base.raise_for_status(response)
                        raise httpx.TransportError(f"the stream answered {response.status_code}")
                    async for line in response.aiter_lines():
                        for event in decoder.feed(line):
                            progressed = True
                            yield event
                return
            except (httpx.TransportError, _base.StreamError) as exc:
                failures = 0 if progressed else failures + 1
                if failures > client._options.max_retries:
                    raise APIConnectionError(f"the event stream of job {job_id} kept failing: {exc}") from exc
                await asyncio.sleep(_base.retry_delay(client._options, failures, None))

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_event: Callable[[Event], Awaitable[None] | None] | None = None,
    ) -> Job:
        """Wait until the job ends (a paused one has not); `on_event` (sync or async) sees every event."""
        deadline = None if timeout is None else time.monotonic() + timeout

        async def follow() -> None:
            async for event in self.events(job_id, stream=True):
                if on_event is not None:
                    result = on_event(event)
                    if asyncio.iscoroutine(result):
                        await result

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(
                follow(), timeout=None if deadline is None else max(0.0, deadline - time.monotonic())
            )
        job = await self.get(job_id)
        while not job.is_terminal:
            if deadline is not None and time.monotonic() > deadline:
                raise JobWaitTimeout(job, timeout or 0.0)
            await asyncio.sleep(1.0)
            job = await self.get(job_id)
        return job

    async def download_student(
        self, job_id: str, dest: str | os.PathLike[str] = ".", *, unpack: bool = True
    ) -> Path:
        """Like `Distillery.jobs.download_student` (the transfer runs in a worker thread)."""
        return await asyncio.to_thread(self._sync_jobs().download_student, job_id, dest, unpack=unpack)

    async def download_checkpoint(
        self, job_id: str, step: int, dest: str | os.PathLike[str] = ".", *, unpack: bool = True
    ) -> Path:
        return await asyncio.to_thread(
            self._sync_jobs().download_checkpoint, job_id, step, dest, unpack=unpack
        )

    def _sync_jobs(self) -> Any:
        from distillery._client import Distillery

        options = self._client._options
        client = Distillery(
            options.base_url, options.api_key, timeout=options.timeout, max_retries=options.max_retries
        )
        return client.jobs


class AsyncSweeps:
    """Like `Distillery.sweeps`, with `await` (and `async for` over `list`)."""

    def __init__(self, client: AsyncDistillery) -> None:
        self._client = client

    async def create(
        self,
        spec: Any,
        grid: Mapping[str, Sequence[Any]] | None = None,
        *,
        metric: str | None = None,
        mode: str | None = None,
        max_parallel: int | None = None,
        idempotency_key: str | None = None,
    ) -> Sweep:
        body, base = _base.load_sweep(spec, grid, metric=metric, mode=mode, max_parallel=max_parallel)
        uploads = {
            field: (await self._client.files.upload(path, purpose=field)).id
            for field, path in _base.local_data_files(body["spec"], base).items()
        }
        body["spec"] = _base.with_file_ids(body["spec"], uploads)
        return Sweep.model_validate(
            await self._client.request("POST", "/v1/sweeps", json_body=body, idempotency_key=idempotency_key)
        )

    async def list(self, *, limit: int = 100) -> AsyncIterator[Sweep]:
        async for item in self._client._page_iter("/v1/sweeps", {"limit": limit}):
            yield Sweep.model_validate(item)

    async def get(self, sweep_id: str) -> Sweep:
        return Sweep.model_validate(await self._client.request("GET", f"/v1/sweeps/{sweep_id}"))

    async def cancel(self, sweep_id: str) -> Sweep:
        return Sweep.model_validate(await self._client.request("POST", f"/v1/sweeps/{sweep_id}/cancel"))

    async def wait(
        self,
        sweep_id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = 2.0,
        on_update: Callable[[Sweep], Awaitable[None] | None] | None = None,
    ) -> Sweep:
        """Poll until no child is queued or running (see `Distillery.sweeps.wait`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            sweep = await self.get(sweep_id)
            if on_update is not None:
                result = on_update(sweep)
                if asyncio.iscoroutine(result):
                    await result
            if sweep.is_done:
                return sweep
            if deadline is not None and time.monotonic() > deadline:
                raise SweepWaitTimeout(sweep, timeout or 0.0)
            await asyncio.sleep(poll_interval)
