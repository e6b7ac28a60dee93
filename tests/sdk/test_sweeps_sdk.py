"""`client.sweeps` (sync and async) against a real API server on SQLite and PostgreSQL: a lost create response
retried without a second sweep, and the async client's create, list, get, cancel and wait."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

import distillery
from core.jobs.models import Job, Sweep
from tests.sdk.test_client import FaultyTransport, _small_file, sdk, small_spec
from tests.support.live_api import LiveApi


@pytest.fixture
def tenant(live_api: LiveApi) -> tuple[str, str]:
    return live_api.new_tenant("sdk-sweeps")


def test_a_lost_create_response_is_retried_without_a_second_sweep(
    live_api: LiveApi, tenant: tuple[str, str], tiny_teacher_dir: Path
) -> None:
    tenant_id, key = tenant

    def lose_first_create(request: httpx.Request, n: int, response: httpx.Response) -> httpx.Response | None:
        if request.method == "POST" and request.url.path == "/v1/sweeps" and n == 1:
            response.read()  # the server made the sweep; its answer is lost on the way back
            raise httpx.ReadError("connection reset by peer", request=request)
        return None

    with sdk(live_api, key) as plain:
        train = plain.files.upload(_small_file()).id
    transport = FaultyTransport(lose_first_create)
    with sdk(live_api, key, transport, max_retries=3) as client:
        client._options.backoff_base_s = 0.01
        sweep = client.sweeps.create(small_spec(tiny_teacher_dir, train), {"loss.alpha": [-1, 0.5]})
        posts = [r for r in transport.requests if r.method == "POST"]
        assert len(posts) == 2 and len({r.headers["idempotency-key"] for r in posts}) == 1
        assert [s.id for s in client.sweeps.list()] == [sweep.id]
    with live_api.session() as session:
        sweeps = session.scalar(select(func.count()).select_from(Sweep).where(Sweep.tenant_id == tenant_id))
        jobs = session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id))
    assert (sweeps, jobs) == (1, 2)


def test_the_async_client(live_api: LiveApi, tenant: tuple[str, str], tiny_teacher_dir: Path) -> None:
    _, key = tenant

    async def scenario() -> None:
        async with distillery.AsyncDistillery(live_api.base_url, key) as client:
            spec = small_spec(tiny_teacher_dir, str(_small_file()))  # a local file: uploaded first
            sweep = await client.sweeps.create(
                spec, {"loss.lam": [0.1, 0.2]}, metric="eval_rouge_l", mode="max", max_parallel=1
            )
            assert (sweep.metric, sweep.mode, sweep.max_parallel) == ("eval_rouge_l", "max", 1)
            assert [job.params for job in sweep.jobs] == [{"loss.lam": 0.1}, {"loss.lam": 0.2}]
            assert sweep.spec["data"]["train"].startswith("file_") and not sweep.is_done
            assert [s.id async for s in client.sweeps.list()] == [sweep.id]
            with pytest.raises(distillery.SweepWaitTimeout) as waited:
                await client.sweeps.wait(sweep.id, timeout=0.5, poll_interval=0.1)
            assert waited.value.sweep.status == "running"
            cancelled = await client.sweeps.cancel(sweep.id)
            assert cancelled.status == "cancelled" and cancelled.counts["cancelled"] == 2
            done = await client.sweeps.wait(sweep.id, timeout=5)
            assert done.is_done and done.best is None
            with pytest.raises(distillery.ConflictError) as refused:
                await client.sweeps.cancel(sweep.id)
            assert refused.value.code == "sweep_not_cancellable"
            with pytest.raises(distillery.UnprocessableEntityError) as invalid:
                await client.sweeps.create(spec, {"loss.lam": [0.1, 3.0]})
            assert invalid.value.param == "children[1].loss.lam"

    asyncio.run(scenario())
