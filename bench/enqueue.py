"""Enqueue rate: one job per call (each its own commit), and batches of 1,000 per call, no worker running.
Each run stops at its job count or after `enqueue_seconds`, whichever comes first.

Skiplock: jobs.services.job_defer / job_defer_batch (validation, job records by trigger);
bare procrastinate: task.defer / task.batch_defer on a plain App; Celery: task.delay / 1,000 apply_async
through one producer (Celery has no bulk publish); SQL limit: pgbench, one INSERT per transaction, or INSERT … SELECT of 1,000 rows.
Over HTTP (POST /api/jobs, /api/jobs/batch): see bench/api.py.
"""

from __future__ import annotations

import time
from typing import Any

from bench import celery_client, sqlloop
from bench.common import Bench, log, summary
from bench.systems import ProcrastinateSystem, SkiplockSystem, System


def measure(bench: Bench, system: System) -> dict[str, Any]:
    size = bench.size
    single: list[float] = []
    batch: list[float] = []
    system.defer_one("bench_noop")  # connect before timing
    for _ in range(size.runs):
        system.reset()
        start = time.perf_counter()
        deadline = start + size.enqueue_seconds
        done = 0
        while done < size.enqueue_single and (done < 10 or time.perf_counter() < deadline):
            system.defer_one("bench_noop")
            done += 1
        single.append(done / (time.perf_counter() - start))
        system.reset()
        start = time.perf_counter()
        deadline = start + size.enqueue_seconds
        batches = 0
        while batches < size.enqueue_batches and (batches == 0 or time.perf_counter() < deadline):
            system.defer_batch("bench_noop", 1000)
            batches += 1
        batch.append(batches * 1000 / (time.perf_counter() - start))
        if system.remaining() != batches * 1000:
            raise RuntimeError(f"{system.label}: the batches did not all land")
    system.reset()
    return {"single": summary(single), "batch": summary(batch)}


def run(bench: Bench, systems: list[str] | None = None) -> dict[str, Any]:
    size = bench.size
    wanted = systems or ["skiplock", "procrastinate", "celery", "celery_backend", "sql"]
    out: dict[str, Any] = {"single_jobs": size.enqueue_single, "batches": size.enqueue_batches}
    if "skiplock" in wanted:
        log("enqueue Skiplock")
        skiplock = SkiplockSystem(bench.target)
        try:
            out["skiplock"] = measure(bench, skiplock)
        finally:
            skiplock.close()
    if "procrastinate" in wanted:
        log("enqueue bare procrastinate")
        system = ProcrastinateSystem(bench.target)
        system.setup()
        try:
            out["procrastinate"] = measure(bench, system)
        finally:
            system.close()
    for name, backend, label in celery_client.SYSTEMS:
        if name in wanted and bench.has_celery:
            log(f"enqueue {label}")
            out[name] = celery_client.run(
                bench, "enqueue", backend=backend, single=size.enqueue_single, batches=size.enqueue_batches,
                runs=size.runs, seconds=size.enqueue_seconds,
            )
    if "sql" in wanted and bench.has_pgbench:
        log("enqueue SQL insert loop")
        sqlloop.setup(bench)
        out["sql"] = {
            "single": summary([sqlloop.insert_rate(bench, batch=False) for _ in range(size.runs)]),
            "batch": summary([sqlloop.insert_rate(bench, batch=True) for _ in range(size.runs)]),
        }
    return out
