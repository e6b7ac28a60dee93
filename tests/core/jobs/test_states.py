"""The job state machine on its own: which moves are legal, and the named state sets."""

from __future__ import annotations

import pytest

from core.jobs.states import (
    ACTIVE_STATES,
    ALLOWED_TRANSITIONS,
    RESUMABLE_STATES,
    STOPPING_STATES,
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
    assert {JobStatus.RUNNING, JobStatus.CANCELLING, JobStatus.PAUSING} == ACTIVE_STATES
    assert not ACTIVE_STATES & TERMINAL_STATES
    # Only a worker's claim enters them from the queue, and a worker's end leaves them.
    assert sources_of(JobStatus.RUNNING) == {JobStatus.QUEUED}
    assert sources_of(JobStatus.CANCELLING) == {JobStatus.RUNNING, JobStatus.PAUSING}
    assert sources_of(JobStatus.PAUSING) == {JobStatus.RUNNING}
    # The worker holding a stopping job asks its trainer to stop.
    assert {JobStatus.CANCELLING, JobStatus.PAUSING} == STOPPING_STATES < ACTIVE_STATES


def test_a_paused_job_is_neither_active_nor_ended() -> None:
    paused = JobStatus.PAUSED
    assert paused not in ACTIVE_STATES and not paused.is_terminal
    # Paused straight from the queue, or by the worker once its trainer stopped (or by the reaper once that
    # worker was lost); never by a generic move out of a running job.
    assert sources_of(paused) == {JobStatus.QUEUED, JobStatus.PAUSING}
    # Out of it only by the user: a cancel, or a resume (its own path, see below).
    assert ALLOWED_TRANSITIONS[paused] == {JobStatus.CANCELLED}
    # A job may end in the moment between a pause request and the stop.
    assert {JobStatus.SUCCEEDED, JobStatus.FAILED} < ALLOWED_TRANSITIONS[JobStatus.PAUSING]


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
        (JobStatus.QUEUED, JobStatus.PAUSING),  # nothing to stop: a queued job is paused at once
        (JobStatus.RUNNING, JobStatus.PAUSED),  # a running job is paused only once its trainer stopped
        (JobStatus.PAUSING, JobStatus.QUEUED),  # a pause never turns into a re-queue
        (JobStatus.PAUSING, JobStatus.RUNNING),
        (JobStatus.PAUSED, JobStatus.RUNNING),  # a worker's claim takes only queued jobs
        (JobStatus.PAUSED, JobStatus.QUEUED),  # only the user's resume (check_resume)
        (JobStatus.PAUSED, JobStatus.PAUSING),
        (JobStatus.CANCELLING, JobStatus.PAUSING),  # a cancel wins over a later pause
        (JobStatus.SUCCEEDED, JobStatus.PAUSED),
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
        (JobStatus.QUEUED, JobStatus.PAUSED),
        (JobStatus.RUNNING, JobStatus.PAUSING),
        (JobStatus.PAUSING, JobStatus.PAUSED),
        (JobStatus.PAUSING, JobStatus.CANCELLING),  # cancelled while pausing
        (JobStatus.PAUSING, JobStatus.SUCCEEDED),  # finished in the moment before the stop
        (JobStatus.PAUSED, JobStatus.CANCELLED),
    ],
)
def test_legal_moves_pass(current: JobStatus, target: JobStatus) -> None:
    check_transition(current, target)
    assert current in sources_of(target)


def test_only_a_paused_failed_or_cancelled_job_is_resumed_and_only_by_its_own_path() -> None:
    assert {JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PAUSED} == RESUMABLE_STATES
    for state in RESUMABLE_STATES:
        check_resume(state)
        with pytest.raises(IllegalTransition):  # no generic transition reopens an ended job
            check_transition(state, JobStatus.QUEUED)
    for state in set(JobStatus) - RESUMABLE_STATES:
        with pytest.raises(IllegalTransition):
            check_resume(state)
    assert sources_of(JobStatus.QUEUED) == {JobStatus.RUNNING}
