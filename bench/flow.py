"""Claim rate with flow control configured on another queue, beside the rate without it.

Both sides hold the same 2,000 jobs on two other queues that no worker may run now. Without flow
control (one side) they are scheduled an hour ahead; with it (the other) they are due but held:
queue `bench-limited` has a concurrency limit and a rate limit, and its 1,000 jobs are of a task
with a per-key limit (20 keys, none admitted: their rate windows are spent), and queue
`bench-paused` is paused with its 1,000 jobs. So the difference is what flow control costs a
claim, not what 2,000 more rows in the queue table cost (any waiting job costs that). Both sides drain the
same no-op jobs on `default` with the same warm workers, alternately, `runs` times each, twice:
- workers serving `default` (their own queue, as a deployment runs a worker per queue family):
  the limits elsewhere should cost nothing; this is issue 15's target;
- workers serving every queue (`manage.py worker` without --queues): each claim also checks the
  limits that have jobs waiting, and its index scan in claim order steps over the waiting rows it
  may not take (2,000 here, ahead of the no-op jobs).
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
    """The 2,000 jobs on the other queues, held by flow control (on) or scheduled later (off)."""
    from django.db import connection, transaction

    from jobs import queues
    from jobs.services import DeferRequest, job_defer_batch

    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM procrastinate_jobs WHERE queue_name IN ('bench-limited', 'bench-paused')")
        cursor.execute("DELETE FROM skiplock_queue")
        cursor.execute("DELETE FROM skiplock_limit")
    later = None if on else 3600.0
    with transaction.atomic():  # one commit: no worker sees the jobs before their windows are spent
        if on:
            queues.set_queue_limits("bench-limited", concurrency=2, rate_limit=1, rate_period=3600)
            queues.pause_queue("bench-paused")
        job_defer_batch(requests=[
            DeferRequest(task_name="bench_limited", args={"key": n % 20}, queue="bench-limited", delay_seconds=later)
            for n in range(LIMITED_JOBS)
        ])
        job_defer_batch(requests=[DeferRequest(task_name="bench_noop", queue="bench-paused", delay_seconds=later)
                                  for _ in range(LIMITED_JOBS)])
        with connection.cursor() as cursor:
            if not on:
                # Scheduled later and not limited: only the flow-control columns and rows differ.
                cursor.execute("UPDATE procrastinate_jobs SET skiplock_limit_key = NULL WHERE queue_name = 'bench-limited'")
                cursor.execute("DELETE FROM skiplock_limit")
                return
            # Every key's window already spent: the limited jobs stay waiting through the measurement.
            cursor.execute("UPDATE skiplock_limit SET starts = ARRAY[now()]")
            cursor.execute("UPDATE skiplock_queue SET starts = ARRAY[now()] WHERE name = 'bench-limited'")


def drain_rate(system: SkiplockSystem, procs: Any, n: int) -> float:
    t0 = system.fill("bench_noop", n)
    t1 = wait_until(lambda: remaining(system) == 0, timeout=max(60.0, n / 10), interval=0.01,
                    what="the default queue to drain", check=procs.check_alive)
    return n / (t1 - t0)


def alternate(bench: Bench, system: SkiplockSystem, queues: list[str] | None) -> dict[str, Any]:
    """Drains with nothing steered and with the other queues steered, alternately, on one set of workers."""
    size = bench.size
    system.reset()  # the warm-up drains the whole queue table
    procs = system.start_workers(CONCURRENCY, 1, queues=queues)
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
                log(f"flow ({'default' if queues else 'every queue'}): {side:3} {rate:,.0f} jobs/s")
                n = int(min(size.max_jobs, max(size.min_jobs, rate * size.drain_seconds)))
        waiting = system.monitor().execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE queue_name IN ('bench-limited', 'bench-paused') "
            "AND status = 'todo'").fetchone()[0]
    finally:
        procs.stop()
    off, on = summary(rates["off"]), summary(rates["on"])
    return {
        "limited_jobs_waiting": int(waiting), "rate_without_flow_control": off, "rate_with_limits_elsewhere": on,
        "ratio": round(on["median"] / off["median"], 3) if off["median"] else None,
    }


def run(bench: Bench) -> dict[str, Any]:
    system = SkiplockSystem(bench.target)
    system.reset()
    own = alternate(bench, system, ["default"])
    every = alternate(bench, system, None)
    return {"concurrency": CONCURRENCY, "processes": 1, **own, "every_queue": every}
