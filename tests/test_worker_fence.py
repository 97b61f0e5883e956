# ruff: noqa: F811  (pytest fixtures imported from tests/worker_fixtures.py are redefined as arguments)
"""A written-off attempt changes nothing: every write made for an attempt is fenced on (job, worker, attempts).

The issue's reproduction, with real processes: a worker frozen with SIGSTOP past
SKIPLOCK_STALLED_AFTER has its job taken back and run again elsewhere; when it is resumed, its
old attempt's late progress, error and attempt row must leave the job as the new attempt left it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection

from jobs import recording, services, transitions
from jobs.worker import finish_params
from tests.worker_fixtures import (  # noqa: F401  (fixtures)
    QUEUE,
    WorkerProcess,
    query,
    scalar,
    start_worker,
    wait_for,
    worker_tables,
)

pytestmark = pytest.mark.django_db(transaction=True)

SIDE = ("SELECT progress, step, progress_at, result, error_type, error_message, error_traceback, finished_at, "
        "worker_name, started_at FROM skiplock_job WHERE job_id = %s")
ATTEMPTS = ("SELECT number, worker_name, outcome, error_type, error_message, started_at, finished_at "
            "FROM skiplock_job_attempt WHERE job_id = %s ORDER BY number")


def queue_row(job_id: int) -> tuple[Any, ...]:
    return query("SELECT status, attempts, worker_id, abort_requested FROM procrastinate_jobs WHERE id = %s",
                 [job_id])[0]


@pytest.mark.slow
def test_a_worker_frozen_past_the_stall_timeout_then_resumed_changes_nothing(
    start_worker: Callable[..., WorkerProcess],
) -> None:
    frozen = start_worker("frozen", processes=1, concurrency=1)
    (pid,) = frozen.wait_ready()
    job_id = services.job_defer(task_name="stubborn", args={"seconds": 8.0}, queue=QUEUE).job_id
    wait_for(lambda: (scalar("SELECT progress FROM skiplock_job WHERE job_id = %s", [job_id]) or 0) > 0,
             timeout=30, what="the first run to report progress")
    os.kill(pid, signal.SIGSTOP)
    try:
        rescuer = start_worker("rescuer", processes=1, concurrency=1)
        rescuer.wait_ready()
        # Taken back after SKIPLOCK_STALLED_AFTER (4 s in tests), then run again by the rescuer.
        wait_for(lambda: scalar("SELECT state FROM skiplock_job_view WHERE job_id = %s", [job_id]) == "succeeded",
                 timeout=60, what="the job to be taken back and succeed on the rescuer")
        after_rescue = (query(SIDE, [job_id]), query(ATTEMPTS, [job_id]), queue_row(job_id))
    finally:
        os.kill(pid, signal.SIGCONT)

    # The frozen run goes on: more progress, then its error (or it notices it was written off).
    wait_for(lambda: scalar("SELECT count(*) FROM wtest_runs WHERE job_id = %s AND token = 'attempt-1-ended'",
                            [job_id]), timeout=60, what="the frozen run to end")
    time.sleep(1.5)  # its heartbeat, its flush window and any late write: let them all happen

    assert (query(SIDE, [job_id]), query(ATTEMPTS, [job_id]), queue_row(job_id)) == after_rescue
    side = query(SIDE, [job_id])[0]
    result = json.loads(side[3]) if isinstance(side[3], str) else side[3]
    assert result["run"] == 2  # the rescuer's result
    assert (side[0], side[4]) == (100, "")  # its progress and no error
    outcomes = [(row[1], row[2]) for row in query(ATTEMPTS, [job_id])]
    assert outcomes == [("frozen", "lost"), ("rescuer", "succeeded")]
    # The resumed worker noticed and registered again under a new id: its old fence matches nothing.
    assert "registering again" in frozen.output()
    assert frozen.terminate() == 0
    assert rescuer.terminate() == 0


def _claim(worker_id: int) -> recording.Claimed:
    with connection.cursor() as cursor:
        cursor.execute(transitions.CLAIM, {"queues": [QUEUE], "n": 1, "worker_id": worker_id})
        (row,) = cursor.fetchall()
    return recording.Claimed(*row[:9])


def _late_writes(claimed: recording.Claimed, worker_id: int) -> tuple[int, int]:
    """What a written-off attempt would still send: a progress write and a failure."""
    now = dt.datetime.now(dt.UTC)
    with connection.cursor() as cursor:
        cursor.execute(transitions.WRITE_PROGRESS, {"job_id": claimed.id, "worker_id": worker_id,
                                                    "attempts": claimed.attempts, "progress": 77, "step": "late"})
        progress_rows = int(cursor.fetchone()[1])
        ending = recording.Ending(job=claimed, status="failed", outcome="failed", started_at=now,
                                  error_type="JobAborted", error_message="late error", traceback="tb")
        cursor.execute(transitions.END_ATTEMPTS, finish_params([ending], worker_id=worker_id, worker_name="old"))
        finished_rows = len(cursor.fetchall())
    return progress_rows, finished_rows


def test_late_progress_and_outcome_of_a_taken_back_attempt_match_nothing(worker_tables: None) -> None:
    job_id = services.job_defer(task_name="plain", args={"n": 1}, queue=QUEUE).job_id
    old, new = (int(scalar("INSERT INTO procrastinate_workers DEFAULT VALUES RETURNING id")) for _ in range(2))
    first = _claim(old)
    transitions.recover_stalled(stalled_after=60, worker_ids=[old])  # the old worker looked dead
    second = _claim(new)
    assert (first.id, first.attempts) == (second.id, second.attempts)  # a lost run uses no retry…

    # …so only the worker in the fence tells the attempts apart: while the new attempt runs,
    before = (query(SIDE, [job_id]), query(ATTEMPTS, [job_id]), queue_row(job_id))
    assert _late_writes(first, old) == (0, 0)
    assert (query(SIDE, [job_id]), query(ATTEMPTS, [job_id]), queue_row(job_id)) == before

    # …and after it ended.
    with connection.cursor() as cursor:
        ending = recording.succeeded(second, dt.datetime.now(dt.UTC), '{"ok": true}')
        cursor.execute(transitions.END_ATTEMPTS, finish_params([ending], worker_id=new, worker_name="new"))
        assert len(cursor.fetchall()) == 1
    done = (query(SIDE, [job_id]), query(ATTEMPTS, [job_id]), queue_row(job_id))
    assert _late_writes(first, old) == (0, 0)
    assert (query(SIDE, [job_id]), query(ATTEMPTS, [job_id]), queue_row(job_id)) == done
    assert done[2][:2] == ("succeeded", 1)
    assert [row[2] for row in done[1]] == ["lost", "succeeded"]
