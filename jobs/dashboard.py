"""Aggregate reads for the job console: each one reads an index or a small rollup table, never the
job history.

Counts of waiting and running jobs are exact (the queue's status indexes hold only the backlog);
what finished in the last hour and day comes from the rollup rings `skiplock_count_ends` writes
in the statement that ends jobs (`skiplock_minute_stats`, `skiplock_hour_stats`, migration 0012);
the all-time numbers are PostgreSQL's own estimates (`pg_class.reltuples`, `pg_stats`), which cost
nothing at any size.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import connection
from django.utils import timezone

from jobs.registry import all_tasks, find_task
from jobs.states import FINAL_STATES, State

FAILURE_RATE_ALERT = 0.10
RECENTLY_DEAD = dt.timedelta(hours=24)


def _rows(sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params or [])
        return list(cursor.fetchall())


def live_after() -> dt.timedelta:
    """A worker is live while its heartbeat is younger than this: the setting health and /metrics use."""
    return dt.timedelta(seconds=float(settings.SKIPLOCK_WORKER_LIVE_AFTER))


# --- cheap helpers for the job list ---------------------------------------------------------------


SMALL_TABLE = 10_000


def estimated_total() -> int:
    """PostgreSQL's estimate of the number of jobs (no scan); exact while the table is small
    (a never-analysed table has no estimate, and counting a few thousand rows costs nothing)."""
    rows = _rows(
        """
        SELECT CASE WHEN reltuples >= %s THEN reltuples::bigint
                    ELSE (SELECT count(*) FROM (SELECT 1 FROM procrastinate_jobs LIMIT %s) AS few) END
        FROM pg_class WHERE oid = 'procrastinate_jobs'::regclass
        """,
        [SMALL_TABLE, SMALL_TABLE * 2],
    )
    return max(0, int(rows[0][0])) if rows else 0


def distinct_tasks_and_queues() -> tuple[list[str], list[str]]:
    """Every task and queue name in the table, by a loose index scan (one probe per name)."""
    sql = """
        WITH RECURSIVE
        t(v) AS (SELECT min(task_name) FROM procrastinate_jobs
                 UNION ALL
                 SELECT (SELECT min(task_name) FROM procrastinate_jobs WHERE task_name > t.v)
                 FROM t WHERE t.v IS NOT NULL),
        q(v) AS (SELECT min(queue_name) FROM procrastinate_jobs
                 UNION ALL
                 SELECT (SELECT min(queue_name) FROM procrastinate_jobs WHERE queue_name > q.v)
                 FROM q WHERE q.v IS NOT NULL)
        SELECT 't', v FROM t WHERE v IS NOT NULL
        UNION ALL
        SELECT 'q', v FROM q WHERE v IS NOT NULL
    """
    tasks = {spec.name for spec in all_tasks()}
    queues = {spec.queue for spec in all_tasks()}
    for kind, value in _rows(sql):
        (tasks if kind == "t" else queues).add(value)
    return sorted(tasks), sorted(queues)


# --- dashboard ------------------------------------------------------------------------------------


@dataclass
class Alert:
    key: str
    level: str  # "error" or "warning"
    message: str
    link: str = ""


@dataclass
class Dashboard:
    now: dt.datetime
    window_hours: int
    active_by_state: dict[str, int]
    finished_by_state: dict[str, int]
    estimated_by_state: dict[str, int]
    estimated_total: int
    by_queue: list[dict[str, Any]]
    per_minute: list[dict[str, Any]]
    per_hour: list[dict[str, Any]]
    percentiles: list[dict[str, Any]]
    oldest_waiting: dict[str, Any] | None
    stalled: list[dict[str, Any]]
    over_soft_limit: list[dict[str, Any]]
    live_workers: int
    failure_rate_hour: float | None
    finished_hour: int
    paused: list[dict[str, Any]] = field(default_factory=list)  # queues paused (jobs.queues), by name
    alerts: list[Alert] = field(default_factory=list)


def active_counts() -> dict[str, int]:
    """Exact counts of waiting and running jobs, split like the display states."""
    rows = _rows(
        """
        SELECT CASE WHEN status = 'doing' AND abort_requested THEN 'aborting' ELSE status::text END AS state,
               count(*) FILTER (WHERE scheduled_at > now() AND attempts = 0) AS scheduled,
               count(*) FILTER (WHERE attempts > 0 AND status = 'todo') AS retrying,
               count(*)
        FROM procrastinate_jobs WHERE status IN ('todo', 'doing') GROUP BY 1
        """,
    )
    counts = {"todo": 0, "scheduled": 0, "retrying": 0, "doing": 0, "aborting": 0}
    for state, scheduled, retrying, total in rows:
        if state == State.TODO:
            counts["scheduled"] = scheduled
            counts["retrying"] = retrying
            counts["todo"] = total - scheduled - retrying
        else:
            counts[state] = total
    return counts


# Durations are binned on a log scale (1 ms … 1 day, 120 bins, ~8 % wide) so the rollup rows yield
# every percentile; the exact maximum comes along. Keep in step with migration 0012.
_BINS, _LO, _HI = 120, 0.001, 86400.0
MINUTE_SLOTS, HOUR_SLOTS = 64, 32  # the rings of skiplock_minute_stats / skiplock_hour_stats


@dataclass
class Rollup:
    """What finished since a moment, from the rollup rows `skiplock_count_ends` writes when jobs end."""

    by_bucket: dict[dt.datetime, tuple[int, int, int]]  # start → (succeeded, failed, cancelled+aborted)
    by_state: dict[str, int]
    by_queue: dict[str, tuple[int, int]]  # queue → (succeeded, failed)
    durations: dict[str, dict[str, Any]]  # task → {"count", "bins": {bin: n}, "max"}


def _empty_rollup() -> tuple[dict[dt.datetime, list[int]], dict[str, int]]:
    return {}, {s.value: 0 for s in State if s in FINAL_STATES}


def _add(by_bucket: dict[dt.datetime, list[int]], by_state: dict[str, int], moment: dt.datetime, state: str,
         n: int) -> None:
    counts = by_bucket.setdefault(moment, [0, 0, 0])
    counts[0 if state == State.SUCCEEDED else 1 if state == State.FAILED else 2] += n
    if state in by_state:
        by_state[state] += n


def minute_rollup(*, since: dt.datetime) -> Rollup:
    """Jobs that finished per minute and state since `since` (at most the ring's 64 minutes back)."""
    by_bucket, by_state = _empty_rollup()
    for minute, state, n in _rows(
        "SELECT minute, state, sum(count)::bigint FROM skiplock_minute_stats WHERE minute >= %s GROUP BY 1, 2",
        [since],
    ):
        _add(by_bucket, by_state, minute, state, int(n))
    return Rollup(by_bucket={b: (c[0], c[1], c[2]) for b, c in by_bucket.items()}, by_state=by_state,
                  by_queue={}, durations={})


def hour_rollup(*, since: dt.datetime) -> Rollup:
    """Jobs that finished per hour since `since` (at most the ring's 32 hours back): by state, by
    queue, and the duration bins of the succeeded ones per task."""
    by_bucket, by_state = _empty_rollup()
    by_queue: dict[str, list[int]] = {}
    durations: dict[str, dict[str, Any]] = {}
    # Summed in SQL, three groupings in one pass: a row per hour and state, per queue and state, per
    # task and duration bin (a few hundred rows, where the ring holds thousands).
    for hour, queue, task, state, bin_, n, top in _rows(
        """
        SELECT hour, queue_name, task_name, state, bin, sum(count)::bigint, max(max_seconds)
        FROM skiplock_hour_stats WHERE hour >= %s
        GROUP BY GROUPING SETS ((hour, state), (queue_name, state), (task_name, state, bin))
        """,
        [since],
    ):
        n = int(n)
        if hour is not None:
            _add(by_bucket, by_state, hour, state, n)
        elif queue is not None:
            pair = by_queue.setdefault(queue, [0, 0])
            if state == State.SUCCEEDED:
                pair[0] += n
            elif state == State.FAILED:
                pair[1] += n
        elif task is not None and state == State.SUCCEEDED and bin_ >= 0:
            entry = durations.setdefault(task, {"count": 0, "bins": {}, "max": 0.0})
            entry["count"] += n
            entry["bins"][int(bin_)] = entry["bins"].get(int(bin_), 0) + n
            entry["max"] = max(entry["max"], float(top or 0.0))
    return Rollup(
        by_bucket={b: (c[0], c[1], c[2]) for b, c in by_bucket.items()},
        by_state=by_state,
        by_queue={q: (c[0], c[1]) for q, c in by_queue.items()},
        durations=durations,
    )


def rollup(*, since: dt.datetime, bucket: str) -> Rollup:
    assert bucket in ("minute", "hour")
    return minute_rollup(since=since) if bucket == "minute" else hour_rollup(since=since)


def _bin_edge(index: float) -> float:
    """Seconds at a (fractional) bin position: bin i spans [edge(i-1), edge(i)) for 1 ≤ i ≤ _BINS."""
    import math

    return math.exp(math.log(_LO) + (math.log(_HI) - math.log(_LO)) * index / _BINS)


def percentile(bins: dict[int, int], total: int, fraction: float, top: float) -> float:
    """Nearest-rank percentile from log-scale bins: the upper edge of the rank's bin (at most ~8 %
    high), capped by the exact maximum, so p50 ≤ p95 ≤ p99 ≤ max always holds."""
    import math

    rank = max(1, math.ceil(fraction * total))
    seen = 0
    for index in sorted(bins):
        seen += bins[index]
        if seen >= rank:
            return min(_bin_edge(max(index, 0)), top)
    return top


def duration_percentiles(rolled: Rollup) -> list[dict[str, Any]]:
    out = []
    for task in sorted(rolled.durations):
        entry = rolled.durations[task]
        n, bins, top = entry["count"], entry["bins"], entry["max"]
        out.append({"task": task, "count": n, "max": top,
                    **{name: percentile(bins, n, q, top) for name, q in (("p50", .5), ("p95", .95), ("p99", .99))}})
    return out


def queue_summary(*, finished: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """Per queue: waiting (runnable now), scheduled, running, and succeeded/failed in the window."""
    # Counted on the queue's status indexes; the oldest waiting job of a queue is its lowest id (ids
    # grow with time), whose creation time is one primary-key probe, not a join of the whole backlog.
    active = _rows(
        """
        WITH active AS (
            SELECT queue_name,
                   count(*) FILTER (WHERE status = 'todo' AND (scheduled_at IS NULL OR scheduled_at <= now())) AS waiting,
                   count(*) FILTER (WHERE status = 'todo' AND scheduled_at > now()) AS scheduled,
                   count(*) FILTER (WHERE status = 'doing') AS running,
                   min(id) FILTER (WHERE status = 'todo' AND (scheduled_at IS NULL OR scheduled_at <= now())) AS first_id
            FROM procrastinate_jobs WHERE status IN ('todo', 'doing') GROUP BY queue_name
        )
        SELECT a.queue_name, a.waiting, a.scheduled, a.running,
               (SELECT r.created_at FROM skiplock_job r WHERE r.job_id = a.first_id)
        FROM active a
        """,
    )
    queues: dict[str, dict[str, Any]] = {}
    for spec in all_tasks():
        queues.setdefault(spec.queue, {})
    for name, waiting, scheduled, running, oldest in active:
        queues.setdefault(name, {}).update(waiting=waiting, scheduled=scheduled, running=running, oldest=oldest)
    for name, (succeeded, failed) in finished.items():
        queues.setdefault(name, {}).update(succeeded=succeeded, failed=failed)
    depth_limit = int(settings.SKIPLOCK_ALERT_QUEUE_DEPTH)
    out = []
    for name in sorted(queues):
        row = {"queue": name, "waiting": 0, "scheduled": 0, "running": 0, "succeeded": 0, "failed": 0,
               "oldest": None, **queues[name]}
        row["over_depth"] = row["waiting"] > depth_limit
        out.append(row)
    return out


def series(found: dict[dt.datetime, tuple[int, int, int]], *, bucket: str, buckets: int,
           now: dt.datetime) -> list[dict[str, Any]]:
    """Succeeded and failed jobs per bucket, oldest first, empty buckets filled in."""
    step = dt.timedelta(minutes=1) if bucket == "minute" else dt.timedelta(hours=1)
    end = now.replace(second=0, microsecond=0)
    if bucket == "hour":
        end = end.replace(minute=0)
    out = []
    for index in range(buckets - 1, -1, -1):
        start = end - index * step
        ok, failed, other = found.get(start, (0, 0, 0))
        out.append({"start": start, "succeeded": ok, "failed": failed, "other": other})
    return out


def throughput(*, since: dt.datetime, bucket: str, buckets: int, now: dt.datetime) -> list[dict[str, Any]]:
    """Succeeded and failed jobs per `bucket` ('minute' or 'hour') since `since`."""
    return series(rollup(since=since, bucket=bucket).by_bucket, bucket=bucket, buckets=buckets, now=now)


def estimated_state_counts(total: int) -> dict[str, int]:
    """All-time counts per state from the planner statistics (ANALYZE keeps them fresh)."""
    rows = _rows(
        """
        SELECT most_common_vals::text::text[], most_common_freqs FROM pg_stats
        WHERE schemaname = current_schema() AND tablename = 'procrastinate_jobs' AND attname = 'status'
        """
    )
    if not rows or rows[0][0] is None:
        return {}
    return {value: round(freq * total) for value, freq in zip(rows[0][0], rows[0][1], strict=False)}


def oldest_waiting() -> dict[str, Any] | None:
    """The runnable job that has waited longest (the head of the line is what users feel)."""
    # Two candidates, neither a join of the backlog: the lowest-id job waiting since its creation
    # (ids grow with time; its side row by primary key), and the job runnable since the earliest
    # scheduled time (a retry or a delayed start).
    rows = _rows(
        """
        SELECT * FROM (
            (SELECT j.id, j.task_name, j.queue_name,
                    (SELECT r.created_at FROM skiplock_job r WHERE r.job_id = j.id) AS since
             FROM procrastinate_jobs j WHERE j.status = 'todo' AND j.scheduled_at IS NULL ORDER BY j.id LIMIT 1)
            UNION ALL
            (SELECT j.id, j.task_name, j.queue_name, j.scheduled_at
             FROM procrastinate_jobs j WHERE j.status = 'todo' AND j.scheduled_at <= now()
             ORDER BY j.scheduled_at LIMIT 1)
        ) AS candidates
        ORDER BY since NULLS LAST LIMIT 1
        """
    )
    if not rows:
        return None
    job_id, task, queue, since = rows[0]
    return {"job_id": job_id, "task": task, "queue": queue, "since": since}


def running_jobs(*, limit: int = 500) -> list[dict[str, Any]]:
    """Running jobs with their worker's last heartbeat (None: the worker row is gone)."""
    rows = _rows(
        """
        SELECT s.job_id, s.task_name, s.queue_name, s.started_at, s.worker_name, s.progress, s.step,
               w.last_heartbeat, pj.worker_id
        FROM skiplock_job_view s
        JOIN procrastinate_jobs pj ON pj.id = s.job_id
        LEFT JOIN procrastinate_workers w ON w.id = pj.worker_id
        WHERE s.status = 'doing'
        ORDER BY s.started_at LIMIT %s
        """,
        [limit],
    )
    keys = ("job_id", "task", "queue", "started_at", "worker", "progress", "step", "heartbeat", "worker_id")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def live_worker_count() -> int:
    rows = _rows(
        "SELECT count(*) FROM procrastinate_workers WHERE last_heartbeat > now() - %s", [live_after()]
    )
    return int(rows[0][0])


def day_rollup(*, now: dt.datetime) -> Rollup:
    """The last 24 hours (from the start of the hour 24 hours ago), by hour."""
    return hour_rollup(since=(now - dt.timedelta(hours=24)).replace(minute=0, second=0, microsecond=0))


def dashboard(*, now: dt.datetime | None = None) -> Dashboard:
    now = now or timezone.now()
    hour_ago = now - dt.timedelta(hours=1)
    day = day_rollup(now=now)
    per_minute = throughput(since=hour_ago.replace(second=0, microsecond=0), bucket="minute", buckets=60, now=now)
    per_hour = series(day.by_bucket, bucket="hour", buckets=24, now=now)
    ok_hour = sum(b["succeeded"] for b in per_minute)
    failed_hour = sum(b["failed"] for b in per_minute)
    finished_hour = ok_hour + failed_hour
    running = running_jobs()
    total = estimated_total()
    stalled_after = dt.timedelta(seconds=int(settings.SKIPLOCK_STALLED_AFTER))
    stalled = [r for r in running if r["heartbeat"] is None or now - r["heartbeat"] > stalled_after]
    over_soft = []
    for job in running:
        spec = find_task(job["task"])
        if spec and job["started_at"] and (now - job["started_at"]).total_seconds() > spec.soft_time_limit:
            over_soft.append({**job, "soft_limit": spec.soft_time_limit})
    paused = paused_queues()
    board = Dashboard(
        now=now,
        window_hours=24,
        active_by_state=active_counts(),
        finished_by_state=day.by_state,
        estimated_by_state=estimated_state_counts(total),
        estimated_total=total,
        by_queue=queue_summary(finished=day.by_queue),
        per_minute=per_minute,
        per_hour=per_hour,
        percentiles=duration_percentiles(day),
        oldest_waiting=oldest_waiting(),
        stalled=stalled,
        over_soft_limit=over_soft,
        live_workers=live_worker_count(),
        failure_rate_hour=(failed_hour / finished_hour) if finished_hour else None,
        finished_hour=finished_hour,
        paused=paused,
    )
    paused_names = {p["queue"] for p in paused}
    for row in board.by_queue:
        row["paused"] = row["queue"] in paused_names
    board.alerts = alerts(board)
    return board


def paused_queues() -> list[dict[str, Any]]:
    """Queues paused at run time (a few rows of skiplock_queue), with when and by whom."""
    return [{"queue": name, "since": since, "by": by} for name, since, by in _rows(
        "SELECT name, paused_at, changed_by FROM skiplock_queue WHERE paused ORDER BY name")]


def alerts(board: Dashboard) -> list[Alert]:
    """The alert conditions, in the order an operator should look at them."""
    found = []
    if board.paused:
        held_by = {row["queue"]: row["waiting"] + row["scheduled"] for row in board.by_queue}
        names = ", ".join(p["queue"] for p in board.paused)
        held = sum(held_by.get(p["queue"], 0) for p in board.paused)
        found.append(Alert("paused", "warning",
                           f"Paused: {names}. No worker starts their jobs ({held} waiting) until they are "
                           "resumed on the Queues page or with `manage.py queue resume`."))
    waiting = board.active_by_state.get("todo", 0) + board.active_by_state.get("retrying", 0)
    if board.live_workers == 0:
        found.append(Alert("no_live_worker", "error",
                           f"No live worker: {waiting} runnable job(s) will not run until one starts "
                           "(`manage.py worker`)."))
    if board.failure_rate_hour is not None and board.failure_rate_hour > FAILURE_RATE_ALERT:
        found.append(Alert("failure_rate", "error",
                           f"Failure rate {board.failure_rate_hour:.0%} over the last hour "
                           f"({board.finished_hour} finished jobs; alert above {FAILURE_RATE_ALERT:.0%})."))
    limit = int(settings.SKIPLOCK_ALERT_QUEUE_DEPTH)
    for row in board.by_queue:
        if row["over_depth"]:
            found.append(Alert(f"queue_depth:{row['queue']}", "warning",
                               f"Queue '{row['queue']}' has {row['waiting']} runnable jobs waiting "
                               f"(threshold SKIPLOCK_ALERT_QUEUE_DEPTH={limit})."))
    for job in board.over_soft_limit:
        found.append(Alert(f"soft_limit:{job['job_id']}", "warning",
                           f"Job #{job['job_id']} ({job['task']}) has run past its soft time limit "
                           f"of {job['soft_limit']:.0f} s.", link=str(job["job_id"])))
    if board.stalled:
        found.append(Alert("stalled", "warning",
                           f"{len(board.stalled)} running job(s) belong to a worker with no recent heartbeat "
                           "(stalled; the maintenance task will retry them)."))
    return found


# --- workers --------------------------------------------------------------------------------------


def workers(*, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Live workers and those seen in the last day, with heartbeat, jobs in flight and queues."""
    now = now or timezone.now()
    rows = _rows(
        """
        WITH inflight AS (
            SELECT worker_id, count(*) AS n FROM procrastinate_jobs
            WHERE worker_id IS NOT NULL AND status = 'doing' GROUP BY worker_id
        ),
        ids AS (
            SELECT id AS worker_id FROM procrastinate_workers
            UNION
            SELECT worker_id FROM skiplock_worker WHERE last_seen_at > %s OR stopped_at > %s
        )
        SELECT ids.worker_id, i.name, i.hostname, i.pid, i.queues, i.concurrency, i.processes,
               i.started_at, i.stopped_at, COALESCE(w.last_heartbeat, i.last_seen_at) AS heartbeat,
               w.id IS NOT NULL AS registered, COALESCE(f.n, 0)
        FROM ids
        LEFT JOIN skiplock_worker i ON i.worker_id = ids.worker_id
        LEFT JOIN procrastinate_workers w ON w.id = ids.worker_id
        LEFT JOIN inflight f ON f.worker_id = ids.worker_id
        ORDER BY heartbeat DESC NULLS LAST LIMIT 500
        """,
        [now - RECENTLY_DEAD, now - RECENTLY_DEAD],
    )
    live_cut = now - live_after()
    out = []
    for wid, name, host, pid, queues, concurrency, processes, started, stopped, beat, registered, inflight in rows:
        live = bool(registered and beat is not None and beat > live_cut and stopped is None)
        out.append({
            "worker_id": wid, "name": name or f"worker-{wid}", "hostname": host or "", "pid": pid,
            "queues": _queue_names(queues), "concurrency": concurrency, "processes": processes,
            "started_at": started, "stopped_at": stopped, "heartbeat": beat, "live": live,
            "in_flight": inflight,
            "status": "live" if live else ("stopped" if stopped else "dead"),
        })
    return out


def _queue_names(value: Any) -> list[str]:
    """A worker's queues from a raw query: Django hands jsonb over as text there, not as a list."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return [value]
    return [str(name) for name in value] if isinstance(value, list) else []


# --- periodic schedules ---------------------------------------------------------------------------


def periodic_rows(*, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Each periodic schedule with its next run, last run and that run's outcome (jobs.periodic)."""
    from jobs.periodic import periodic_schedules

    rows = []
    for item in periodic_schedules(now=now):
        spec = find_task(item["task_name"])
        rows.append({**item, "description": spec.description.splitlines()[0] if spec and spec.description else ""})
    return sorted(rows, key=lambda r: (r["task_name"], r["periodic_id"]))
