"""Pickup latency on an idle worker: from the enqueue call to the task's first line, p50/p95/p99.

The workers (concurrency 4, one process) are warm and idle, woken by LISTEN/NOTIFY (Celery: BRPOP).
Each sample: note the wall time, enqueue one stamp task (one commit), and the task sends the wall
time it started over UDP; then a pause of 20–40 ms so the worker is idle again. The enqueue call's
own duration is part of the figure, as a caller experiences it.
"""

from __future__ import annotations

import random
import time
from typing import Any

from bench import celery_client
from bench.common import Bench, log, percentiles, stamps
from bench.systems import ProcrastinateSystem, SkiplockSystem, System

CONCURRENCY = 4


def sample(system: System, samples: int, *, concurrency: int = CONCURRENCY) -> dict[str, Any]:
    system.reset()
    procs = system.start_workers(concurrency, 1)
    try:
        return sample_running(system, samples)
    finally:
        procs.stop()


def sample_running(system: System, samples: int) -> dict[str, Any]:
    """Pickup latencies against workers that are already running and idle."""
    latencies: list[float] = []
    enqueue_ms: list[float] = []
    with stamps() as receiver:
        for marker in range(samples):
            time.sleep(random.uniform(0.02, 0.04))
            start = time.time()
            system.defer_one("bench_stamp", {"port": receiver.port, "marker": marker})
            enqueue_ms.append((time.time() - start) * 1000)
            latencies.append((receiver.wait(marker) - start) * 1000)
    # The worker's own share: from the enqueue call's return (job committed) to the task's start.
    after = [max(0.0, lat - enq) for lat, enq in zip(latencies, enqueue_ms, strict=True)]
    return {"latency_ms": percentiles(latencies), "enqueue_ms": percentiles(enqueue_ms),
            "after_enqueue_ms": percentiles(after)}


def run(bench: Bench, systems: list[str] | None = None) -> dict[str, Any]:
    size = bench.size
    wanted = systems or ["skiplock", "procrastinate", "celery", "celery_backend"]
    out: dict[str, Any] = {"samples": size.pickup_samples, "concurrency": CONCURRENCY}
    if "skiplock" in wanted:
        log("pickup Skiplock")
        skiplock = SkiplockSystem(bench.target)
        try:
            out["skiplock"] = sample(skiplock, size.pickup_samples)
        finally:
            skiplock.close()
    if "procrastinate" in wanted:
        log("pickup bare procrastinate")
        system = ProcrastinateSystem(bench.target)
        system.setup()
        out["procrastinate"] = sample(system, size.pickup_samples)
        system.close()
    for name, backend, label in celery_client.SYSTEMS:
        if name in wanted and bench.has_celery:
            log(f"pickup {label}")
            out[name] = celery_client.run(bench, "pickup", backend=backend, concurrency=CONCURRENCY,
                                          samples=size.pickup_samples)
    return out
