"""End to end: N jobs enqueued one by one (one commit each) into a running worker (concurrency 4, one process).

Rate = N / (time from the first enqueue call until the last job finished); also how long the
worker needed after the last enqueue returned (its backlog).
"""

from __future__ import annotations

import time
from typing import Any

from bench import celery_client
from bench.common import Bench, Processes, log, summary
from bench.systems import ProcrastinateSystem, SkiplockSystem, System

CONCURRENCY = 4


def measure(bench: Bench, system: System, procs: Processes | None = None) -> dict[str, Any]:
    """Against `procs` if given (workers already running), else against workers of its own."""
    size = bench.size
    own = procs is None
    system.reset()
    if procs is None:
        procs = system.start_workers(CONCURRENCY, 1)
    rates: list[float] = []
    lags: list[float] = []
    began = time.monotonic()
    try:
        for _ in range(size.runs):
            if rates and time.monotonic() - began > size.e2e_budget_seconds:
                break  # a slow machine: fewer runs rather than an unbounded suite
            system.reset()
            t0 = time.monotonic()
            for _ in range(size.e2e_jobs):
                system.defer_one("bench_noop")
            t_enqueued = time.monotonic()
            t1 = system.wait_drained(procs, timeout=600)
            rates.append(size.e2e_jobs / (t1 - t0))
            lags.append((t1 - t_enqueued) * 1000)
        if system.failures():
            raise RuntimeError(f"{system.label}: some jobs did not succeed")
    finally:
        if own:
            procs.stop()
    return {"rate": summary(rates), "drain_after_last_enqueue_ms": summary(lags, digits=1)}


def run(bench: Bench, systems: list[str] | None = None) -> dict[str, Any]:
    size = bench.size
    wanted = systems or ["skiplock", "procrastinate", "celery", "celery_backend"]
    out: dict[str, Any] = {"jobs": size.e2e_jobs, "concurrency": CONCURRENCY}
    if "skiplock" in wanted:
        log("end-to-end Skiplock")
        skiplock = SkiplockSystem(bench.target)
        try:
            out["skiplock"] = measure(bench, skiplock)
        finally:
            skiplock.close()
    if "procrastinate" in wanted:
        log("end-to-end bare procrastinate")
        system = ProcrastinateSystem(bench.target)
        system.setup()
        out["procrastinate"] = measure(bench, system)
        system.close()
    for name, backend, label in celery_client.SYSTEMS:
        if name in wanted and bench.has_celery:
            log(f"end-to-end {label}")
            out[name] = celery_client.run(bench, "e2e", backend=backend, concurrency=CONCURRENCY,
                                          jobs=size.e2e_jobs, runs=size.runs,
                                          budget=size.e2e_budget_seconds)
    return out
