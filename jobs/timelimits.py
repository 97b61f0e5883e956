"""Soft and hard time limits of a job (per task: `@task(soft_time_limit=…, hard_time_limit=…)`).

- **Soft limit**: the task is told. An async task is cancelled and sees `SoftTimeLimitExceeded`
  raised from its `await`; a sync task gets `SoftTimeLimitExceeded` raised in its thread (at
  the next Python bytecode; `report_progress` raises it too) and may catch it to clean up.
  The attempt is recorded with outcome `timed_out`; the job is retried by its policy.
- **Hard limit**: the job ends even if it never yields. Under `manage.py worker` (always
  supervised) the worker process tells its supervisor when each job starts; past the hard
  limit the supervisor kills that process, records the job failed with "hard time limit
  exceeded" (`HardTimeLimitExceeded`, outcome `timed_out`), retries it by its policy, requeues
  the other jobs of the killed process, and starts a fresh process. Without a supervisor
  (in-web worker, tests) async tasks are cancelled and sync ones interrupted in their thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from procrastinate.job_context import JobContext as ProcrastinateContext

from jobs.context import JobContext, current_job
from jobs.exceptions import HardTimeLimitExceeded, SoftTimeLimitExceeded, TimeLimitExceeded

logger = logging.getLogger(__name__)

# The supervisor of this process, when there is one: receives one JSON line per event.
_reporter: Callable[[dict[str, Any]], None] | None = None
_threads: dict[int, int] = {}  # job id → ident of the thread running its sync task
_threads_lock = threading.Lock()
_timed_out: set[int] = set()


def set_reporter(reporter: Callable[[dict[str, Any]], None] | None) -> None:
    global _reporter
    _reporter = reporter


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


def pop_timed_out(job_id: int) -> bool:
    """True (once) if the job's attempt ended because of a time limit."""
    with _threads_lock:
        if job_id in _timed_out:
            _timed_out.discard(job_id)
            return True
    return False


def _raise_in_thread(ident: int, exc_type: type[BaseException] | None) -> bool:
    result = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(ident), ctypes.py_object(exc_type) if exc_type is not None else ctypes.c_void_p(0)
    )
    return bool(result == 1)


def interrupt_sync_job(job_id: int, exc_type: type[BaseException] | None = None) -> bool:
    """Raise `exc_type` (JobAborted by default) in the thread running a sync job, if any."""
    if exc_type is None:
        from procrastinate.exceptions import JobAborted

        exc_type = JobAborted
    with _threads_lock:
        ident = _threads.get(job_id)
        if ident is None:
            return False
        return _raise_in_thread(ident, exc_type)


def track_thread(call_next: Callable[[], Any], context: ProcrastinateContext, worker: Any) -> Any:
    """Sync task middleware (runs in the task's thread): let time limits reach this thread."""
    job_id = context.job.id
    assert job_id is not None
    ident = threading.get_ident()
    with _threads_lock:
        _threads[job_id] = ident
    try:
        return call_next()
    finally:
        with _threads_lock:
            _threads.pop(job_id, None)
            _raise_in_thread(ident, None)  # drop an interruption that arrived too late to matter


async def enforce_time_limits(call_next: Callable[[], Any], context: ProcrastinateContext, worker: Any) -> Any:
    """Worker middleware (inside `record_job`): soft and hard limits of one attempt."""
    ctx = current_job()
    loop = asyncio.get_running_loop()
    job_id = ctx.job_id
    is_async = _is_async(worker, context)
    inner = asyncio.ensure_future(call_next())
    fired: list[type[TimeLimitExceeded]] = []

    def fire(kind: type[TimeLimitExceeded]) -> None:
        if inner.done():
            return
        if kind is SoftTimeLimitExceeded:
            ctx.soft_limit_hit = True
        elif supervised() and not is_async:
            return  # the supervisor kills the process: a CPU loop in C never sees an exception
        fired.append(kind)
        label = "soft" if kind is SoftTimeLimitExceeded else "hard"
        limit = ctx.soft_time_limit if kind is SoftTimeLimitExceeded else ctx.hard_time_limit
        logger.warning("job %s (%s) ran past its %s time limit of %g s", job_id, ctx.task_name, label, limit)
        if is_async:
            inner.cancel()
        else:
            with _threads_lock:
                ident = _threads.get(job_id)
                if ident is not None:
                    _raise_in_thread(ident, kind)

    soft = loop.call_later(ctx.soft_time_limit, fire, SoftTimeLimitExceeded)
    hard = loop.call_later(ctx.hard_time_limit, fire, HardTimeLimitExceeded)
    report({"event": "start", "job_id": job_id, "hard_time_limit": ctx.hard_time_limit})
    try:
        try:
            return await inner
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if fired and not (task is not None and task.cancelling()):
                kind = fired[-1]
                raise kind(_message(ctx, kind)) from None
            raise
    except TimeLimitExceeded:
        with _threads_lock:
            _timed_out.add(job_id)
        raise
    finally:
        soft.cancel()
        hard.cancel()
        if not inner.done():
            inner.cancel()
        report({"event": "end", "job_id": job_id})


def _message(ctx: JobContext, kind: type[TimeLimitExceeded]) -> str:
    if kind is HardTimeLimitExceeded:
        return f"hard time limit exceeded ({ctx.hard_time_limit:g} s)"
    return f"soft time limit exceeded ({ctx.soft_time_limit:g} s)"


def _is_async(worker: Any, context: ProcrastinateContext) -> bool:
    import inspect

    task = worker.app.tasks.get(context.job.task_name)
    return bool(task is not None and inspect.iscoroutinefunction(task.func))
