"""Skiplock's domain errors. Each maps to one HTTP status in the API's exception handler."""

from __future__ import annotations

from typing import Any


class SkiplockError(Exception):
    """Something went wrong in Skiplock."""

    code = "error"
    status = 400

    def __init__(self, message: str | None = None, *, details: Any = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())
        self.message = message or (self.__doc__ or "").strip()
        self.details = details


class TaskNotFound(SkiplockError):
    """No task has this name."""

    code = "task_not_found"
    status = 404


class InvalidArguments(SkiplockError):
    """The task's arguments are invalid."""

    code = "invalid_arguments"
    status = 422


class JobNotFound(SkiplockError):
    """No job has this id."""

    code = "job_not_found"
    status = 404


class InvalidTransition(SkiplockError):
    """The job is not in a state that allows this action."""

    code = "invalid_transition"
    status = 409

    def __init__(self, *, job_id: int, action: str, state: str) -> None:
        super().__init__(
            f"cannot {action} job {job_id}: it is {state}",
            details={"job_id": job_id, "action": action, "state": state},
        )
        self.state = state


class IdempotencyConflict(SkiplockError):
    """This idempotency key was already used with other arguments."""

    code = "idempotency_conflict"
    status = 409


class AlreadyQueued(SkiplockError):
    """A job with this queueing lock is already waiting."""

    code = "already_queued"
    status = 409


class ResultNotSerializable(SkiplockError):
    """The task returned a value that cannot be stored as JSON."""

    code = "result_not_serializable"
    status = 500


class TimeLimitExceeded(BaseException):
    """The job ran past a time limit."""


class SoftTimeLimitExceeded(TimeLimitExceeded, Exception):
    """The job ran past its soft time limit; it may catch this to clean up."""


class HardTimeLimitExceeded(TimeLimitExceeded):
    """The job ran past its hard time limit and was stopped.

    Not an `Exception`: a task that wraps its work in `except Exception` (log, return a failure
    dict) cannot swallow it and go on to succeed.
    """


class JobAborted(BaseException):
    """The job was asked to abort (revoked) while it ran, and was stopped.

    Raised in a sync task's thread by the worker. Not an `Exception`, for the reason
    HardTimeLimitExceeded is not; `report_progress` raises procrastinate's JobAborted, which
    a task may catch to clean up.
    """


class JobExpired(Exception):
    """The job's expiry time passed before it ran; it was not run."""


class Snooze(Exception):
    """Raised by a task: "not now, run me again in `seconds`". No attempt is used up.

    The job goes back to waiting with its run time `seconds` from now; its attempt history shows
    a `snoozed` row. `JobContext.snooze(seconds)` raises it.
    """

    MAX_SECONDS = 366 * 24 * 3600

    def __init__(self, seconds: float) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds <= self.MAX_SECONDS:
            raise ValueError(f"Snooze takes 0 to {self.MAX_SECONDS} seconds, not {seconds!r}")
        super().__init__(f"snoozed for {seconds:g} s")
        self.seconds = float(seconds)


class Discard(Exception):
    """Raised by a task: this job has become pointless. It ends `discarded` with the reason, not
    failed, and is never retried."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = str(reason)
