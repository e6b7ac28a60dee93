"""The reaper on SQLite and PostgreSQL: re-queue stale jobs with a message sent after commit, fail after
max attempts with a clear error, finish cancellations, leave live jobs alone; send again the messages of
queued jobs the broker lost, once, and never flood a queue that lost nothing."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from core.config import Settings
from core.db import session_scope, utcnow
from core.jobs.models import Job, JobEvent
from core.jobs.states import JobStatus
from core.queue import enqueue_job, queue_depth
from tests.support.services import (
    fresh_postgres_database,
    make_settings,
    seed_job,
    sqlite_database,
    tiny_spec,
)
from worker import reaper


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    if request.param == "sqlite":
        yield make_settings(tmp_path, database_url=sqlite_database(tmp_path / "db"), stale_after_s=30)
    else:
        with fresh_postgres_database() as url:
            yield make_settings(tmp_path, database_url=url, stale_after_s=30)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Job ids the reaper enqueued (the broker itself is exercised by the end-to-end tests)."""
    calls: list[str] = []
    monkeypatch.setattr(reaper, "enqueue_job", lambda settings, job_id: calls.append(job_id))
    return calls


def running_job(settings: Settings, *, heartbeat_age_s: float, attempts: int = 1, max_attempts: int = 3,
                status: JobStatus = JobStatus.RUNNING) -> str:  # fmt: skip
    job_id = seed_job(settings, tiny_spec(Path("/models/teacher"), "placeholder"), max_attempts=max_attempts)
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status=status,
                attempts=attempts,
                worker_id="w1",
                heartbeat_at=utcnow() - timedelta(seconds=heartbeat_age_s),
            )
        )
    return job_id


def load(settings: Settings, job_id: str) -> tuple[Job, list[str]]:
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        events = session.scalars(
            select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        )
        return job, list(events)  # type: ignore[return-value]


def test_a_stale_running_job_is_requeued_and_sent_again(settings: Settings, sent: list[str]) -> None:
    job_id = running_job(settings, heartbeat_age_s=120, attempts=1)
    counts = reaper.reap_once(settings)
    assert (counts.requeued, counts.failed, counts.cancelled) == (1, 0, 0)
    job, events = load(settings, job_id)
    assert (job.status, job.worker_id, job.heartbeat_at, job.attempts) == (JobStatus.QUEUED, None, None, 1)
    assert any("lost" in m and "re-queued (attempt 2 of 3)" in m for m in events)
    assert sent == [job_id]
    assert reaper.reap_once(settings).total == 0  # nothing twice


def test_a_job_whose_worker_is_alive_is_left_alone(settings: Settings, sent: list[str]) -> None:
    job_id = running_job(settings, heartbeat_age_s=5)
    assert reaper.reap_once(settings).total == 0
    assert load(settings, job_id)[0].status is JobStatus.RUNNING
    assert sent == []


def test_after_max_attempts_the_job_fails_with_a_clear_error(settings: Settings, sent: list[str]) -> None:
    job_id = running_job(settings, heartbeat_age_s=120, attempts=3, max_attempts=3)
    assert reaper.reap_once(settings).failed == 1
    job, _ = load(settings, job_id)
    assert job.status is JobStatus.FAILED and job.error_code == "max_attempts_exceeded"
    assert "3 attempts" in (job.error_message or "") and job.finished_at is not None
    assert sent == []


def test_a_stale_cancelling_job_is_cancelled(settings: Settings, sent: list[str]) -> None:
    job_id = running_job(settings, heartbeat_age_s=120, status=JobStatus.CANCELLING)
    assert reaper.reap_once(settings).cancelled == 1
    assert load(settings, job_id)[0].status is JobStatus.CANCELLED
    assert sent == []


def test_a_heartbeat_arriving_late_keeps_the_job(
    settings: Settings, sent: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-queue re-checks staleness in its UPDATE: a job found stale by the SELECT but refreshed
    before the UPDATE stays with its worker."""
    job_id = running_job(settings, heartbeat_age_s=120)
    original = reaper.transition

    def heartbeat_then_transition(session, **kwargs):  # type: ignore[no-untyped-def]
        with session_scope(settings.database_url) as other:
            other.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow()))
        return original(session, **kwargs)

    monkeypatch.setattr(reaper, "transition", heartbeat_then_transition)
    assert reaper.reap_once(settings).total == 0
    assert load(settings, job_id)[0].status is JobStatus.RUNNING
    assert sent == []


# ------------------------------------------------------------------------------ a worker known gone
def test_a_dead_workers_jobs_are_released_at_once_and_no_other_workers(
    settings: Settings, sent: list[str]
) -> None:
    """`distill serve` saw its worker die: its jobs get the reaper's rules without waiting for their
    heartbeats to go stale; jobs of other workers, even with a look-alike name, are left alone."""
    node = "distill-a_b%c@host"  # LIKE's wildcards in the name must match only themselves
    running, cancelling, last_try, other, look_alike = (
        running_job(settings, heartbeat_age_s=1, attempts=attempts, status=status)
        for attempts, status in [
            (1, JobStatus.RUNNING),
            (1, JobStatus.CANCELLING),
            (3, JobStatus.RUNNING),
            (1, JobStatus.RUNNING),
            (1, JobStatus.RUNNING),
        ]
    )
    for job_id, worker_id in [
        *((job, f"{node}:41") for job in (running, cancelling, last_try)),
        (other, "distill-a_b%c@host2:41"),
        (look_alike, "distill-aXbYc@host:41"),
    ]:
        with session_scope(settings.database_url) as session:
            session.execute(update(Job).where(Job.id == job_id).values(worker_id=worker_id))

    assert reaper.reap_worker(settings, node, "was killed by SIGKILL") == [running]

    job, events = load(settings, running)
    assert (job.status, job.worker_id, job.heartbeat_at) == (JobStatus.QUEUED, None, None)
    assert events[-1] == f"worker {node}:41 was killed by SIGKILL; re-queued (attempt 2 of 3)"
    assert sent == [running]
    job, events = load(settings, cancelling)
    assert job.status is JobStatus.CANCELLED and events[-1].endswith("while cancelling; job cancelled")
    job, events = load(settings, last_try)
    assert (job.status, job.error_code) == (JobStatus.FAILED, "max_attempts_exceeded")
    assert "lost on each of its 3 attempts" in events[-1]
    for untouched in (other, look_alike):
        assert load(settings, untouched)[0].status is JobStatus.RUNNING
    assert reaper.reap_worker(settings, node, "was killed by SIGKILL") == []  # nothing twice
    assert reaper.reap_once(settings).total == 0  # the others' heartbeats are fresh


# ------------------------------------------------------------------------------ lost queue messages
def queued_job(settings: Settings, *, waited_s: float) -> str:
    job_id = seed_job(settings, tiny_spec(Path("/models/teacher"), "placeholder"))
    with session_scope(settings.database_url) as session:
        sent_at = utcnow() - timedelta(seconds=waited_s)
        session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=sent_at))
    return job_id


def enqueued_at(settings: Settings, job_id: str) -> datetime:
    with session_scope(settings.database_url) as session:
        return session.scalar(select(Job.enqueued_at).where(Job.id == job_id))  # type: ignore[return-value]


def test_a_queued_job_whose_message_is_gone_is_sent_again(settings: Settings, sent: list[str]) -> None:
    """The test broker (SQLite, real) holds no message: both long-waiting jobs are sent again, once."""
    old, older = queued_job(settings, waited_s=400), queued_job(settings, waited_s=900)
    young = queued_job(settings, waited_s=10)
    before = utcnow()
    settings.requeue_after_s = 300
    counts = reaper.reap_once(settings)
    assert counts.resent == 2 and sorted(sent) == sorted([old, older])
    assert enqueued_at(settings, old) >= before and enqueued_at(settings, young) < before
    _, events = load(settings, old)
    assert any("sent again" in m and "fewer messages (0)" in m for m in events), events
    assert reaper.reap_once(settings).resent == 0  # sent just now: not again before requeue_after_s


def test_a_long_queue_that_lost_nothing_is_not_flooded(settings: Settings, sent: list[str]) -> None:
    settings.requeue_after_s = 300
    jobs = [queued_job(settings, waited_s=400) for _ in range(3)]
    for job_id in jobs:  # their messages really are in the broker's queue
        enqueue_job(settings, job_id)
    assert queue_depth(settings) == 3
    assert reaper.reap_once(settings).resent == 0 and sent == []


def test_two_reapers_send_a_lost_message_once(
    settings: Settings, sent: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The send is claimed by a conditional UPDATE of enqueued_at: a reaper that read the job as waiting
    but lost the race to another one sends nothing."""
    settings.requeue_after_s = 300
    job_id = queued_job(settings, waited_s=400)

    def another_reaper_first(settings: Settings, **_: object) -> int:
        with session_scope(settings.database_url) as session:
            session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow()))
        return 0

    monkeypatch.setattr(reaper, "queue_depth", another_reaper_first)
    assert reaper.reap_once(settings).resent == 0 and sent == []


def test_an_unreadable_broker_sends_nothing(
    settings: Settings, sent: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.requeue_after_s = 300
    job_id = queued_job(settings, waited_s=400)

    def unreachable(settings: Settings, **_: object) -> int:
        raise ConnectionError("broker down")

    monkeypatch.setattr(reaper, "queue_depth", unreachable)
    assert reaper.reap_once(settings).resent == 0 and sent == []
    assert enqueued_at(settings, job_id) < utcnow() - timedelta(seconds=300)  # tried again next pass


def test_a_requeued_stale_job_records_when_it_was_sent(settings: Settings, sent: list[str]) -> None:
    job_id = running_job(settings, heartbeat_age_s=120)
    before = utcnow()
    assert reaper.reap_once(settings).requeued == 1
    assert enqueued_at(settings, job_id) >= before and sent == [job_id]
