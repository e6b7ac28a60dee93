"""The job state machine: `queued → running → succeeded | failed | cancelled`, with `cancelling` between
a cancel request and the trainer actually stopping, and `pausing → paused` for a pause. A re-queue (worker
lost, trainer crashed) goes `running → queued`.

A pause is a stop that keeps the job: a running job is `pausing` while its worker still holds it (the
trainer checkpoints its current step and exits), then `paused`, held by no worker; a queued job is paused
at once (nothing to checkpoint; its message, when a worker gets it, is a no-op, since a worker claims only a
`queued` job). A paused job is neither active nor ended: it keeps its files and checkpoints, an event stream
stays open, and the user's resume queues it again (or a cancel ends it). A job may still finish or fail in
the moment between the pause request and the stop, and a cancel while pausing turns into `cancelling`.
A worker lost while pausing leaves the job `paused` too (see worker.reaper): a resume continues from its
last checkpoint, or from the start when it has none, and nothing runs until the user asks.

Ended jobs never move on their own, with one exception kept out of `ALLOWED_TRANSITIONS` so that no
generic transition can take it: the user resumes a failed or cancelled job that has a checkpoint, or a
paused job (`failed | cancelled | paused → queued`, see `check_resume`). "Terminal" therefore means "ended
until a user resumes it": whatever waits for a job's end (an event stream, a file-in-use check) must look at
the job's current status, not at the first final status it saw."""

from __future__ import annotations

import enum


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    PAUSING = "pausing"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
# A worker holds the job: its trainer runs (or is being stopped), it sends heartbeats and writes progress.
ACTIVE_STATES = frozenset({JobStatus.RUNNING, JobStatus.CANCELLING, JobStatus.PAUSING})
# A stop was requested and the worker holding the job is asked to stop its trainer (the STOP file).
STOPPING_STATES = frozenset({JobStatus.CANCELLING, JobStatus.PAUSING})
# States the user's resume (POST /v1/jobs/{id}/resume) takes back to `queued`: an ended job that has a
# checkpoint, or a paused one (with or without a checkpoint: one paused before it started has none).
RESUMABLE_STATES = frozenset({JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PAUSED})

ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.PAUSED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLING, JobStatus.PAUSING, JobStatus.QUEUED}
    ),
    # A job may finish on its own in the moment between the cancel request and the stop.
    JobStatus.CANCELLING: frozenset({JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.SUCCEEDED}),
    # Likewise between a pause request and the stop; a cancel meanwhile wins (the stop is already asked).
    JobStatus.PAUSING: frozenset(
        {JobStatus.PAUSED, JobStatus.CANCELLING, JobStatus.FAILED, JobStatus.SUCCEEDED}
    ),
    # Out of `paused` only by the user: a cancel, or a resume (`check_resume`).
    JobStatus.PAUSED: frozenset({JobStatus.CANCELLED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


class IllegalTransition(Exception):
    def __init__(self, current: JobStatus, target: JobStatus) -> None:
        super().__init__(f"a job cannot go from '{current.value}' to '{target.value}'")
        self.current = current
        self.target = target


def check_transition(current: JobStatus, target: JobStatus) -> None:
    if target not in ALLOWED_TRANSITIONS[current]:
        raise IllegalTransition(current, target)


def check_resume(current: JobStatus) -> None:
    """The user's resume (`failed | cancelled | paused → queued`), the only way back to the queue from an
    ended or paused job."""
    if current not in RESUMABLE_STATES:
        raise IllegalTransition(current, JobStatus.QUEUED)


def sources_of(target: JobStatus) -> frozenset[JobStatus]:
    """States from which `target` may be entered (for atomic `UPDATE ... WHERE status IN (...)`)."""
    return frozenset(state for state, targets in ALLOWED_TRANSITIONS.items() if target in targets)
