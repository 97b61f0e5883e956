"""Test-only tasks and fixtures of the jobs core tests.

Importing this module registers the tasks (`@task` at import time), so the in-process worker
of `jobs.testing.run_jobs` finds them like any task of `jobs/tasks.py`.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from django.conf import settings
from django.db import connection
from procrastinate import exceptions as procrastinate_exceptions
from procrastinate.contrib.django.utils import connector_params

from jobs.context import JobContext
from jobs.models import JobRecord
from jobs.registry import NO_RETRY, RetryPolicy, task
from jobs.testing import run_jobs

FAST_DEPLOY = {"check_interval": 0, "build_megabytes": 1, "health_checks": 1}


class Flaky(ConnectionError):
    """A failure that the flaky task's policy retries."""


@task(name="tests.core.echo", queue="core-tests")
def echo(ctx: JobContext, *, value: int = 0, label: str = "") -> dict[str, Any]:
    """Return what the task sees of its context."""
    ctx.report_progress(50, "echoing")
    return {"job_id": ctx.job_id, "attempt": ctx.attempt, "task_name": ctx.task_name,
            "value": value, "label": label, "sync": True}


@task(name="tests.core.aecho", queue="core-tests")
async def aecho(ctx: JobContext, *, value: int = 0) -> dict[str, Any]:
    """The async twin of echo."""
    ctx.report_progress(50, "echoing")
    await asyncio.sleep(0)
    return {"job_id": ctx.job_id, "attempt": ctx.attempt, "task_name": ctx.task_name,
            "value": value, "sync": False}


@task(name="tests.core.progress_storm", queue="core-tests", retry=NO_RETRY)
def progress_storm(ctx: JobContext, *, calls: int = 10_000, spread: float = 0.5, fail: bool = False) -> int:
    """Report progress `calls` times over about `spread` seconds, then pause so the last one lands."""
    deadline = time.monotonic() + spread
    for number in range(1, calls + 1):
        ctx.report_progress(min(99, number * 99 // calls), f"item {number}")
        # Spread the calls over `spread` seconds (busy, not sleeping: a task doing real work).
        while time.monotonic() < deadline - spread * (calls - number) / calls:
            pass
    time.sleep(0.3)  # longer than SKIPLOCK_PROGRESS_INTERVAL: the flusher writes the last value now
    if fail:
        raise RuntimeError("failed after reporting")
    return calls


@task(name="tests.core.aprogress_storm", queue="core-tests", retry=NO_RETRY)
async def aprogress_storm(ctx: JobContext, *, calls: int = 10_000) -> int:
    """Report progress `calls` times from an async task, yielding to the loop now and then."""
    for number in range(1, calls + 1):
        ctx.report_progress(min(99, number * 99 // calls), f"item {number}")
        if number % 100 == 0:
            await asyncio.sleep(0.005)
    await asyncio.sleep(0.3)
    return calls


@task(name="tests.core.wait_for_abort", queue="core-tests")
def wait_for_abort(ctx: JobContext, *, timeout: float = 20.0) -> str:
    """A sync task that stops cooperatively: it polls should_abort() between units of work."""
    ctx.report_progress(1, "waiting for abort")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ctx.should_abort():
            raise procrastinate_exceptions.JobAborted("stopping: abort requested")
        time.sleep(0.01)
    return "never aborted"


@task(name="tests.core.await_abort", queue="core-tests")  # default retry policy on purpose
async def await_abort(ctx: JobContext, *, timeout: float = 20.0) -> str:
    """An async task the worker cancels on abort (it never checks should_abort itself)."""
    ctx.report_progress(1, "waiting for abort")
    await asyncio.sleep(timeout)
    return "never aborted"


@task(name="tests.core.bad_result", queue="core-tests")
def bad_result(*, kind: str = "set") -> Any:
    """Return a value that JSON cannot hold."""
    return {1, 2, 3} if kind == "set" else float("nan")


@task(
    name="tests.core.flaky",
    queue="core-tests",
    retry=RetryPolicy(max_retries=3, backoff=1, max_backoff=2, retry_on=(ConnectionError,),
                      dont_retry_on=(ConnectionRefusedError,)),
)
def flaky(ctx: JobContext, *, fail_times: int = 1, error: str = "flaky") -> int:
    """Fail the first `fail_times` attempts with the named error."""
    if ctx.attempt <= fail_times:
        kind: type[Exception] = {"flaky": Flaky, "value": ValueError, "refused": ConnectionRefusedError}[error]
        raise kind(f"attempt {ctx.attempt} failed ({error})")
    return ctx.attempt


@task(name="tests.core.locked", queue="core-tests", lock="resource-{resource}")
def locked(*, resource: str, hold: float = 0.3, label: str = "") -> dict[str, Any]:
    """Hold a resource for `hold` seconds; report when it held it."""
    started = time.time()
    time.sleep(hold)
    return {"resource": resource, "label": label, "started": started, "finished": time.time(),
            "thread": threading.get_ident()}


@task(name="tests.core.unique", queue="core-tests", queueing_lock="unique-{key}", retry=NO_RETRY)
def unique(*, key: str, fail: bool = False) -> str:
    """At most one waiting job per key."""
    if fail:
        raise RuntimeError("failed on purpose")
    return key


@task(name="tests.core.bad_progress", queue="core-tests", retry=NO_RETRY)
def bad_progress(ctx: JobContext, *, percent: float) -> None:
    """Report an impossible progress."""
    ctx.report_progress(percent)


@task(name="tests.core.check_abort_often", queue="core-tests")
def check_abort_often(ctx: JobContext, *, calls: int = 100_000) -> dict[str, float]:
    """Call should_abort() `calls` times and say how long it took."""
    started = time.perf_counter()
    for _ in range(calls):
        ctx.should_abort()
    return {"seconds": time.perf_counter() - started, "calls": calls}


# --- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def clean_queue(transactional_db: None) -> Iterator[None]:
    """Run each test on an empty queue, and leave it empty.

    pytest-django's flush truncates Skiplock's tables but not procrastinate's (unmanaged
    models): jobs a test left waiting would otherwise run in the next one. Bind it in a
    test module (`clean_queue = core_fixtures.clean_queue`) to make it apply there.
    """

    def empty() -> None:
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM procrastinate_jobs")
            cursor.execute("DELETE FROM skiplock_job_attempt")

    empty()
    yield
    empty()


@pytest.fixture
def listener() -> Iterator[psycopg.Connection[Any]]:
    """A psycopg connection LISTENing on the skiplock_job channel and registered as a listener, as
    the API's event hub does (writers announce only while a listener is registered)."""
    with psycopg.connect(**connector_params("default"), autocommit=True) as conn:
        conn.execute("LISTEN skiplock_job")
        conn.execute("INSERT INTO skiplock_listener (name, expires_at) VALUES ('tests', now() + interval '1 hour') "
                     "ON CONFLICT (name) DO UPDATE SET expires_at = EXCLUDED.expires_at")
        yield conn
        conn.execute("DELETE FROM skiplock_listener WHERE name = 'tests'")


def drain(conn: psycopg.Connection[Any], timeout: float = 0.3) -> list[dict[str, Any]]:
    """The job events received so far, in order (a notification carries a batch of them)."""
    from jobs.events import parse_payload

    return [event for n in conn.notifies(timeout=timeout) for event in parse_payload(n.payload)]


@pytest.fixture
def write_counter() -> Iterator[Callable[[int], int]]:
    """Count the row writes to skiplock_job per job with a trigger (the UPDATEs the worker makes)."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            CREATE TABLE core_test_job_writes (job_id bigint, progress int, step text);
            CREATE FUNCTION core_test_count_write() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO core_test_job_writes VALUES (NEW.job_id, NEW.progress, NEW.step);
                RETURN NULL;
            END $$;
            CREATE TRIGGER core_test_count_write AFTER UPDATE ON skiplock_job
            FOR EACH ROW EXECUTE FUNCTION core_test_count_write();
            """
        )

    def count(job_id: int) -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM core_test_job_writes WHERE job_id = %s", [job_id])
            return int(cursor.fetchone()[0])

    try:
        yield count
    finally:
        with connection.cursor() as cursor:
            cursor.execute(
                "DROP TRIGGER IF EXISTS core_test_count_write ON skiplock_job;"
                "DROP FUNCTION IF EXISTS core_test_count_write();"
                "DROP TABLE IF EXISTS core_test_job_writes;"
            )


@contextmanager
def worker_in_background(**options: Any) -> Iterator[threading.Thread]:
    """run_jobs in a thread (with its own database connection) while the test acts on the jobs."""
    errors: list[BaseException] = []

    def target() -> None:
        from django.db import connection as thread_connection

        try:
            run_jobs(**options)
        except BaseException as exc:
            errors.append(exc)
        finally:
            thread_connection.close()

    thread = threading.Thread(target=target, name="core-test-worker")
    thread.start()
    try:
        yield thread
    finally:
        thread.join(timeout=60)
    assert not thread.is_alive(), "the worker did not finish"
    if errors:
        raise errors[0]


def wait_for_state(job_id: int, *states: str, timeout: float = 10.0) -> JobRecord:
    deadline = time.monotonic() + timeout
    while True:
        record = JobRecord.objects.filter(pk=job_id).first()
        if record is not None and record.state in states:
            return record
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} never reached {states}: {record and record.state}")
        time.sleep(0.02)


def subprocess_env() -> dict[str, str]:
    """The environment for a `manage.py` subprocess that must use this test database."""
    import os
    from urllib.parse import quote

    db = connection.settings_dict
    url = f"postgresql://{quote(db['USER'] or '')}@/{quote(db['NAME'])}?host={quote(db['HOST'] or '')}"
    if db["PORT"]:
        url += f"&port={db['PORT']}"
    if db["PASSWORD"]:
        url = url.replace("@/", f":{quote(db['PASSWORD'])}@/", 1)
    return {**os.environ, "DATABASE_URL": url, "DEBUG": "true"}


def manage(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `manage.py ARGS` in a subprocess against the test database."""
    return subprocess.run(
        [sys.executable, str(settings.BASE_DIR / "manage.py"), *args],
        env=subprocess_env(), capture_output=True, text=True, timeout=timeout, check=False,
    )


@task(name="tests.core.unique_slow", queue="core-tests", queueing_lock="slow-{key}",
      retry=RetryPolicy(max_retries=2, backoff=0.1, jitter=0))
def unique_slow(ctx: JobContext, *, key: str, hold: float = 0.5) -> str:
    """Fail after `hold` seconds while holding a queueing lock (a newer job may be waiting by then)."""
    time.sleep(hold)
    if ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    return key
