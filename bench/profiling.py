"""Where the time goes: a Skiplock worker (and, for comparison, bare procrastinate) draining no-op jobs.

For N pre-filled no-op jobs at concurrency 4, one process, measured over the drain only, with no
profiler attached (cProfile slows the worker enough to inflate the per-job database figures
several-fold; run py-spy against a worker by hand for a flame graph):
- CPU seconds of the worker process and of the PostgreSQL server processes, per job;
- pg_stat_statements (track = all, so statements run inside functions show too): top statements by
  total time, calls and milliseconds per job; round trips (top-level statements), transactions and
  WAL bytes per job.
The worker is paused (SIGSTOP) while the queue is filled, so the figures hold the drain alone.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from bench.common import Bench, Processes, log
from bench.systems import ProcrastinateSystem, SkiplockSystem, System

CONCURRENCY = 4
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def server_pids(postmaster: int) -> list[int]:
    pids = [postmaster]
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                    pids.append(int(proc.name))
            except (OSError, ValueError, IndexError):
                continue
    return pids


def db_counters(conn: Any) -> dict[str, float]:
    row = conn.execute(
        "SELECT xact_commit, (SELECT wal_bytes FROM pg_stat_wal) FROM pg_stat_database "
        "WHERE datname = current_database()"
    ).fetchone()
    return {"commits": float(row[0]), "wal_bytes": float(row[1])}


def round_trips(conn: Any) -> float:
    """Top-level statements run so far (each one round trip from a client, bench polls included)."""
    row = conn.execute(
        "SELECT COALESCE(sum(calls), 0) FROM pg_stat_statements WHERE toplevel "
        "AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND query NOT ILIKE '%%pg_stat_statements%%' AND query NOT ILIKE '%%pg_stat_database%%'"
    ).fetchone()
    return float(row[0])


def statements(conn: Any, jobs: int, limit: int = 12) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT toplevel, calls, total_exec_time, rows, regexp_replace(query, '\\s+', ' ', 'g') "
        "FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND query NOT ILIKE '%%pg_stat_statements%%' AND query NOT ILIKE '%%procrastinate_jobs WHERE status IN%%' "
        "ORDER BY total_exec_time DESC LIMIT %s",
        [limit],
    ).fetchall()
    return [{
        "toplevel": bool(r[0]),
        "calls_per_job": round(r[1] / jobs, 2),
        "ms_per_job": round(r[2] / jobs, 4),
        "mean_ms": round(r[2] / max(r[1], 1), 4),
        "query": r[4][:300],
    } for r in rows]


def measure(bench: Bench, system: System, jobs: int, postmaster: int | None) -> dict[str, Any]:
    target = bench.target
    with target.connect(system.database) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        conn.execute(f'ALTER DATABASE "{system.database}" SET pg_stat_statements.track = \'all\'')
    system.reset()
    procs: Processes = system.start_workers(CONCURRENCY, 1)
    try:
        worker = procs.procs[0]
        worker.send_signal(signal.SIGSTOP)
        try:
            system.fill("bench_noop", jobs)
            with target.connect(system.database) as conn:
                conn.execute("SELECT pg_stat_statements_reset()")
                before = db_counters(conn)
            polls_before = system.polls
            cpu_worker0 = cpu_seconds([worker.pid])
            cpu_db0 = cpu_seconds(server_pids(postmaster)) if postmaster else 0.0
        finally:
            worker.send_signal(signal.SIGCONT)
        t0 = time.monotonic()
        t1 = system.wait_drained(procs, timeout=max(60.0, jobs / 10))
        cpu_worker = cpu_seconds([worker.pid]) - cpu_worker0
        cpu_db = (cpu_seconds(server_pids(postmaster)) - cpu_db0) if postmaster else None
        polls = system.polls - polls_before
        # A backend reports its transaction and WAL counts lazily (at most once a second, or when
        # it ends): stop the worker first, so every commit it made is counted.
        procs.stop()
        time.sleep(0.5)
        with target.connect(system.database) as conn:
            after = db_counters(conn)
            trips = round_trips(conn)
            top = statements(conn, jobs)
    finally:
        procs.stop()
    wall = t1 - t0
    return {
        "jobs": jobs,
        "rate": round(jobs / wall, 1),
        "wall_ms_per_job": round(wall / jobs * 1000, 3),
        "worker_cpu_ms_per_job": round(cpu_worker / jobs * 1000, 3),
        "server_cpu_ms_per_job": None if cpu_db is None else round(cpu_db / jobs * 1000, 3),
        # Less the bench's own: its drain polls and the two counter reads.
        "commits_per_job": round((after["commits"] - before["commits"] - polls - 2) / jobs, 2),
        # Less the bench's own polls of the queue.
        "round_trips_per_job": round((trips - polls) / jobs, 2),
        "wal_bytes_per_job": round((after["wal_bytes"] - before["wal_bytes"]) / jobs),
        "top_statements": top,
    }


def run(bench: Bench, systems: list[str] | None = None) -> dict[str, Any]:
    jobs = bench.size.profile_jobs
    postmaster = None
    pid = bench.target.scalar(bench.target.skiplock_db, "SELECT pg_backend_pid()")
    try:  # the postmaster is the parent of any backend
        postmaster = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        bench.note("profile: PostgreSQL runs elsewhere; no server CPU figures")
    out: dict[str, Any] = {"concurrency": CONCURRENCY}
    wanted = systems or ["skiplock", "procrastinate"]
    if "skiplock" in wanted:
        log("profile Skiplock")
        skiplock = SkiplockSystem(bench.target)
        try:
            out["skiplock"] = measure(bench, skiplock, jobs, postmaster)
        finally:
            skiplock.close()
    if "procrastinate" in wanted:
        log("profile bare procrastinate")
        proc = ProcrastinateSystem(bench.target)
        proc.setup()
        try:
            out["procrastinate"] = measure(bench, proc, jobs, postmaster)
        finally:
            proc.close()
    return out
