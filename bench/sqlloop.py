"""The physical limit: a minimal SKIP LOCKED queue driven by pgbench on the same server.

One table, one partial index. Claim = one UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED),
complete = one UPDATE by id; each its own transaction, prepared statements (as psycopg does
after five executions). Enqueue = one INSERT per transaction, or 1,000 per INSERT … SELECT.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

from bench.common import Bench, pg_bin

SCHEMA = """
DROP TABLE IF EXISTS sql_jobs;
CREATE TABLE sql_jobs (
    id bigserial PRIMARY KEY,
    queue text NOT NULL DEFAULT 'default',
    args jsonb NOT NULL DEFAULT '{}',
    status smallint NOT NULL DEFAULT 0,  -- 0 todo, 1 doing, 2 done
    attempts int NOT NULL DEFAULT 0
);
CREATE INDEX sql_jobs_todo ON sql_jobs (id) WHERE status = 0;
"""

CLAIM = (
    "UPDATE sql_jobs SET status = 1, attempts = attempts + 1 WHERE id = "
    "(SELECT id FROM sql_jobs WHERE status = 0 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id \\gset\n"
)
COMPLETE = "UPDATE sql_jobs SET status = 2 WHERE id = :id;\n"
SCRIPTS = {
    "claim_complete": CLAIM + COMPLETE,
    "claim_io10_complete": CLAIM + "\\sleep 10 ms\n" + COMPLETE,
    "insert_one": "INSERT INTO sql_jobs (queue, args) VALUES ('default', '{}');\n",
    "insert_batch": "INSERT INTO sql_jobs (queue, args) SELECT 'default', '{}' FROM generate_series(1, 1000);\n",
}


def setup(bench: Bench) -> None:
    target = bench.target
    target.recreate_database(target.sql_db)
    with target.connect(target.sql_db) as conn:
        conn.execute(SCHEMA)


def prefill(bench: Bench, n: int) -> None:
    with bench.target.connect(bench.target.sql_db) as conn:
        conn.execute("TRUNCATE sql_jobs RESTART IDENTITY")
        conn.execute("INSERT INTO sql_jobs (queue, args) SELECT 'default', '{}' FROM generate_series(1, %s)", [n])
        conn.execute("VACUUM ANALYZE sql_jobs")


def pgbench(bench: Bench, script: str, *, clients: int, transactions: int | None = None) -> float:
    """Run a script; return transactions per second (without connection time)."""
    binary = pg_bin("pgbench")
    if binary is None:
        raise RuntimeError("pgbench is not available")
    target = bench.target
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as handle:
        handle.write(SCRIPTS[script])
    Path(handle.name).chmod(0o644)
    length = ["-t", str(transactions)] if transactions else ["-T", str(bench.size.pgbench_seconds)]
    argv = [str(binary), "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 2)), *length,
            "-f", handle.name, "-U", target.user or "postgres", "-d", target.sql_db]
    if target.host:
        argv += ["-h", target.host]
    if target.port:
        argv += ["-p", target.port]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    finally:
        Path(handle.name).unlink(missing_ok=True)
    if out.returncode != 0 or "aborted" in out.stdout:
        raise RuntimeError(f"pgbench {script} failed: {out.stderr.strip()[-2000:]} {out.stdout[-1000:]}")
    match = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out.stdout)
    if not match:
        raise RuntimeError(f"pgbench printed no tps: {out.stdout[-1000:]}")
    return float(match.group(1))


def processing_rate(bench: Bench, *, connections: int, io: bool) -> float:
    """Jobs/s of the claim/complete loop at `connections` connections (pre-filled queue)."""
    size = bench.size
    seconds = size.pgbench_seconds or 1
    per_second = connections * 100 if io else 20_000
    transactions = None if size.pgbench_seconds else max(5, 60 // connections)
    prefill(bench, int(per_second * seconds * 1.5) + 1000)
    return pgbench(bench, "claim_io10_complete" if io else "claim_complete", clients=connections,
                   transactions=transactions)


def insert_rate(bench: Bench, *, batch: bool) -> float:
    """Jobs/s of a plain insert loop on one connection (one row, or 1,000 rows, per transaction)."""
    with bench.target.connect(bench.target.sql_db) as conn:
        conn.execute("TRUNCATE sql_jobs RESTART IDENTITY")
    transactions = None if bench.size.pgbench_seconds else (3 if batch else 100)
    tps = pgbench(bench, "insert_batch" if batch else "insert_one", clients=1, transactions=transactions)
    return tps * (1000 if batch else 1)
