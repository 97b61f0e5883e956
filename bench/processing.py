"""Processing rate: a pre-filled queue drained by warm workers, no-op and 10 ms I/O jobs,
at each concurrency and process count, for every system; the SQL loop at the same connection count.

One figure = median (min–max) of `runs` drains. A drain: the workers are up and idle; the queue
is filled in one commit (one RENAME for Celery); rate = jobs / (time until none is left).
The job count adapts to the last measured rate so each drain lasts about `drain_seconds`.
"""

from __future__ import annotations

from typing import Any

from bench import celery_client, sqlloop
from bench.common import Bench, log, summary
from bench.systems import ProcrastinateSystem, SkiplockSystem, System

TASKS = {"noop": "bench_noop", "io10": "bench_io10"}


def guess(task: str, concurrency: int, processes: int) -> float:
    """A cautious first rate: the first drain is short, the next ones last about drain_seconds."""
    return 60.0 if task == "noop" else min(60.0, 30.0 * concurrency * processes)


def drain(bench: Bench, system: System, concurrency: int, processes: int) -> dict[str, Any]:
    """Both task bodies on one set of warm workers: {task: {"rate": summary}}."""
    size = bench.size
    system.reset()
    procs = system.start_workers(concurrency, processes)
    out: dict[str, Any] = {}
    try:
        for task, task_name in TASKS.items():
            rates: list[float] = []
            rate = guess(task, concurrency, processes)
            for _ in range(size.runs):
                n = int(min(size.max_jobs, max(size.min_jobs, rate * size.drain_seconds)))
                system.reset()
                t0 = system.fill(task_name, n)
                t1 = system.wait_drained(procs, timeout=max(60.0, n / 10))
                rate = n / (t1 - t0)
                rates.append(rate)
            failures = system.failures()
            if failures:
                raise RuntimeError(f"{system.label}: {failures} bench jobs did not succeed")
            out[task] = {"rate": summary(rates), "jobs_per_run": n}
    finally:
        procs.stop()
    return out


def run(bench: Bench, systems: list[str] | None = None) -> dict[str, Any]:
    size = bench.size
    wanted = systems or ["skiplock", "procrastinate", "celery", "celery_backend", "sql"]
    db_systems: list[System] = []
    if "skiplock" in wanted:
        db_systems.append(SkiplockSystem(bench.target))
    if "procrastinate" in wanted:
        proc = ProcrastinateSystem(bench.target)
        proc.setup()
        db_systems.append(proc)
    if "sql" in wanted and bench.has_pgbench:
        sqlloop.setup(bench)
    rows: dict[str, dict[str, Any]] = {}

    def row(task: str, concurrency: int, processes: int) -> dict[str, Any]:
        key = f"{task}/c{concurrency}/p{processes}"
        return rows.setdefault(key, {"task": task, "concurrency": concurrency, "processes": processes})

    try:
        for processes in size.processes:
            for concurrency in size.concurrencies:
                where = f"c{concurrency}/p{processes}"
                for system in db_systems:
                    log(f"processing {where} {system.label}")
                    for task, figures in drain(bench, system, concurrency, processes).items():
                        row(task, concurrency, processes)[system.name] = figures
                for name, backend, label in celery_client.SYSTEMS:
                    if name in wanted and bench.has_celery:
                        log(f"processing {where} {label}")
                        figures = celery_client.run(
                            bench, "processing", backend=backend, concurrency=concurrency, processes=processes,
                            tasks=[(task, task_name, guess(task, concurrency, processes)) for task, task_name in TASKS.items()],
                            runs=size.runs, drain_seconds=size.drain_seconds, min_jobs=size.min_jobs,
                            max_jobs=size.max_jobs,
                        )
                        for task, figure in figures["by_task"].items():
                            row(task, concurrency, processes)[name] = figure
                if "sql" in wanted and bench.has_pgbench:
                    log(f"processing {where} SQL loop ({concurrency * processes} connections)")
                    for task in TASKS:
                        rates = [sqlloop.processing_rate(bench, connections=concurrency * processes, io=task == "io10")
                                 for _ in range(size.runs)]
                        row(task, concurrency, processes)["sql"] = {"rate": summary(rates)}
    finally:
        for system in db_systems:
            system.close()
    return {"rows": dict(sorted(rows.items(), key=lambda kv: (kv[1]["task"] != "noop", kv[1]["processes"], kv[1]["concurrency"])))}
