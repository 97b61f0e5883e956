# ruff: noqa: F811  (pytest fixtures imported from tests/worker_fixtures.py are redefined as arguments)
"""Maintenance: pruning in bounded batches, periodic schedules deferred once per tick, the commands."""

from __future__ import annotations

import asyncio
import io
import json
import time

import pytest
from django.core.management import call_command

from jobs import maintenance, periodic, services
from jobs.worker import worker_pool
from tests.worker_fixtures import QUEUE, query, scalar, worker_tables  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)


def finished_jobs(count: int, *, age_seconds: float, state: str = "succeeded") -> list[int]:
    ids = [services.job_defer(task_name="record_run", args={}, queue=QUEUE).job_id for _ in range(count)]
    worker_id = scalar("INSERT INTO procrastinate_workers DEFAULT VALUES RETURNING id")
    for _ in ids:
        scalar("SELECT id FROM procrastinate_fetch_job_v2(ARRAY[%s]::varchar[], %s)", [QUEUE, worker_id])
    for job_id in ids:
        scalar("SELECT procrastinate_finish_job_v1(%s, %s, false)", [job_id, state])
    query("UPDATE skiplock_job SET finished_at = now() - make_interval(secs => %s) WHERE job_id = ANY(%s)",
          [age_seconds, ids])
    return ids


def test_prune_deletes_finished_jobs_past_the_retention_in_batches(worker_tables: None) -> None:
    old = finished_jobs(25, age_seconds=3600) + finished_jobs(3, age_seconds=3600, state="failed")
    recent = finished_jobs(5, age_seconds=10)
    waiting = services.job_defer(task_name="record_run", args={}, queue=QUEUE).job_id
    query("UPDATE skiplock_job SET created_at = now() - interval '1 day' WHERE job_id = %s", [waiting])

    report = maintenance.prune_finished_jobs(older_than=600, batch=10)
    assert report.deleted == 28
    assert report.batches == 3  # 10 + 10 + 8: each batch its own short transaction
    assert report.complete
    assert scalar("SELECT count(*) FROM procrastinate_jobs WHERE id = ANY(%s)", [old]) == 0
    assert scalar("SELECT count(*) FROM skiplock_job WHERE job_id = ANY(%s)", [old]) == 0  # records went too
    assert scalar("SELECT count(*) FROM skiplock_job_attempt WHERE job_id = ANY(%s)", [old]) == 0
    assert scalar("SELECT count(*) FROM procrastinate_events WHERE job_id = ANY(%s)", [old]) == 0
    assert scalar("SELECT count(*) FROM skiplock_job WHERE job_id = ANY(%s)", [[*recent, waiting]]) == 6


def test_prune_stops_at_its_time_budget_and_says_so(worker_tables: None) -> None:
    finished_jobs(6, age_seconds=3600)
    report = maintenance.prune_finished_jobs(older_than=600, batch=2, time_budget=0)
    assert report.deleted == 2
    assert not report.complete


def test_the_prune_command(worker_tables: None) -> None:
    finished_jobs(4, age_seconds=3600)
    out = io.StringIO()
    call_command("prune", "--older-than", "600", "--dry-run", stdout=out)
    assert "4 finished job(s) older than 600 s would be deleted" in out.getvalue()
    out = io.StringIO()
    call_command("prune", "--older-than", "600", "--batch", "3", stdout=out)
    assert "deleted 4 finished job(s) older than 600 s in 2 batch(es)" in out.getvalue()


def test_the_maintenance_task_is_scheduled_and_listed(worker_tables: None) -> None:
    rows = periodic.periodic_schedules()
    row = next(r for r in rows if r["task_name"] == maintenance.MAINTENANCE_TASK)
    assert row["cron"] == "* * * * *"
    assert row["queue"] == maintenance.MAINTENANCE_QUEUE
    assert row["next_run_at"].timestamp() > time.time()
    out = io.StringIO()
    call_command("periodic", stdout=out)
    assert "skiplock.maintenance" in out.getvalue()
    assert "never" in out.getvalue()
    out = io.StringIO()
    call_command("periodic", "--json", stdout=out)
    assert json.loads(out.getvalue())[0]["task_name"] == "skiplock.maintenance"


def test_each_tick_is_deferred_once_however_many_workers_defer_it(worker_tables: None) -> None:
    schedule = periodic.register_periodic("record_run", cron="* * * * *", args={"work_ms": 1}, periodic_id="once")
    try:
        tick = schedule.previous_tick(time.time())

        async def five_workers_at_once() -> list[int | None]:
            class Connector:
                pool = worker_pool(concurrency=4)

            connector = Connector()
            await connector.pool.open(wait=True)
            try:
                return await asyncio.gather(*(
                    periodic.defer_tick(connector, schedule, tick, heal=False) for _ in range(5)
                ))
            finally:
                await connector.pool.close()

        results = asyncio.run(five_workers_at_once())
        deferred = [job_id for job_id in results if job_id]
        assert len(deferred) == 1
        args = scalar("SELECT args::text FROM procrastinate_jobs WHERE id = %s", deferred)
        assert json.loads(args) == {"work_ms": 1}  # the schedule's arguments, no `timestamp` added
    finally:
        periodic._SCHEDULES.pop(("record_run", "once"), None)


def test_a_schedule_with_bad_arguments_or_cron_is_refused_at_declaration() -> None:
    from jobs.exceptions import InvalidArguments

    with pytest.raises(InvalidArguments):
        periodic.register_periodic("record_run", cron="* * * * *", args={"nope": 1}, periodic_id="bad")
    with pytest.raises(ValueError, match="not a valid cron"):
        periodic.register_periodic("record_run", cron="every day", periodic_id="bad")
    assert ("record_run", "bad") not in periodic._SCHEDULES
