"""The worker middleware that records what only the worker knows: result, error, progress.

State, timings and attempts are kept by database triggers on procrastinate's table (migration
0002); this middleware adds, around every attempt, the task context, a progress flusher, and
one final UPDATE with the result or the error. Task code never writes these rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import traceback
from typing import Any

from django.conf import settings
from procrastinate.job_context import JobContext as ProcrastinateContext

from jobs.context import JobContext, _current
from jobs.exceptions import ResultNotSerializable
from jobs.reconnect import until_connected
from jobs.registry import DEFAULT_HARD_TIME_LIMIT, DEFAULT_SOFT_TIME_LIMIT, find_task
from jobs.transitions import event_sql

logger = logging.getLogger(__name__)

MAX_RESULT_BYTES = 1_000_000
MAX_MESSAGE_CHARS = 4000
MAX_TRACEBACK_CHARS = 20000
RECORD_RETRY_SECONDS = 60.0  # a database outage delays the record write; it does not fail the job

# lean-data adapter: no trigger announces progress any more; the write announces itself.
_WRITE_PROGRESS = """
WITH r AS (
    UPDATE skiplock_job SET progress = %(progress)s, step = %(step)s, progress_at = now()
    WHERE job_id = %(job_id)s AND (progress, step) IS DISTINCT FROM (%(progress)s, %(step)s)
    RETURNING *
)
SELECT skiplock_announce(jsonb_agg(""" + event_sql("'progress'") + """))
FROM r JOIN procrastinate_jobs j ON j.id = r.job_id
"""

_WRITE_SUCCESS = """
UPDATE skiplock_job
SET result = %(result)s::jsonb, progress = 100, step = COALESCE(%(step)s, step), progress_at = now(),
    error_type = '', error_message = '', error_traceback = ''
WHERE job_id = %(job_id)s
"""

_WRITE_FAILURE = """
WITH attempt AS (
    UPDATE skiplock_job_attempt
    SET error_type = %(error_type)s, error_message = %(error_message)s, error_traceback = %(traceback)s
    WHERE job_id = %(job_id)s AND finished_at IS NULL
)
UPDATE skiplock_job
SET error_type = %(error_type)s, error_message = %(error_message)s, error_traceback = %(traceback)s,
    progress = COALESCE(%(progress)s, progress), step = COALESCE(%(step)s, step), progress_at = now()
WHERE job_id = %(job_id)s
"""


def install(procrastinate_app: Any) -> None:
    """PROCRASTINATE_ON_APP_READY: wrap every job of every worker in `record_job` and its time limits."""
    from jobs.timelimits import enforce_time_limits, track_thread

    middlewares = list(procrastinate_app.worker_defaults.get("worker_middleware") or [])
    if record_job not in middlewares:
        middlewares = [record_job, *middlewares]
    if enforce_time_limits not in middlewares:
        middlewares.insert(middlewares.index(record_job) + 1, enforce_time_limits)
    procrastinate_app.worker_defaults["worker_middleware"] = middlewares
    task_middlewares = list(procrastinate_app.worker_defaults.get("task_middleware") or [])
    if track_thread not in task_middlewares:
        procrastinate_app.worker_defaults["task_middleware"] = [*task_middlewares, track_thread]


def build_context(context: ProcrastinateContext) -> JobContext:
    job = context.job
    spec = find_task(job.task_name)
    assert job.id is not None
    return JobContext(
        job_id=job.id,
        attempt=job.attempts + 1,
        task_name=job.task_name,
        queue=job.queue,
        args=dict(job.task_kwargs),
        soft_time_limit=spec.soft_time_limit if spec else DEFAULT_SOFT_TIME_LIMIT,
        hard_time_limit=spec.hard_time_limit if spec else DEFAULT_HARD_TIME_LIMIT,
        _procrastinate=context,
        _loop=asyncio.get_running_loop(),
    )


async def record_job(call_next: Any, context: ProcrastinateContext, worker: Any) -> Any:
    """procrastinate worker middleware: wrap one attempt of one job."""
    connector = worker.app.connector
    ctx = build_context(context)
    token = _current.set(ctx)
    stop = asyncio.Event()
    flusher = asyncio.create_task(_flush_progress(ctx, connector, stop), name=f"progress {ctx.job_id}")
    try:
        result = await call_next()
    except BaseException as exc:
        pending = await _stop_flusher(flusher, stop, ctx)
        await _shielded(_write_failure(connector, ctx.job_id, exc, pending))
        raise
    finally:
        _current.reset(token)
    pending = await _stop_flusher(flusher, stop, ctx)
    try:
        payload = encode_result(result)
    except ResultNotSerializable as exc:
        await _shielded(_write_failure(connector, ctx.job_id, exc, pending))
        raise
    step = pending[1] if pending else None
    await _shielded(until_connected(
        lambda: connector.execute_query_async(_WRITE_SUCCESS, job_id=ctx.job_id, result=payload, step=step),
        what=f"storing the result of job {ctx.job_id}", deadline=RECORD_RETRY_SECONDS,
    ))
    return result


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


async def _flush_progress(ctx: JobContext, connector: Any, stop: asyncio.Event) -> None:
    """Write reported progress as it comes, at most once per interval; the newest value wins.

    Never cancelled mid-write (a cancelled UPDATE would lose the value it took): `stop` ends
    the loop between writes, and the caller folds what is still pending into its final write.
    """
    interval = float(settings.SKIPLOCK_PROGRESS_INTERVAL)
    wake = ctx._progress.wake
    while not stop.is_set():
        await _first_of(wake.wait(), stop.wait())
        if stop.is_set():
            return
        wake.clear()
        taken = ctx._progress.take()
        if taken is None:
            continue
        try:
            await connector.execute_query_async(
                _WRITE_PROGRESS, job_id=ctx.job_id, progress=taken[0], step=taken[1]
            )
        except Exception:  # progress is best effort; the final write carries the last value
            logger.warning("could not store progress of job %s", ctx.job_id, exc_info=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


async def _first_of(*aws: Any) -> None:
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in tasks:
            waiting.cancel()


async def _stop_flusher(flusher: asyncio.Task[None], stop: asyncio.Event, ctx: JobContext) -> tuple[int, str] | None:
    """Let the flusher finish its write in flight, then hand back what is still pending."""
    stop.set()
    try:
        await asyncio.shield(flusher)
    except asyncio.CancelledError:
        await flusher
        raise
    except Exception:
        logger.warning("progress flusher of job %s failed", ctx.job_id, exc_info=True)
    return ctx._progress.take()


async def _write_failure(connector: Any, job_id: int, exc: BaseException, pending: tuple[int, str] | None) -> None:
    error_type = type(exc).__name__ if not isinstance(exc, asyncio.CancelledError) else "JobAborted"
    message = str(exc) or (exc.__doc__ or "").strip().split("\n")[0]
    params = {
        "job_id": job_id,
        "error_type": error_type[:255],
        "error_message": message[:MAX_MESSAGE_CHARS],
        "traceback": "".join(traceback.format_exception(exc))[-MAX_TRACEBACK_CHARS:],
        "progress": pending[0] if pending else None,
        "step": pending[1] if pending else None,
    }
    try:
        await until_connected(
            lambda: connector.execute_query_async(_WRITE_FAILURE, **params),
            what=f"storing the error of job {job_id}", deadline=RECORD_RETRY_SECONDS,
        )
    except Exception:
        logger.exception("could not record the failure of job %s", job_id)


async def _shielded(coro: Any) -> None:
    """Finish a record write even when the job's task is being cancelled (abort, shutdown)."""
    write = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(write)
    except asyncio.CancelledError:
        await write
        raise
