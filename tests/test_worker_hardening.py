# ruff: noqa: F811  (pytest fixtures imported from tests/worker_fixtures.py are redefined as arguments)
"""One job must not hurt its neighbours (hardening items 13–17), with real worker processes."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable

import pytest

from jobs import services
from jobs.testing import run_jobs
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


def attempts_of(job_id: int) -> list[tuple[str, str]]:
    return [(row[0], row[1]) for row in query(
        "SELECT outcome, error_type FROM skiplock_job_attempt WHERE job_id = %s ORDER BY number", [job_id]
    )]


def charged(job_id: int) -> int:
    return int(scalar("SELECT attempts FROM procrastinate_jobs WHERE id = %s", [job_id]))


def test_exit_or_keyboard_interrupt_in_a_task_fails_that_job_and_the_worker_and_neighbours_go_on(
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker("exits", processes=1, concurrency=3)
    (pid,) = worker.wait_ready()
    neighbour = defer("slow_job", seconds=2.0)
    wait_for(lambda: scalar("SELECT count(*) FROM wtest_started WHERE job_id = %s", [neighbour]), timeout=30,
             what="the neighbour to start")
    exiting = [defer("exits", code=3), defer("exits", kind="interrupt"), defer("aexits")]

    wait_for(lambda: all(state_of(job) == "failed" for job in exiting), timeout=60, what="the exiting jobs to fail")
    # Each is that job's failure, retried by its policy (one retry), never an abort of the worker.
    assert attempts_of(exiting[0]) == [("retried", "SystemExit"), ("failed", "SystemExit")]
    assert attempts_of(exiting[1]) == [("retried", "KeyboardInterrupt"), ("failed", "KeyboardInterrupt")]
    assert attempts_of(exiting[2]) == [("retried", "SystemExit"), ("failed", "SystemExit")]
    wait_for(lambda: state_of(neighbour) == "succeeded", timeout=30, what="the neighbour to succeed")
    assert attempts_of(neighbour) == [("succeeded", "")]
    assert worker.child_pids() == [pid]  # the same worker process served them all
    assert worker.terminate() == 0


def test_run_jobs_does_not_let_a_tasks_system_exit_escape(worker_tables: None) -> None:
    job_id = defer("exits", code=5)
    run_jobs(queues=[QUEUE], include_scheduled=True)
    assert state_of(job_id) == "failed"
    assert attempts_of(job_id) == [("retried", "SystemExit"), ("failed", "SystemExit")]


def test_a_hard_limit_kill_requeues_the_neighbour_without_charging_it_an_attempt(
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker("hardlimit", processes=1, concurrency=2)
    worker.wait_ready()
    neighbour = defer("slow_job", seconds=6.0)
    wait_for(lambda: scalar("SELECT count(*) FROM wtest_started WHERE job_id = %s", [neighbour]), timeout=30,
             what="the neighbour to start")
    runaway = defer("runaway")  # a loop in C: only killing its process stops it
    wait_for(lambda: attempts_of(runaway), timeout=60, what="the runaway job to be killed")
    assert attempts_of(runaway)[0] == ("timed_out", "HardTimeLimitExceeded")

    # The neighbour ran in the killed process: back in the queue, not lost, no attempt charged.
    assert attempts_of(neighbour)[0] == ("requeued", "WorkerLost")
    message = scalar("SELECT error_message FROM skiplock_job_attempt WHERE job_id = %s AND number = 1", [neighbour])
    assert "hard time limit" in message
    assert "without using up a retry" in message
    wait_for(lambda: state_of(neighbour) == "succeeded", timeout=60, what="the neighbour to run again")
    # (The runaway's retry may kill it once more: each time it is requeued, never lost nor charged.)
    *requeues, last = attempts_of(neighbour)
    assert requeues
    assert set(requeues) == {("requeued", "WorkerLost")}
    assert last == ("succeeded", "")
    assert charged(neighbour) == 1  # only the attempt that succeeded
    wait_for(lambda: state_of(runaway) == "failed", timeout=60, what="the runaway job to fail for good")
    assert worker.terminate() == 0


def test_stalled_jobs_are_taken_back_by_a_worker_whose_every_slot_is_busy(
    start_worker: Callable[..., WorkerProcess],
) -> None:
    busy = start_worker("busy", processes=1, concurrency=1)
    busy.wait_ready()
    long_job = defer("slow_job", seconds=40.0)
    wait_for(lambda: scalar("SELECT count(*) FROM wtest_started WHERE job_id = %s", [long_job]), timeout=30,
             what="the long job to fill the busy worker's only slot")

    doomed = start_worker("doomed-busy", processes=1, concurrency=1)
    doomed.wait_ready()
    orphan = defer("slow_job", seconds=30.0)
    wait_for(lambda: scalar("SELECT count(*) FROM wtest_started WHERE job_id = %s", [orphan]), timeout=30,
             what="the doomed worker to start its job")
    doomed.kill_all()
    died_at = time.monotonic()

    # SKIPLOCK_STALLED_AFTER is 4 s and the heartbeat 0.5 s in these tests; maintenance jobs cannot
    # run (the only live slot is busy for 40 s), so only the worker's own loop can take it back.
    wait_for(lambda: attempts_of(orphan), timeout=20, what="the orphan to be taken back")
    assert time.monotonic() - died_at < 20
    assert attempts_of(orphan) == [("lost", "WorkerLost")]
    assert state_of(orphan) == "todo"
    assert state_of(long_job) == "doing"
    message = scalar("SELECT error_message FROM skiplock_job_attempt WHERE job_id = %s", [orphan])
    assert "stopped heartbeating for more than 4 s" in message
    assert busy.terminate() == 0


def test_a_job_waiting_behind_a_lock_is_woken_by_the_holders_finish_not_by_polling(
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # Polling every 30 s: within the 20 s this test waits, only the notification can start the waiter.
    worker = start_worker("handover", processes=1, concurrency=2, env={"SKIPLOCK_FETCH_POLL_INTERVAL": "30"})
    worker.wait_ready()
    time.sleep(0.5)  # let its LISTEN connection settle
    holder = defer("hold_lock", resource="deploy", seconds=1.0)
    wait_for(lambda: state_of(holder) == "doing", timeout=20, what="the holder to start (insert notification)")
    waiter = defer("hold_lock", resource="deploy", seconds=0.0)
    wait_for(lambda: state_of(holder) == "succeeded", timeout=20, what="the holder to finish")
    wait_for(lambda: state_of(waiter) == "succeeded", timeout=20, what="the waiter to run after the hand-over")
    gap = scalar(
        "SELECT extract(epoch FROM w.at - (SELECT finished_at FROM skiplock_job WHERE job_id = %s)) "
        "FROM wtest_started w WHERE w.job_id = %s", [holder, waiter],
    )
    print(f"lock hand-over: the waiter started {float(gap) * 1000:.0f} ms after the holder finished")
    assert worker.terminate() == 0


def test_the_supervisor_says_a_child_it_saw_die_died(start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker("seen-dying", processes=1, concurrency=1)
    (pid,) = worker.wait_ready()
    job_id = defer("slow_job", seconds=2.0)
    wait_for(lambda: scalar("SELECT count(*) FROM wtest_started WHERE job_id = %s", [job_id]), timeout=30,
             what="the job to start")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: attempts_of(job_id), timeout=30, what="the job to be taken back")
    message = str(scalar("SELECT error_message FROM skiplock_job_attempt WHERE job_id = %s", [job_id]))
    assert f"(pid {pid}) died (signal 9)" in message, message
    assert "e+09" not in message
    assert "heartbeating" not in message
    assert worker.terminate() == 0


def test_a_retried_failure_logs_one_warning_line_and_the_final_failure_an_error_with_traceback(
    worker_tables: None, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="jobs.worker")
    job_id = defer("exits", code=7)
    run_jobs(queues=[QUEUE], include_scheduled=True)
    assert state_of(job_id) == "failed"
    lines = [r for r in caplog.records if r.name == "jobs.worker" and f"job {job_id} " in r.getMessage()]
    assert [(r.levelname, r.exc_info is not None) for r in lines] == [("WARNING", False), ("ERROR", True)]
    assert "retrying in" in lines[0].getMessage()
    assert "\n" not in lines[0].getMessage()
    assert "(final)" in lines[1].getMessage()
