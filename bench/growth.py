"""Growth: Skiplock's processing rate (no-op, concurrency 4, one process) and pickup latency with
0, 100,000 and 1,000,000 finished jobs in the tables.

Paired, because a shared machine's load drifts by more than the effect measured: two databases on
the same server, each with its own worker process — the empty one (the baseline) and one grown to
each point — and every drain and pickup sample alternates between them (ABBA), so both see the
same load. Finished jobs are cloned in SQL from a job the worker really ran (its queue row, events,
job record, attempt, and any other table keyed by job_id), with generate_series, triggers off
(session_replication_role = replica), then VACUUM ANALYZE and a CHECKPOINT — seconds, not minutes.
Each point also reports, per side, the statements that took the database's time (pg_stat_statements)
and the buffer accesses per job of each table and index (pg_statio): what grows with the table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import Iterator
from typing import Any

from bench.common import Bench, Processes, Target, log, percentiles, stamps, summary
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


def clone_finished(target: Target, count: int) -> float:
    """Add `count` finished jobs like a real succeeded one; return the seconds it took."""
    if count <= 0:
        return 0.0
    started = time.monotonic()
    with target.connect(target.skiplock_db, autocommit=False) as conn:
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
    with target.connect(target.skiplock_db) as conn:
        for table in tables:
            conn.execute(f"VACUUM ANALYZE {table}")
        # Else the checkpoint the clone's writes trigger lands in the measurement, and the first
        # change to each page after it logs the whole page.
        conn.execute("CHECKPOINT")
    return time.monotonic() - started


def finished_jobs(target: Target) -> int:
    return int(target.scalar(target.skiplock_db, "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"))


def table_mb(target: Target) -> float:
    return round(int(target.scalar(
        target.skiplock_db,
        "SELECT pg_total_relation_size('procrastinate_jobs') + pg_total_relation_size('skiplock_job') "
        "+ pg_total_relation_size('procrastinate_events') + pg_total_relation_size('skiplock_job_attempt')",
    )) / 2**20, 1)


_wrappers: dict[str, Any] = {}


@contextlib.contextmanager
def on_database(name: str) -> Iterator[None]:
    """Django's default connection (what SkiplockSystem defers through) on another database of the
    server: one persistent connection per database, swapped in, so neither side ever defers on a
    fresh backend (cold caches, statements not yet prepared) or pays for connecting."""
    from django.db import connections

    current = connections["default"]
    if current.settings_dict["NAME"] == name:
        yield
        return
    wrapper = _wrappers.get(name)
    if wrapper is None:
        wrapper = _wrappers[name] = current.__class__({**current.settings_dict, "NAME": name}, "default")
    wrapper.ensure_connection()
    connections["default"] = wrapper
    try:
        yield
    finally:
        connections["default"] = current


def close_other_databases() -> None:
    for wrapper in _wrappers.values():
        wrapper.close()
    _wrappers.clear()


def settle(side: Side) -> float:
    """One unmeasured drain to warm the caches (the clone's index builds evicted them); its rate."""
    n = side.bench.size.min_jobs * 5
    with on_database(side.target.skiplock_db):
        t0 = side.system.fill("bench_noop", n)
    return n / (side.system.wait_drained(side.procs, timeout=max(60.0, n / 10)) - t0)


STATEMENTS = 8  # per point, the statements that took the most database time


def _reset_statements(target: Target) -> bool:
    """Start counting statement times afresh (pg_stat_statements); False where it is not loaded."""
    try:
        with target.connect(target.skiplock_db) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute("SELECT pg_stat_statements_reset()")
        return True
    except Exception:  # a server without the library still gets its figures
        return False


def _block_counts(target: Target) -> dict[str, tuple[int, int]]:
    """Buffer accesses (hit + read, read) per table and index so far: which relation grows costly."""
    with target.connect(target.skiplock_db) as conn:
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


def _top_statements(target: Target) -> list[dict[str, Any]]:
    """Where the database time went since the reset: what grows with the table shows up here."""
    with target.connect(target.skiplock_db) as conn:
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


@dataclasses.dataclass
class Side:
    """One of the pair: a database, its system and its worker process, and what was measured on it."""

    name: str
    bench: Bench
    target: Target
    system: SkiplockSystem
    procs: Processes
    rates: list[float] = dataclasses.field(default_factory=list)
    latencies: list[float] = dataclasses.field(default_factory=list)
    jobs: int = 0

    def drain(self, n: int) -> None:
        with on_database(self.target.skiplock_db):
            t0 = self.system.fill("bench_noop", n)
        self.rates.append(n / (self.system.wait_drained(self.procs, timeout=max(60.0, n / 10)) - t0))
        self.jobs += n


def measure_pair(sides: list[Side], size: Any) -> dict[str, dict[str, Any]]:
    """The same drains and pickup samples on both sides, alternating ABBA; per side its figures."""
    for side in sides:
        side.rates, side.latencies, side.jobs = [], [], 0
    n = int(min(size.max_jobs, max(size.min_jobs, min(settle(side) for side in sides) * size.drain_seconds)))
    reset = [_reset_statements(side.target) for side in sides]  # each database gets the extension
    counting = all(reset)
    before = {side.name: _block_counts(side.target) for side in sides}
    for run in range(size.runs):
        for side in sides if run % 2 == 0 else sides[::-1]:
            side.drain(n)
    with stamps() as receiver:
        for marker in range(2 * size.growth_pickup_samples):
            side = sides[(marker + marker // 2) % 2]  # ABBA
            with on_database(side.target.skiplock_db):
                time.sleep(random.uniform(0.02, 0.04))
                start = time.time()
                side.system.defer_one("bench_stamp", {"port": receiver.port, "marker": marker})
                side.latencies.append((receiver.wait(marker) - start) * 1000)
    out = {}
    for side in sides:
        statements = _top_statements(side.target) if counting else []
        relations = _blocks_per_job(before[side.name], _block_counts(side.target), side.jobs)
        log(f"  {side.name}: {summary(side.rates)['median']:.0f} jobs/s, pickup p50 "
            f"{percentiles(side.latencies)['p50']:.1f} ms")
        for item in statements:
            log(f"    {item['calls']:>6} calls {item['rows']:>6} rows {item['ms_per_row']:>8.4f} ms/row "
                f"{item['blocks_per_row']:>7.1f} blocks/row ({item['read_per_call']:.2f} read/call)  {item['query']}")
        for item in relations:
            log(f"    {item['blocks_per_job']:>8.2f} blocks/job ({item['read_per_job']:.3f} read)  {item['relation']}")
        out[side.name] = {"rate": summary(side.rates), "pickup_ms": percentiles(side.latencies),
                          "statements": statements, "blocks_per_job": relations, "table_mb": table_mb(side.target)}
    return out


def run(bench: Bench, procs: Processes | None = None) -> dict[str, Any]:
    """Against `procs` if given (Skiplock workers already running on the bench database, which
    becomes the empty side), else against workers of its own; the grown side gets its own."""
    from django.core.management import call_command

    size = bench.size
    base = SkiplockSystem(bench.target)
    base.reset()
    grown_target = dataclasses.replace(bench.target, skiplock_db=f"{bench.target.skiplock_db}_grown")
    grown_target.recreate_database(grown_target.skiplock_db)
    with on_database(grown_target.skiplock_db):
        call_command("migrate", verbosity=0, interactive=False)
    grown = SkiplockSystem(grown_target)
    own = procs is None
    grown_procs: Processes | None = None
    points: list[dict[str, Any]] = []
    try:
        if procs is None:
            procs = base.start_workers(CONCURRENCY, 1)
        with on_database(grown_target.skiplock_db):
            grown_procs = grown.start_workers(CONCURRENCY, 1)
        sides = [Side("empty", bench, bench.target, base, procs), Side("grown", bench, grown_target, grown, grown_procs)]
        warm = finished_jobs(grown_target)  # the warm-up jobs
        for point in [p for p in size.growth_points if p > 0] or [0]:
            missing = point - (finished_jobs(grown_target) - warm)
            log(f"growth: {point:,} finished jobs (adding {max(0, missing):,}) beside an empty database")
            fill_seconds = clone_finished(grown_target, missing)
            pair = measure_pair(sides, size)
            if not points:
                points.append({"finished_jobs": 0, "fill_seconds": 0.0, **_figures(pair["empty"])})
            if point > 0:
                points.append({"finished_jobs": point, "fill_seconds": round(fill_seconds, 1), **_figures(pair["grown"]),
                               "paired_empty": _figures(pair["empty"])})
        if base.failures() or grown.failures():
            raise RuntimeError("some growth jobs did not succeed")
    finally:
        if grown_procs is not None:
            grown_procs.stop()
        if own and procs is not None:
            procs.stop()
        base.reset()
        base.close()
        grown.close()
        close_other_databases()
        bench.target.drop_database(grown_target.skiplock_db)
    return {"concurrency": CONCURRENCY, "paired": True, "points": points}


def _figures(side: dict[str, Any]) -> dict[str, Any]:
    return {"rate": side["rate"], "pickup_ms": side["pickup_ms"], "table_mb": side["table_mb"],
            "statements": side["statements"], "blocks_per_job": side["blocks_per_job"]}
