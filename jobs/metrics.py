"""Prometheus metrics at /metrics, read from the database at scrape time.

Every web process reports the same numbers (they come from PostgreSQL, not from process memory),
so a scrape of any replica is the whole truth. No scrape reads a whole table: waiting and running
jobs are counted on the queue's status index, and what ended comes from small counter tables that
whoever ends an attempt or a job increments in the same statement (`skiplock_count_ends`), so
pruning old jobs never lowers a counter. Label sets are bounded (MAX_LABELS, then "other").
Alert rules built on these live in docs/prometheus-alerts.yml.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from jobs.queues import WAITING_SQL, LimitInfo, list_task_limits
from jobs.registry import all_tasks, find_task
from jobs.states import State

logger = logging.getLogger(__name__)

# Seconds; job durations span milliseconds (no-op) to an hour (the default soft limit).
# Keep in step with skiplock_count_ends (migrations 0010 and 0012), which fills the buckets.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
# Label sets stay bounded whatever names jobs bring: the registry's queues and tasks, plus the
# busiest others up to this many, the rest summed under "other".
MAX_LABELS = 20
OTHER = "other"

# Waiting and running jobs, from the queue's status index (their number is the backlog, not the history).
_ACTIVE_BY_STATE = """
SELECT queue_name, CASE WHEN status = 'doing' AND abort_requested THEN 'aborting' ELSE status::text END, count(*)
FROM procrastinate_jobs WHERE status IN ('todo', 'doing') GROUP BY 1, 2
"""
# Jobs that reached a final state: counters kept by the writers (skiplock_count_ends), never lowered.
_FINAL_BY_STATE = "SELECT queue_name, state, sum(count)::bigint FROM skiplock_queue_stats GROUP BY 1, 2"
_ATTEMPTS = "SELECT task_name, outcome, count, seconds_sum, buckets FROM skiplock_task_stats"
_WORKERS = """
SELECT count(*) FILTER (WHERE last_heartbeat > now() - make_interval(secs => %s)), count(*)
FROM procrastinate_workers
"""
_STALLED = """
SELECT count(*) FROM procrastinate_jobs j LEFT JOIN procrastinate_workers w ON w.id = j.worker_id
WHERE j.status = 'doing' AND (w.id IS NULL OR w.last_heartbeat < now() - make_interval(secs => %s))
"""
# Queues an operator paused or limited (jobs.queues); a queue without a row runs unlimited.
_QUEUE_CONTROLS = "SELECT name, paused, concurrency, rate_limit, rate_period FROM skiplock_queue"
_RUNNING = """
SELECT j.task_name, EXTRACT(EPOCH FROM now() - (
    SELECT max(e.at) FROM procrastinate_events e WHERE e.job_id = j.id AND e.type = 'started'))::float8
FROM procrastinate_jobs j WHERE j.status = 'doing'
"""


def bounded(counts: dict[str, float], keep: set[str], limit: int = MAX_LABELS) -> dict[str, str]:
    """Map each name to itself or to "other": `keep` always stays, then the largest up to `limit`."""
    ranked = sorted((name for name in counts if name not in keep), key=lambda name: (-counts[name], name))
    room = max(0, limit - len(keep))
    kept = keep | set(ranked[:room])
    return {name: (name if name in kept else OTHER) for name in set(counts) | keep}


class DatabaseCollector(Collector):
    """Collects every Skiplock metric with a handful of aggregate queries."""

    def collect(self) -> Iterator[Metric]:
        started = time.monotonic()
        up = GaugeMetricFamily("skiplock_database_up", "1 when the metrics could be read from PostgreSQL")
        try:
            families = self._read()
        except DatabaseError as exc:
            logger.warning("metrics: database unavailable (%s)", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families
        duration = GaugeMetricFamily("skiplock_metrics_query_seconds", "Time spent reading the metrics from PostgreSQL")
        duration.add_metric([], time.monotonic() - started)
        yield duration

    def _read(self) -> list[Metric]:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET LOCAL statement_timeout = '10s'")
            cursor.execute(_ACTIVE_BY_STATE)
            by_state = cursor.fetchall()
            cursor.execute(_FINAL_BY_STATE)
            by_state += cursor.fetchall()
            cursor.execute(WAITING_SQL)
            waiting = cursor.fetchall()
            cursor.execute(_ATTEMPTS)
            attempts = cursor.fetchall()
            cursor.execute(_WORKERS, [settings.SKIPLOCK_WORKER_LIVE_AFTER])
            live_workers, all_workers = cursor.fetchone()
            cursor.execute(_STALLED, [settings.SKIPLOCK_STALLED_AFTER])
            stalled = cursor.fetchone()[0]
            cursor.execute(_RUNNING)
            running = cursor.fetchall()
            cursor.execute(_QUEUE_CONTROLS)
            controls = cursor.fetchall()
            limits = list_task_limits()
        return [
            *self._jobs(by_state, waiting),
            *self._attempts(attempts),
            *self._workers(live_workers, all_workers, stalled),
            *self._running(running),
            *self._queue_controls(controls),
            *self._task_limits(limits),
        ]

    def _jobs(self, by_state: list[Any], waiting: list[Any]) -> list[Metric]:
        jobs = GaugeMetricFamily(
            "skiplock_jobs",
            "Jobs by queue and state: waiting and running ones now, and those that reached a final state "
            "(those never go down, pruning included)",
            labels=["queue", "state"],
        )
        sizes: dict[str, float] = {}
        for queue, _state, count in [*by_state, *((q, None, c) for q, c, _ in waiting)]:
            sizes[queue] = sizes.get(queue, 0) + float(count)
        label = bounded(sizes, {spec.queue for spec in all_tasks()})
        seen: dict[tuple[str, str], int] = {}
        for queue, state, count in by_state:
            key = (label[queue], state)
            seen[key] = seen.get(key, 0) + int(count)
        queues = sorted(set(label.values()))
        for queue in queues:
            for state in State:  # every state, zeros included, so alerts and rates never see gaps
                jobs.add_metric([queue, state.value], seen.get((queue, state.value), 0))
        depth = GaugeMetricFamily("skiplock_queue_depth", "Jobs waiting to run now (not scheduled later)", labels=["queue"])
        oldest = GaugeMetricFamily(
            "skiplock_oldest_waiting_job_age_seconds", "How long the oldest runnable job has waited", labels=["queue"]
        )
        found: dict[str, tuple[int, float]] = {}
        for queue, count, age in waiting:
            previous = found.get(label[queue], (0, 0.0))
            found[label[queue]] = (previous[0] + int(count), max(previous[1], float(age)))
        for queue in queues:
            count, age = found.get(queue, (0, 0.0))
            depth.add_metric([queue], count)
            oldest.add_metric([queue], float(age))
        return [jobs, depth, oldest]

    def _attempts(self, rows: list[Any]) -> list[Metric]:
        from prometheus_client.core import CounterMetricFamily

        processed = CounterMetricFamily(
            "skiplock_jobs_processed", "Ended job attempts, by task and outcome (never lowered by pruning)",
            labels=["task", "outcome"],
        )
        durations = HistogramMetricFamily(
            "skiplock_job_duration_seconds", "Duration of ended job attempts, by task and outcome",
            labels=["task", "outcome"],
        )
        sizes: dict[str, float] = {}
        for task, _outcome, count, *_ in rows:
            sizes[task] = sizes.get(task, 0) + float(count)
        label = bounded(sizes, {spec.name for spec in all_tasks()})
        totals: dict[tuple[str, str], list[Any]] = {}
        for task, outcome, count, seconds, buckets in rows:
            entry = totals.setdefault((label[task], outcome), [0, 0.0, [0] * len(DURATION_BUCKETS)])
            entry[0] += int(count)
            entry[1] += float(seconds)
            entry[2] = [a + int(b) for a, b in zip(entry[2], list(buckets or [])[:len(DURATION_BUCKETS)], strict=False)]
        for (task, outcome), (count, total, bucket_counts) in sorted(totals.items()):
            processed.add_metric([task, outcome], count)
            buckets = [(str(bound), value) for bound, value in zip(DURATION_BUCKETS, bucket_counts, strict=True)]
            buckets.append(("+Inf", count))
            durations.add_metric([task, outcome], buckets, total)
        return [processed, durations]

    def _workers(self, live: int, total: int, stalled: int) -> list[Metric]:
        workers = GaugeMetricFamily("skiplock_workers_live", "Workers whose heartbeat is recent")
        workers.add_metric([], live)
        registered = GaugeMetricFamily("skiplock_workers_registered", "Workers registered, live or not")
        registered.add_metric([], total)
        stalled_jobs = GaugeMetricFamily(
            "skiplock_stalled_jobs", "Running jobs whose worker stopped heartbeating (SKIPLOCK_STALLED_AFTER)"
        )
        stalled_jobs.add_metric([], stalled)
        return [workers, registered, stalled_jobs]

    def _running(self, rows: list[Any]) -> list[Metric]:
        running = GaugeMetricFamily("skiplock_jobs_running", "Jobs running now, by task", labels=["task"])
        oldest = GaugeMetricFamily(
            "skiplock_running_job_max_age_seconds", "How long the longest-running job of a task has run", labels=["task"]
        )
        past_soft = GaugeMetricFamily(
            "skiplock_jobs_past_soft_limit", "Running jobs past their task's soft time limit", labels=["task"]
        )
        soft = GaugeMetricFamily("skiplock_task_soft_time_limit_seconds", "Each task's soft time limit", labels=["task"])
        hard = GaugeMetricFamily("skiplock_task_hard_time_limit_seconds", "Each task's hard time limit", labels=["task"])
        per_task: dict[str, list[float]] = {spec.name: [] for spec in all_tasks()}
        for task, elapsed in rows:
            per_task.setdefault(task, []).append(float(elapsed or 0.0))
        for task, ages in sorted(per_task.items()):
            spec = find_task(task)
            running.add_metric([task], len(ages))
            oldest.add_metric([task], max(ages, default=0.0))
            if spec is not None:
                past_soft.add_metric([task], sum(1 for age in ages if age > spec.soft_time_limit))
                soft.add_metric([task], spec.soft_time_limit)
                hard.add_metric([task], spec.hard_time_limit)
        return [running, oldest, past_soft, soft, hard]

    def _queue_controls(self, rows: list[Any]) -> list[Metric]:
        paused = GaugeMetricFamily(
            "skiplock_queue_paused", "1 while the queue is paused (no worker starts its jobs), else 0", labels=["queue"]
        )
        concurrency = GaugeMetricFamily(
            "skiplock_queue_concurrency_limit", "At most this many jobs of the queue run at once", labels=["queue"]
        )
        rate = GaugeMetricFamily(
            "skiplock_queue_rate_limit", "At most this many starts of the queue per rate period", labels=["queue"]
        )
        period = GaugeMetricFamily(
            "skiplock_queue_rate_period_seconds", "The window of the queue's rate limit", labels=["queue"]
        )
        # Control rows exist only where an operator paused or limited a queue: few, and named on purpose.
        flags = {spec.queue: False for spec in all_tasks()}
        for name, is_paused, limit, rate_limit, rate_period in rows:
            flags[name] = bool(is_paused)
            if limit is not None:
                concurrency.add_metric([name], limit)
            if rate_limit is not None:
                rate.add_metric([name], rate_limit)
                period.add_metric([name], float(rate_period))
        for name, flag in sorted(flags.items()):
            paused.add_metric([name], 1 if flag else 0)
        return [paused, concurrency, rate, period]

    def _task_limits(self, limits: list[LimitInfo]) -> list[Metric]:
        running = GaugeMetricFamily("skiplock_limit_running", "Jobs running under a task limit key", labels=["key"])
        waiting = GaugeMetricFamily(
            "skiplock_limit_waiting", "Runnable jobs waiting under a task limit key (held back while it is full)",
            labels=["key"],
        )
        oldest = GaugeMetricFamily(
            "skiplock_limit_oldest_wait_seconds", "How long the oldest job waiting under a task limit key has waited",
            labels=["key"],
        )
        # Keys come from job arguments ("partner:{partner_id}"): the busiest keep their label, the rest sum up.
        label = bounded({limit.key: float(limit.running + limit.waiting) for limit in limits}, set())
        totals: dict[str, list[float]] = {}
        for limit in limits:
            entry = totals.setdefault(label[limit.key], [0, 0, 0.0])
            entry[0] += limit.running
            entry[1] += limit.waiting
            entry[2] = max(entry[2], limit.oldest_waiting_seconds)
        for key, (run, wait, age) in sorted(totals.items()):
            running.add_metric([key], run)
            waiting.add_metric([key], wait)
            oldest.add_metric([key], age)
        return [running, waiting, oldest]


def build_registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector())
    return registry


_registry: CollectorRegistry | None = None


def metrics_view(request: HttpRequest) -> HttpResponse:
    global _registry
    if not settings.SKIPLOCK_OPEN_METRICS:
        from jobs.auth import read_access
        from jobs.health import unauthorized

        try:
            allowed = read_access(request) is not None
        except DatabaseError:
            return HttpResponse("skiplock_database_up 0\n", status=503, content_type=CONTENT_TYPE_LATEST)
        if not allowed:
            return unauthorized()
    if _registry is None:
        _registry = build_registry()
    return HttpResponse(generate_latest(_registry), content_type=CONTENT_TYPE_LATEST)
