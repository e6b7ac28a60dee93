"""GET /metrics on a real server (SQLite and PostgreSQL), parsed with prometheus_client's own parser:
requests by route template and status, jobs read from the database, the optional token; a real
`distill api --workers 2` whose two processes' counts add up in one scrape; a real Celery worker's own
metrics port with the duration of the job it ended."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from api.metrics import REQUEST_BUCKETS, JobsCollector, fresh_multiprocess_dir
from core.db import session_scope, utcnow
from core.jobs.lifecycle import transition
from core.jobs.models import Job
from core.jobs.states import JobStatus
from core.queue import enqueue_job
from tests.support.api import assert_error, dolly_lines, job_spec, upload
from tests.support.live_api import LiveApi, serve_in_thread, service_settings
from tests.support.services import (
    distill_command,
    free_port,
    make_settings,
    seed_job,
    settings_env,
    sqlite_database,
    start_service,
    tiny_spec,
    wait_for,
)

WORKER_ID = "distill-metrics@test-host:4242"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(base_url: str, **headers: str) -> tuple[str, Samples]:
    """GET /metrics; returns the text and every sample by (name, labels), parsed by the client's parser."""
    response = httpx.get(f"{base_url}/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return response.text, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def requests_of(
    samples: Samples, name: str = "distill_http_requests_total"
) -> dict[tuple[str, str, str], float]:
    """{(method, route, status): value} of a per-request series."""
    found = {}
    for (sample_name, labels), count in samples.items():
        if sample_name == name:
            label = dict(labels)
            found[(label["method"], label["route"], label["status"])] = count
    return found


def _move(live_api: LiveApi, job_id: str, target: JobStatus, **values: Any) -> None:
    with live_api.session() as session:
        assert transition(session, job_id=job_id, target=target, **values)
        session.commit()


def _create_job(client: httpx.Client, teacher: Path, train: str) -> str:
    response = client.post("/v1/jobs", json=job_spec(str(teacher), train))
    assert response.status_code == 201, response.text
    return response.json()["id"]


# ------------------------------------------------------------------------------------ the live API
def test_requests_and_jobs_in_one_scrape(live_api: LiveApi, tiny_teacher_dir: Path) -> None:
    # The module's server has answered nothing yet: every count below is exact.
    tenant_id, key = live_api.new_tenant("metrics")
    with live_api.client(key) as client:
        train = upload(client, dolly_lines(4)).json()["id"]
        queued, running, cancelled = (_create_job(client, tiny_teacher_dir, train) for _ in range(3))
        for _ in range(2):
            assert client.get(f"/v1/jobs/{queued}").status_code == 200
        assert_error(client.get("/v1/jobs/job_doesnotexist"), 404, "job_not_found")
        assert_error(client.get("/v1/no-such-endpoint"), 404)
        assert_error(client.post("/v1/jobs", json={"teacher": {}}), 422, "invalid_request")
        assert client.post(f"/v1/jobs/{cancelled}/cancel").status_code == 200
    for _ in range(3):
        assert httpx.get(f"{live_api.base_url}/healthz").status_code == 200

    # One job is running on a worker that last beat 7 s ago, with the trainer's latest step metrics.
    beat = utcnow() - timedelta(seconds=7)
    latest = {"loss": 2.5, "tokens_per_s": 1234.5, "teacher_time_s": 0.25, "student_time_s": 0.5}
    _move(live_api, running, JobStatus.RUNNING, worker_id=WORKER_ID, heartbeat_at=beat, latest_metrics=latest)
    with session_scope(live_api.settings.database_url) as session:  # the queued one was sent 40 s ago
        sent = utcnow() - timedelta(seconds=40)
        session.execute(update(Job).where(Job.id == queued).values(enqueued_at=sent))

    text, samples = scrape(live_api.base_url)
    assert requests_of(samples) == {
        ("POST", "/v1/files", "201"): 1,
        ("POST", "/v1/jobs", "201"): 3,
        ("POST", "/v1/jobs", "422"): 1,
        ("GET", "/v1/jobs/{job_id}", "200"): 2,
        ("GET", "/v1/jobs/{job_id}", "404"): 1,
        ("GET", "unmatched", "404"): 1,
        ("POST", "/v1/jobs/{job_id}/cancel", "200"): 1,
        ("GET", "/healthz", "200"): 3,
    }

    # Histogram: every bucket of each series, cumulative, ending at +Inf with the series' count.
    buckets: dict[tuple[str, str, str], dict[float, float]] = defaultdict(dict)
    for (name, labels), count in samples.items():
        if name == "distill_http_request_duration_seconds_bucket":
            label = dict(labels)
            buckets[(label["method"], label["route"], label["status"])][float(label["le"])] = count
    assert set(buckets) == set(requests_of(samples))
    for series, counts in buckets.items():
        assert sorted(counts) == [*REQUEST_BUCKETS, math.inf], series
        cumulative = [counts[le] for le in sorted(counts)]
        assert cumulative == sorted(cumulative), series
        method, route, status = series
        labels = {"method": method, "route": route, "status": status}
        assert counts[math.inf] == value(samples, "distill_http_request_duration_seconds_count", **labels)
        assert counts[math.inf] == requests_of(samples)[series]
        assert (
            0 < value(samples, "distill_http_request_duration_seconds_sum", **labels) < 30 * counts[math.inf]
        )

    assert value(samples, "distill_job_metrics_up") == 1
    by_status = {status.value: value(samples, "distill_jobs", status=status.value) for status in JobStatus}
    expected = {"queued": 1, "running": 1, "cancelled": 1, "cancelling": 0, "succeeded": 0, "failed": 0}
    expected |= {"pausing": 0, "paused": 0}
    assert by_status == expected
    assert value(samples, "distill_queue_depth") == 1
    assert 40 <= value(samples, "distill_oldest_queued_job_age_seconds") < 100
    assert 7 <= value(samples, "distill_worker_heartbeat_age_seconds", worker=WORKER_ID) < 67
    assert value(samples, "distill_training_tokens_per_second", job_id=running) == 1234.5
    assert value(samples, "distill_training_step_seconds", job_id=running) == pytest.approx(0.75)
    # Only the running job has training gauges; nothing names a tenant, a file or a model.
    assert [k for k in samples if k[0] == "distill_training_tokens_per_second"] == [
        ("distill_training_tokens_per_second", frozenset({("job_id", running)}))
    ]
    for private in (tenant_id, train, str(tiny_teacher_dir)):
        assert private not in text

    # The scrape itself is counted once its response starts, so the next scrape shows the first one.
    _, again = scrape(live_api.base_url)
    assert requests_of(again)[("GET", "/metrics", "200")] == 1


def test_a_stream_is_counted_when_its_response_starts(live_api: LiveApi, tiny_teacher_dir: Path) -> None:
    _, key = live_api.new_tenant("metrics-stream")
    with live_api.client(key) as client:
        train = upload(client, dolly_lines(4)).json()["id"]
        job_id = _create_job(client, tiny_teacher_dir, train)
        _move(live_api, job_id, JobStatus.RUNNING, worker_id=WORKER_ID, heartbeat_at=utcnow())
        route = ("GET", "/v1/jobs/{job_id}/events", "200")
        before = requests_of(scrape(live_api.base_url)[1]).get(route, 0)
        with client.stream("GET", f"/v1/jobs/{job_id}/events", params={"stream": "true"}) as stream:
            assert stream.status_code == 200
            next(stream.iter_lines())  # the stream is open, and stays open: the job is still running
            _, samples = scrape(live_api.base_url)
            assert requests_of(samples)[route] == before + 1
            labels = dict(zip(("method", "route", "status"), route, strict=True))
            assert value(samples, "distill_http_request_duration_seconds_sum", **labels) < 30


def test_the_job_gauges_are_cached_and_a_database_failure_is_reported(
    live_api: LiveApi, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    def depth(collector: JobsCollector) -> float:
        families = {family.name: family for family in collector.collect()}
        return families["distill_queue_depth"].samples[0].value

    cached, fresh = (
        JobsCollector(live_api.settings.database_url, ttl_s=60),
        JobsCollector(live_api.settings.database_url, ttl_s=0),
    )
    first = depth(cached)
    assert depth(fresh) == first
    _, key = live_api.new_tenant("metrics-cache")
    with live_api.client(key) as client:
        _create_job(client, tiny_teacher_dir, upload(client, dolly_lines(4)).json()["id"])
    assert depth(cached) == first  # within its time to live: no query
    assert depth(fresh) == first + 1

    unreachable = JobsCollector(f"sqlite:///{tmp_path / 'missing' / 'distill.db'}")
    families = {family.name: family for family in unreachable.collect()}
    assert families["distill_job_metrics_up"].samples[0].value == 0
    assert set(families) == {"distill_job_metrics_up"}


def test_the_metrics_token_and_switch(live_api: LiveApi) -> None:
    home = live_api.settings.home
    url = live_api.settings.database_url
    base_url, stop = serve_in_thread(service_settings(home / "token", url, metrics_token="s3cret-token"))
    try:
        assert_error(httpx.get(f"{base_url}/metrics"), 401, "unauthorized", "Authorization")
        wrong = httpx.get(f"{base_url}/metrics", headers={"Authorization": "Bearer nope"})
        assert_error(wrong, 401, "unauthorized", "Authorization")
        _, samples = scrape(base_url, Authorization="Bearer s3cret-token")
        assert requests_of(samples)[("GET", "/metrics", "401")] == 2
    finally:
        stop()
    base_url, stop = serve_in_thread(service_settings(home / "off", url, metrics_enabled=False))
    try:
        assert_error(httpx.get(f"{base_url}/metrics"), 404)
    finally:
        stop()


def test_each_api_start_gets_an_empty_multiprocess_folder(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now
    gone, living, own = (tmp_path / f"api-{pid}" for pid in (dead.pid, 1, os.getpid()))
    for folder in (gone, living, own):
        folder.mkdir()
        (folder / "counter_7.db").write_bytes(b"stale")
    assert fresh_multiprocess_dir(tmp_path) == own
    assert not gone.exists() and list(own.iterdir()) == []
    assert (living / "counter_7.db").is_file()  # another live process' folder stays


# ------------------------------------------------------------------------- real service processes
def test_two_api_workers_add_up_in_one_scrape(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "home", database_url=sqlite_database(tmp_path / "db"))
    port = free_port()
    env = {k: v for k, v in settings_env(settings).items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    api = start_service("api", distill_command("api", "--port", str(port), "--workers", "2"), env, tmp_path)
    base_url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            assert api.alive(), api.output()
            try:
                return httpx.get(f"{base_url}/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout=90, what="distill api --workers 2")
        folders = list((settings.home / "prometheus").glob("api-*"))
        assert [folder.name for folder in folders] == [f"api-{api.pid}"]

        # New connections from several threads, until both worker processes have counted requests.
        sent = 1  # the readiness probe above
        lock = threading.Lock()

        def hit(count: int) -> None:
            nonlocal sent
            for _ in range(count):
                assert httpx.get(f"{base_url}/healthz").status_code == 200
                with lock:
                    sent += 1

        deadline = time.monotonic() + 60
        while len(list(folders[0].glob("counter_*.db"))) < 2:
            assert time.monotonic() < deadline, "one uvicorn worker answered every request"
            threads = [threading.Thread(target=hit, args=(10,)) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        # Whichever process answers the scrape, it reports every process' requests.
        for _ in range(4):
            _, samples = scrape(base_url)
            assert requests_of(samples)[("GET", "/healthz", "200")] == sent
    finally:
        api.stop(grace_s=10)


def test_a_worker_exports_the_duration_of_the_job_it_ended(tmp_path: Path) -> None:
    metrics_port = free_port()
    settings = make_settings(
        tmp_path / "home", database_url=sqlite_database(tmp_path / "db"), worker_metrics_port=metrics_port
    )
    worker = start_service("worker", distill_command("worker"), settings_env(settings), tmp_path)
    try:
        worker_url = f"http://127.0.0.1:{metrics_port}"

        def serving() -> bool:
            assert worker.alive(), worker.output()
            try:
                return httpx.get(worker_url).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(serving, timeout=90, what="the worker's metrics port")
        # A teacher outside MODEL_ROOTS: the worker fails the job at set-up, in well under a second.
        job_id = seed_job(settings, tiny_spec(Path("/nowhere/teacher"), "placeholder"))
        enqueue_job(settings, job_id)

        def ended() -> bool:
            with session_scope(settings.database_url) as session:
                return session.get(Job, job_id).status is JobStatus.FAILED

        wait_for(ended, timeout=60, what="the worker to fail the job")
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(worker_url).text)}
        samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for s in families["distill_job_duration_seconds"].samples
        }
        assert value(samples, "distill_job_duration_seconds_count", status="failed") == 1
        assert value(samples, "distill_job_duration_seconds_bucket", status="failed", le="1.0") == 1
        assert 0 <= value(samples, "distill_job_duration_seconds_sum", status="failed") < 1
        assert families["distill_job_duration_seconds"].documentation
    finally:
        worker.stop(grace_s=10)


def test_a_held_sweep_child_is_not_an_old_queued_job(live_api: LiveApi, tiny_teacher_dir: Path) -> None:
    from core.jobs.models import Sweep

    tenant_id, key = live_api.new_tenant("metrics-sweep")
    with live_api.client(key) as client:
        sent = _create_job(client, tiny_teacher_dir, upload(client, dolly_lines(4)).json()["id"])
    collector = JobsCollector(live_api.settings.database_url, ttl_s=0)

    def oldest_age() -> float:
        families = {family.name: family for family in collector.collect()}
        return families["distill_oldest_queued_job_age_seconds"].samples[0].value

    with session_scope(live_api.settings.database_url) as session:
        session.execute(update(Job).values(enqueued_at=utcnow()).where(Job.status == JobStatus.QUEUED))
        # A job held back by its sweep's max_parallel: queued long ago but never sent to the broker.
        sweep = Sweep(
            tenant_id=tenant_id, spec={}, grid={}, metric="eval_kd_loss", mode="min", max_parallel=1
        )
        session.add(sweep)
        session.flush()
        held = session.get(Job, sent)
        session.add(
            Job(
                tenant_id=tenant_id, status=JobStatus.QUEUED, spec=held.spec, total_steps=2, max_attempts=1,
                sweep_id=sweep.id, created_at=utcnow() - timedelta(hours=2), enqueued_at=None,
            )
        )  # fmt: skip
    assert oldest_age() < 60  # the sent jobs' age, not two hours
