"""Prometheus metrics at /metrics, read from the database at scrape time.

Every web process reports the same numbers (they come from PostgreSQL, not from process memory),
so a scrape of any replica is the whole truth. Counters are computed from the retained job
history: pruning old jobs lowers them, which Prometheus treats as a counter reset.
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

from jobs.registry import all_tasks, find_task
from jobs.states import State

logger = logging.getLogger(__name__)

# Seconds; job durations span milliseconds (no-op) to an hour (the default soft limit).
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

_JOBS_BY_STATE = "SELECT queue_name, state, count(*) FROM skiplock_job GROUP BY 1, 2"
_WAITING = """
SELECT queue_name, count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(GREATEST(created_at, COALESCE(scheduled_at, created_at)))), 0)
FROM skiplock_job
WHERE state = 'todo' AND (scheduled_at IS NULL OR scheduled_at <= now())
GROUP BY 1
"""
_ATTEMPTS = """
SELECT j.task_name, a.outcome, count(*), COALESCE(sum(a.d), 0), {buckets}
FROM (SELECT job_id, outcome, EXTRACT(EPOCH FROM finished_at - started_at)::float8 AS d
      FROM skiplock_job_attempt WHERE finished_at IS NOT NULL) AS a
JOIN skiplock_job j ON j.job_id = a.job_id
GROUP BY 1, 2
""".format(buckets=", ".join(f"count(*) FILTER (WHERE a.d <= {b})" for b in DURATION_BUCKETS))
_WORKERS = """
SELECT count(*) FILTER (WHERE last_heartbeat > now() - make_interval(secs => %s)), count(*)
FROM procrastinate_workers
"""
_STALLED = """
SELECT count(*) FROM procrastinate_jobs j LEFT JOIN procrastinate_workers w ON w.id = j.worker_id
WHERE j.status = 'doing' AND (w.id IS NULL OR w.last_heartbeat < now() - make_interval(secs => %s))
"""
_RUNNING = """
SELECT j.task_name, EXTRACT(EPOCH FROM now() - a.started_at)::float8
FROM skiplock_job j JOIN skiplock_job_attempt a ON a.job_id = j.job_id AND a.finished_at IS NULL
WHERE j.state IN ('doing', 'aborting')
"""


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
            cursor.execute(_JOBS_BY_STATE)
            by_state = cursor.fetchall()
            cursor.execute(_WAITING)
            waiting = cursor.fetchall()
            cursor.execute(_ATTEMPTS)
            attempts = cursor.fetchall()
            cursor.execute(_WORKERS, [settings.SKIPLOCK_WORKER_LIVE_AFTER])
            live_workers, all_workers = cursor.fetchone()
            cursor.execute(_STALLED, [settings.SKIPLOCK_STALLED_AFTER])
            stalled = cursor.fetchone()[0]
            cursor.execute(_RUNNING)
            running = cursor.fetchall()
        return [
            *self._jobs(by_state, waiting),
            *self._attempts(attempts),
            *self._workers(live_workers, all_workers, stalled),
            *self._running(running),
        ]

    def _jobs(self, by_state: list[Any], waiting: list[Any]) -> list[Metric]:
        jobs = GaugeMetricFamily("skiplock_jobs", "Jobs kept in the database, by queue and state", labels=["queue", "state"])
        seen = {(queue, state): count for queue, state, count in by_state}
        queues = sorted({queue for queue, _ in seen} | {spec.queue for spec in all_tasks()})
        for queue in queues:
            for state in State:  # every state, zeros included, so alerts and rates never see gaps
                jobs.add_metric([queue, state.value], seen.get((queue, state.value), 0))
        depth = GaugeMetricFamily("skiplock_queue_depth", "Jobs waiting to run now (not scheduled later)", labels=["queue"])
        oldest = GaugeMetricFamily(
            "skiplock_oldest_waiting_job_age_seconds", "How long the oldest runnable job has waited", labels=["queue"]
        )
        found = {queue: (count, age) for queue, count, age in waiting}
        for queue in queues:
            count, age = found.get(queue, (0, 0.0))
            depth.add_metric([queue], count)
            oldest.add_metric([queue], float(age))
        return [jobs, depth, oldest]

    def _attempts(self, rows: list[Any]) -> list[Metric]:
        from prometheus_client.core import CounterMetricFamily

        processed = CounterMetricFamily(
            "skiplock_jobs_processed", "Finished job attempts, by task and outcome", labels=["task", "outcome"]
        )
        durations = HistogramMetricFamily(
            "skiplock_job_duration_seconds", "Duration of finished job attempts, by task and outcome",
            labels=["task", "outcome"],
        )
        for task, outcome, count, total, *bucket_counts in rows:
            processed.add_metric([task, outcome], count)
            buckets = [(str(bound), value) for bound, value in zip(DURATION_BUCKETS, bucket_counts, strict=True)]
            buckets.append(("+Inf", count))
            durations.add_metric([task, outcome], buckets, float(total))
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
