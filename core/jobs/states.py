"""The job state machine: `queued → running → succeeded | failed | cancelled`, with `cancelling` between
a cancel request and the trainer actually stopping. A re-queue (worker lost, trainer crashed) goes
`running → queued`.

Ended jobs never move on their own, with one exception kept out of `ALLOWED_TRANSITIONS` so that no
generic transition can take it: the user resumes a failed or cancelled job that has a checkpoint
(`failed | cancelled → queued`, see `check_resume`). "Terminal" therefore means "ended until a user
resumes it": whatever waits for a job's end (an event stream, a file-in-use check) must look at the job's
current status, not at the first final status it saw."""

from __future__ import annotations

import enum


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
# A worker holds the job: its trainer runs (or is being stopped), it sends heartbeats and writes progress.
ACTIVE_STATES = frozenset({JobStatus.RUNNING, JobStatus.CANCELLING})
# Ended states a user may resume from (when the job has a checkpoint): POST /v1/jobs/{id}/resume.
RESUMABLE_STATES = frozenset({JobStatus.FAILED, JobStatus.CANCELLED})

ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLING, JobStatus.QUEUED}
    ),
    # A job may finish on its own in the moment between the cancel request and the stop.
    JobStatus.CANCELLING: frozenset({JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.SUCCEEDED}),
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
    """The user's resume (`failed | cancelled → queued`), the only way out of an ended state."""
    if current not in RESUMABLE_STATES:
        raise IllegalTransition(current, JobStatus.QUEUED)


def sources_of(target: JobStatus) -> frozenset[JobStatus]:
    """States from which `target` may be entered (for atomic `UPDATE ... WHERE status IN (...)`)."""
    return frozenset(state for state, targets in ALLOWED_TRANSITIONS.items() if target in targets)
