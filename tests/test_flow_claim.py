"""Flow control at claim time, with real worker processes: paused queues, concurrency and rate
limits across processes (issue 15's "Done when" counts)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from jobs import queues, services
from tests import flow_tasks
from tests.worker_fixtures import WorkerProcess, query, scalar, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

FLOW_ENV = {"SKIPLOCK_IMPORT_PATHS": "tests.flow_tasks"}


@pytest.fixture
def flow_tables(transactional_db: None) -> Iterator[None]:
    flow_tasks.empty_tables()
    yield
    flow_tasks.empty_tables()


@pytest.fixture
def start_workers(flow_tables: None) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(name: str, *, processes: int = 2, concurrency: int = 8, queues: str = "ftest") -> WorkerProcess:
        worker = WorkerProcess(name, processes=processes, concurrency=concurrency, env=FLOW_ENV, queues=queues)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


def most_at_once(label: str | None = None) -> int:
    """The most spans of `label` (of any label) open at the same instant (an end at t closes
    before a start at t)."""
    edges: list[tuple[dt.datetime, int]] = []
    for started, ended in query("SELECT started, ended FROM ftest_spans WHERE %s::text IS NULL OR label = %s",
                                [label, label]):
        edges += [(started, 1), (ended, -1)]
    running = peak = 0
    for _, step in sorted(edges):
        running += step
        peak = max(peak, running)
    return peak


def states(ids: list[int]) -> dict[str, int]:
    return dict(query("SELECT status::text, count(*) FROM procrastinate_jobs WHERE id = ANY(%s) GROUP BY 1", [ids]))


def defer(task_name: str, count: int, **args: Any) -> list[int]:
    requests = [services.DeferRequest(task_name=task_name, args=dict(args)) for _ in range(count)]
    return [job.job_id for job in services.job_defer_batch(requests=requests)]


def test_a_task_concurrency_limit_of_3_is_never_exceeded_by_2_processes_of_8_slots(
    start_workers: Callable[..., WorkerProcess],
) -> None:
    ids = defer("tests.flow.partner_call", 100, partner_id=7, work_ms=40)
    others = defer("tests.flow.partner_call", 20, partner_id=8, work_ms=40)
    start_workers("flow-conc").wait_ready()
    wait_for(lambda: states(ids + others) == {"succeeded": 120}, timeout=120, what="all 120 jobs to succeed")
    # Three at once for partner 7 — never four — and partner 8 had its own three meanwhile.
    assert most_at_once("partner:7") == 3
    assert most_at_once("partner:8") == 3
    # Every job ran exactly once.
    assert scalar("SELECT count(DISTINCT job_id) FROM ftest_spans") == 120
    assert scalar("SELECT count(*) FROM ftest_spans") == 120


def test_a_queue_concurrency_limit_set_at_run_time_holds_across_processes(
    start_workers: Callable[..., WorkerProcess],
) -> None:
    queues.set_queue_limits("ftest", concurrency=3, by="test")
    ids = defer("tests.flow.plain_call", 60, n=0, work_ms=40)
    start_workers("flow-qconc").wait_ready()
    wait_for(lambda: states(ids) == {"succeeded": 60}, timeout=120, what="all 60 jobs to succeed")
    assert most_at_once("plain:ftest") == 3
    # Lifted at run time: the rest of the queue runs as wide as the workers allow.
    queues.set_queue_limits("ftest", concurrency=None)
    more = defer("tests.flow.plain_call", 48, n=0, work_ms=300)
    wait_for(lambda: states(more) == {"succeeded": 48}, timeout=120, what="the next 48 jobs to succeed")
    assert most_at_once("plain:ftest") > 3


def test_a_rate_limit_of_20_per_2_seconds_holds_in_every_window_over_100_jobs(
    start_workers: Callable[..., WorkerProcess],
) -> None:
    ids = defer("tests.flow.rated_call", 100, n=0)
    start_workers("flow-rate").wait_ready()
    wait_for(lambda: states(ids) == {"succeeded": 100}, timeout=120, what="all 100 jobs to succeed")
    # The start of each job as the queue recorded it (procrastinate's `started` event, stamped in
    # the claiming transaction): no window of 2 s holds more than 20 of them.
    starts = sorted(row[0] for row in query(
        "SELECT at FROM procrastinate_events WHERE type = 'started' AND job_id = ANY(%s)", [ids]))
    assert len(starts) == 100
    window = dt.timedelta(seconds=2)
    busiest = max(sum(1 for t in starts[i:] if t < first + window) for i, first in enumerate(starts))
    assert busiest == 20
    # Waiting on the limit never failed a job, and the jobs took at least 4 full windows.
    assert starts[-1] - starts[0] >= 4 * window


def test_a_paused_queue_runs_nothing_until_resumed_and_keeps_accepting_jobs(
    start_workers: Callable[..., WorkerProcess],
) -> None:
    assert queues.pause_queue("ftest", by="test") is True
    assert queues.pause_queue("ftest") is False  # already paused: nothing changes
    ids = defer("tests.flow.plain_call", 10, n=0, work_ms=1)
    worker = start_workers("flow-pause")
    worker.wait_ready()
    limited = defer("tests.flow.partner_call", 5, partner_id=1, work_ms=1)  # limited jobs wait too
    # Several claim rounds go by (poll interval 0.5 s): nothing of the paused queue starts.
    wait_for(lambda: scalar("SELECT count(*) FROM skiplock_worker WHERE last_seen_at > now() - interval '1 s'"),
             timeout=10, what="the workers to heartbeat")
    time.sleep(2.5)
    assert states(ids + limited) == {"todo": 15}
    assert scalar("SELECT count(*) FROM ftest_spans") == 0
    info = queues.get_queue("ftest")
    assert info.paused
    assert info.depth["todo"] == 15
    assert queues.resume_queue("ftest", by="test") is True
    wait_for(lambda: states(ids + limited) == {"succeeded": 15}, timeout=30, what="the resumed queue to drain")


def test_pause_state_survives_a_restart_of_the_workers(start_workers: Callable[..., WorkerProcess]) -> None:
    queues.pause_queue("ftest", by="test")
    first = start_workers("flow-restart-1", processes=1, concurrency=2)
    first.wait_ready()
    assert first.terminate() == 0
    ids = defer("tests.flow.plain_call", 3, n=0, work_ms=1)
    second = start_workers("flow-restart-2", processes=1, concurrency=2)
    second.wait_ready()
    time.sleep(1.5)
    assert states(ids) == {"todo": 3}
    queues.resume_queue("ftest")
    wait_for(lambda: states(ids) == {"succeeded": 3}, timeout=30, what="the jobs to run after resume")


def test_a_job_under_both_a_queue_limit_and_a_task_limit_needs_room_in_both(flow_tables: None) -> None:
    from jobs.testing import WorkerThread

    queues.set_queue_limits("ftest", concurrency=4)
    ids = defer("tests.flow.partner_call", 16, partner_id=1, work_ms=60)
    ids += defer("tests.flow.partner_call", 16, partner_id=2, work_ms=60)
    with WorkerThread(queues=["ftest"], concurrency=8, name="flow-both"):
        wait_for(lambda: states(ids) == {"succeeded": 32}, timeout=60, what="all 32 jobs to succeed")
    assert most_at_once("partner:1") <= 3
    assert most_at_once("partner:2") <= 3
    assert most_at_once() == 4


def test_snooze_discard_and_expiry_with_worker_processes(start_workers: Callable[..., WorkerProcess]) -> None:
    snoozed = services.job_defer(task_name="tests.flow.snoozer", args={"times": 2, "seconds": 0.3}).job_id
    discarded = services.job_defer(task_name="tests.flow.discarder", args={"reason": "pointless now"}).job_id
    # Due only after its expiry: no worker ever runs it, and the maintenance tick ends it.
    expiring = services.job_defer(task_name="tests.flow.plain_call", args={"n": 1}, delay_seconds=1.5,
                                  expires_in=1.0).job_id
    start_workers("flow-ends").wait_ready()
    wait_for(lambda: states([snoozed, discarded, expiring]) == {"succeeded": 1, "discarded": 1, "expired": 1},
             timeout=60, what="the three jobs to end")
    assert query("SELECT attempts FROM procrastinate_jobs WHERE id = %s", [snoozed]) == [(1,)]
    assert [row[0] for row in query("SELECT outcome FROM skiplock_job_attempt WHERE job_id = %s ORDER BY number",
                                    [snoozed])] == ["snoozed", "snoozed", "succeeded"]
    assert query("SELECT error_message FROM skiplock_job WHERE job_id = %s", [discarded]) == [("pointless now",)]
    assert scalar("SELECT count(*) FROM ftest_spans WHERE job_id = %s", [expiring]) == 0


def test_a_limited_job_that_ends_wakes_the_workers_for_the_next_one(flow_tables: None) -> None:
    from jobs.testing import WorkerThread

    queues.set_queue_limits("ftest", concurrency=1)
    ids = defer("tests.flow.plain_call", 4, n=0, work_ms=50)
    # A poll every 60 s: only the wake-up that the end of each limited job sends gets the next one
    # claimed in time.
    with WorkerThread(queues=["ftest"], concurrency=4, name="flow-wake", poll_interval=60):
        wait_for(lambda: states(ids) == {"succeeded": 4}, timeout=20, what="the 4 jobs, one after another")
    assert most_at_once() == 1
