"""Growth: Skiplock's processing rate (no-op, concurrency 4, one process) and pickup latency with
0, 100,000 and 1,000,000 finished jobs in the tables.

Finished jobs are cloned in SQL from a job the worker really ran (its queue row, events, job
record, attempt, and any other table keyed by job_id), with generate_series, triggers off
(session_replication_role = replica), then VACUUM ANALYZE — seconds, not minutes.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import Bench, Processes, log, summary
from bench.pickup import sample_running
from bench.systems import SkiplockSystem

CONCURRENCY = 4


def columns(conn: Any, table: str) -> list[tuple[str, str | None]]:
    return [(r[0], r[1]) for r in conn.execute(
        "SELECT column_name, column_default FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name = %s AND is_generated = 'NEVER' "
        "AND identity_generation IS NULL ORDER BY ordinal_position",
        [table],
    ).fetchall()]


def job_tables(conn: Any) -> list[str]:
    """Tables with one or more rows per job: procrastinate's events, Skiplock's records, and any added since."""
    rows = conn.execute(
        "SELECT DISTINCT table_name FROM information_schema.columns WHERE table_schema = 'public' "
        "AND column_name = 'job_id' AND table_name NOT IN ('procrastinate_periodic_defers') "
        "AND table_name IN (SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE')"
    ).fetchall()
    return sorted(r[0] for r in rows)


def clone_finished(bench: Bench, count: int) -> float:
    """Add `count` finished jobs like a real succeeded one; return the seconds it took."""
    if count <= 0:
        return 0.0
    started = time.monotonic()
    with bench.target.connect(bench.target.skiplock_db, autocommit=False) as conn:
        template = conn.execute(
            "SELECT id FROM procrastinate_jobs WHERE status = 'succeeded' ORDER BY id LIMIT 1"
        ).fetchone()
        if template is None:
            raise RuntimeError("no succeeded job to clone")
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute("SET LOCAL maintenance_work_mem = '256MB'")
        sequence = conn.execute("SELECT pg_get_serial_sequence('procrastinate_jobs', 'id')").fetchone()[0]
        base = conn.execute(f"SELECT greatest(last_value, (SELECT max(id) FROM procrastinate_jobs)) FROM {sequence}").fetchone()[0]
        conn.execute("SELECT setval(%s, %s)", [sequence, base + count])
        plan = [("procrastinate_jobs", "id")] + [(t, "job_id") for t in job_tables(conn)]
        # Building an index once after the insert is much faster than a million index insertions:
        # drop the plain (non-constraint) indexes, insert, recreate them from their definitions.
        indexes = conn.execute(
            "SELECT i.indexname, i.indexdef FROM pg_indexes i WHERE i.schemaname = 'public' "
            "AND i.tablename = ANY(%s) AND NOT EXISTS (SELECT 1 FROM pg_constraint c "
            "WHERE c.conname = i.indexname)",
            [[t for t, _ in plan]],
        ).fetchall()
        for name, _definition in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        for table, key in plan:
            cols = []
            values = []
            for name, default in columns(conn, table):
                if name == key:
                    cols.append(name)
                    values.append("g")
                elif name == "id" and default and default.startswith("nextval("):
                    continue  # the table's own serial id: its default numbers the clones
                elif name in ("worker_id",) and table == "procrastinate_jobs":
                    cols.append(name)
                    values.append("NULL")  # long-gone workers: their rows were deleted, ids set NULL
                elif name == "idempotency_key":
                    cols.append(name)
                    values.append("NULL")
                else:
                    cols.append(name)
                    values.append(f"t.{name}")
            conn.execute(
                f"INSERT INTO {table} ({', '.join(cols)}) SELECT {', '.join(values)} "
                f"FROM {table} AS t, generate_series(%s::bigint, %s::bigint) AS g WHERE t.{key} = %s",
                [base + 1, base + count, template[0]],
            )
        for _name, definition in indexes:
            conn.execute(definition)
        conn.commit()
        tables = [t for t, _ in plan]
    with bench.target.connect(bench.target.skiplock_db) as conn:
        for table in tables:
            conn.execute(f"VACUUM ANALYZE {table}")
    return time.monotonic() - started


def finished_jobs(bench: Bench) -> int:
    return int(bench.target.scalar(
        bench.target.skiplock_db, "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"
    ))


def settle(bench: Bench, system: SkiplockSystem, procs: Processes) -> float:
    """Same conditions at every point: the clone's writes checkpointed (else the first change to each
    page after the checkpoint it triggers logs the whole page) and one unmeasured drain to warm the
    caches the clone's index builds evicted. Returns that drain's rate (the first measured run's size)."""
    with bench.target.connect(bench.target.skiplock_db) as conn:
        conn.execute("CHECKPOINT")
    n = bench.size.min_jobs * 5
    t0 = system.fill("bench_noop", n)
    return n / (system.wait_drained(procs, timeout=max(60.0, n / 10)) - t0)


STATEMENTS = 8  # per point, the statements that took the most database time


def _reset_statements(bench: Bench) -> bool:
    """Start counting statement times afresh (pg_stat_statements); False where it is not loaded."""
    try:
        with bench.target.connect(bench.target.skiplock_db) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute("SELECT pg_stat_statements_reset()")
        return True
    except Exception:  # a server without the library still gets its figures
        return False


def _block_counts(bench: Bench) -> dict[str, tuple[int, int]]:
    """Buffer accesses (hit + read, read) per table and index so far: which relation grows costly."""
    with bench.target.connect(bench.target.skiplock_db) as conn:
        rows = conn.execute(
            "SELECT relname, coalesce(heap_blks_hit, 0) + coalesce(heap_blks_read, 0), coalesce(heap_blks_read, 0) "
            "FROM pg_statio_user_tables UNION ALL "
            "SELECT indexrelname, idx_blks_hit + idx_blks_read, idx_blks_read FROM pg_statio_user_indexes"
        ).fetchall()
    return {name: (int(total), int(read)) for name, total, read in rows}


def _blocks_per_job(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], jobs: int,
                    top: int = 10) -> list[dict[str, Any]]:
    diffs = [(name, after[name][0] - before.get(name, (0, 0))[0], after[name][1] - before.get(name, (0, 0))[1])
             for name in after]
    diffs.sort(key=lambda item: -item[1])
    return [{"relation": name, "blocks_per_job": round(total / max(jobs, 1), 2),
             "read_per_job": round(read / max(jobs, 1), 3)} for name, total, read in diffs[:top] if total]


def _top_statements(bench: Bench) -> list[dict[str, Any]]:
    """Where the database time went since the reset: what grows with the table shows up here."""
    with bench.target.connect(bench.target.skiplock_db) as conn:
        rows = conn.execute(
            "SELECT calls, rows, total_exec_time, mean_exec_time, shared_blks_hit + shared_blks_read, shared_blks_read, "
            "left(regexp_replace(query, '\\s+', ' ', 'g'), 90) FROM pg_stat_statements "
            "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "ORDER BY total_exec_time DESC LIMIT %s",
            [STATEMENTS],
        ).fetchall()
    return [{"calls": calls, "rows": nrows, "total_ms": round(total, 1), "mean_ms": round(mean, 3),
             "ms_per_row": round(total / max(nrows, 1), 4), "blocks_per_row": round(blocks / max(nrows, 1), 1),
             "read_per_call": round(read / max(calls, 1), 2), "query": query}
            for calls, nrows, total, mean, blocks, read, query in rows]


def run(bench: Bench, procs: Processes | None = None) -> dict[str, Any]:
    """Against `procs` if given (Skiplock workers already running), else against workers of its own."""
    size = bench.size
    system = SkiplockSystem(bench.target)
    system.reset()
    points: list[dict[str, Any]] = []
    own = procs is None
    if procs is None:
        procs = system.start_workers(CONCURRENCY, 1)
    try:
        baseline = finished_jobs(bench)  # the warm-up jobs
        for point in size.growth_points:
            missing = point - (finished_jobs(bench) - baseline)
            log(f"growth: {point:,} finished jobs (adding {max(0, missing):,})")
            fill_seconds = clone_finished(bench, missing)
            rate = settle(bench, system, procs)
            counting = _reset_statements(bench)
            blocks_before = _block_counts(bench)
            jobs_run = 0
            rates: list[float] = []
            for _ in range(size.runs):
                n = int(min(size.max_jobs, max(size.min_jobs, rate * size.drain_seconds)))
                t0 = system.fill("bench_noop", n)
                t1 = system.wait_drained(procs, timeout=max(60.0, n / 10))
                rate = n / (t1 - t0)
                jobs_run += n
                rates.append(rate)
            pickup = sample_running(system, size.growth_pickup_samples)
            statements = _top_statements(bench) if counting else []
            for item in statements:
                log(f"  {item['calls']:>6} calls {item['rows']:>6} rows {item['ms_per_row']:>8.4f} ms/row "
                    f"{item['blocks_per_row']:>7.1f} blocks/row ({item['read_per_call']:.2f} read/call)  {item['query']}")
            relations = _blocks_per_job(blocks_before, _block_counts(bench), jobs_run)
            for item in relations:
                log(f"  {item['blocks_per_job']:>8.2f} blocks/job ({item['read_per_job']:.3f} read)  {item['relation']}")
            points.append({
                "finished_jobs": point,
                "fill_seconds": round(fill_seconds, 1),
                "rate": summary(rates),
                "pickup_ms": pickup["latency_ms"],
                "statements": statements,
                "blocks_per_job": relations,
                "table_mb": round(int(bench.target.scalar(
                    bench.target.skiplock_db,
                    "SELECT pg_total_relation_size('procrastinate_jobs') + pg_total_relation_size('skiplock_job') "
                    "+ pg_total_relation_size('procrastinate_events') + pg_total_relation_size('skiplock_job_attempt')",
                )) / 2**20, 1),
            })
        if system.failures():
            raise RuntimeError("some growth jobs did not succeed")
    finally:
        if own:
            procs.stop()
        system.reset()
        system.close()
    return {"concurrency": CONCURRENCY, "points": points}
