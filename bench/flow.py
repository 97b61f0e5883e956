"""Claim rate with flow control configured on another queue, beside the rate without it.

The workers serve every queue (as `manage.py worker` does by default). One side: no queue is
steered. The other: queue `bench-limited` has a concurrency limit and a rate limit, 1,000 jobs of
a task with a per-key limit wait there (20 keys, none admitted: their rate window is spent), and
queue `bench-paused` is paused with 1,000 jobs waiting. Each claim then checks the limits that
have jobs waiting (their room), and skips the paused and limited rows. Both sides drain the same
no-op jobs on `default` with the same warm workers, alternately, `runs` times each.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import Bench, log, summary, wait_until
from bench.systems import SkiplockSystem

CONCURRENCY = 16
LIMITED_JOBS = 1_000


def remaining(system: SkiplockSystem) -> int:
    row = system.monitor().execute(
        "SELECT count(*) FROM procrastinate_jobs WHERE queue_name = 'default' AND status IN ('todo', 'doing')"
    ).fetchone()
    return int(row[0])


def configure(system: SkiplockSystem, on: bool) -> None:
    """Steer the other queues (on) or leave nothing steered (off)."""
    from django.db import connection, transaction

    from jobs import queues
    from jobs.services import DeferRequest, job_defer_batch

    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM procrastinate_jobs WHERE queue_name IN ('bench-limited', 'bench-paused')")
        cursor.execute("DELETE FROM skiplock_queue")
        cursor.execute("DELETE FROM skiplock_limit")
    if not on:
        return
    queues.set_queue_limits("bench-limited", concurrency=2, rate_limit=1, rate_period=3600)
    queues.pause_queue("bench-paused")
    with transaction.atomic():
        job_defer_batch(requests=[
            DeferRequest(task_name="bench_limited", args={"key": n % 20}, queue="bench-limited")
            for n in range(LIMITED_JOBS)
        ])
        job_defer_batch(requests=[DeferRequest(task_name="bench_noop", queue="bench-paused") for _ in range(LIMITED_JOBS)])
    with connection.cursor() as cursor:
        # Every key's window already spent: the limited jobs stay waiting through the measurement.
        cursor.execute("UPDATE skiplock_limit SET starts = ARRAY[now()]")
        cursor.execute("UPDATE skiplock_queue SET starts = ARRAY[now()] WHERE name = 'bench-limited'")


def drain_rate(system: SkiplockSystem, procs: Any, n: int) -> float:
    t0 = system.fill("bench_noop", n)
    t1 = wait_until(lambda: remaining(system) == 0, timeout=max(60.0, n / 10), interval=0.01,
                    what="the default queue to drain", check=procs.check_alive)
    return n / (t1 - t0)


def run(bench: Bench) -> dict[str, Any]:
    size = bench.size
    system = SkiplockSystem(bench.target)
    system.reset()
    configure(system, on=False)
    procs = system.start_workers(CONCURRENCY, 1)
    rates: dict[str, list[float]] = {"off": [], "on": []}
    try:
        n = 2_000
        for _ in range(size.runs):
            for side in ("off", "on"):
                configure(system, on=side == "on")
                system.monitor().execute("DELETE FROM procrastinate_jobs WHERE queue_name = 'default'")
                time.sleep(0.2)
                rate = drain_rate(system, procs, n)
                rates[side].append(rate)
                log(f"flow: {side:3} {rate:,.0f} jobs/s")
                n = int(min(size.max_jobs, max(size.min_jobs, rate * size.drain_seconds)))
        waiting = system.monitor().execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE queue_name IN ('bench-limited', 'bench-paused') "
            "AND status = 'todo'").fetchone()[0]
    finally:
        procs.stop()
        configure(system, on=False)
    off, on = summary(rates["off"]), summary(rates["on"])
    return {
        "concurrency": CONCURRENCY, "processes": 1, "limited_jobs_waiting": int(waiting),
        "rate_without_flow_control": off, "rate_with_limits_elsewhere": on,
        "ratio": round(on["median"] / off["median"], 3) if off["median"] else None,
    }
