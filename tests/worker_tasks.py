"""Test-only tasks for the worker and reliability tests (imported by worker subprocesses via
SKIPLOCK_IMPORT_PATHS=tests.worker_tasks).

`record_run` proves exactly-once and no-concurrent-run: at start it claims the job in
`wtest_running` (primary key job_id: a second concurrent run of the same job cannot insert and
is counted in `wtest_overlaps`), at the end it releases the claim and appends to `wtest_runs`.
Its writes survive database restarts (they retry until PostgreSQL is back), so what the tables
show is the queue's behaviour, not the test task's.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from django.db import OperationalError, connection
from django.db.utils import InterfaceError

from jobs.context import JobContext
from jobs.registry import RetryPolicy, task

FAST_RETRY = RetryPolicy(max_retries=5, backoff=0.2, factor=2, max_backoff=2, jitter=0.1)

TABLES = """
CREATE TABLE IF NOT EXISTS wtest_running (job_id bigint PRIMARY KEY, token text NOT NULL, pid int NOT NULL);
CREATE TABLE IF NOT EXISTS wtest_overlaps (job_id bigint NOT NULL, at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS wtest_runs (job_id bigint NOT NULL, token text NOT NULL, attempt int NOT NULL,
                                       pid int NOT NULL, at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS wtest_started (job_id bigint NOT NULL, attempt int NOT NULL, pid int NOT NULL,
                                          at timestamptz NOT NULL DEFAULT now());
"""


def _write(sql: str, params: list[Any], *, deadline: float = 120.0) -> Any:
    """Run one autocommitted statement, retrying while the database is unreachable."""
    ends = time.monotonic() + deadline
    while True:
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchone() if cursor.description else None
        except (OperationalError, InterfaceError):
            if time.monotonic() > ends:
                raise
            connection.close()
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = f"/proc/{pid}/stat"
    try:
        with open(stat) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@task(queue="wtest", retry=FAST_RETRY, soft_time_limit=60, hard_time_limit=120)
def record_run(ctx: JobContext, *, work_ms: int = 5) -> dict[str, Any]:
    """Claim the job, work a little, release: proves no job runs twice at once."""
    import os

    token = uuid.uuid4().hex
    row = _write(
        "INSERT INTO wtest_running (job_id, token, pid) VALUES (%s, %s, %s) "
        "ON CONFLICT (job_id) DO UPDATE SET job_id = EXCLUDED.job_id WHERE wtest_running.token = EXCLUDED.token "
        "RETURNING token",
        [ctx.job_id, token, os.getpid()],
    )
    if row is None:  # another run of this job holds the claim: is it still alive?
        holder = _write("SELECT pid FROM wtest_running WHERE job_id = %s", [ctx.job_id])
        if holder is not None and not _alive(holder[0]):
            # A run killed with its process (SIGKILL tests) left its claim: not an overlap.
            _write("UPDATE wtest_running SET token = %s, pid = %s WHERE job_id = %s", [token, os.getpid(), ctx.job_id])
        else:
            _write("INSERT INTO wtest_overlaps (job_id) VALUES (%s)", [ctx.job_id])
    time.sleep(work_ms / 1000)
    _write("DELETE FROM wtest_running WHERE job_id = %s AND token = %s", [ctx.job_id, token])
    _write("INSERT INTO wtest_runs (job_id, token, attempt, pid) VALUES (%s, %s, %s, %s)",
           [ctx.job_id, token, ctx.attempt, os.getpid()])
    return {"token": token}


@task(queue="wtest", retry=FAST_RETRY, soft_time_limit=300, hard_time_limit=600)
def slow_job(ctx: JobContext, *, seconds: float = 2.0) -> dict[str, Any]:
    """Sleep in small steps (a job that takes a while), recording each start."""
    import os

    _write("INSERT INTO wtest_started (job_id, attempt, pid) VALUES (%s, %s, %s)", [ctx.job_id, ctx.attempt, os.getpid()])
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        time.sleep(0.05)
    _write("INSERT INTO wtest_runs (job_id, token, attempt, pid) VALUES (%s, 'slow', %s, %s)",
           [ctx.job_id, ctx.attempt, os.getpid()])
    return {"slept": seconds}


@task(queue="wtest", retry=RetryPolicy(max_retries=1, backoff=0.1, factor=1, max_backoff=0.1, jitter=0),
      soft_time_limit=1.0, hard_time_limit=2.0)
def runaway(*, n: int = 10**12) -> int:
    """A CPU loop that never yields to Python (the sum runs in C): only a kill stops it."""
    return sum(range(n))


@task(queue="wtest", retry=RetryPolicy(max_retries=0), soft_time_limit=0.5, hard_time_limit=30)
def soft_limited(ctx: JobContext, *, seconds: float = 10.0) -> str:
    """Sleeps past its soft limit; catches SoftTimeLimitExceeded to clean up, then re-raises."""
    from jobs.exceptions import SoftTimeLimitExceeded

    try:
        ends = time.monotonic() + seconds
        while time.monotonic() < ends:
            time.sleep(0.01)
    except SoftTimeLimitExceeded:
        _write("INSERT INTO wtest_started (job_id, attempt, pid) VALUES (%s, -1, 0)", [ctx.job_id])
        raise
    return "finished"


@task(queue="wtest", retry=RetryPolicy(max_retries=0), soft_time_limit=0.3, hard_time_limit=30)
async def soft_limited_async(*, seconds: float = 10.0) -> str:
    """An async task past its soft limit: cancelled, recorded as SoftTimeLimitExceeded."""
    import asyncio

    await asyncio.sleep(seconds)
    return "finished"


@task(queue="wtest", retry=FAST_RETRY)
def plain(*, n: int = 0) -> int:
    """A task without a context, that any worker (procrastinate's own too) can run."""
    return n


QUICK_RETRY = RetryPolicy(max_retries=1, backoff=0.1, factor=1, max_backoff=0.1, jitter=0)


@task(queue="wtest", retry=QUICK_RETRY)
def exits(*, code: int = 3, kind: str = "exit") -> None:
    """Leave the way a script would: exit() (SystemExit) or KeyboardInterrupt."""
    import sys

    if kind == "exit":
        sys.exit(code)
    raise KeyboardInterrupt("interrupted by the task")


@task(queue="wtest", retry=QUICK_RETRY)
async def aexits(*, code: int = 4) -> None:
    """An async task that raises SystemExit on the worker's own loop."""
    raise SystemExit(code)


@task(queue="wtest", lock="resource-{resource}", retry=RetryPolicy(max_retries=0))
def hold_lock(ctx: JobContext, *, resource: str, seconds: float = 0.5) -> str:
    """Hold a lock for a while, recording when it started."""
    import os

    _write("INSERT INTO wtest_started (job_id, attempt, pid) VALUES (%s, %s, %s)", [ctx.job_id, ctx.attempt, os.getpid()])
    time.sleep(seconds)
    return resource


@task(queue="wtest", retry=RetryPolicy(max_retries=3, backoff=0.1, factor=1, max_backoff=0.1, jitter=0))
def stubborn(ctx: JobContext, *, seconds: float = 8.0) -> dict[str, Any]:
    """The first run reports progress for `seconds`, then fails; any later run succeeds at once.

    (A run after a lost worker is still attempt 1 — a lost worker uses up no retry — so runs are
    told apart by what wtest_started holds.)
    """
    import os

    runs_before = _write("SELECT count(*) FROM wtest_started WHERE job_id = %s", [ctx.job_id])[0]
    _write("INSERT INTO wtest_started (job_id, attempt, pid) VALUES (%s, %s, %s)", [ctx.job_id, ctx.attempt, os.getpid()])
    if runs_before:
        ctx.report_progress(50, "a later run")
        return {"run": runs_before + 1, "pid": os.getpid()}
    try:
        ends = time.time() + seconds
        step = 0
        while time.time() < ends:
            step += 1
            ctx.report_progress(min(90, step), f"attempt 1 step {step}")
            time.sleep(0.05)
        raise RuntimeError("late error from attempt 1")
    finally:
        _write("INSERT INTO wtest_runs (job_id, token, attempt, pid) VALUES (%s, 'attempt-1-ended', 1, %s)",
               [ctx.job_id, os.getpid()])
