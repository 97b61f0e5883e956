"""Plan checks on tiny test tables: EXPLAIN as PostgreSQL would plan the statement at scale."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from django.db import connection

JOB_TABLES = ("procrastinate_jobs", "procrastinate_events", "skiplock_job", "skiplock_job_attempt")


@contextmanager
def plans_at_scale() -> Iterator[Callable[[str], str]]:
    """An `explain(sql) -> plan text` with no seq scan and no bitmap heap scan allowed (a few test
    rows would otherwise make both the cheapest plan)."""
    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")
        cursor.execute("SET enable_bitmapscan = off")

        def explain(sql: str) -> str:
            cursor.execute("EXPLAIN " + sql)
            return "\n".join(row[0] for row in cursor.fetchall()) + "\n"

        try:
            yield explain
        finally:
            cursor.execute("RESET enable_seqscan")
            cursor.execute("RESET enable_bitmapscan")


def assert_no_seq_scan_of_job_tables(statements: Iterable[str]) -> None:
    """Every statement walks indexes of the job tables at scale, never a whole table."""
    with plans_at_scale() as explain:
        for sql in statements:
            plan = explain(sql)
            for table in JOB_TABLES:
                assert f"Seq Scan on {table} " not in plan, (sql, plan)
