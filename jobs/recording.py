"""How one attempt ends: its result or error, the retry decision, and the one log line it earns.

The worker (jobs/worker.py) runs a job, then turns what happened into an `Ending`: succeeded
with a JSON result, retried at a time its policy chose, failed, aborted, or requeued without
using up a retry. Endings wait in the worker's buffer and are written in batches by the finish
statement (jobs/transitions.py), together with the queue row, the side row and the attempt row.

Any exception a task raises — `SystemExit` and `KeyboardInterrupt` included — is that job's
failure, retried by its policy; it never reaches the worker. A retried failure logs one WARNING
line; the final failure logs an ERROR with the traceback.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import traceback
from dataclasses import dataclass
from typing import Any

from procrastinate import exceptions as procrastinate_exceptions
from procrastinate import jobs as procrastinate_jobs

from jobs.exceptions import (
    Discard,
    JobAborted,
    JobExpired,
    ResultNotSerializable,
    Snooze,
    TimeLimitExceeded,
)
from jobs.reconnect import is_connection_error
from jobs.registry import RetryPolicy

logger = logging.getLogger("jobs.worker")

MAX_RESULT_BYTES = 1_000_000
MAX_MESSAGE_CHARS = 4000
MAX_TRACEBACK_CHARS = 20000


@dataclass(frozen=True)
class Claimed:
    """A job as the claim statement returned it; (id, attempts) plus the worker id is the attempt."""

    id: int
    task_name: str
    queue: str
    priority: int
    lock: str | None
    queueing_lock: str | None
    args: dict[str, Any]
    attempts: int  # finished attempts before this one (procrastinate's count)
    abort_requested: bool = False

    def as_procrastinate_job(self) -> procrastinate_jobs.Job:
        return procrastinate_jobs.Job(
            id=self.id, queue=self.queue, lock=self.lock, queueing_lock=self.queueing_lock,
            task_name=self.task_name, priority=self.priority, task_kwargs=self.args, attempts=self.attempts,
        )


@dataclass
class Ending:
    """How one attempt ended, waiting in the worker's buffer for the next finish batch."""

    job: Claimed
    # succeeded | failed | aborted | todo (retry) | requeue (back to todo, no retry used) |
    # snooze (back to todo at retry_at, no attempt used) | discarded | expired
    status: str
    outcome: str  # the attempt row's outcome
    started_at: dt.datetime
    result: str | None = None  # JSON text
    retry_at: dt.datetime | None = None
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    progress: int | None = None  # the last progress still pending (None: nothing pending)
    step: str | None = None


def encode_result(result: Any) -> str:
    try:
        payload = json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ResultNotSerializable(
            f"the task returned a {type(result).__name__} that cannot be stored as JSON ({exc}); "
            "return dicts, lists, strings, numbers, booleans or None"
        ) from exc
    if len(payload) > MAX_RESULT_BYTES:
        raise ResultNotSerializable(
            f"the task's result is {len(payload)} bytes of JSON, over the {MAX_RESULT_BYTES} byte limit; "
            "store large outputs elsewhere and return a reference"
        )
    return payload


def succeeded(job: Claimed, started_at: dt.datetime, payload: str) -> Ending:
    return Ending(job=job, status="succeeded", outcome="succeeded", started_at=started_at, result=payload)


def requeued(job: Claimed, started_at: dt.datetime, *, error_type: str, message: str) -> Ending:
    """Back to `todo` without using up a retry (shutdown, a claim nobody ran)."""
    return Ending(job=job, status="requeue", outcome="requeued", started_at=started_at,
                  error_type=error_type, error_message=message, traceback="")


def _error_fields(exc: BaseException) -> tuple[str, str, str]:
    error_type = "JobAborted" if isinstance(exc, asyncio.CancelledError) else type(exc).__name__
    message = str(exc) or (type(exc).__doc__ or "").strip().split("\n")[0]
    if isinstance(exc, SystemExit):
        message = f"the task called exit({exc.code!r}); it ended this job, not the worker"
    tb = "".join(traceback.format_exception(exc))[-MAX_TRACEBACK_CHARS:]
    return error_type[:255], message[:MAX_MESSAGE_CHARS], tb


def failed(
    job: Claimed, started_at: dt.datetime, exc: BaseException, *, policy: RetryPolicy | None,
    procrastinate_task: Any, abort_requested: bool,
) -> Ending:
    """The ending of an attempt that raised `exc`: snoozed, discarded, expired, aborted, retried by
    the policy, or failed."""
    if isinstance(exc, Snooze):
        return Ending(job=job, status="snooze", outcome="snoozed", started_at=started_at,
                      retry_at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=exc.seconds))
    if isinstance(exc, Discard | JobExpired):
        kind = "discarded" if isinstance(exc, Discard) else "expired"
        ending = Ending(job=job, status=kind, outcome=kind, started_at=started_at,
                        error_type=type(exc).__name__, error_message=str(exc)[:MAX_MESSAGE_CHARS], traceback="")
        logger.info("job %s (%s) attempt %s %s: %s", job.id, job.task_name, job.attempts + 1, kind,
                    _one_line(ending.error_message))
        return ending
    error_type, message, tb = _error_fields(exc)
    timed_out = isinstance(exc, TimeLimitExceeded)
    ending = Ending(job=job, status="failed", outcome="timed_out" if timed_out else "failed",
                    started_at=started_at, error_type=error_type, error_message=message, traceback=tb)
    if isinstance(exc, procrastinate_exceptions.JobAborted | JobAborted | asyncio.CancelledError):
        ending.status = ending.outcome = "aborted"
    elif not abort_requested:  # an abort-requested job is never retried (procrastinate's rule)
        retry_at = _retry_at(job, exc, policy=policy, procrastinate_task=procrastinate_task)
        if retry_at is not None:
            ending.status, ending.retry_at = "todo", retry_at
            ending.outcome = "timed_out" if timed_out else "retried"
    _log(ending, exc)
    return ending


def _retry_at(job: Claimed, exc: BaseException, *, policy: RetryPolicy | None, procrastinate_task: Any) -> dt.datetime | None:
    attempts_done = job.attempts + 1
    if policy is not None:
        if attempts_done >= policy.max_attempts or isinstance(exc, policy.dont_retry_on):
            return None
        # SystemExit, KeyboardInterrupt…: a failure of this job like any other Exception.
        judged = exc if isinstance(exc, Exception) else RuntimeError(str(exc))
        if not policy.should_retry(judged, attempts_done):
            return None
        return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=policy.retry_delay(judged, attempts_done))
    strategy = getattr(procrastinate_task, "retry_strategy", None)
    if strategy is None:
        return None
    judged = exc if isinstance(exc, Exception) else RuntimeError(str(exc))
    decision = strategy.get_retry_decision(exception=judged, job=job.as_procrastinate_job())
    if decision is None:
        return None
    return decision.retry_at or dt.datetime.now(dt.UTC)


def _log(ending: Ending, exc: BaseException) -> None:
    job = ending.job
    what = f"job {job.id} ({job.task_name}) attempt {job.attempts + 1}"
    if ending.status == "todo":
        assert ending.retry_at is not None
        wait = max(0.0, (ending.retry_at - dt.datetime.now(dt.UTC)).total_seconds())
        logger.warning("%s failed with %s: %s; retrying in %.1f s", what, ending.error_type,
                       _one_line(ending.error_message), wait)
    elif ending.status == "aborted":
        logger.info("%s aborted", what)
    elif is_connection_error(exc):  # an outage is told by the worker once, not as a traceback per job
        logger.error("%s failed with %s: %s (final; the database was unreachable)", what, ending.error_type,
                     _one_line(ending.error_message))
    else:
        logger.error("%s failed with %s: %s (final)", what, ending.error_type, _one_line(ending.error_message),
                     exc_info=exc)


def _one_line(text: str | None) -> str:
    line = (text or "").strip().splitlines()
    return (line[0] if line else "")[:300]


def install(procrastinate_app: Any) -> None:
    """PROCRASTINATE_ON_APP_READY hook, kept for settings that name it: nothing to install.

    Jobs run by `manage.py worker` (jobs/worker.py) record their outcome in the finish statement;
    procrastinate's own worker (`manage.py procrastinate worker`) runs them without Skiplock's records.
    """
    return None
