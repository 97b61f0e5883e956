"""Soft and hard time limits of a job (per task: `@task(soft_time_limit=…, hard_time_limit=…)`).

- **Soft limit**: the task is told. An async task is cancelled and its attempt ends with
  `SoftTimeLimitExceeded`; a sync task gets `SoftTimeLimitExceeded` raised in its thread (at the
  next Python bytecode; `report_progress` raises it too) and may catch it to clean up. The attempt
  is recorded with outcome `timed_out`; the job is retried by its policy.
- **Hard limit**: the job ends even if it ignores the soft limit. The worker first stops only that
  job: an async task is cancelled, a sync task gets `HardTimeLimitExceeded` raised in its thread.
  A job that still does not stop (a loop inside C code never runs Python bytecode) is the only
  case that costs more: under `manage.py worker` (always supervised) the worker process reports
  each job's start and end on a pipe, and `HARD_LIMIT_GRACE` seconds past the hard limit the
  supervisor kills that process, records the job `timed_out` (retried by its policy), puts the
  neighbours that ran in the same process back in the queue without charging them an attempt
  (outcome `requeued`), and starts a fresh process. Without a supervisor (in-web worker, tests)
  such a job keeps its thread until it returns.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

# Seconds past the hard limit before the supervisor kills the process: the in-thread
# interruption gets this long to work first (reports travel through a pipe).
HARD_LIMIT_GRACE = 1.0

# The supervisor of this process, when there is one: receives one JSON line per event.
_reporter: Callable[[dict[str, Any]], None] | None = None
_report_fd: int | None = None


def set_reporter(reporter: Callable[[dict[str, Any]], None] | None, fd: int | None = None) -> None:
    global _reporter, _report_fd
    _reporter = reporter
    _report_fd = fd


def report_jobs(lines: list[str]) -> None:
    """Job starts and ends for the supervisor, many per write: `s <job id> <hard limit>` / `e <job id>`.

    The worker batches them (one write per claim, one per loop iteration of endings), so
    supervision costs a few microseconds per job, not a pipe write and a JSON document each.
    """
    if _report_fd is None or not lines:
        return
    data = "".join(lines).encode()
    try:
        while data:
            written = os.write(_report_fd, data)
            data = data[written:]
    except OSError:
        logger.warning("could not report %d job start(s)/end(s) to the supervisor", len(lines))


def pipe_reporter(fd: int) -> Callable[[dict[str, Any]], None]:
    """Report events as JSON lines on a pipe to the supervisor (writes under PIPE_BUF are atomic)."""

    def report(event: dict[str, Any]) -> None:
        try:
            os.write(fd, (json.dumps(event) + "\n").encode())
        except OSError:
            logger.warning("could not report %s to the supervisor", event.get("event"))

    return report


def supervised() -> bool:
    return _reporter is not None


def report(event: dict[str, Any]) -> None:
    if _reporter is not None:
        _reporter(event)


def raise_in_thread(ident: int, exc_type: type[BaseException] | None) -> bool:
    """Raise `exc_type` in thread `ident` at its next bytecode (None: drop a pending one)."""
    result = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(ident), ctypes.py_object(exc_type) if exc_type is not None else ctypes.c_void_p(0)
    )
    return bool(result == 1)
