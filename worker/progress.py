"""Trainer callbacks that report a job's progress to the database: metrics, events, checkpoints, and
whether the job is still this worker's to run.

Exactly once per step across attempts: every metric, and every event logged while training (evaluations,
checkpoints, stops, the end), carries its step. A new attempt owns every step after the one it resumes
from; when it starts, it deletes what earlier attempts logged for those steps, so nothing of a dead attempt
past the resume point survives and nothing is counted twice. Steps up to the resume point were written
before their checkpoint existed (see `on_step`), so they are complete and are not logged again.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, insert, or_, select, update

from core.db import get_sessionmaker, utcnow
from core.distill import layout
from core.distill.callbacks import TrainerCallbacks
from core.jobs.lifecycle import add_event
from core.jobs.models import Checkpoint, Job, JobEvent, Metric
from core.jobs.states import ACTIVE_STATES, STOPPING_STATES
from core.storage import Storage
from worker.job_files import JobFiles


class DatabaseCallbacks(TrainerCallbacks):
    """Trainer callbacks that write metrics, events and checkpoints to the database.

    Step metrics are buffered and written at most every `flush_interval_s` (one transaction each), so a
    fast trainer does not turn into a database load. Every write is conditional on the job still being
    this worker's; when it is not (re-queued by the reaper, say), writes stop and `should_stop` says so.
    """

    def __init__(
        self,
        *,
        database_url: str,
        storage: Storage,
        job_id: str,
        worker_id: str,
        checkpoint_every: int = 0,
        flush_interval_s: float = 0.5,
        stop_check_interval_s: float = 0.25,
    ) -> None:
        self._sessions = get_sessionmaker(database_url)
        self._storage = storage
        self._job_id = job_id
        self._worker_id = worker_id
        self._files = JobFiles(storage.job_dir(job_id))
        self._checkpoint_every = checkpoint_every
        self._flush_interval_s = flush_interval_s
        self._stop_check_interval_s = stop_check_interval_s
        self._pending: list[dict[str, Any]] = []
        self._latest: dict[str, float] = {}
        self._step: int | None = None
        self._last_flush = time.monotonic()
        self._last_stop_check = 0.0
        self._stop_requested = False
        self._owned = True
        self.started = False
        self._start_step = 0
        self._start_event_id = 0
        # (step, metric names) of an evaluation that replaces earlier ones of its step (see on_eval).
        self._replace_eval: tuple[int, list[str]] | None = None

    # ----------------------------------------------------------------------------- trainer interface
    def on_start(self, *, total_steps: int, start_step: int) -> None:
        self.started = True
        self._step = self._start_step = start_step
        with self._sessions.begin() as session:
            if not self._claim_write(session, total_steps=total_steps, current_step=start_step):
                return
            self._forget_steps_from(session, start_step)
            if start_step > 0:
                message = f"resumed from step {start_step} of {total_steps}"
            else:
                message = f"training started: {total_steps} steps"
            start = add_event(
                session,
                job_id=self._job_id,
                kind="start",
                message=message,
                data={"start_step": start_step, "total_steps": total_steps},
            )
            self._start_event_id = start.id

    def _forget_steps_from(self, session: Any, start_step: int) -> None:
        """Delete what earlier attempts logged for the steps this attempt is about to run again.

        Resuming after step s re-runs steps s+1...; starting afresh re-runs everything, including the
        step-0 baseline evaluation. Logged again *at* s are the end (`done`), when the resumed checkpoint
        is the last step, and an evaluation of step s that a stop interrupted (see `on_eval`). Checkpoint
        rows after s point at checkpoints the trainer did not resume from (unverifiable ones); it writes its
        own as it gets there.
        """
        job = self._job_id
        first = start_step + 1 if start_step > 0 else 0
        again = or_(JobEvent.step >= first, and_(JobEvent.kind == "done", JobEvent.step == start_step))
        session.execute(delete(Metric).where(Metric.job_id == job, Metric.step >= first))
        session.execute(delete(JobEvent).where(JobEvent.job_id == job, JobEvent.step.is_not(None), again))
        session.execute(delete(Checkpoint).where(Checkpoint.job_id == job, Checkpoint.step > start_step))

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._record(step, metrics)
        # Before a checkpoint of this step exists on disk its metrics must be stored: a resumed attempt
        # starts after the checkpoint and will not log these steps again.
        checkpoint_next = self._checkpoint_every > 0 and step % self._checkpoint_every == 0
        if checkpoint_next or time.monotonic() - self._last_flush >= self._flush_interval_s:
            self.flush()

    def on_eval(self, step: int, metrics: dict[str, float], samples: list[dict[str, Any]]) -> None:
        if step == self._start_step > 0:
            # A resumed run evaluates its start step only when a stop interrupted that evaluation before
            # the checkpoint; an attempt that died after it may have logged it all the same: replace it.
            self._replace_eval = (step, list(metrics))
        self._record(step, metrics)
        finite = {k: v for k, v in metrics.items() if _finite(v)}
        self.flush(
            event=(
                "eval",
                f"evaluation at step {step}",
                {"step": step, "metrics": finite, "samples": samples},
            ),
            step=step,
        )

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        self.flush()
        if self._owned:
            # Object storage: the checkpoint goes to the bucket before its row exists, so that whatever the
            # API lists it can serve, and another worker can resume from it.
            self._storage.push(self._storage.relative(path))
        self._record_checkpoint(step, path, metrics, replace=True)

    def on_resume(self, step: int, path: Path) -> None:
        """Resuming from `path`: make sure it is listed (a lost attempt may have died before recording it)."""
        self.flush(event=("resume", f"resuming from the checkpoint of step {step}", None), step=step)
        self._record_checkpoint(step, path, {}, replace=False)

    def _record_checkpoint(self, step: int, path: Path, metrics: dict[str, float], *, replace: bool) -> None:
        if not self._owned:
            return
        relative = self._storage.relative(path)
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        finite = {k: v for k, v in metrics.items() if _finite(v)}
        with self._sessions.begin() as session:
            if not self._claim_write(session):
                return
            existing = select(Checkpoint.id).where(Checkpoint.job_id == self._job_id, Checkpoint.step == step)
            if not replace and session.scalar(existing) is not None:
                return
            # A lost attempt may have recorded this step already; keep_checkpoints may have deleted others.
            session.execute(
                delete(Checkpoint).where(Checkpoint.job_id == self._job_id, Checkpoint.step == step)
            )
            session.add(
                Checkpoint(
                    job_id=self._job_id, step=step, storage_path=relative, size_bytes=size, metrics=finite
                )
            )
            for old in session.scalars(select(Checkpoint).where(Checkpoint.job_id == self._job_id)):
                if old.step != step and not self._storage.resolve(old.storage_path).is_dir():
                    session.delete(old)
                    self._storage.delete(old.storage_path)  # pruned here: from object storage too
            if replace:
                add_event(
                    session,
                    job_id=self._job_id,
                    kind="checkpoint",
                    message=f"checkpoint saved at step {step}",
                    data={"step": step, "size_bytes": size},
                    step=step,
                )

    def on_checkpoint_set_aside(self, step: int, path: Path, problem: str) -> None:
        """A checkpoint failed verification and was renamed: its row goes (GET .../checkpoints must not
        list what cannot be downloaded), with a warning naming its step, in one transaction.

        The warning belongs to no training step: a checkpoint is set aside once (it is renamed), so the
        warning must outlive a later attempt's forgetting of the steps it runs again.
        """
        self.flush()
        if not self._owned:
            return
        with self._sessions.begin() as session:
            if not self._claim_write(session):
                return
            session.execute(
                delete(Checkpoint).where(Checkpoint.job_id == self._job_id, Checkpoint.step == step)
            )
            # Object storage: its copy of the checkpoint goes too (the corrupt local one stays aside).
            self._storage.delete(self._storage.relative(path.with_name(layout.checkpoint_name(step))))
            add_event(
                session,
                job_id=self._job_id,
                kind="warning",
                message=(
                    f"the checkpoint of step {step} is corrupt ({problem}); set aside as {path.name} "
                    "and not used"
                ),
                data={"step": step, "problem": problem},
            )

    def on_event(self, kind: str, message: str) -> None:
        # Paths inside the artifacts volume mean nothing to the API's users; keep them relative. Events
        # while training (a strategy change, a stop, the end) belong to the current step; set-up events
        # (loading, data counts) to the attempt.
        message = message.replace(f"{self._storage.root}{os.sep}", "")
        self.flush(event=(kind, message, None), step=self._step if self.started else None)

    def should_stop(self) -> bool:
        now = time.monotonic()
        if not self._stop_requested and now - self._last_stop_check >= self._stop_check_interval_s:
            self._last_stop_check = now
            self._stop_requested = self._files.stop_requested()
        if self._stop_requested and self._pending:
            self.flush()  # the trainer checkpoints this step next
        return self._stop_requested or not self._owned

    # ------------------------------------------------------------------------------------------ writes
    def flush(
        self, event: tuple[str, str, dict[str, Any] | None] | None = None, *, step: int | None = None
    ) -> None:
        """Write buffered metrics, the job's progress and `event` (of training step `step`) in one
        transaction."""
        self._last_flush = time.monotonic()
        rows, self._pending = self._pending, []
        if not self._owned:
            return
        with self._sessions.begin() as session:
            progress: dict[str, Any] = {}
            if self._step is not None:
                progress = {"current_step": self._step, "latest_metrics": dict(self._latest)}
            if not self._claim_write(session, **progress):
                return
            if self._replace_eval is not None:
                self._forget_evaluation(session, *self._replace_eval)
                self._replace_eval = None
            if rows:
                session.execute(insert(Metric), rows)
            if event is not None:
                kind, message, data = event
                add_event(session, job_id=self._job_id, kind=kind, message=message, data=data, step=step)

    def _forget_evaluation(self, session: Any, step: int, names: list[str]) -> None:
        """Delete earlier attempts' evaluation of `step`: its metrics, its event and strategy changes."""
        job = self._job_id
        session.execute(
            delete(Metric).where(Metric.job_id == job, Metric.step == step, Metric.name.in_(names))
        )
        earlier = or_(
            JobEvent.kind == "eval", and_(JobEvent.kind == "strategy", JobEvent.id < self._start_event_id)
        )
        session.execute(delete(JobEvent).where(JobEvent.job_id == job, JobEvent.step == step, earlier))

    def _record(self, step: int, metrics: dict[str, float]) -> None:
        self._step = step
        now = utcnow()
        for name, value in metrics.items():
            if _finite(value):
                self._pending.append(
                    {
                        "job_id": self._job_id,
                        "step": step,
                        "name": name,
                        "value": float(value),
                        "created_at": now,
                    }
                )
                self._latest[name] = float(value)

    def _claim_write(self, session: Any, **values: Any) -> bool:
        """Touch the job row if it is still ours (and read whether a stop was asked), inside `session`."""
        result = session.execute(
            update(Job)
            .where(Job.id == self._job_id, Job.worker_id == self._worker_id, Job.status.in_(ACTIVE_STATES))
            .values(updated_at=utcnow(), **values)
            .returning(Job.status)
            .execution_options(synchronize_session=False)
        ).scalar_one_or_none()
        if result is None:
            self._owned = False
            return False
        if result in STOPPING_STATES:  # a cancel or a pause: checkpoint and stop at the next step
            self._stop_requested = True
        return True


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
