# ruff: noqa: F811  (pytest fixtures imported from tests/worker_fixtures.py are redefined as arguments)
"""Each known weakness of the engine (procrastinate notes §1.6, §5, §6), reproduced, then recovered by Skiplock."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from typing import Any

import psycopg_pool
import pytest
from asgiref.sync import async_to_sync
from django.db import connection
from procrastinate.contrib.django import app
from procrastinate.contrib.django.django_connector import DjangoConnector
from procrastinate.contrib.django.utils import connector_params
from procrastinate.manager import JobManager
from procrastinate.psycopg_connector import PsycopgConnector
from procrastinate.worker import Worker

from jobs import maintenance, periodic, recording, services, transitions
from jobs.worker import Worker as SkiplockWorker
from jobs.worker import finish_params, worker_pool
from tests.worker_fixtures import QUEUE, query, scalar, wait_for, worker_tables  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)


def claim(job_id: int, *, heartbeat_age: float) -> int:
    """A worker (heartbeat `heartbeat_age` s old) claims the job exactly as procrastinate's fetch does."""
    worker_id = scalar(
        "INSERT INTO procrastinate_workers (last_heartbeat) VALUES (now() - make_interval(secs => %s)) RETURNING id",
        [heartbeat_age],
    )
    claimed = scalar("SELECT id FROM procrastinate_fetch_job_v2(ARRAY[%s]::varchar[], %s)", [QUEUE, worker_id])
    assert claimed == job_id
    return int(worker_id)


def defer(task_name: str = "slow_job", **args: Any) -> int:
    return services.job_defer(task_name=task_name, args=args, queue=QUEUE).job_id


def state(job_id: int) -> str:
    return str(scalar("SELECT status FROM procrastinate_jobs WHERE id = %s", [job_id]))


def test_procrastinate_only_detects_stalled_jobs_skiplock_takes_them_back(worker_tables: None) -> None:
    dead = defer()
    claim(dead, heartbeat_age=3600)
    alive = defer()
    claim(alive, heartbeat_age=0)

    # The engine: the stalled job is found, and stays `doing` forever unless someone acts.
    manager = JobManager(DjangoConnector())
    stalled = async_to_sync(manager.get_stalled_jobs)(seconds_since_heartbeat=60)
    assert [job.id for job in stalled] == [dead]
    time.sleep(0.2)
    assert state(dead) == "doing"

    # Skiplock: the sweeper retries it now and records why.
    report = maintenance.recover_stalled_jobs(stalled_after=60)
    assert report.retried == [dead]
    assert report.failed == []
    assert state(dead) == "todo"
    assert state(alive) == "doing"  # a live worker's job is never touched
    assert query(
        "SELECT number, outcome, error_type FROM skiplock_job_attempt WHERE job_id = %s", [dead]
    ) == [(1, "lost", "WorkerLost")]
    assert report.workers_pruned == 1


def test_a_lost_job_uses_no_retry_but_one_lost_again_and_again_is_failed_not_retried_forever(
    worker_tables: None,
) -> None:
    from jobs.transitions import MAX_LOST_ATTEMPTS

    job_id = defer("soft_limited")  # max_retries=0: one attempt only
    for _ in range(MAX_LOST_ATTEMPTS - 1):
        claim(job_id, heartbeat_age=3600)
        assert maintenance.recover_stalled_jobs(stalled_after=60).retried == [job_id]
        assert state(job_id) == "todo"  # a lost worker cost the job no retry (hardening 15)
    assert scalar("SELECT attempts FROM procrastinate_jobs WHERE id = %s", [job_id]) == 0
    claim(job_id, heartbeat_age=3600)
    report = maintenance.recover_stalled_jobs(stalled_after=60)
    assert report.failed == [job_id]
    assert state(job_id) == "failed"


def test_finished_jobs_keep_no_worker_link_so_removing_a_worker_touches_only_its_running_jobs(
    worker_tables: None,
) -> None:
    def run_fifty(finish: Any) -> int:
        ids = [defer("record_run") for _ in range(50)]
        worker_id = scalar("INSERT INTO procrastinate_workers DEFAULT VALUES RETURNING id")
        for _ in ids:
            scalar("SELECT id FROM procrastinate_fetch_job_v2(ARRAY[%s]::varchar[], %s)", [QUEUE, worker_id])
        finish(ids[:-1], int(worker_id))
        linked = scalar("SELECT count(*) FROM procrastinate_jobs WHERE worker_id = %s", [worker_id])
        scalar("DELETE FROM procrastinate_workers WHERE id = %s RETURNING id", [worker_id])
        return int(linked)

    def engine_finish(ids: list[int], worker_id: int) -> None:
        for job_id in ids:
            scalar("SELECT procrastinate_finish_job_v1(%s, 'succeeded', false)", [job_id])

    def skiplock_finish(ids: list[int], worker_id: int) -> None:
        now = dt.datetime.now(dt.UTC)
        endings = [recording.succeeded(recording.Claimed(job_id, "record_run", QUEUE, 0, None, None, {}, 0), now, "1")
                   for job_id in ids]
        with connection.cursor() as cursor:
            cursor.execute(transitions.END_ATTEMPTS, finish_params(endings, worker_id=worker_id, worker_name="w"))
            assert len(cursor.fetchall()) == 49

    # The engine (#1454): every job a worker ever ran still points at it, so deleting the worker
    # row (stop, or pruning at another worker's start) rewrites all of them.
    assert run_fifty(engine_finish) == 50
    # Skiplock: a job is unlinked in the statement that ends its attempt.
    assert run_fifty(skiplock_finish) == 1  # only the job still running


def _async_connector() -> Any:
    class Connector:
        pool = worker_pool(concurrency=1)

    return Connector()


def test_a_recorded_tick_whose_job_vanished_is_deferred_again(worker_tables: None) -> None:
    schedule = periodic.register_periodic("record_run", cron="* * * * *", args={"work_ms": 1}, periodic_id="t1495")
    try:
        tick = schedule.previous_tick(time.time())
        # procrastinate's ledger says the tick was deferred, but its job is gone (#1495).
        scalar(
            "INSERT INTO procrastinate_periodic_defers (task_name, periodic_id, defer_timestamp, job_id) "
            "VALUES ('record_run', 't1495', %s, NULL) RETURNING id", [tick],
        )
        engine = scalar(
            "SELECT procrastinate_defer_periodic_job_v2(%s, NULL, NULL, 'record_run', 0, 't1495', %s, '{}'::jsonb)",
            [QUEUE, tick],
        )
        assert engine is None  # the engine defers nothing: this tick never runs

        async def scenario() -> list[int | None]:
            connector = _async_connector()
            await connector.pool.open(wait=True)
            try:
                healed = await periodic.defer_tick(connector, schedule, tick, heal=True)
                again = await periodic.defer_tick(connector, schedule, tick, heal=True)
                older = await periodic.defer_tick(connector, schedule, tick - 60, heal=True)
                return [healed, again, older]
            finally:
                await connector.pool.close()

        healed, again, older = asyncio.run(scenario())
        assert healed is not None
        assert again is None  # once per tick, however many workers ask
        assert older is None  # a lagging worker never re-runs an older tick
        row = next(r for r in periodic.periodic_schedules() if r["periodic_id"] == "t1495")
        assert row["last_job_id"] == healed
        assert row["last_state"] == "todo"
        assert row["last_run_at"].timestamp() == tick
    finally:
        periodic._SCHEDULES.pop(("record_run", "t1495"), None)


def maintenance_job(*, scheduled_at: Any) -> int:
    """A waiting `skiplock.maintenance` job holding its queueing lock, inserted as procrastinate would."""
    return int(scalar(
        "INSERT INTO procrastinate_jobs (queue_name, task_name, priority, queueing_lock, args, scheduled_at) "
        "VALUES ('skiplock', 'skiplock.maintenance', 0, 'skiplock-maintenance', '{}', %s) RETURNING id",
        [scheduled_at],
    ))


def test_a_periodic_tick_replaces_a_lock_holder_that_is_not_due(worker_tables: None) -> None:
    """Hardening item 2: a `skiplock.maintenance` started for year 9999 must not block its ticks."""
    import datetime as dt

    from jobs import maintenance as maintenance_module

    maintenance_module.ensure_schedule()
    schedule = periodic._SCHEDULES[(maintenance_module.MAINTENANCE_TASK, "")]
    # Started before internal tasks were refused and run_at capped (or by procrastinate itself).
    squatter = maintenance_job(scheduled_at=dt.datetime(9999, 1, 1, tzinfo=dt.UTC))
    tick = schedule.previous_tick(time.time())

    async def scenario() -> int | None:
        connector = _async_connector()
        await connector.pool.open(wait=True)
        try:
            return await periodic.defer_tick(connector, schedule, tick, heal=True)
        finally:
            await connector.pool.close()

    deferred = asyncio.run(scenario())
    assert deferred is not None
    assert deferred != squatter
    assert state(squatter) == "cancelled"
    assert state(deferred) == "todo"
    assert scalar("SELECT queueing_lock FROM procrastinate_jobs WHERE id = %s", [deferred]) == "skiplock-maintenance"
    assert scalar("SELECT error_type FROM skiplock_job WHERE job_id = %s", [squatter]) == "Replaced"


def test_a_periodic_tick_still_skips_when_a_due_job_holds_its_lock(worker_tables: None) -> None:
    from jobs import maintenance as maintenance_module

    maintenance_module.ensure_schedule()
    schedule = periodic._SCHEDULES[(maintenance_module.MAINTENANCE_TASK, "")]
    waiting = maintenance_job(scheduled_at=None)
    tick = schedule.previous_tick(time.time())

    async def scenario() -> int | None:
        connector = _async_connector()
        await connector.pool.open(wait=True)
        try:
            return await periodic.defer_tick(connector, schedule, tick, heal=True)
        finally:
            await connector.pool.close()

    assert asyncio.run(scenario()) is None
    assert state(waiting) == "todo"


def _run_in_thread(make_worker: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run a worker on its own event loop in a thread; returns the thread and a handle."""
    handle: dict[str, Any] = {}
    ready = threading.Event()

    async def main() -> None:
        try:
            worker = await make_worker(handle)
            handle["worker"] = worker
            handle["loop"] = asyncio.get_running_loop()
            ready.set()
            try:
                await worker.run()
            except Exception as exc:
                handle["error"] = exc
        finally:
            ready.set()
            if "cleanup" in handle:
                await handle["cleanup"]()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    ready.wait(30)
    return thread, handle


async def _engine_worker(handle: dict[str, Any]) -> Worker:
    """procrastinate's own worker, with the settings Skiplock's worker uses."""
    pool = psycopg_pool.AsyncConnectionPool(conninfo="", kwargs=connector_params("default"), min_size=1,
                                            max_size=4, open=False, timeout=5.0)
    await pool.open(wait=True)
    connector = PsycopgConnector(kwargs=connector_params("default"))
    await connector.open_async(pool=pool)
    replaced = app.replace_connector(connector)
    real_app = replaced.__enter__()

    async def cleanup() -> None:
        replaced.__exit__(None, None, None)
        await pool.close(timeout=1)

    handle["cleanup"] = cleanup
    return Worker(app=real_app, queues=[QUEUE], concurrency=2, name="bare", wait=True,
                  update_heartbeat_interval=0.5, fetch_job_polling_interval=0.5, install_signal_handlers=False)


async def _skiplock_worker(handle: dict[str, Any]) -> SkiplockWorker:
    return SkiplockWorker(queues=[QUEUE], concurrency=2, name="skiplock", periodic=False,
                          heartbeat_interval=0.5, poll_interval=0.5)


def _restart(cluster: Any, *, down_for: float) -> None:
    connection.close()
    cluster.stop()
    time.sleep(down_for)
    cluster.start()


@pytest.mark.slow
def test_a_postgresql_restart_stops_procrastinates_worker_skiplocks_keeps_working(
    worker_tables: None, embedded_postgres: object,
) -> None:
    from project.embedded_postgres import EmbeddedPostgres

    if not isinstance(embedded_postgres, EmbeddedPostgres):
        pytest.skip("needs the embedded test cluster to restart it")

    # The engine: any side task (heartbeat, LISTEN) that meets the outage — here, down longer than
    # the pool's 5 s wait for a connection — stops the worker for good: 0 % recovery.
    thread, handle = _run_in_thread(_engine_worker)
    first = defer("plain")
    wait_for(lambda: state(first) == "succeeded", timeout=30, what="the bare worker to run a job")
    _restart(embedded_postgres, down_for=7)
    after = defer("plain")
    thread.join(timeout=15)
    assert not thread.is_alive()  # the worker is gone...
    assert state(after) == "todo"  # ...and nothing runs the jobs deferred after the restart

    # Skiplock: the same outage only delays it.
    thread, handle = _run_in_thread(_skiplock_worker)
    wait_for(lambda: state(after) == "succeeded", timeout=30, what="the Skiplock worker to catch up")
    _restart(embedded_postgres, down_for=7)
    later = defer("record_run")
    wait_for(lambda: state(later) == "succeeded", timeout=60, what="a job deferred after the restart")
    assert thread.is_alive()
    handle["loop"].call_soon_threadsafe(handle["worker"].stop)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert "error" not in handle
    # Sessions the workers' task threads left open would block dropping the test database.
    query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
          "WHERE datname = current_database() AND pid <> pg_backend_pid()")
