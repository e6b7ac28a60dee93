"""Exactly once per step across attempts (worker.progress.DatabaseCallbacks on SQLite and PostgreSQL):
attempts that die at different points, driven through the trainer's callback sequence, leave every step's
metrics, evaluations and checkpoint events once, and nothing of a dead attempt past the resume point."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, update

from core.config import Settings
from core.db import session_scope
from core.jobs.models import Checkpoint, Job, JobEvent, Metric
from core.jobs.states import JobStatus
from core.storage import Storage
from tests.support.services import (
    fresh_postgres_database,
    make_settings,
    seed_job,
    sqlite_database,
    tiny_spec,
)
from worker.progress import DatabaseCallbacks

TOTAL, EVAL_EVERY, CHECKPOINT_EVERY = 6, 2, 3


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    if request.param == "sqlite":
        yield make_settings(tmp_path, database_url=sqlite_database(tmp_path / "db"))
    else:
        with fresh_postgres_database() as url:
            yield make_settings(tmp_path, database_url=url)


@pytest.fixture
def job_id(settings: Settings) -> str:
    return seed_job(settings, tiny_spec(Path("/models/teacher"), "placeholder"))


class Attempt:
    """One attempt of the job on worker `worker`, calling the callbacks in the trainer's order."""

    def __init__(self, settings: Settings, job_id: str, worker: str) -> None:
        with session_scope(settings.database_url) as session:  # what the claim does
            session.execute(
                update(Job).where(Job.id == job_id).values(status=JobStatus.RUNNING, worker_id=worker)
            )
        self.storage = Storage(settings.artifacts)
        self.job_dir = self.storage.job_dir(job_id)
        self.cb = DatabaseCallbacks(
            database_url=settings.database_url,
            storage=self.storage,
            job_id=job_id,
            worker_id=worker,
            checkpoint_every=CHECKPOINT_EVERY,
            flush_interval_s=3600,  # only the flushes the trainer's order forces
        )

    def checkpoint_dir(self, step: int) -> Path:
        path = self.job_dir / "checkpoints" / f"step-{step:08d}"
        path.mkdir(parents=True, exist_ok=True)
        (path / "model.safetensors").write_bytes(b"x" * 10)
        return path

    def evaluate(self, step: int) -> None:
        self.cb.on_event("strategy", f"validation loss rose at step {step}")
        self.cb.on_eval(step, {"eval_loss": 1.0 / (step + 1), "eval_rouge_l": float(step)}, [])

    def run(self, *, start: int = 0, until: int = TOTAL, eval_pending: bool = False) -> None:
        """Resume from `start` (0: afresh) and train to step `until`; past `until` the attempt is dead."""
        self.cb.on_event("load", "loading the teacher")
        if start:
            self.cb.on_resume(start, self.checkpoint_dir(start))
        self.cb.on_start(total_steps=TOTAL, start_step=start)
        if start == 0 or eval_pending:
            self.evaluate(start)
        for step in range(start + 1, until + 1):
            self.cb.on_step(step, {"loss": float(step), "lr": 1e-3})
            if step % EVAL_EVERY == 0 or step == TOTAL:
                self.evaluate(step)
            if step % CHECKPOINT_EVERY == 0:
                self.cb.on_checkpoint(step, self.checkpoint_dir(step), {"loss": float(step)})
        if until == TOTAL:
            self.cb.on_event("done", "saved the student")
        self.cb.flush()  # what was buffered when it died is lost; this flush changes nothing in the checks


def metric_steps(settings: Settings, job_id: str, name: str) -> list[int]:
    with session_scope(settings.database_url) as session:
        query = select(Metric.step).where(Metric.job_id == job_id, Metric.name == name).order_by(Metric.step)
        return list(session.scalars(query))


def event_steps(settings: Settings, job_id: str) -> Counter[tuple[str, int | None]]:
    with session_scope(settings.database_url) as session:
        rows = session.execute(select(JobEvent.kind, JobEvent.step).where(JobEvent.job_id == job_id))
        return Counter((kind, step) for kind, step in rows)


def assert_every_step_once(settings: Settings, job_id: str) -> None:
    assert metric_steps(settings, job_id, "loss") == list(range(1, TOTAL + 1))
    assert metric_steps(settings, job_id, "eval_loss") == [0, 2, 4, 6]
    events = event_steps(settings, job_id)
    assert {step: n for (kind, step), n in events.items() if kind == "eval"} == {0: 1, 2: 1, 4: 1, 6: 1}
    assert {step: n for (kind, step), n in events.items() if kind == "strategy"} == {0: 1, 2: 1, 4: 1, 6: 1}
    assert {step: n for (kind, step), n in events.items() if kind == "checkpoint"} == {3: 1, 6: 1}
    assert events[("done", TOTAL)] == 1


def test_a_single_attempt_logs_steps_on_its_events(settings: Settings, job_id: str) -> None:
    Attempt(settings, job_id, "w1").run()
    assert_every_step_once(settings, job_id)
    events = event_steps(settings, job_id)
    assert events[("load", None)] == 1 and events[("start", None)] == 1  # set-up events: the attempt's


def test_an_attempt_dead_before_the_first_checkpoint_is_replaced_entirely(
    settings: Settings, job_id: str
) -> None:
    Attempt(settings, job_id, "w1").run(until=2)  # baseline evaluation, steps 1-2, evaluation at 2
    assert metric_steps(settings, job_id, "eval_loss") == [0, 2]
    Attempt(settings, job_id, "w2").run()  # starts afresh: the step-0 baseline runs again too
    assert_every_step_once(settings, job_id)
    events = event_steps(settings, job_id)
    assert events[("load", None)] == 2 and events[("start", None)] == 2  # both attempts' history stays


def test_an_attempt_dead_after_a_checkpoint_keeps_what_precedes_it(settings: Settings, job_id: str) -> None:
    Attempt(settings, job_id, "w1").run(until=5)  # checkpoint at 3; steps 4-5 and the eval at 4 are lost
    Attempt(settings, job_id, "w2").run(start=3)
    assert_every_step_once(settings, job_id)
    assert event_steps(settings, job_id)[("resume", 3)] == 1


def test_a_dead_attempt_that_had_finished_leaves_one_end(settings: Settings, job_id: str) -> None:
    Attempt(settings, job_id, "w1").run()  # died after "done", before the supervisor recorded success
    Attempt(settings, job_id, "w2").run(start=6)  # resumes from the last step's checkpoint: done again
    assert_every_step_once(settings, job_id)


def test_an_interrupted_evaluation_run_again_on_resume_is_logged_once(
    settings: Settings, job_id: str
) -> None:
    # Stopped during the evaluation of step 4 (no result logged): a checkpoint of 4 with the eval pending.
    first = Attempt(settings, job_id, "w1")
    first.run(until=3)
    first.cb.on_step(4, {"loss": 4.0, "lr": 1e-3})
    first.cb.on_checkpoint(4, first.checkpoint_dir(4), {})
    # The resumed attempt evaluates step 4, trains step 5 and dies; the next one evaluates 4 again.
    Attempt(settings, job_id, "w2").run(start=4, until=5, eval_pending=True)
    Attempt(settings, job_id, "w3").run(start=4, eval_pending=True)
    assert metric_steps(settings, job_id, "loss") == list(range(1, TOTAL + 1))
    assert metric_steps(settings, job_id, "eval_loss") == [0, 2, 4, 6]
    events = event_steps(settings, job_id)
    assert {step: n for (kind, step), n in events.items() if kind == "eval"} == {0: 1, 2: 1, 4: 1, 6: 1}
    assert {step: n for (kind, step), n in events.items() if kind == "strategy"} == {0: 1, 2: 1, 4: 1, 6: 1}


def test_checkpoint_rows_after_the_resume_point_are_dropped(settings: Settings, job_id: str) -> None:
    Attempt(settings, job_id, "w1").run(until=5)
    with session_scope(settings.database_url) as session:  # as if step 6's checkpoint had been recorded
        session.add(Checkpoint(job_id=job_id, step=6, storage_path="gone", size_bytes=1, metrics={}))
    Attempt(settings, job_id, "w2").run(start=3, until=4)
    with session_scope(settings.database_url) as session:
        steps = session.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job_id))
        assert sorted(steps) == [3]


def test_a_dead_attempt_writes_nothing_over_the_next_one(settings: Settings, job_id: str) -> None:
    dead = Attempt(settings, job_id, "w1")
    dead.run(until=2)
    Attempt(settings, job_id, "w2").run(until=4)
    dead.cb.on_step(3, {"loss": 99.0})  # a late write of the first attempt
    dead.cb.flush()
    assert metric_steps(settings, job_id, "loss") == [1, 2, 3, 4]
    assert dead.cb.should_stop()


def checkpoint_steps(settings: Settings, job_id: str) -> list[int]:
    with session_scope(settings.database_url) as session:
        query = select(Checkpoint.step).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)
        return list(session.scalars(query))


def test_a_checkpoint_set_aside_as_corrupt_is_no_longer_listed(settings: Settings, job_id: str) -> None:
    first = Attempt(settings, job_id, "w1")
    first.run()  # checkpoints of steps 3 and 6; died before the supervisor recorded the end
    assert checkpoint_steps(settings, job_id) == [3, 6]
    # The next attempt finds step 6's checkpoint corrupt: it resumes from 3 and, before training, sets 6
    # aside (renamed); then it dies loading its models, before `on_start` could forget the later steps.
    second = Attempt(settings, job_id, "w2")
    second.cb.on_resume(3, second.checkpoint_dir(3))
    corrupt = second.checkpoint_dir(6).rename(second.job_dir / "checkpoints" / "step-00000006.corrupt")
    second.cb.on_checkpoint_set_aside(6, corrupt, "model.safetensors does not match its SHA-256")
    assert checkpoint_steps(settings, job_id) == [3]  # nothing listed that cannot be downloaded

    with session_scope(settings.database_url) as session:
        warnings = session.execute(
            select(JobEvent.message, JobEvent.data, JobEvent.step).where(
                JobEvent.job_id == job_id, JobEvent.kind == "warning"
            )
        ).all()
    assert [(data["step"], step) for _, data, step in warnings] == [(6, None)]
    assert warnings[0].message.startswith("the checkpoint of step 6 is corrupt (model.safetensors")
    assert "step-00000006.corrupt" in warnings[0].message

    # A third attempt trains steps 4-6 again: everything once, and the warning is still there.
    Attempt(settings, job_id, "w3").run(start=3)
    assert_every_step_once(settings, job_id)
    assert checkpoint_steps(settings, job_id) == [3, 6]
    assert event_steps(settings, job_id)[("warning", None)] == 1
