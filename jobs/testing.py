"""A testing helper for Skiplock users: run waiting jobs through the real worker, in-process.

    from jobs.testing import run_jobs

    def test_report_is_built(transactional_db):
        job_id = build_report.defer(account_id=1)
        run_jobs()
        assert JobRecord.objects.get(pk=job_id).state == "succeeded"

The jobs run exactly as in production (the worker loop and its statements in `jobs.transitions`),
against the real database, until no runnable job is left. A task's SystemExit or
KeyboardInterrupt is that job's failure; it never escapes into the test. Use a transactional test (the
worker reads committed rows on its own connections).

`WorkerThread` keeps a real worker running beside the test instead, for tests that watch a
job while it runs (progress over the API's event stream, a page's live progress bar):

    with WorkerThread():
        job_id = deploy_stack.defer(stack="shop")
        ...  # follow /api/jobs/{job_id}/events, or poll the record
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any, Self

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


class WorkerThread:
    """A real worker (jobs.worker.run_worker) on its own event loop in a thread, stopped on exit."""

    def __init__(self, **options: Any) -> None:
        self.options: dict[str, Any] = {
            "queues": None, "concurrency": 2, "name": "test-worker", "wait": True, "listen_notify": True,
            "install_signal_handlers": False, "shutdown_grace": 2.0, **options,
        }
        self.loop = asyncio.new_event_loop()
        self.task: asyncio.Task[Any] | None = None
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=str(self.options["name"]), daemon=True)

    def _run(self) -> None:
        from django.db import connections

        async def main() -> None:
            self.task = asyncio.current_task()
            self.started.set()
            await run_worker(**self.options)

        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass
        except BaseException as exc:
            self.error = exc
        finally:
            connections.close_all()
            self.loop.close()

    def __enter__(self) -> Self:
        self.thread.start()
        if not self.started.wait(10):
            raise RuntimeError("the test worker did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(timeout=20)
        if self.error is not None:
            raise self.error


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
    from jobs.transitions import make_runnable_now

    make_runnable_now(queues=queues)


def _waiting(queues: list[str] | None, *, runnable_only: bool = False) -> bool:
    where, params = _queue_filter(queues)
    if runnable_only:
        where += " AND (scheduled_at IS NULL OR scheduled_at <= now())"
    with connection.cursor() as cursor:
        cursor.execute("SELECT EXISTS (SELECT 1 FROM procrastinate_jobs WHERE status = 'todo'" + where + ")", params)
        return bool(cursor.fetchone()[0])
