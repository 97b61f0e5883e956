"""The worker's claim statement against procrastinate's own `procrastinate_fetch_job_v2`.

Skiplock claims with its own SQL (jobs/transitions.py, CLAIM) on procrastinate's schema, so a
procrastinate release that changes the rule must fail here, not in production: each scenario is
run through procrastinate's function (one job per call, until it returns nothing) and through the
claim statement (every free slot at once), and the picks must be the same jobs in the same order.
The one intended difference is procrastinate#1599: a job that is not due never holds its `lock`
against jobs that are.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.db import connection, transaction
from procrastinate.contrib.django.utils import connector_params

from jobs import recording, services, transitions
from jobs.models import JobRecord
from jobs.testing import run_jobs
from jobs.worker import finish_params
from tests import core_fixtures

pytestmark = pytest.mark.django_db(transaction=True)
clean_queue = core_fixtures.clean_queue

FUTURE = dt.datetime(9999, 1, 1, tzinfo=dt.UTC)
PAST = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


class _Rollback(Exception):
    pass


def insert(queue: str = "q1", *, priority: int = 0, lock: str | None = None, scheduled_at: dt.datetime | None = None,
           status: str = "todo") -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, priority, lock, args, scheduled_at, status) "
            "VALUES (%s, 'contract.task', %s, %s, '{}', %s, %s) RETURNING id",
            [queue, priority, lock, scheduled_at, status],
        )
        return int(cursor.fetchone()[0])


def picks(queues: list[str] | None) -> tuple[list[int], list[int]]:
    """(procrastinate's picks, Skiplock's picks) from the same rows; nothing is kept."""
    results: list[list[int]] = []
    for engine in ("procrastinate", "skiplock"):
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("INSERT INTO procrastinate_workers DEFAULT VALUES RETURNING id")
                worker_id = cursor.fetchone()[0]
                picked: list[int] = []
                if engine == "procrastinate":
                    while True:
                        cursor.execute("SELECT id FROM procrastinate_fetch_job_v2(%s::varchar[], %s)", [queues, worker_id])
                        job_id = cursor.fetchone()[0]
                        if job_id is None:
                            break
                        picked.append(job_id)
                else:
                    cursor.execute(transitions.CLAIM, {"queues": queues, "n": 100, "worker_id": worker_id})
                    rows = [row for row in cursor.fetchall() if row[0] is not None]
                    picked = [row[0] for row in sorted(rows, key=lambda row: (-row[3], row[0]))]
                results.append(picked)
                raise _Rollback
        except _Rollback:
            pass
    return results[0], results[1]


def test_priority_then_id_order_is_procrastinates() -> None:
    ids = [insert(priority=p) for p in (0, 5, -1, 5, 0)]
    engine, ours = picks(None)
    assert engine == ours == [ids[1], ids[3], ids[0], ids[4], ids[2]]


def test_queues_filter_candidates_like_procrastinate() -> None:
    a, b, c = insert("q1"), insert("q2"), insert("q3")
    assert picks(["q1", "q3"]) == ([a, c], [a, c])
    assert picks(None) == ([a, b, c], [a, b, c])


def test_one_head_per_lock_by_priority_then_id_and_a_running_job_blocks_its_lock() -> None:
    first, _second, urgent = insert(lock="L"), insert(lock="L"), insert(lock="L", priority=10)
    other = insert(lock="M")
    insert(lock="R", status="doing")
    blocked = insert(lock="R")
    free = insert()
    engine, ours = picks(None)
    assert engine == ours == [urgent, other, free]
    assert first not in ours
    assert blocked not in ours


def test_a_same_lock_job_in_another_queue_still_blocks() -> None:
    head = insert("q2", lock="L")
    waiting = insert("q1", lock="L")
    assert picks(["q1"]) == ([], [])
    assert head < waiting


def test_jobs_not_due_are_skipped() -> None:
    due = insert(scheduled_at=PAST)
    insert(scheduled_at=FUTURE)
    assert picks(None) == ([due], [due])


def test_a_job_that_is_not_due_holds_its_lock_in_procrastinate_but_not_in_skiplock() -> None:
    # procrastinate#1599 (hardening item 1): a squatter scheduled in year 9999, ahead by priority.
    insert(lock="deploy", priority=2147483647, scheduled_at=FUTURE)
    due = insert(lock="deploy")
    engine, ours = picks(None)
    assert engine == []  # the engine: the due job waits forever
    assert ours == [due]


def test_a_due_job_runs_beside_a_year_9999_job_with_its_lock() -> None:
    squatter = services.job_defer(task_name="tests.core.locked", args={"resource": "shop", "label": "squat"})
    with connection.cursor() as cursor:
        cursor.execute("UPDATE procrastinate_jobs SET scheduled_at = %s, priority = 2147483647 WHERE id = %s",
                       [FUTURE, squatter.job_id])
    due = services.job_defer(task_name="tests.core.locked", args={"resource": "shop", "label": "due", "hold": 0})
    run_jobs(queues=["core-tests"])
    assert JobRecord.objects.get(pk=due.job_id).state == "succeeded"
    assert JobRecord.objects.get(pk=squatter.job_id).state == "todo"


@pytest.fixture
def connections_pair() -> Iterator[list[psycopg.Connection[Any]]]:
    conns = [psycopg.connect(**connector_params("default"), autocommit=True) for _ in range(2)]
    try:
        yield conns
    finally:
        for conn in conns:
            conn.close()


def test_two_racing_claimers_never_claim_the_same_job_nor_two_of_one_lock(
    connections_pair: list[psycopg.Connection[Any]],
) -> None:
    ids = [insert(lock=f"L{n % 7}" if n % 3 == 0 else None, priority=n % 4) for n in range(300)]
    claimed: list[list[int]] = [[], []]
    overlaps: list[str] = []

    def claimer(index: int) -> None:
        conn = connections_pair[index]
        row = conn.execute("INSERT INTO procrastinate_workers DEFAULT VALUES RETURNING id").fetchone()
        assert row is not None
        worker_id = row[0]
        idle = 0
        while idle < 3:
            try:
                rows = [row for row in conn.execute(transitions.CLAIM, {"queues": None, "n": 4, "worker_id": worker_id})
                        if row[0] is not None]
            except psycopg.errors.UniqueViolation:
                continue  # two heads of one lock from two snapshots: the index refused ours
            if not rows:
                idle += 1
                continue
            idle = 0
            locks = [row[4] for row in rows if row[4] is not None]
            if len(locks) != len(set(locks)):
                overlaps.append(f"one claim took two jobs of a lock: {rows}")
            claimed[index] += [row[0] for row in rows]
            now = dt.datetime.now(dt.UTC)
            endings = [recording.succeeded(recording.Claimed(*row[:9]), now, "null") for row in rows]
            done = conn.execute(transitions.END_ATTEMPTS, finish_params(endings, worker_id=worker_id,
                                                                  worker_name=f"racer-{index}")).fetchall()
            if len(done) != len(rows):
                overlaps.append(f"finished {len(done)} of {len(rows)}")

    threads = [threading.Thread(target=claimer, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not overlaps
    assert not set(claimed[0]) & set(claimed[1])
    assert sorted(claimed[0] + claimed[1]) == sorted(ids)
    assert claimed[0]
    assert claimed[1]
