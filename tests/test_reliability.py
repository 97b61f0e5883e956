# ruff: noqa: F811  (pytest fixtures imported from tests/worker_fixtures.py are redefined as arguments)
"""The reliability contract (SPEC §8) with real worker processes: 2 processes × 4 jobs at a time.

`record_run` claims its job in a table keyed by job id while it runs (a second concurrent run
could not claim it and is counted as an overlap) and appends one row per finished run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from django.db import connection

from jobs import services
from jobs.services import DeferRequest
from tests.worker_fixtures import (  # noqa: F401  (fixtures)
    LOG_DIR,
    QUEUE,
    WorkerProcess,
    query,
    scalar,
    start_worker,
    wait_for,
    worker_tables,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def defer_many(count: int, *, work_ms: int = 5) -> list[int]:
    ids: list[int] = []
    for start in range(0, count, 500):
        batch = [DeferRequest(task_name="record_run", args={"work_ms": work_ms}, queue=QUEUE)
                 for _ in range(min(500, count - start))]
        ids += [job.job_id for job in services.job_defer_batch(requests=batch)]
    return ids


def finished(ids: list[int]) -> int:
    return int(scalar(
        "SELECT count(*) FROM skiplock_job_view WHERE job_id = ANY(%s) AND state IN ('succeeded', 'failed')", [ids]
    ))


def summary(ids: list[int]) -> dict[str, int]:
    states = dict(query("SELECT state, count(*) FROM skiplock_job_view WHERE job_id = ANY(%s) GROUP BY state", [ids]))
    return {
        "jobs": len(ids),
        "succeeded": int(states.get("succeeded", 0)),
        "attempts": int(scalar("SELECT count(*) FROM skiplock_job_attempt WHERE job_id = ANY(%s)", [ids])),
        "runs": int(scalar("SELECT count(*) FROM wtest_runs WHERE job_id = ANY(%s)", [ids])),
        "jobs_run_more_than_once": int(scalar(
            "SELECT count(*) FROM (SELECT job_id FROM wtest_runs WHERE job_id = ANY(%s) "
            "GROUP BY job_id HAVING count(*) > 1) x", [ids])),
        "concurrent_duplicates": int(scalar("SELECT count(*) FROM wtest_overlaps WHERE job_id = ANY(%s)", [ids])),
        "still_claimed": int(scalar("SELECT count(*) FROM wtest_running WHERE job_id = ANY(%s)", [ids])),
    }


def test_1000_jobs_on_2_processes_x_4_without_faults_each_run_exactly_once(
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker("steady", processes=2, concurrency=4)
    worker.wait_ready()
    ids = defer_many(1000)
    wait_for(lambda: finished(ids) == 1000, timeout=240, interval=0.5, what="1000 jobs to finish")
    result = summary(ids)
    assert result == {
        "jobs": 1000, "succeeded": 1000, "attempts": 1000, "runs": 1000,
        "jobs_run_more_than_once": 0, "concurrent_duplicates": 0, "still_claimed": 0,
    }
    # Both processes took part.
    assert scalar("SELECT count(DISTINCT pid) FROM wtest_runs WHERE job_id = ANY(%s)", [ids]) == 2
    assert worker.terminate() == 0


def test_postgresql_restart_while_2000_jobs_run_on_2_processes_x_4_loses_nothing(
    start_worker: Callable[..., WorkerProcess], embedded_postgres: object,
) -> None:
    from project.embedded_postgres import EmbeddedPostgres

    if not isinstance(embedded_postgres, EmbeddedPostgres):
        pytest.skip("needs the embedded test cluster to restart it")
    # As in production, the stall timeout (300 s by default) is longer than a restart.
    worker = start_worker("outage", processes=2, concurrency=4, env={"SKIPLOCK_STALLED_AFTER": "30"})
    worker.wait_ready()
    ids = defer_many(2000)
    started = time.monotonic()
    wait_for(lambda: finished(ids) >= 400, timeout=120, interval=0.2, what="400 jobs to finish before the restart")
    done_before = finished(ids)
    connection.close()
    restart_began = time.monotonic()
    embedded_postgres.restart()  # fast shutdown: every connection is dropped, then the server comes back
    restart_seconds = time.monotonic() - restart_began

    wait_for(lambda: finished(ids) == 2000, timeout=300, interval=0.5, what="all 2000 jobs to finish")
    duration = time.monotonic() - started
    result = summary(ids)
    figures = {**result, "done_before_restart": done_before, "restart_seconds": round(restart_seconds, 2),
               "duration_seconds": round(duration, 1), "retries": result["attempts"] - result["jobs"]}
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    (LOG_DIR / "restart-figures.json").write_text(json.dumps(figures, indent=2))
    print("restart test figures:", json.dumps(figures))

    assert result["succeeded"] == 2000  # none lost, none failed
    assert result["concurrent_duplicates"] == 0  # none ran twice at the same time
    assert result["still_claimed"] == 0
    assert result["runs"] >= 2000
    assert worker.process.poll() is None  # no crash loop: the supervisor and its processes lived on
    assert worker.terminate() == 0


def test_repeated_worker_kills_lose_no_job_and_never_run_one_twice_at_once(
    start_worker: Callable[..., WorkerProcess],
) -> None:
    import os
    import signal

    worker = start_worker("battered", processes=2, concurrency=4)
    worker.wait_ready()
    ids = defer_many(300, work_ms=30)
    for threshold in (50, 150):
        def enough(threshold: int = threshold) -> bool:
            return finished(ids) >= threshold

        wait_for(enough, timeout=120, interval=0.2, what=f"{threshold} jobs to finish")
        victim = worker.child_pids()[0]
        os.kill(victim, signal.SIGKILL)  # mid-batch: it is running up to 4 jobs

        def replaced(victim: int = victim) -> bool:
            return victim not in worker.child_pids()

        wait_for(replaced, timeout=30, what="the kill to be noticed")
    wait_for(lambda: finished(ids) == 300, timeout=240, interval=0.5, what="all 300 jobs to finish")
    result = summary(ids)
    assert result["succeeded"] == 300
    assert result["concurrent_duplicates"] == 0
    lost = scalar("SELECT count(*) FROM skiplock_job_attempt WHERE job_id = ANY(%s) AND outcome = 'lost'", [ids])
    assert lost >= 1  # the killed processes were running jobs, taken back at once
    assert worker.process.poll() is None
    assert worker.terminate() == 0
