"""The one vocabulary of job states: procrastinate's and flow control's, plus derived display states.

Stored states (`JobRecord.state`) mirror procrastinate's `status`, which Skiplock extends with two
final states: *discarded* (the task dropped itself: `raise Discard(reason)`) and *expired* (its
`expires_at` passed before it ran; it never runs). *aborting* is a running job whose abort was
requested. Display states add *scheduled* (waiting, run time in the future), *retrying* (waiting
after a failed attempt) and show a waiting job past its expiry as *expired* before the sweep
moves it there. Every view of state (API, admin, pages,
commands) draws from here; `docs/jobs.md` has the diagram.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum


class State(StrEnum):
    TODO = "todo"
    DOING = "doing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ABORTING = "aborting"
    ABORTED = "aborted"
    DISCARDED = "discarded"
    EXPIRED = "expired"


class DisplayState(StrEnum):
    TODO = "todo"
    SCHEDULED = "scheduled"
    RETRYING = "retrying"
    DOING = "doing"
    ABORTING = "aborting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ABORTED = "aborted"
    DISCARDED = "discarded"
    EXPIRED = "expired"


FINAL_STATES = frozenset({
    State.SUCCEEDED, State.FAILED, State.CANCELLED, State.ABORTED, State.DISCARDED, State.EXPIRED,
})
ACTIVE_STATES = frozenset({State.TODO, State.DOING, State.ABORTING})

# label, colour family (used by the admin, the pages and the CLI)
DISPLAY: dict[DisplayState, tuple[str, str]] = {
    DisplayState.TODO: ("Waiting", "grey"),
    DisplayState.SCHEDULED: ("Scheduled", "blue"),
    DisplayState.RETRYING: ("Retrying", "orange"),
    DisplayState.DOING: ("Running", "cyan"),
    DisplayState.ABORTING: ("Aborting", "orange"),
    DisplayState.SUCCEEDED: ("Succeeded", "green"),
    DisplayState.FAILED: ("Failed", "red"),
    DisplayState.CANCELLED: ("Cancelled", "grey"),
    DisplayState.ABORTED: ("Aborted", "purple"),
    DisplayState.DISCARDED: ("Discarded", "grey"),
    DisplayState.EXPIRED: ("Expired", "grey"),
}

# Which stored state each display state refines (filters by display state query this).
STORED_STATE_OF: dict[DisplayState, State] = {
    DisplayState.TODO: State.TODO,
    DisplayState.SCHEDULED: State.TODO,
    DisplayState.RETRYING: State.TODO,
    DisplayState.DOING: State.DOING,
    DisplayState.ABORTING: State.ABORTING,
    DisplayState.SUCCEEDED: State.SUCCEEDED,
    DisplayState.FAILED: State.FAILED,
    DisplayState.CANCELLED: State.CANCELLED,
    DisplayState.ABORTED: State.ABORTED,
    DisplayState.DISCARDED: State.DISCARDED,
    DisplayState.EXPIRED: State.EXPIRED,
}


def display_state(
    state: str, *, scheduled_at: dt.datetime | None, attempts: int, now: dt.datetime | None = None,
    expires_at: dt.datetime | None = None,
) -> DisplayState:
    """The state a person should see: waiting jobs are told apart by why they wait."""
    if state == State.TODO:
        now = now or dt.datetime.now(dt.UTC)
        if expires_at is not None and expires_at <= now:
            return DisplayState.EXPIRED  # never runs; the next maintenance tick stores it
        if scheduled_at is not None and scheduled_at > now:
            return DisplayState.RETRYING if attempts > 0 else DisplayState.SCHEDULED
        return DisplayState.RETRYING if attempts > 0 else DisplayState.TODO
    return DisplayState(state)


def label(state: DisplayState | str) -> str:
    return DISPLAY[DisplayState(state)][0]


def colour(state: DisplayState | str) -> str:
    return DISPLAY[DisplayState(state)][1]
