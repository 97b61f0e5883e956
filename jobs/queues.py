"""Queues steered at run time: pause and resume, queue-wide limits, and what each queue holds.

A `skiplock_queue` row exists once a queue was paused or limited; no row means running and
unlimited. Pausing takes effect at the next claim of every worker (the claim statement reads the
row); a paused queue keeps accepting jobs. The row survives restarts. Task limits (declared in
code, jobs.flow) are listed here too, with what runs and waits under each key.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django.db import connection, transaction

from jobs.flow import ConcurrencyLimit, RateLimit
from jobs.registry import queue_problem, startable_tasks


class QueueProblem(ValueError):
    """A queue change that cannot be made (the message says why); nothing was changed."""


UNSET: Any = object()


def _wake(cursor: Any, queue: str) -> None:
    """Tell waiting workers to claim again (a resumed queue, a raised limit)."""
    cursor.execute(
        "SELECT pg_notify('procrastinate_queue_v1#' || %(q)s, '{\"type\": \"job_inserted\", \"job_id\": 0}'), "
        "pg_notify('procrastinate_any_queue_v1', '{\"type\": \"job_inserted\", \"job_id\": 0}')",
        {"q": queue},
    )


def _check_queue_name(name: str) -> None:
    problem = queue_problem(name)
    if problem:
        raise QueueProblem(f"queue {problem}")


def pause_queue(name: str, *, by: str = "") -> bool:
    """Stop every worker claiming from `name` (running jobs finish); returns False if it was paused."""
    _check_queue_name(name)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            """INSERT INTO skiplock_queue AS q (name, paused, paused_at, changed_by, starts, updated_at)
               VALUES (%(name)s, true, now(), %(by)s, '{}', now())
               ON CONFLICT (name) DO UPDATE SET paused = true, paused_at = now(), changed_by = %(by)s, updated_at = now()
               WHERE NOT q.paused
               RETURNING 1""",
            {"name": name, "by": by},
        )
        return cursor.fetchone() is not None


def resume_queue(name: str, *, by: str = "") -> bool:
    """Let workers claim from `name` again; returns False if it was not paused."""
    _check_queue_name(name)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            """UPDATE skiplock_queue SET paused = false, paused_at = NULL, changed_by = %(by)s, updated_at = now()
               WHERE name = %(name)s AND paused RETURNING 1""",
            {"name": name, "by": by},
        )
        changed = cursor.fetchone() is not None
        if changed:
            _wake(cursor, name)
        return changed


def set_queue_limits(
    name: str, *, concurrency: int | None = UNSET, rate_limit: int | None = UNSET,
    rate_period: float | None = UNSET, by: str = "",
) -> dict[str, Any]:
    """Set (a number) or clear (None) a queue's limits; what is not given stays. Returns the limits."""
    _check_queue_name(name)
    if concurrency is not UNSET and concurrency is not None:
        try:
            ConcurrencyLimit(concurrency)  # the same rule as a task's
        except ValueError as exc:
            raise QueueProblem(str(exc)) from None
    if (rate_limit is UNSET) != (rate_period is UNSET) or (rate_limit is None) != (rate_period is None):
        raise QueueProblem("give rate_limit and rate_period together (both numbers, or both null to clear)")
    if rate_limit is not UNSET and rate_limit is not None and rate_period is not None:
        try:
            RateLimit(rate_limit, per=rate_period)
        except ValueError as exc:
            raise QueueProblem(str(exc)) from None
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            """INSERT INTO skiplock_queue (name, paused, changed_by, starts, updated_at)
               VALUES (%(name)s, false, %(by)s, '{}', now()) ON CONFLICT (name) DO NOTHING""",
            {"name": name, "by": by},
        )
        sets = ["changed_by = %(by)s", "updated_at = now()"]
        params: dict[str, Any] = {"name": name, "by": by}
        if concurrency is not UNSET:
            sets.append("concurrency = %(concurrency)s")
            params["concurrency"] = concurrency
        if rate_limit is not UNSET:
            sets.append("rate_limit = %(rate_limit)s")
            sets.append("rate_period = %(rate_period)s")
            params.update(rate_limit=rate_limit, rate_period=None if rate_period is None else float(rate_period))
        cursor.execute(
            f"UPDATE skiplock_queue SET {', '.join(sets)} WHERE name = %(name)s "
            "RETURNING concurrency, rate_limit, rate_period",
            params,
        )
        row = cursor.fetchone()
        _wake(cursor, name)
    return {"concurrency": row[0], "rate_limit": row[1], "rate_period": row[2]}


@dataclass
class QueueInfo:
    """One queue as operators see it."""

    name: str
    paused: bool = False
    paused_at: dt.datetime | None = None
    concurrency: int | None = None
    rate_limit: int | None = None
    rate_period: float | None = None
    # waiting (due), scheduled, running, aborting
    depth: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("todo", "scheduled", "doing", "aborting"), 0))
    oldest_waiting_seconds: float = 0.0
    starts_in_window: int | None = None  # for a rate-limited queue

    @property
    def running(self) -> int:
        return self.depth.get("doing", 0) + self.depth.get("aborting", 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "paused": self.paused,
            "paused_at": self.paused_at.isoformat() if self.paused_at else None,
            "limits": {"concurrency": self.concurrency, "rate_limit": self.rate_limit, "rate_period": self.rate_period},
            "depth": dict(self.depth), "running": self.running,
            "oldest_waiting_seconds": round(self.oldest_waiting_seconds, 3),
            "starts_in_window": self.starts_in_window,
        }


# Runnable jobs per queue on the status index, and how long the head of each queue has waited: the
# earlier of the lowest-id job waiting since its creation (ids grow with time; one primary-key probe
# of its side row) and the earliest scheduled time that has passed (a retry, a delayed start) —
# no join of the backlog with the side rows.
WAITING_SQL = """
WITH waiting AS (
    SELECT queue_name, count(*) AS n, min(id) FILTER (WHERE scheduled_at IS NULL) AS first_id,
           min(scheduled_at) AS first_scheduled
    FROM procrastinate_jobs
    WHERE status = 'todo' AND (scheduled_at IS NULL OR scheduled_at <= now())
    GROUP BY queue_name
)
SELECT w.queue_name, w.n,
       COALESCE(EXTRACT(EPOCH FROM now() - LEAST(
           (SELECT r.created_at FROM skiplock_job r WHERE r.job_id = w.first_id), w.first_scheduled)), 0)
FROM waiting w
"""
# Active jobs per queue and state (waiting due / scheduled / running / aborting), from the status
# indexes; the head of each queue's wait as in jobs.metrics.
_QUEUE_DEPTH = """
SELECT queue_name,
       CASE WHEN status = 'doing' AND abort_requested THEN 'aborting'
            WHEN status = 'todo' AND scheduled_at > now() THEN 'scheduled'
            ELSE status::text END,
       count(*)
FROM procrastinate_jobs WHERE status IN ('todo', 'doing') GROUP BY 1, 2
"""


def list_queues(names: Iterable[str] | None = None) -> list[QueueInfo]:
    """Every queue with jobs waiting or running, or with a control row (paused, limited)."""
    queues: dict[str, QueueInfo] = {}
    with connection.cursor() as cursor:
        cursor.execute(_QUEUE_DEPTH)
        for queue, state, count in cursor.fetchall():
            queues.setdefault(queue, QueueInfo(queue)).depth[state] = int(count)
        cursor.execute(WAITING_SQL)
        for queue, _n, age in cursor.fetchall():
            queues.setdefault(queue, QueueInfo(queue)).oldest_waiting_seconds = float(age or 0)
        cursor.execute(
            """SELECT name, paused, paused_at, concurrency, rate_limit, rate_period,
                      CASE WHEN rate_limit IS NOT NULL THEN
                          (SELECT count(*) FROM unnest(starts) s WHERE s > now() - make_interval(secs => rate_period))
                      END
               FROM skiplock_queue"""
        )
        for name, paused, paused_at, concurrency, rate_limit, rate_period, recent in cursor.fetchall():
            info = queues.setdefault(name, QueueInfo(name))
            info.paused, info.paused_at = bool(paused), paused_at
            info.concurrency, info.rate_limit, info.rate_period = concurrency, rate_limit, rate_period
            info.starts_in_window = None if recent is None else int(recent)
    wanted = set(names) if names is not None else None
    return sorted((q for q in queues.values() if wanted is None or q.name in wanted), key=lambda q: q.name)


def get_queue(name: str) -> QueueInfo:
    _check_queue_name(name)
    found = list_queues([name])
    return found[0] if found else QueueInfo(name)


def every_queue() -> list[QueueInfo]:
    """list_queues() plus every queue a startable task declares, empty ones included (API, CLI)."""
    found = {info.name: info for info in list_queues()}
    for name in {spec.queue for spec in startable_tasks()} - set(found):
        found[name] = QueueInfo(name)
    return [found[name] for name in sorted(found)]


# Task limits as they stand: per key, running now, waiting, the oldest wait, starts in the window.
_TASK_LIMITS = """
SELECT l.key, l.task_name, l.concurrency, l.rate_limit, l.rate_period,
       (SELECT count(*) FROM procrastinate_jobs j
        WHERE j.status = 'doing' AND j.worker_id IS NOT NULL AND j.skiplock_limit_key = l.key) AS running,
       CASE WHEN l.rate_limit IS NOT NULL THEN
           (SELECT count(*) FROM unnest(l.starts) s WHERE s > now() - make_interval(secs => l.rate_period)) END,
       w.n, w.oldest
FROM skiplock_limit l
LEFT JOIN (
    SELECT j.skiplock_limit_key AS key, count(*) AS n,
           EXTRACT(EPOCH FROM now() - min(COALESCE(j.scheduled_at, r.created_at)))::float8 AS oldest
    FROM procrastinate_jobs j LEFT JOIN skiplock_job r ON r.job_id = j.id
    WHERE j.status = 'todo' AND j.skiplock_limit_key IS NOT NULL AND (j.scheduled_at IS NULL OR j.scheduled_at <= now())
    GROUP BY 1
) w ON w.key = l.key
ORDER BY l.key
"""


@dataclass
class LimitInfo:
    key: str
    task_name: str
    concurrency: int | None
    rate_limit: int | None
    rate_period: float | None
    running: int
    starts_in_window: int | None
    waiting: int
    oldest_waiting_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "task": self.task_name,
            "limits": {"concurrency": self.concurrency, "rate_limit": self.rate_limit, "rate_period": self.rate_period},
            "running": self.running, "starts_in_window": self.starts_in_window, "waiting": self.waiting,
            "oldest_waiting_seconds": round(self.oldest_waiting_seconds, 3),
        }


def list_task_limits() -> list[LimitInfo]:
    """Every task limit key known (declared by a started job), with what runs and waits on it."""
    with connection.cursor() as cursor:
        cursor.execute(_TASK_LIMITS)
        return [
            LimitInfo(key=k, task_name=t, concurrency=c, rate_limit=r, rate_period=p, running=int(run),
                      starts_in_window=None if recent is None else int(recent), waiting=int(n or 0),
                      oldest_waiting_seconds=float(oldest or 0.0))
            for k, t, c, r, p, run, recent, n, oldest in cursor.fetchall()
        ]


def prune_task_limits() -> int:
    """Forget limit keys no job waits on or runs under, whose rate window is over (maintenance)."""
    with connection.cursor() as cursor:
        cursor.execute(
            """DELETE FROM skiplock_limit l
               WHERE l.updated_at < now() - interval '1 hour'
                 AND NOT EXISTS (SELECT 1 FROM procrastinate_jobs j
                                 WHERE j.skiplock_limit_key = l.key AND j.status IN ('todo', 'doing'))
                 AND NOT EXISTS (SELECT 1 FROM unnest(l.starts) s
                                 WHERE s > now() - make_interval(secs => COALESCE(l.rate_period, 0)))"""
        )
        return int(cursor.rowcount)
