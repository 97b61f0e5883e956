"""A testing helper for Skiplock users: run waiting jobs through the real worker, in-process.

    from jobs.testing import run_jobs

    def test_report_is_built(transactional_db):
        job_id = build_report.defer(account_id=1)
        run_jobs()
        assert JobRecord.objects.get(pk=job_id).state == "succeeded"

The jobs run exactly as in production (the worker, its middleware, the database triggers),
against the real database, until no runnable job is left. Use a transactional test (the
worker reads committed rows on its own connections).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from django.db import connection

from jobs.worker import run_worker


def run_jobs(
    *,
    queues: list[str] | None = None,
    concurrency: int = 1,
    include_scheduled: bool = False,
    max_rounds: int = 50,
    **worker_options: Any,
) -> int:
    """Run jobs until none is runnable; returns how many attempts ran.

    `include_scheduled` also runs jobs scheduled for later, retries waiting out their backoff
    included, by making them runnable now, round after round, until the queue is empty.
    Other keyword arguments go to the worker (e.g. `name`, `abort_job_polling_interval`).
    """
    options: dict[str, Any] = {
        "name": "test-worker",
        "listen_notify": False,
        # The worker learns of abort requests by polling while jobs run: poll often in tests.
        "abort_job_polling_interval": 0.1,
        **worker_options,
    }
    before = _attempt_count()
    for _ in range(max_rounds):
        if include_scheduled:
            _make_scheduled_runnable(queues)
        round_start = _attempt_count()
        _in_fresh_loop(run_worker(queues=queues, concurrency=concurrency, wait=False,
                                  install_signal_handlers=False, **options))
        # A worker with wait=False stops at the first empty fetch, which can come while a
        # job is only held back by a `lock` another job held: go on while jobs still move.
        progressed = _attempt_count() > round_start
        if not progressed or not _waiting(queues, runnable_only=not include_scheduled):
            break
    return _attempt_count() - before


async def arun_jobs(**kwargs: Any) -> int:
    """`run_jobs` for async tests."""
    return await asyncio.to_thread(run_jobs, **kwargs)


def _in_fresh_loop(coro: Any) -> None:
    """Run a coroutine on its own loop, in a thread when this thread already runs one."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coro)
        return
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coro)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def _attempt_count() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM skiplock_job_attempt")
        return int(cursor.fetchone()[0])


def _queue_filter(queues: list[str] | None) -> tuple[str, list[Any]]:
    return (" AND queue_name = ANY(%s)", [queues]) if queues else ("", [])


def _make_scheduled_runnable(queues: list[str] | None) -> None:
    where, params = _queue_filter(queues)
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE procrastinate_jobs SET scheduled_at = now() "
            "WHERE status = 'todo' AND scheduled_at > now()" + where,
            params,
        )


def _waiting(queues: list[str] | None, *, runnable_only: bool = False) -> bool:
    where, params = _queue_filter(queues)
    if runnable_only:
        where += " AND (scheduled_at IS NULL OR scheduled_at <= now())"
    with connection.cursor() as cursor:
        cursor.execute("SELECT EXISTS (SELECT 1 FROM procrastinate_jobs WHERE status = 'todo'" + where + ")", params)
        return bool(cursor.fetchone()[0])
