"""Test-only tasks of the flow-control tests (imported by worker subprocesses via
SKIPLOCK_IMPORT_PATHS=tests.flow_tasks, and in-process by the tests themselves).

Each run writes its span to `ftest_spans` with the database clock: the span lies inside the
time the job was `doing` (claimed before, finished after), so the most spans open at once is
at most how many jobs of a limit ran at once.
"""

from __future__ import annotations

import os
import time
from typing import Any

from django.db import connection

from jobs.context import JobContext
from jobs.registry import NO_RETRY, ConcurrencyLimit, Discard, RateLimit, Unique, task

TABLES = """
CREATE TABLE IF NOT EXISTS ftest_spans (job_id bigint NOT NULL, pid int NOT NULL, label text NOT NULL,
                                        started timestamptz NOT NULL, ended timestamptz);
CREATE TABLE IF NOT EXISTS ftest_snoozes (job_id bigint PRIMARY KEY, times int NOT NULL);
"""


def empty_tables() -> None:
    """No job, span, queue control or task limit left from another test."""
    with connection.cursor() as cursor:
        cursor.execute(TABLES)
        cursor.execute("TRUNCATE ftest_spans, ftest_snoozes")
        cursor.execute("DELETE FROM procrastinate_jobs")
        cursor.execute("DELETE FROM procrastinate_workers")
        cursor.execute("DELETE FROM skiplock_job_attempt")
        cursor.execute("DELETE FROM skiplock_queue")
        cursor.execute("DELETE FROM skiplock_limit")


def _span(ctx: JobContext, label: str, work_ms: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO ftest_spans (job_id, pid, label, started) VALUES (%s, %s, %s, clock_timestamp())",
            [ctx.job_id, os.getpid(), label],
        )
    time.sleep(work_ms / 1000)
    with connection.cursor() as cursor:
        cursor.execute("UPDATE ftest_spans SET ended = clock_timestamp() WHERE job_id = %s AND ended IS NULL",
                       [ctx.job_id])


@task(name="tests.flow.partner_call", queue="ftest", retry=NO_RETRY,
      concurrency=ConcurrencyLimit(3, key="partner:{partner_id}"))
def partner_call(ctx: JobContext, *, partner_id: int, work_ms: int = 30) -> int:
    """A call to a partner API that allows 3 concurrent calls per partner."""
    _span(ctx, f"partner:{partner_id}", work_ms)
    return partner_id


@task(name="tests.flow.rated_call", queue="ftest", retry=NO_RETRY, rate_limit=RateLimit(20, per=2))
def rated_call(ctx: JobContext, *, n: int) -> int:
    """A call to an API that allows 20 calls in any 2 seconds."""
    _span(ctx, "rated", 1)
    return n


@task(name="tests.flow.plain_call", queue="ftest", retry=NO_RETRY)
def plain_call(ctx: JobContext, *, n: int, work_ms: int = 30) -> int:
    """No limit of its own: queue limits and pauses apply to it."""
    _span(ctx, f"plain:{ctx.queue}", work_ms)
    return n


@task(name="tests.flow.snoozer", queue="ftest", retry=NO_RETRY)
def snoozer(ctx: JobContext, *, times: int = 1, seconds: float = 0.2) -> dict[str, Any]:
    """Snooze `times` times, then succeed (the count lives in the database, not in the attempt)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO ftest_snoozes AS s (job_id, times) VALUES (%s, 1) "
            "ON CONFLICT (job_id) DO UPDATE SET times = s.times + 1 RETURNING times",
            [ctx.job_id],
        )
        runs = cursor.fetchone()[0]
    if runs <= times:
        ctx.snooze(seconds)
    return {"runs": runs, "attempt": ctx.attempt}


@task(name="tests.flow.discarder", queue="ftest")
def discarder(*, reason: str) -> None:
    """Drop the job: it has become pointless."""
    raise Discard(reason)


@task(name="tests.flow.sync_account", queue="ftest", unique=Unique(period=3600, fields=("account_id",)))
def sync_account(*, account_id: int, full: bool = False) -> int:
    """At most one waiting or running sync per account, whatever `full` says."""
    return account_id
