# ruff: noqa: F811  (pytest fixtures imported from tests/worker_fixtures.py are redefined as arguments)
"""The worker command with real processes and real signals: shutdown, crashes, time limits."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from jobs import services
from tests.worker_fixtures import (  # noqa: F401  (fixtures)
    QUEUE,
    WorkerProcess,
    query,
    scalar,
    start_worker,
    wait_for,
    worker_tables,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def defer(task_name: str, **args: object) -> int:
    return services.job_defer(task_name=task_name, args=args, queue=QUEUE).job_id


def state_of(job_id: int) -> str:
    return str(scalar("SELECT state FROM skiplock_job_view WHERE job_id = %s", [job_id]))


def attempts_of(job_id: int) -> list[tuple[int, str, str, str]]:
    return [tuple(row) for row in query(  # type: ignore[misc,unused-ignore]
        "SELECT number, outcome, error_type, worker_name FROM skiplock_job_attempt WHERE job_id = %s ORDER BY number",
        [job_id],
    )]


def test_sigkill_mid_job_the_job_runs_again_after_the_stall_timeout(
    start_worker: Callable[..., WorkerProcess],
) -> None:
    doomed = start_worker("doomed", concurrency=2)
    doomed.wait_ready()
    job_id = defer("slow_job", seconds=1.5)
    wait_for(lambda: scalar("SELECT count(*) FROM wtest_started WHERE job_id = %s", [job_id]), timeout=30,
             what="the job to start")
    doomed.kill_all()  # the whole worker dies (supervisor too): nobody is left to hand the job back
    assert state_of(job_id) == "doing"
    last_heartbeat = scalar(
        "SELECT w.last_heartbeat FROM procrastinate_workers w JOIN skiplock_worker s ON s.worker_id = w.id "
        "WHERE s.name = 'doomed'"
    )

    rescuer = start_worker("rescuer")
    rescuer.wait_ready()
    wait_for(lambda: state_of(job_id) == "succeeded", timeout=60, what="the job to succeed on the rescuer")
    # Taken back only once its worker had been silent for SKIPLOCK_STALLED_AFTER (4 s in tests).
    taken_back = scalar("SELECT finished_at FROM skiplock_job_attempt WHERE job_id = %s AND number = 1", [job_id])
    assert (taken_back - last_heartbeat).total_seconds() >= 4

    attempts = attempts_of(job_id)
    assert [(a[0], a[1], a[2]) for a in attempts] == [(1, "lost", "WorkerLost"), (2, "succeeded", "")]
    assert attempts[0][3] == "doomed"
    assert attempts[1][3] == "rescuer"
    assert scalar("SELECT count(*) FROM wtest_runs WHERE job_id = %s", [job_id]) == 1  # exactly one success
    assert rescuer.terminate() == 0


def test_sigterm_lets_a_short_job_finish_and_requeues_a_long_one_then_exits_0(
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker("graceful", concurrency=2, env={"SKIPLOCK_SHUTDOWN_GRACE": "2"})
    worker.wait_ready()
    short = defer("slow_job", seconds=1.0)
    long = defer("slow_job", seconds=60.0)
    wait_for(lambda: scalar("SELECT count(*) FROM wtest_started WHERE job_id = ANY(%s)", [[short, long]]) == 2,
             timeout=30, what="both jobs to start")
    stopped_at = time.monotonic()
    assert worker.terminate() == 0, worker.output()
    assert time.monotonic() - stopped_at < 2 + 10  # the grace period, plus the requeue and exit

    assert state_of(short) == "succeeded"
    assert state_of(long) == "todo"  # requeued, never lost
    assert [(a[0], a[1], a[2]) for a in attempts_of(long)] == [(1, "aborted", "WorkerShutdown")]
    assert scalar("SELECT count(*) FROM wtest_runs WHERE job_id = %s", [long]) == 0
    assert scalar("SELECT count(*) FROM procrastinate_workers") == 0  # unregistered


def test_a_child_killed_mid_job_is_replaced_and_its_job_taken_back_at_once(
    start_worker: Callable[..., WorkerProcess],
) -> None:
    import os

    worker = start_worker("phoenix", processes=1, concurrency=1)
    (pid,) = worker.wait_ready()
    job_id = defer("slow_job", seconds=1.0)
    wait_for(lambda: scalar("SELECT count(*) FROM wtest_started WHERE job_id = %s", [job_id]), timeout=30,
             what="the job to start")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: state_of(job_id) == "succeeded", timeout=90, what="the job to succeed after the restart")
    assert [(a[0], a[1]) for a in attempts_of(job_id)] == [(1, "lost"), (2, "succeeded")]
    assert worker.process.poll() is None  # the supervisor kept running
    assert pid not in worker.child_pids()
    assert worker.terminate() == 0


def test_a_runaway_cpu_loop_is_killed_at_its_hard_limit_and_the_worker_keeps_serving(
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker("limits", processes=2, concurrency=2)
    first_pids = set(worker.wait_ready())
    runaway = defer("runaway")
    wait_for(lambda: state_of(runaway) == "doing", timeout=30, what="the runaway job to start")
    others = [defer("record_run", work_ms=5) for _ in range(10)]

    wait_for(lambda: state_of(runaway) == "failed", timeout=120, what="the runaway job to fail")
    attempts = query(
        "SELECT outcome, error_type, error_message FROM skiplock_job_attempt WHERE job_id = %s ORDER BY number",
        [runaway],
    )
    # Its policy allows one retry: two attempts, each killed at the 2 s hard limit.
    assert [(a[0], a[1]) for a in attempts] == [("timed_out", "HardTimeLimitExceeded")] * 2
    assert all("hard time limit exceeded" in a[2] for a in attempts)
    record = query("SELECT error_type, error_message FROM skiplock_job WHERE job_id = %s", [runaway])[0]
    assert record[0] == "HardTimeLimitExceeded"
    assert "hard time limit exceeded" in record[1]

    wait_for(lambda: all(state_of(job) == "succeeded" for job in others), timeout=90, what="the other jobs")
    assert worker.process.poll() is None
    replaced = set(worker.wait_ready())  # the killed processes were replaced
    assert len(replaced) == 2
    assert replaced != first_pids
    assert worker.terminate() == 0
