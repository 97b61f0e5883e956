"""Job console at scale: fill N jobs, time each console page, print the EXPLAIN plans.

    .venv/bin/python -m bench.admin --rows 1000000

Runs on its own embedded PostgreSQL instance (SKIPLOCK_PG_INSTANCE, default `bench_admin`) or on
DATABASE_URL's server, always in a database of its own (`skiplock_admin_bench`). The fill writes procrastinate_jobs and skiplock_job directly with generate_series
(triggers off for that one statement pair, so a million rows take seconds): 30 days of history,
~90 % succeeded, 6 % failed, the newest 2,000 waiting and 20 running. Pages are served in-process
by Django's test client with a logged-in superuser; each is timed warm (median of --repeat runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from importlib import import_module
from typing import Any

SIZES = {"small": 10_000, "10k": 10_000, "100k": 100_000, "medium": 100_000, "1m": 1_000_000,
         "large": 1_000_000, "full": 1_000_000}
TASKS = ["deploy_stack", "index_document", "optimize_route", "reports.build", "emails.send"]
QUEUES = {"deploy_stack": "default", "index_document": "default", "optimize_route": "cpu",
          "reports.build": "reports", "emails.send": "emails"}


def _setup() -> Any:
    """Django on the bench database; returns the embedded cluster if this call started it."""
    os.environ.setdefault("DEBUG", "true")
    os.environ.setdefault("SKIPLOCK_PG_INSTANCE", "bench_admin")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()
    from django.conf import settings

    started = None
    if settings.EMBEDDED_DATABASE:
        from project.embedded_postgres import EmbeddedPostgres

        cluster = EmbeddedPostgres(os.environ["SKIPLOCK_PG_INSTANCE"])
        started = cluster if cluster.start() else None
    _use_own_database()
    return started


BENCH_DATABASE = "skiplock_admin_bench"


def _use_own_database() -> None:
    """Switch to a database of our own on the same server (created and migrated on first use).

    The fill truncates the job tables; called from another benchmark process (`run(size)`), that
    must never touch the application's own jobs."""
    from django.core.management import call_command
    from django.db import connection, connections

    if connection.settings_dict["NAME"] != BENCH_DATABASE:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [BENCH_DATABASE])
            if cursor.fetchone() is None:
                cursor.execute(f'CREATE DATABASE "{BENCH_DATABASE}"')
        connections["default"].close()
        connections["default"].settings_dict["NAME"] = BENCH_DATABASE
    call_command("migrate", verbosity=0)


def _parse_size(size: str) -> int:
    key = size.strip().lower().replace("_", "").replace(",", "")
    if key in SIZES:
        return SIZES[key]
    if key.endswith("k"):
        return int(float(key[:-1]) * 1_000)
    if key.endswith("m"):
        return int(float(key[:-1]) * 1_000_000)
    return int(key)


def fill(rows: int) -> float:
    """Replace every job with `rows` generated ones; returns seconds taken (VACUUM ANALYZE included)."""
    from django.db import connection, transaction

    started = time.perf_counter()
    task_array = "ARRAY[" + ",".join(f"'{t}'" for t in TASKS) + "]"
    queue_case = "CASE t " + " ".join(f"WHEN '{t}' THEN '{q}'" for t, q in QUEUES.items()) + " END"
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("TRUNCATE procrastinate_jobs, skiplock_job, skiplock_job_attempt CASCADE")
        cursor.execute("SET session_replication_role = replica")  # procrastinate's event triggers off
        try:
            cursor.execute(
                f"""
                CREATE TEMP TABLE gen ON COMMIT DROP AS
                SELECT i,
                       ({task_array})[1 + (i * 7 %% 5)] AS t,
                       now() - make_interval(secs => (%(n)s - i) * (30 * 86400.0 / %(n)s)) AS created,
                       CASE WHEN i > %(n)s - 20 THEN 'doing'
                            WHEN i > %(n)s - 2000 THEN 'todo'
                            WHEN i %% 100 < 90 THEN 'succeeded'
                            WHEN i %% 100 < 96 THEN 'failed'
                            WHEN i %% 100 < 99 THEN 'cancelled'
                            ELSE 'aborted' END AS s
                FROM generate_series(1, %(n)s) AS i
                """,
                {"n": rows},
            )
            cursor.execute(
                f"""
                INSERT INTO procrastinate_jobs (id, queue_name, task_name, priority, args, status, scheduled_at,
                                                attempts, abort_requested)
                SELECT i, {queue_case}, t, 0, jsonb_build_object('title', 'doc-' || i, 'points', i %% 500),
                       s::procrastinate_job_status,
                       CASE WHEN s = 'todo' AND i %% 10 = 0 THEN now() + interval '1 hour' END,
                       CASE s WHEN 'todo' THEN 0 WHEN 'doing' THEN 0 WHEN 'failed' THEN 4 ELSE 1 END, false
                FROM gen
                """,
                {"n": rows},
            )
            cursor.execute(
                """
                INSERT INTO skiplock_job (job_id, created_at, started_at, finished_at, progress, step, error_type,
                    error_message, error_traceback, worker_name, result)
                SELECT i, created,
                       CASE WHEN s <> 'todo' THEN created + interval '200 ms' END,
                       CASE WHEN s NOT IN ('todo', 'doing') THEN created + make_interval(secs => 0.2 + (i %% 997) / 100.0) END,
                       CASE s WHEN 'succeeded' THEN 100 WHEN 'doing' THEN i %% 100 ELSE 0 END,
                       CASE s WHEN 'succeeded' THEN 'done' WHEN 'doing' THEN 'embed ' || (i %% 10) || '/10' ELSE '' END,
                       CASE s WHEN 'failed' THEN 'ValueError' ELSE '' END,
                       CASE s WHEN 'failed' THEN 'the document holds no text' ELSE '' END,
                       CASE s WHEN 'failed' THEN 'Traceback (most recent call last):\n  ...\nValueError: the document holds no text' ELSE '' END,
                       CASE WHEN s <> 'todo' THEN 'bench-worker-' || (i %% 4) ELSE '' END,
                       CASE s WHEN 'succeeded' THEN jsonb_build_object('chunks', i %% 40) END
                FROM gen
                """,
                {"n": rows},
            )
        finally:
            cursor.execute("SET session_replication_role = origin")
        cursor.execute("SELECT setval('procrastinate_jobs_id_seq', %s)", [rows])
    refill_rollups()
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE procrastinate_jobs")
        cursor.execute("VACUUM ANALYZE skiplock_job")
    return time.perf_counter() - started


def refill_rollups() -> None:
    """The dashboard's rollup rings, as the writers would have filled them over the last 25 hours
    (migration 0012's backfill); redone on every run, since the history is relative to the fill time."""
    from django.db import connection, transaction

    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("TRUNCATE skiplock_minute_stats, skiplock_hour_stats")
        cursor.execute(import_module("jobs.migrations.0012_dashboard_rollups").BACKFILL)


def _current_rows() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*), coalesce(max(job_id), 0) FROM skiplock_job")
        count, top = cursor.fetchone()
    return int(count) if count == top else -1


def pages(rows: int) -> dict[str, str]:
    probe = rows - 5_000  # a finished job in the middle of the recent history
    return {
        "list (unfiltered)": "/admin/jobs/jobrecord/",
        "list page 20": "/admin/jobs/jobrecord/?p=20",
        "list state=failed": "/admin/jobs/jobrecord/?state=failed",
        "list state=retrying": "/admin/jobs/jobrecord/?state=retrying",
        "list task=index_document": "/admin/jobs/jobrecord/?task=index_document",
        "list queue=emails + failed": "/admin/jobs/jobrecord/?queue=emails&state=failed",
        "list finished last hour": "/admin/jobs/jobrecord/?finished=1h",
        "list finished last 7 days + failed": "/admin/jobs/jobrecord/?finished=7d&state=failed",
        "list created last 24 h": "/admin/jobs/jobrecord/?created=24h",
        "search by id": f"/admin/jobs/jobrecord/?q={probe}",
        "search by task": "/admin/jobs/jobrecord/?q=optimize_route",
        "search by argument (title=doc-N)": f"/admin/jobs/jobrecord/?q=title%3Ddoc-{probe}",
        "job detail": f"/admin/jobs/jobrecord/{probe}/change/",
        "dashboard": "/admin/jobs/dashboard/",
        "workers": "/admin/jobs/workerinfo/",
        "periodic tasks": "/admin/jobs/periodic/",
        "queues": "/admin/jobs/queues/",
    }


def time_pages(rows: int, *, repeat: int) -> dict[str, dict[str, Any]]:
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    user = User.objects.filter(username="bench-admin").first() or User.objects.create_superuser(
        "bench-admin", "bench@example.com", "bench-admin-pass")
    client = Client(HTTP_HOST="localhost")
    client.force_login(user)
    results: dict[str, dict[str, Any]] = {}
    for name, url in pages(rows).items():
        assert client.get(url).status_code == 200, url  # warm caches and connections
        times = []
        for _ in range(repeat):
            begin = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - begin) * 1000)
            assert response.status_code == 200, (url, response.status_code)
        with CaptureQueriesContext(connection) as captured:
            client.get(url)
        results[name] = {
            "url": url,
            "median_ms": round(statistics.median(times), 1),
            "max_ms": round(max(times), 1),
            "queries": len(captured),
            "db_ms": round(sum(float(q["time"]) for q in captured.captured_queries) * 1000, 1),
            "sql": [q["sql"] for q in captured.captured_queries if "skiplock_job" in q["sql"]
                    or "procrastinate_" in q["sql"]],
        }
    return results


def explain(sql: str) -> list[str]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, COSTS OFF, TIMING ON, SUMMARY ON) " + sql)
        return [row[0] for row in cursor.fetchall()]


def run(size: str) -> dict[str, Any]:
    """Fill `size` jobs (e.g. "1m", "100k", "1000000"), time the console pages, EXPLAIN their queries."""
    started = _setup()
    try:
        return _measure(size)
    finally:
        if started is not None:  # leave no PostgreSQL running (the filled data stays for the next run)
            from django.db import connections

            connections.close_all()
            started.stop()


def _measure(size: str) -> dict[str, Any]:
    rows = _parse_size(size)
    fill_seconds = None
    if _current_rows() != rows:
        fill_seconds = round(fill(rows), 2)
    else:
        refill_rollups()
    timings = time_pages(rows, repeat=7)
    plans = {}
    for name, result in timings.items():
        plans[name] = [{"sql": sql, "plan": explain(sql)} for sql in result.pop("sql")
                       if sql.lstrip().upper().startswith(("SELECT", "WITH"))]
    slowest = max(timings.values(), key=lambda r: r["median_ms"])
    return {
        "benchmark": "admin",
        "rows": rows,
        "fill_seconds": fill_seconds,
        "pages": timings,
        "plans": plans,
        "slowest_page_ms": slowest["median_ms"],
        "target_ms": 300,
        "all_under_target": all(r["median_ms"] < 300 for r in timings.values()),
    }


def _index_use(plan: list[str]) -> str:
    scans = [line.strip().split(" (")[0].lstrip("-> ").strip() for line in plan if "Scan" in line]
    return "; ".join(dict.fromkeys(scans)) or "(no table scan)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1000000", help="jobs to fill (1000000, 100k, 1m, …)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--plans", action="store_true", help="print every full EXPLAIN ANALYZE plan")
    args = parser.parse_args(argv)
    result = run(args.rows)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    print(f"job console at {result['rows']:,} jobs"
          + (f" (filled in {result['fill_seconds']} s)" if result["fill_seconds"] else " (existing data)"))
    print(f"{'page':36} {'median':>9} {'max':>9} {'in SQL':>8} {'queries':>8}  scans (beside the task/queue name probes)")
    for name, page in result["pages"].items():
        scans = " | ".join(_index_use(p["plan"]) for p in result["plans"][name] if "RECURSIVE" not in p["sql"])
        print(f"{name:36} {page['median_ms']:>7.1f}ms {page['max_ms']:>7.1f}ms {page['db_ms']:>6.1f}ms "
              f"{page['queries']:>8}  {scans}")
    print(f"slowest page {result['slowest_page_ms']} ms; all under {result['target_ms']} ms: {result['all_under_target']}")
    if args.plans:
        for name, plans in result["plans"].items():
            print(f"\n=== {name}")
            for item in plans:
                print(item["sql"][:400])
                print("\n".join("    " + line for line in item["plan"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
