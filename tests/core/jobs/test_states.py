"""The job state machine on its own: which moves are legal, and the named state sets."""

from __future__ import annotations

import pytest

from core.jobs.states import (
    ACTIVE_STATES,
    ALLOWED_TRANSITIONS,
    RESUMABLE_STATES,
    TERMINAL_STATES,
    IllegalTransition,
    JobStatus,
    check_resume,
    check_transition,
    sources_of,
)


def test_every_state_has_a_row_and_ended_jobs_never_move() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(JobStatus)
    for state in TERMINAL_STATES:
        assert ALLOWED_TRANSITIONS[state] == frozenset()
        assert state.is_terminal
    assert not any(state.is_terminal for state in set(JobStatus) - TERMINAL_STATES)


def test_active_states_are_the_ones_a_worker_holds() -> None:
    assert {JobStatus.RUNNING, JobStatus.CANCELLING} == ACTIVE_STATES
    assert not ACTIVE_STATES & TERMINAL_STATES
    # Only a worker's claim enters them from the queue, and a worker's end leaves them.
    assert sources_of(JobStatus.RUNNING) == {JobStatus.QUEUED}
    assert sources_of(JobStatus.CANCELLING) == {JobStatus.RUNNING}


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (JobStatus.QUEUED, JobStatus.SUCCEEDED),
        (JobStatus.QUEUED, JobStatus.CANCELLING),
        (JobStatus.CANCELLING, JobStatus.RUNNING),
        (JobStatus.CANCELLING, JobStatus.QUEUED),
        (JobStatus.SUCCEEDED, JobStatus.QUEUED),
        (JobStatus.FAILED, JobStatus.RUNNING),
        (JobStatus.CANCELLED, JobStatus.QUEUED),
    ],
)
def test_illegal_moves_are_refused(current: JobStatus, target: JobStatus) -> None:
    with pytest.raises(IllegalTransition) as info:
        check_transition(current, target)
    assert (info.value.current, info.value.target) == (current, target)
    assert current.value in str(info.value) and target.value in str(info.value)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (JobStatus.QUEUED, JobStatus.RUNNING),
        (JobStatus.QUEUED, JobStatus.CANCELLED),
        (JobStatus.RUNNING, JobStatus.QUEUED),  # the reaper re-queues a lost worker's job
        (JobStatus.RUNNING, JobStatus.CANCELLING),
        (JobStatus.CANCELLING, JobStatus.SUCCEEDED),  # finished in the moment before the stop
        (JobStatus.CANCELLING, JobStatus.CANCELLED),
    ],
)
def test_legal_moves_pass(current: JobStatus, target: JobStatus) -> None:
    check_transition(current, target)
    assert current in sources_of(target)


def test_only_a_failed_or_cancelled_job_is_resumed_and_only_by_its_own_path() -> None:
    assert {JobStatus.FAILED, JobStatus.CANCELLED} == RESUMABLE_STATES
    for state in RESUMABLE_STATES:
        check_resume(state)
        with pytest.raises(IllegalTransition):  # no generic transition reopens an ended job
            check_transition(state, JobStatus.QUEUED)
    for state in set(JobStatus) - RESUMABLE_STATES:
        with pytest.raises(IllegalTransition):
            check_resume(state)
    assert sources_of(JobStatus.QUEUED) == {JobStatus.RUNNING}
