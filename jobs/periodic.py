"""Periodic (cron) tasks: declared in code, deferred once per tick however many workers run.

    from jobs.periodic import periodic
    from jobs.registry import task

    @periodic(cron="0 3 * * *")              # every day at 03:00 UTC
    @task(queue="reports")
    def nightly_report(*, days: int = 1) -> dict: ...

    @periodic(cron="*/15 * * * *", args={"region": "eu"}, periodic_id="eu")
    @periodic(cron="*/15 * * * *", args={"region": "us"}, periodic_id="us")
    @task
    def sync_region(*, region: str) -> None: ...

Cron has five fields (minute precision) or six (the sixth is seconds), in UTC. Every worker
runs the deferrer; the tick is claimed in procrastinate's `procrastinate_periodic_defers`
(unique per task, periodic id and tick), so exactly one job is deferred per tick. Arguments
are validated against the task's schema when the schedule is declared.

Unlike procrastinate's own deferrer, this one does not add a `timestamp` argument, catches up
on ticks missed while no worker ran (up to `SKIPLOCK_PERIODIC_MAX_DELAY`), survives database
outages, and repairs the tick that procrastinate issue #1495 leaves blocked: a recorded tick
whose job row disappeared before it ran (`job_id` NULL) is deferred again.

At run time a schedule can be switched off and on again (`set_periodic_enabled`; a row in
`skiplock_periodic_switch`, no row = on) and triggered now, outside its schedule
(`trigger_periodic`), from `manage.py periodic` and the admin's periodic page. The deferrer reads
the switches once per pass; the ticks of a switched-off schedule are skipped, not caught up later.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from croniter import croniter  # type: ignore[import-untyped,unused-ignore]
from django.conf import settings
from django.db import connection

from jobs import transitions
from jobs.registry import TaskSpec, find_task, get_task, is_internal

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    """One periodic schedule of one task."""

    task_name: str
    cron: str
    args: dict[str, Any] = field(default_factory=dict)
    periodic_id: str = ""
    queue: str | None = None
    priority: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.task_name, self.periodic_id)

    @property
    def switch_key(self) -> str:
        """Its name for people and for its switch: the task name, or "task:periodic_id"."""
        return f"{self.task_name}:{self.periodic_id}" if self.periodic_id else self.task_name

    def ticks_between(self, start: float, end: float) -> list[int]:
        """Tick timestamps t with start < t <= end, oldest first."""
        itr = croniter(self.cron, start)
        ticks: list[int] = []
        while True:
            tick = round(itr.get_next(float))
            if tick > end:
                return ticks
            if tick > start:
                ticks.append(tick)

    def previous_tick(self, at: float) -> int:
        return round(croniter(self.cron, at).get_prev(float))

    def next_tick(self, at: float) -> int:
        return round(croniter(self.cron, at).get_next(float))


_SCHEDULES: dict[tuple[str, str], Schedule] = {}


def register_periodic(
    task_name: str,
    *,
    cron: str,
    args: dict[str, Any] | None = None,
    periodic_id: str = "",
    queue: str | None = None,
    priority: int | None = None,
) -> Schedule:
    """Add a schedule for a registered task; a bad cron or bad arguments raise at once."""
    spec = get_task(task_name)
    if not croniter.is_valid(cron):
        raise ValueError(f"periodic task '{task_name}': {cron!r} is not a valid cron expression")
    validated = spec.validate(args or {})
    schedule = Schedule(
        task_name=spec.name, cron=cron, args=validated, periodic_id=periodic_id, queue=queue, priority=priority
    )
    existing = _SCHEDULES.get(schedule.key)
    if existing is not None and existing != schedule:
        raise ValueError(
            f"task '{task_name}' already has a schedule with periodic_id {periodic_id!r}; "
            "give each schedule of one task its own periodic_id"
        )
    _SCHEDULES[schedule.key] = schedule
    return schedule


def periodic(
    *, cron: str, args: dict[str, Any] | None = None, periodic_id: str = "",
    queue: str | None = None, priority: int | None = None,
) -> Callable[[TaskSpec], TaskSpec]:
    """Decorator over `@task`: run the task on a cron schedule."""

    def decorate(spec: TaskSpec) -> TaskSpec:
        if not isinstance(spec, TaskSpec):
            raise TypeError("@periodic goes above @task (it decorates a Skiplock task)")
        register_periodic(
            spec.name, cron=cron, args=args, periodic_id=periodic_id, queue=queue, priority=priority
        )
        return spec

    return decorate


def all_schedules() -> list[Schedule]:
    _ensure_builtin_schedules()
    return sorted(_SCHEDULES.values(), key=lambda s: s.key)


def _ensure_builtin_schedules() -> None:
    from jobs import maintenance

    maintenance.ensure_schedule()


# --- reading: what runs when, and when it last ran ------------------------------------------------


def periodic_schedules(*, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Each schedule: task, cron, args, next run, last run and its outcome (for the command and admin).

    `last_run_at` is the last tick deferred; `last_job_id`/`last_state` describe its job
    (`last_state` is None when the job was pruned), `last_finished_at` when it ended.
    """
    now = now or dt.datetime.now(dt.UTC)
    schedules = all_schedules()
    last = _last_defers([s.key for s in schedules])
    switches = _switches()
    rows = []
    for schedule in schedules:
        defer = last.get(schedule.key)
        spec = find_task(schedule.task_name)
        switch = switches.get(schedule.switch_key)
        rows.append({
            "key": schedule.switch_key,
            "enabled": switch is None or switch["enabled"],
            "switched_at": switch["changed_at"] if switch else None,
            "switched_by": switch["changed_by"] if switch else "",
            "internal": is_internal(schedule.task_name),
            "task_name": schedule.task_name,
            "periodic_id": schedule.periodic_id,
            "cron": schedule.cron,
            "args": schedule.args,
            "queue": schedule.queue or (spec.queue if spec else ""),
            "next_run_at": dt.datetime.fromtimestamp(schedule.next_tick(now.timestamp()), dt.UTC),
            "last_run_at": dt.datetime.fromtimestamp(defer["tick"], dt.UTC) if defer else None,
            "last_job_id": defer["job_id"] if defer else None,
            "last_state": defer["state"] if defer else None,
            "last_finished_at": defer["finished_at"] if defer else None,
            "last_error": defer["error"] if defer else "",
        })
    return rows


def _last_defers(keys: list[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
    if not keys:
        return {}
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT DISTINCT ON (d.task_name, d.periodic_id)
                   d.task_name, d.periodic_id, d.defer_timestamp, d.job_id, r.state, r.finished_at,
                   COALESCE(NULLIF(r.error_type, '') || ': ' || left(r.error_message, 200), '')
            FROM procrastinate_periodic_defers d
            LEFT JOIN skiplock_job_view r ON r.job_id = d.job_id
            WHERE (d.task_name, d.periodic_id) IN (SELECT * FROM unnest(%s::text[], %s::text[]))
            ORDER BY d.task_name, d.periodic_id, d.defer_timestamp DESC
            """,
            [[k[0] for k in keys], [k[1] for k in keys]],
        )
        return {
            (row[0], row[1]): {
                "tick": int(row[2]), "job_id": row[3], "state": row[4], "finished_at": row[5], "error": row[6],
            }
            for row in cursor.fetchall()
        }


# --- switching on and off, triggering now ----------------------------------------------------------


class PeriodicProblem(ValueError):
    """A periodic change that cannot be made (the message says why); nothing was changed."""


def find_schedule(key: str) -> Schedule:
    """The schedule named `key` ("task" or "task:periodic_id"); PeriodicProblem names the known ones."""
    schedules = all_schedules()
    for schedule in schedules:
        if schedule.switch_key == key:
            return schedule
    known = ", ".join(s.switch_key for s in schedules) or "none"
    raise PeriodicProblem(f"no periodic schedule is named {key!r}; known schedules: {known}")


def _steerable(key: str, what: str) -> Schedule:
    schedule = find_schedule(key)
    if is_internal(schedule.task_name):
        raise PeriodicProblem(f"{key!r} is Skiplock's own schedule (it prunes and sweeps); it cannot be {what}")
    return schedule


def set_periodic_enabled(key: str, enabled: bool, *, by: str = "") -> bool:
    """Switch a schedule on or off for every worker (persisted); returns False if it already was."""
    _steerable(key, "switched off" if not enabled else "switched on")
    with connection.cursor() as cursor:
        cursor.execute(
            """INSERT INTO skiplock_periodic_switch AS s (key, enabled, changed_at, changed_by)
               VALUES (%(key)s, %(enabled)s, now(), %(by)s)
               ON CONFLICT (key) DO UPDATE SET enabled = EXCLUDED.enabled, changed_at = now(), changed_by = %(by)s
               WHERE s.enabled IS DISTINCT FROM EXCLUDED.enabled
               RETURNING (xmax = 0) AS inserted""",
            {"key": key, "enabled": enabled, "by": by},
        )
        row = cursor.fetchone()
    # A new row that switches on changes nothing (no row already meant on).
    return row is not None and not (row[0] and enabled)


def is_periodic_enabled(key: str) -> bool:
    switch = _switches().get(key)
    return switch is None or bool(switch["enabled"])


def _switches() -> dict[str, dict[str, Any]]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT key, enabled, changed_at, changed_by FROM skiplock_periodic_switch")
        return {k: {"enabled": e, "changed_at": at, "changed_by": by} for k, e, at, by in cursor.fetchall()}


def trigger_periodic(key: str) -> transitions.DeferredJob:
    """Start the schedule's job now, outside its schedule (its arguments, queue and priority).

    A switched-off schedule may be triggered too; the tick ledger is not touched, so the next
    tick runs as planned. Raises PeriodicProblem, or the start's own SkiplockError.
    """
    schedule = _steerable(key, "triggered by hand")
    return transitions.job_defer(
        task_name=schedule.task_name, args=dict(schedule.args), queue=schedule.queue, priority=schedule.priority,
    )


_DISABLED = "SELECT key FROM skiplock_periodic_switch WHERE NOT enabled"


async def disabled_keys(connector: Any) -> set[str]:
    """The schedules switched off, read once per deferrer pass (a few rows at most)."""
    async with connector.pool.connection() as conn, conn.cursor() as cur:
        await cur.execute(_DISABLED)
        return {row[0] for row in await cur.fetchall()}


# --- deferring: the side task every worker runs ---------------------------------------------------


_LOCK_SCHEDULE = """
SELECT pg_advisory_xact_lock(hashtext('skiplock-periodic:' || %(task_name)s || ':' || %(periodic_id)s));
"""

_LATEST = """
SELECT defer_timestamp, job_id FROM procrastinate_periodic_defers
WHERE task_name = %(task_name)s AND periodic_id = %(periodic_id)s
ORDER BY defer_timestamp DESC LIMIT 1
"""

# #1495: a tick recorded without a job (the job row went before it ran) would block it forever.
_FORGET_JOBLESS_TICK = """
DELETE FROM procrastinate_periodic_defers
WHERE task_name = %(task_name)s AND periodic_id = %(periodic_id)s AND defer_timestamp = %(tick)s
  AND job_id IS NULL
"""


async def defer_tick(connector: Any, schedule: Schedule, tick: int, *, heal: bool) -> int | None:
    """Defer the job of one tick unless it (or a later tick) was already deferred; returns its id.

    procrastinate keeps only the latest tick per schedule, so a lagging worker must never defer
    an older tick: ticks of one schedule are serialised by an advisory lock and compared.
    """
    from psycopg import errors
    from psycopg.rows import dict_row

    spec = get_task(schedule.task_name)
    params = {
        "queue": schedule.queue or spec.queue,
        "queueing_lock": spec.queueing_lock_for(schedule.args),
        "task_name": spec.name,
        "priority": schedule.priority if schedule.priority is not None else spec.priority,
        "periodic_id": schedule.periodic_id,
        "tick": tick,
        "args": json.dumps(schedule.args),
    }
    async with connector.pool.connection() as conn, conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_LOCK_SCHEDULE, params)
        await cur.execute(_LATEST, params)
        latest = await cur.fetchone()
        if latest is not None:
            if latest["defer_timestamp"] > tick:
                return None
            if latest["defer_timestamp"] == tick:
                if not (heal and latest["job_id"] is None):
                    return None
                await cur.execute(_FORGET_JOBLESS_TICK, params)
                logger.warning("periodic %s: tick %s was recorded but its job is gone; deferring it again",
                               spec.name, tick)
        try:
            async with conn.transaction():
                await cur.execute(transitions.PERIODIC_DEFER, params)
                row = await cur.fetchone()
        except errors.UniqueViolation:
            # A job holding the queueing lock that is not due (e.g. run_at in year 9999) would block
            # every tick for ever: it is cancelled and the tick takes its place.
            async with conn.transaction():
                await cur.execute(transitions.PERIODIC_REPLACE_NOT_DUE, params)
                replaced = await cur.fetchone()
            if not replaced or not replaced["count"]:
                logger.info("periodic %s: tick %s skipped, a job with its queueing lock is waiting", spec.name, tick)
                return None
            logger.warning("periodic %s: a job holding its queueing lock was not due; cancelled it for tick %s",
                           spec.name, tick)
            async with conn.transaction():
                await cur.execute(transitions.PERIODIC_DEFER, params)
                row = await cur.fetchone()
    job_id = row["job_id"] if row else None
    if job_id:
        logger.info("periodic %s%s: deferred job %s for tick %s", spec.name,
                    f"[{schedule.periodic_id}]" if schedule.periodic_id else "", job_id, tick)
    return job_id


async def run_deferrer(connector: Any, *, stop: asyncio.Event) -> None:
    """Defer due ticks of every schedule until `stop`; database errors only delay it.

    After a gap (no worker ran, or the database was away) only the latest missed tick runs,
    and only if it is younger than `SKIPLOCK_PERIODIC_MAX_DELAY`: a cron job does not pile up.
    """
    from jobs.reconnect import backoff_delays, is_connection_error

    schedules = all_schedules()
    if not schedules:
        return
    max_delay = float(settings.SKIPLOCK_PERIODIC_MAX_DELAY)
    heal_window = min(max_delay, float(settings.SKIPLOCK_RESULT_RETENTION))
    done: dict[tuple[str, str], float] = {s.key: time.time() - max_delay for s in schedules}
    delays = backoff_delays()
    while not stop.is_set():
        now = time.time()
        try:
            off = await disabled_keys(connector)
            for schedule in schedules:
                due = schedule.ticks_between(done[schedule.key], now)
                if due and schedule.switch_key in off:
                    done[schedule.key] = due[-1]  # skipped while off, never caught up later
                elif due:
                    await defer_tick(connector, schedule, due[-1], heal=now - due[-1] < heal_window)
                    done[schedule.key] = due[-1]
            delays = backoff_delays()
        except Exception as exc:
            if not is_connection_error(exc):
                logger.exception("periodic deferrer error; trying again")
            await _sleep_or_stop(stop, next(delays))
            continue
        wait = min(s.next_tick(now) for s in schedules) - time.time() + 0.05
        await _sleep_or_stop(stop, max(0.05, min(wait, 30.0)))


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
