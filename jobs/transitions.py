"""The one writer: every change to a job goes through a conditional statement in this module.

Defer, cancel, abort, retry, run-now, delete, stall recovery and pruning (first part), and the
worker's hot path — claim, finish in batches, release, progress (second part). Each statement is
conditional and returns what changed; every write made for an attempt is fenced on
(job, worker, attempt). See docs/architecture.md for the data path and the state diagram.

State lives once, in `procrastinate_jobs`; `skiplock_job` is the side row (progress, result,
error, owner, keys, timings), inserted by the defer statement; `skiplock_job_attempt` gets one row
per ended attempt from whoever ends it. Statements that change what a live page shows call
`skiplock_announce(jsonb)` once (one NOTIFY, only while a listener is registered), and those that
end attempts or jobs call `skiplock_count_ends(...)` (the /metrics counters). No trigger of
Skiplock's own, no session setting.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from django.db import IntegrityError, connection, transaction
from django.db.backends.utils import CursorDebugWrapper, CursorWrapper

from jobs.exceptions import (
    AlreadyQueued,
    IdempotencyConflict,
    InvalidArguments,
    InvalidTransition,
    JobNotFound,
)
from jobs.flow import Unique, write_task_limits
from jobs.registry import (
    EXPIRES_KEY,
    MAX_PRIORITY,
    MIN_PRIORITY,
    TaskSpec,
    get_startable_task,
    queue_problem,
)
from jobs.states import FINAL_STATES, State

# --- jobs: defer and the transitions people ask for ------------------------------------------------

# How far ahead a job may be scheduled, by `delay_seconds` or `run_at` alike.
MAX_DELAY_SECONDS = 366 * 24 * 3600
# A job whose worker was lost this many times fails: lost-worker requeues use up no retry, and a
# job that kills its worker every time would otherwise come back for ever.
MAX_LOST_ATTEMPTS = 3
STEP_IN_EVENTS = 200  # characters of `step` carried by a notification

# The event one changed job contributes to `skiplock_announce` (alias `j` = the queue row as changed,
# `r` = its side row or NULL). `state` and `attempts` are the view's (`skiplock_job_view`).
_EVENT = """jsonb_build_object(
    'id', j.id, 'event', {kind},
    'state', CASE WHEN j.status = 'doing' AND j.abort_requested THEN 'aborting' ELSE j.status::text END,
    'progress', COALESCE(r.progress, 0), 'step', left(COALESCE(r.step, ''), {step}),
    'attempts', j.attempts + CASE WHEN j.status = 'doing' THEN 1 ELSE 0 END)"""


# Whether anyone listens for job events (an event hub registered in skiplock_listener): the hot
# path builds its announcement only then (skiplock_announce checks again before it notifies).
LISTENED = "EXISTS (SELECT 1 FROM skiplock_listener WHERE expires_at > now())"


def event_sql(kind: str = "'state'") -> str:
    """SQL building one job's notification (aliases: `j` the changed queue row, `r` its side row)."""
    return _EVENT.format(kind=kind, step=STEP_IN_EVENTS)


# The queueing lock of a job going back to `todo`: given up when another job holding it is already
# waiting (procrastinate#1543; a queueing lock dedupes starts, so the retry keeps its run).
QUEUEING_LOCK_ON_RETRY = """CASE WHEN j.queueing_lock IS NOT NULL AND EXISTS (
    SELECT 1 FROM procrastinate_jobs q
    WHERE q.queueing_lock = j.queueing_lock AND q.status = 'todo' AND q.id <> j.id
) THEN NULL ELSE j.queueing_lock END"""


@dataclass(frozen=True)
class DeferRequest:
    """One job to start: a task, its arguments and optional placement."""

    task_name: str
    args: dict[str, Any] = field(default_factory=dict)
    queue: str | None = None
    priority: int | None = None
    run_at: dt.datetime | None = None
    delay_seconds: float | None = None
    idempotency_key: str | None = None
    owner_id: int | None = None
    api_key_id: int | None = None  # the API key that starts the job, if one does
    expires_at: dt.datetime | None = None  # past it, the job is never run (ends expired)
    expires_in: float | None = None  # seconds from now; or expires_at, not both
    unique: Unique | None = None  # the task's own rule when None

    @property
    def started_by(self) -> str:
        """The principal, and so the scope of the idempotency key: key:<id>, user:<id>, or "" (code)."""
        if self.api_key_id is not None:
            return f"key:{self.api_key_id}"
        return f"user:{self.owner_id}" if self.owner_id is not None else ""


@dataclass(frozen=True)
class DeferredJob:
    job_id: int
    task_name: str
    queue: str
    state: str
    scheduled_at: dt.datetime | None
    created: bool  # False when an idempotency key returned an existing job


@dataclass(frozen=True)
class _Prepared:
    request: DeferRequest
    task_name: str
    queue: str
    priority: int
    lock: str | None
    queueing_lock: str | None
    args: dict[str, Any]
    scheduled_at: dt.datetime | None
    expires_at: dt.datetime | None = None
    limit_key: str | None = None
    limit_row: dict[str, Any] | None = None  # the task's declared limits, for skiplock_limit
    unique: Unique | None = None
    unique_key: str | None = None


# One statement: ids drawn once, the queue rows and their side rows inserted together.
_DEFER = """
WITH input AS MATERIALIZED (
    SELECT nextval(pg_get_serial_sequence('procrastinate_jobs', 'id')) AS id, i.*
    FROM unnest(
        %(queues)s::varchar[], %(tasks)s::varchar[], %(priorities)s::int[], %(locks)s::text[],
        %(queueing_locks)s::text[], %(args)s::jsonb[], %(scheduled_at)s::timestamptz[],
        %(keys)s::varchar[], %(owners)s::bigint[], %(started_by)s::varchar[], %(limit_keys)s::text[],
        %(expires_at)s::timestamptz[], %(unique_keys)s::varchar[]
    ) WITH ORDINALITY AS i(queue, task, priority, lock, queueing_lock, args, scheduled_at, key, owner, started_by,
                           limit_key, expires_at, unique_key, n)
),
queued AS (
    INSERT INTO procrastinate_jobs (id, queue_name, task_name, priority, lock, queueing_lock, args, scheduled_at,
                                    skiplock_limit_key, skiplock_expires_at)
    SELECT id, queue, task, priority, lock, queueing_lock, args, scheduled_at, limit_key, expires_at
    FROM input ORDER BY n
),
side AS (
    INSERT INTO skiplock_job (job_id, idempotency_key, owner_id, started_by, unique_key)
    SELECT id, key, owner, started_by, unique_key FROM input ORDER BY n
)
SELECT id FROM input ORDER BY n
"""


# One job (an API start, `task.defer()`): the same two inserts with scalar parameters. Bound
# server-side (`_bound_cursor`), it costs about half the client and server CPU of the array form.
_DEFER_ONE = """
WITH queued AS (
    INSERT INTO procrastinate_jobs (queue_name, task_name, priority, lock, queueing_lock, args, scheduled_at,
                                    skiplock_limit_key, skiplock_expires_at)
    VALUES (%(queue)s, %(task)s, %(priority)s, %(lock)s, %(queueing_lock)s, %(args)s::jsonb, %(scheduled_at)s,
            %(limit_key)s, %(expires_at)s)
    RETURNING id
),
side AS (
    INSERT INTO skiplock_job (job_id, idempotency_key, owner_id, started_by, unique_key)
    SELECT id, %(key)s, %(owner)s, %(started_by)s, %(unique_key)s FROM queued
)
SELECT id FROM queued
"""


def job_defer(
    *,
    task_name: str,
    args: dict[str, Any] | None = None,
    queue: str | None = None,
    priority: int | None = None,
    run_at: dt.datetime | None = None,
    delay_seconds: float | None = None,
    idempotency_key: str | None = None,
    owner_id: int | None = None,
    expires_at: dt.datetime | None = None,
    expires_in: float | None = None,
    unique: Unique | None = None,
) -> DeferredJob:
    """Start one job. Joins the caller's transaction; an invalid request changes nothing."""
    request = DeferRequest(
        task_name=task_name, args=args or {}, queue=queue, priority=priority, run_at=run_at,
        delay_seconds=delay_seconds, idempotency_key=idempotency_key, owner_id=owner_id,
        expires_at=expires_at, expires_in=expires_in, unique=unique,
    )
    return job_defer_batch(requests=[request])[0]


def job_defer_batch(*, requests: Sequence[DeferRequest]) -> list[DeferredJob]:
    """Start many jobs in one statement (queue rows and side rows); all valid or none started.

    Runs on Django's connection, so it joins the caller's transaction. Without idempotency keys
    it is exactly one statement; with keys, one read of the keys first.
    """
    prepared = _prepare_all(requests)
    if any(p.unique_key for p in prepared):
        # Unique starts hold their digests' locks until the caller's transaction ends.
        with transaction.atomic():
            return _defer_prepared(requests, prepared)
    return _defer_prepared(requests, prepared)


def _defer_prepared(requests: Sequence[DeferRequest], prepared: list[_Prepared]) -> list[DeferredJob]:
    existing = _existing_by_key(prepared)
    same = _existing_unique(prepared)
    limit_rows = [p.limit_row for p in prepared if p.limit_row and _key_of(p.request) not in existing]
    if limit_rows:
        with connection.cursor() as cursor:
            write_task_limits(limit_rows, cursor=cursor)
    to_insert = [p for i, p in enumerate(prepared) if _key_of(p.request) not in existing and i not in same]
    ids: list[int] = []
    if to_insert:
        try:
            ids = _insert(to_insert, savepoint=bool(existing) or connection.in_atomic_block)
        except IntegrityError as exc:
            constraint = getattr(getattr(exc.__cause__, "diag", None), "constraint_name", "") or ""
            if "queueing_lock" in constraint:
                raise AlreadyQueued(
                    f"a job with this queueing lock is already waiting: {exc.__cause__}",
                ) from None
            if "idempotency" not in constraint or not _existing_by_key(prepared):
                raise
            # Another request took one of these idempotency keys meanwhile: answer as if we came second.
            return job_defer_batch(requests=requests)
    new_ids = iter(ids)
    results: list[DeferredJob] = []
    for index, item in enumerate(prepared):
        key = _key_of(item.request)
        if key in existing:
            results.append(existing[key])
            continue
        if index in same:
            found = same[index]
            results.append(found if isinstance(found, DeferredJob) else dataclasses.replace(results[found], created=False))
            continue
        results.append(DeferredJob(
            job_id=next(new_ids), task_name=item.task_name, queue=item.queue, state=State.TODO,
            scheduled_at=item.scheduled_at, created=True,
        ))
    return results


def _bound_cursor() -> CursorWrapper:
    """A cursor on Django's connection (its transaction, error wrapping and query log) whose
    parameters are bound server-side; Django's own cursors splice them into the SQL text."""
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    cursor = psycopg.Cursor(connection.connection)
    return (CursorDebugWrapper if connection.queries_logged else CursorWrapper)(cursor, connection)


def _insert_params(items: Sequence[_Prepared]) -> tuple[str, dict[str, Any]]:
    if len(items) == 1:
        item = items[0]
        return _DEFER_ONE, {
            "queue": item.queue, "task": item.task_name, "priority": item.priority, "lock": item.lock,
            "queueing_lock": item.queueing_lock, "args": json.dumps(item.args), "scheduled_at": item.scheduled_at,
            "key": item.request.idempotency_key, "owner": item.request.owner_id, "started_by": item.request.started_by,
            "limit_key": item.limit_key, "expires_at": item.expires_at, "unique_key": item.unique_key,
        }
    return _DEFER, {
        "queues": [p.queue for p in items],
        "tasks": [p.task_name for p in items],
        "priorities": [p.priority for p in items],
        "locks": [p.lock for p in items],
        "queueing_locks": [p.queueing_lock for p in items],
        "args": [json.dumps(p.args) for p in items],
        "scheduled_at": [p.scheduled_at for p in items],
        "keys": [p.request.idempotency_key for p in items],
        "owners": [p.request.owner_id for p in items],
        "started_by": [p.request.started_by for p in items],
        "limit_keys": [p.limit_key for p in items],
        "expires_at": [p.expires_at for p in items],
        "unique_keys": [p.unique_key for p in items],
    }


def _insert(items: Sequence[_Prepared], *, savepoint: bool) -> list[int]:
    sql, params = _insert_params(items)
    # Inside the caller's transaction a failed insert must not poison it: a savepoint, only then.
    if savepoint:
        with transaction.atomic(), _bound_cursor() as cursor:
            cursor.execute(sql, params)
            return [row[0] for row in cursor.fetchall()]
    with _bound_cursor() as cursor:
        cursor.execute(sql, params)
        return [row[0] for row in cursor.fetchall()]


def _prepare_all(requests: Sequence[DeferRequest]) -> list[_Prepared]:
    if not requests:
        raise InvalidArguments("no jobs to start", details=[{"field": "jobs", "message": "empty", "type": "empty"}])
    prepared: list[_Prepared] = []
    problems: list[dict[str, Any]] = []
    for index, request in enumerate(requests):
        try:
            prepared.append(_prepare(request, get_startable_task(request.task_name)))
        except InvalidArguments as exc:
            if len(requests) == 1:
                raise
            for detail in exc.details or []:
                problems.append({**detail, "field": f"jobs.{index}.{detail['field']}"})
    if problems:
        raise InvalidArguments(f"{len(problems)} invalid field(s) in the batch; no job was started", details=problems)
    keys = [_key_of(r) for r in requests if r.idempotency_key]
    if len(keys) != len(set(keys)):
        raise InvalidArguments(
            "the same idempotency key appears twice in one batch",
            details=[{"field": "idempotency_key", "message": "duplicate in batch", "type": "duplicate"}],
        )
    return prepared


def _prepare(request: DeferRequest, spec: TaskSpec) -> _Prepared:
    args = spec.validate(request.args)
    problems = []
    queue = request.queue if request.queue is not None else spec.queue
    queue_bad = queue_problem(queue)
    if queue_bad:
        problems.append({"field": "queue", "message": queue_bad, "type": "value_error"})
    priority = request.priority if request.priority is not None else spec.priority
    if isinstance(priority, bool) or not isinstance(priority, int) or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        problems.append({"field": "priority", "message": f"must be an integer from {MIN_PRIORITY} to {MAX_PRIORITY}",
                         "type": "value_error"})
    scheduled_at = None
    now = dt.datetime.now(dt.UTC)
    latest = now + dt.timedelta(seconds=MAX_DELAY_SECONDS)
    if request.run_at is not None and request.delay_seconds is not None:
        problems.append({"field": "run_at", "message": "give run_at or delay_seconds, not both", "type": "value_error"})
    elif request.run_at is not None:
        if request.run_at.tzinfo is None:
            problems.append({"field": "run_at", "message": "must include a time zone (e.g. Z or +02:00)", "type": "value_error"})
        elif request.run_at > latest:
            # A job far in the future would hold its `lock` against every job that is due.
            problems.append({"field": "run_at", "message": f"must be at most {MAX_DELAY_SECONDS // 86400} days from now",
                             "type": "value_error"})
        scheduled_at = request.run_at
    elif request.delay_seconds is not None:
        delay = request.delay_seconds
        if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay <= MAX_DELAY_SECONDS:
            problems.append({"field": "delay_seconds", "message": f"must be from 0 to {MAX_DELAY_SECONDS} (a number)",
                             "type": "value_error"})
        else:
            scheduled_at = now + dt.timedelta(seconds=delay)
    expires_at = _expiry(request, args, now, problems)
    if request.idempotency_key is not None and not 1 <= len(request.idempotency_key) <= 255:
        problems.append({"field": "idempotency_key", "message": "must be 1 to 255 characters", "type": "value_error"})
    if isinstance(request.idempotency_key, str) and "\x00" in request.idempotency_key:
        problems.append({"field": "idempotency_key", "message": "cannot hold NUL characters", "type": "value_error"})
    try:
        lock, queueing_lock = spec.lock_for(args), spec.queueing_lock_for(args)
        limit_key = spec.limits.key_for(spec.name, args)
        unique = request.unique or spec.unique
        unique_key = unique.digest(spec.name, args) if unique else None
    except (KeyError, IndexError) as exc:
        problems.append({"field": "args", "message": f"lock template needs argument {exc}", "type": "value_error"})
        lock = queueing_lock = limit_key = unique_key = None
        unique = None
    if problems:
        raise InvalidArguments(
            "; ".join(f"{p['field']}: {p['message']}" for p in problems), details=problems
        )
    return _Prepared(
        request=request, task_name=spec.name, queue=str(queue), priority=int(priority), lock=lock,
        queueing_lock=queueing_lock, args=args, scheduled_at=scheduled_at, expires_at=expires_at,
        limit_key=limit_key, limit_row=spec.limits.row(limit_key, spec.name) if limit_key else None,
        unique=unique, unique_key=unique_key,
    )


def _expiry(request: DeferRequest, args: dict[str, Any], now: dt.datetime,
            problems: list[dict[str, Any]]) -> dt.datetime | None:
    """When the job expires: `expires_at`, `expires_in` seconds from now, or a Celery `__expires__`."""
    if request.expires_at is not None and request.expires_in is not None:
        problems.append({"field": "expires_at", "message": "give expires_at or expires_in, not both",
                         "type": "value_error"})
        return None
    if request.expires_in is not None:
        seconds = request.expires_in
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds <= MAX_DELAY_SECONDS:
            problems.append({"field": "expires_in", "message": f"must be from 0 to {MAX_DELAY_SECONDS} seconds (a number)",
                             "type": "value_error"})
            return None
        return now + dt.timedelta(seconds=seconds)
    if request.expires_at is not None:
        if request.expires_at.tzinfo is None:
            problems.append({"field": "expires_at", "message": "must include a time zone (e.g. Z or +02:00)",
                             "type": "value_error"})
            return None
        if request.expires_at <= now:
            problems.append({"field": "expires_at", "message": "must be in the future", "type": "value_error"})
            return None
        return request.expires_at
    if isinstance(args.get(EXPIRES_KEY), str):  # validated by the task's schema
        return dt.datetime.fromisoformat(args[EXPIRES_KEY])
    return None


def _key_of(request: DeferRequest) -> tuple[str, str | None]:
    """An idempotency key as it is unique: per principal."""
    return request.started_by, request.idempotency_key


def _existing_by_key(prepared: Sequence[_Prepared]) -> dict[tuple[str, str | None], DeferredJob]:
    """The jobs the same principals already started under these idempotency keys (never another's)."""
    keyed = {_key_of(p.request): p for p in prepared if p.request.idempotency_key}
    if not keyed:
        return {}
    from django.db.models import Q

    from jobs.models import JobRecord

    wanted = Q()
    for started_by, key in keyed:
        wanted |= Q(started_by=started_by, idempotency_key=key)
    found: dict[tuple[str, str | None], DeferredJob] = {}
    for record in JobRecord.objects.filter(wanted):
        item = keyed[(record.started_by, record.idempotency_key)]
        if record.task_name != item.task_name or record.args != item.args:
            raise IdempotencyConflict(
                f"idempotency key '{record.idempotency_key}' was used for job {record.job_id} "
                f"({record.task_name}) with other arguments; use a new key for a new job",
                details={"job_id": record.job_id, "idempotency_key": record.idempotency_key},
            )
        found[_key_of(item.request)] = DeferredJob(
            job_id=record.job_id, task_name=record.task_name, queue=record.queue_name,
            state=record.state, scheduled_at=record.scheduled_at, created=False,
        )
    return found


# The newest job with a unique start's digest, in the rule's states, created within its period.
_SAME_UNIQUE = """
SELECT j.id, j.task_name, j.queue_name, j.status::text, j.scheduled_at
FROM skiplock_job r JOIN procrastinate_jobs j ON j.id = r.job_id
WHERE r.unique_key = %(key)s AND j.status::text = ANY(%(states)s)
  AND (%(period)s::float8 IS NULL OR r.created_at > now() - make_interval(secs => %(period)s::float8))
ORDER BY r.job_id DESC
LIMIT 1
"""


def _existing_unique(prepared: Sequence[_Prepared]) -> dict[int, DeferredJob | int]:
    """For each unique start that is a duplicate: the existing job, or the index of the same start
    earlier in this batch. Takes each digest's transaction lock first (the caller is atomic), so a
    concurrent start of the same job waits for this one's commit and then finds its job."""
    keyed = sorted({p.unique_key for p in prepared if p.unique_key})
    if not keyed:
        return {}
    found: dict[int, DeferredJob | int] = {}
    first: dict[str, int] = {}
    with connection.cursor() as cursor:
        for key in keyed:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext('skiplock.unique'), hashtext(%s))", [key])
        for index, item in enumerate(prepared):
            if not item.unique_key or item.unique is None:
                continue
            if item.unique_key in first:
                found[index] = first[item.unique_key]
                continue
            cursor.execute(_SAME_UNIQUE, {"key": item.unique_key, "states": list(item.unique.states),
                                          "period": item.unique.period})
            row = cursor.fetchone()
            if row is None:
                first[item.unique_key] = index
                continue
            found[index] = DeferredJob(job_id=row[0], task_name=row[1], queue=row[2], state=row[3],
                                       scheduled_at=row[4], created=False)
    return found


# Cancel (todo → cancelled) or abort (todo → cancelled, doing → aborting) one job; the side row's
# finished_at is set for a cancelled job, and the end is counted and announced.
_CANCEL = """
WITH moved AS (
    UPDATE procrastinate_jobs j
    SET status = CASE WHEN j.status = 'todo' THEN 'cancelled'::procrastinate_job_status ELSE j.status END,
        abort_requested = %(abort)s AND j.status = 'doing'
    WHERE j.id = %(job_id)s AND (j.status = 'todo' OR (%(abort)s AND j.status = 'doing' AND NOT j.abort_requested))
    RETURNING j.*
),
side AS (
    INSERT INTO skiplock_job AS r (job_id, finished_at)
    SELECT id, now() FROM moved WHERE status = 'cancelled'
    ON CONFLICT (job_id) DO UPDATE SET finished_at = EXCLUDED.finished_at
)
SELECT j.status::text, j.abort_requested,
       skiplock_count_ends(ARRAY[j.task_name]::text[], ARRAY[j.queue_name]::text[], ARRAY[NULL]::text[],
                           ARRAY[CASE WHEN j.status = 'cancelled' THEN 'cancelled' END]::text[], ARRAY[NULL]::float8[]),
       skiplock_announce(jsonb_build_array({event}))
FROM moved j LEFT JOIN skiplock_job r ON r.job_id = j.id
"""


def job_cancel(*, job_id: int) -> str:
    """Cancel a waiting job (todo → cancelled)."""
    if _run(_CANCEL, {"job_id": job_id, "abort": False}) is None:
        raise _wrong_state(job_id, "cancel")
    return State.CANCELLED


def job_abort(*, job_id: int) -> str:
    """Ask a running job to stop (doing → aborting → aborted); a waiting job is cancelled."""
    row = _run(_CANCEL, {"job_id": job_id, "abort": True})
    if row is None:
        raise _wrong_state(job_id, "abort")
    return State.CANCELLED if row[0] == State.CANCELLED else State.ABORTING


_RETRY = """
WITH moved AS (
    UPDATE procrastinate_jobs j
    SET status = 'todo', scheduled_at = now(), queueing_lock = {queueing_lock}, skiplock_expires_at = NULL
    WHERE j.id = %(job_id)s AND j.status IN ('failed', 'discarded', 'expired')
    RETURNING j.*
),
side AS (UPDATE skiplock_job SET finished_at = NULL WHERE job_id IN (SELECT id FROM moved))
SELECT j.id, skiplock_announce(jsonb_build_array({event}))
FROM moved j LEFT JOIN skiplock_job r ON r.job_id = j.id
"""


def job_retry(*, job_id: int) -> str:
    """Run a failed, discarded or expired job again now (→ todo, no expiry); its attempts and errors
    stay in its history.

    Its attempt count is left as it is, so the retry policy grants this one attempt; a waiting job
    holding its queueing lock makes it give the key up rather than refuse the retry.
    """
    if _run(_RETRY.replace("{queueing_lock}", QUEUEING_LOCK_ON_RETRY), {"job_id": job_id}) is None:
        raise _wrong_state(job_id, "retry")
    return State.TODO


_RUN_NOW = """
WITH moved AS (
    UPDATE procrastinate_jobs j SET scheduled_at = now()
    WHERE j.id = %(job_id)s AND j.status = 'todo' AND j.scheduled_at > now()
    RETURNING j.*
)
SELECT j.id, skiplock_announce(jsonb_build_array({event}))
FROM moved j LEFT JOIN skiplock_job r ON r.job_id = j.id
"""


def job_run_now(*, job_id: int) -> str:
    """Make a scheduled job runnable now."""
    if _run(_RUN_NOW, {"job_id": job_id}) is None:
        raise _wrong_state(job_id, "run now")
    return State.TODO


# Change a waiting job's priority and/or run time (PATCH /api/jobs/{id}, the admin's actions).
_CHANGE = """
WITH moved AS (
    UPDATE procrastinate_jobs j
    SET priority = COALESCE(%(priority)s, j.priority),
        scheduled_at = CASE WHEN %(set_run_at)s THEN %(run_at)s ELSE j.scheduled_at END
    WHERE j.id = %(job_id)s AND j.status = 'todo'
    RETURNING j.*
)
SELECT j.id, skiplock_announce(jsonb_build_array({event}))
FROM moved j LEFT JOIN skiplock_job r ON r.job_id = j.id
"""

_UNSET: Any = object()


def job_change(*, job_id: int, priority: int | None = None, run_at: dt.datetime | None = _UNSET) -> str:
    """Give a waiting job another priority and/or run time (`run_at` None: runnable now).

    Only a waiting job (todo) changes; InvalidArguments for a bad value, InvalidTransition otherwise.
    """
    problems = []
    if priority is not None and (
        isinstance(priority, bool) or not isinstance(priority, int) or not MIN_PRIORITY <= priority <= MAX_PRIORITY
    ):
        problems.append({"field": "priority", "message": f"must be an integer from {MIN_PRIORITY} to {MAX_PRIORITY}",
                         "type": "value_error"})
    if run_at is not _UNSET and run_at is not None:
        if run_at.tzinfo is None:
            problems.append({"field": "run_at", "message": "must include a time zone (e.g. Z or +02:00)",
                             "type": "value_error"})
        elif run_at > dt.datetime.now(dt.UTC) + dt.timedelta(seconds=MAX_DELAY_SECONDS):
            problems.append({"field": "run_at", "message": f"must be at most {MAX_DELAY_SECONDS // 86400} days from now",
                             "type": "value_error"})
    if priority is None and run_at is _UNSET:
        problems.append({"field": "priority", "message": "give priority and/or run_at", "type": "missing"})
    if problems:
        raise InvalidArguments("; ".join(f"{p['field']}: {p['message']}" for p in problems), details=problems)
    params = {"job_id": job_id, "priority": priority, "set_run_at": run_at is not _UNSET,
              "run_at": None if run_at is _UNSET else run_at}
    if _run(_CHANGE, params) is None:
        raise _wrong_state(job_id, "change")
    return State.TODO


# Waiting jobs whose expiry passed end `expired` (never run; the claim skips them meanwhile), a
# batch at a time, counted and announced like any end.
_EXPIRE = """
WITH moved AS (
    UPDATE procrastinate_jobs j SET status = 'expired'
    WHERE j.id IN (SELECT e.id FROM procrastinate_jobs e
                   WHERE e.status = 'todo' AND e.skiplock_expires_at <= now()
                   ORDER BY e.skiplock_expires_at LIMIT %(batch)s
                   FOR UPDATE SKIP LOCKED)
    RETURNING j.*
),
side AS (
    INSERT INTO skiplock_job AS r (job_id, finished_at, error_type, error_message)
    SELECT id, now(), 'JobExpired', 'the job expired at ' || skiplock_expires_at::text || ' before it ran; it was not run'
    FROM moved
    ON CONFLICT (job_id) DO UPDATE SET finished_at = EXCLUDED.finished_at, error_type = EXCLUDED.error_type,
                                       error_message = EXCLUDED.error_message
)
SELECT count(*),
       (SELECT skiplock_count_ends(array_agg(task_name::text), array_agg(queue_name::text), array_agg(NULL::text),
                                   array_agg('expired'::text), array_agg(NULL::float8)) FROM moved),
       (SELECT skiplock_announce(jsonb_agg({event})) FROM moved j LEFT JOIN skiplock_job r ON r.job_id = j.id
        WHERE {listened})
FROM moved
"""


def expire_jobs(*, batch: int = 1000) -> int:
    """End every waiting job past its expiry as `expired`; returns how many ended."""
    total = 0
    sql = _EXPIRE.replace("{event}", event_sql()).replace("{listened}", LISTENED)
    while True:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql, {"batch": batch})
            done = int(cursor.fetchone()[0])
        total += done
        if done < batch:
            return total


_DELETE = """
WITH gone AS (
    DELETE FROM procrastinate_jobs
    WHERE id = %(job_id)s AND status IN ('todo', 'succeeded', 'failed', 'cancelled', 'aborted', 'discarded', 'expired')
    RETURNING id
),
side AS (DELETE FROM skiplock_job WHERE job_id IN (SELECT id FROM gone)),
attempts AS (DELETE FROM skiplock_job_attempt WHERE job_id IN (SELECT id FROM gone))
SELECT id FROM gone
"""


def job_delete(*, job_id: int) -> None:
    """Delete a finished or waiting job with its side row, attempts and events."""
    if _run(_DELETE, {"job_id": job_id}, with_event=False) is None:
        raise _wrong_state(job_id, "delete")


def _run(sql: str, params: dict[str, Any], *, with_event: bool = True) -> tuple[Any, ...] | None:
    if with_event:
        sql = sql.replace("{event}", event_sql())
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


def _state_of(job_id: int) -> str:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT CASE WHEN status = 'doing' AND abort_requested THEN 'aborting' ELSE status::text END "
            "FROM procrastinate_jobs WHERE id = %s",
            [job_id],
        )
        row = cursor.fetchone()
    if row is None:
        raise JobNotFound(f"no job has id {job_id}")
    return str(row[0])


def _wrong_state(job_id: int, action: str) -> InvalidTransition:
    return InvalidTransition(job_id=job_id, action=action, state=_state_of(job_id))


def is_final(state: str) -> bool:
    return state in FINAL_STATES


_MAKE_RUNNABLE = """
WITH moved AS (
    UPDATE procrastinate_jobs j SET scheduled_at = now()
    WHERE j.status = 'todo' AND j.scheduled_at > now() AND (%(queues)s::text[] IS NULL OR j.queue_name = ANY(%(queues)s))
    RETURNING j.*
)
SELECT count(*), (SELECT skiplock_announce(jsonb_agg({event}))
                  FROM moved j LEFT JOIN skiplock_job r ON r.job_id = j.id)
FROM moved
"""


def make_runnable_now(*, queues: Sequence[str] | None = None) -> int:
    """Every scheduled job (of these queues) runnable now — for the testing helper; returns how many."""
    row = _run(_MAKE_RUNNABLE, {"queues": list(queues) if queues else None})
    return int(row[0]) if row else 0


# --- ending attempts: one fenced, set-based statement ----------------------------------------------


@dataclass(frozen=True)
class AttemptEnd:
    """How one attempt ends, as one row of END_ATTEMPTS.

    `status` is where the job goes: succeeded, failed, aborted, `todo` (a retry at `retry_at`),
    `requeue` (back to todo without using up a retry: shutdown, a lost worker) or `release` (claimed ahead, never started: back to todo, no
    attempt row, nothing counted). The attempt is named by (job, worker, attempts as claimed): an
    attempt that is no longer that worker's changes nothing. `started_at` and `worker_name` left
    None are looked up (the start event, the worker's registration). Error fields left None keep
    what the side row holds.
    """

    job_id: int
    worker_id: int | None
    attempts: int
    status: str
    outcome: str
    retry_at: dt.datetime | None = None
    result: str | None = None  # JSON text, for succeeded
    error_type: str | None = None
    error_message: str | None = None
    error_traceback: str | None = None
    started_at: dt.datetime | None = None
    worker_name: str | None = None
    progress: int | None = None  # the last progress the attempt reported and that is not written yet
    step: str | None = None


# End many attempts in one statement, each row fenced on (doing, worker, attempts as claimed):
#   ended:   the queue rows, with finish_job_v1 / retry_job_v2 semantics (attempts + 1 unless the
#            job is requeued or released, abort_requested cleared, a retry or requeue of a job
#            whose abort was requested ends failed) and worker_id cleared (procrastinate#1454). A
#            job going back to todo whose queueing lock is held by a waiting job gives its key up
#            (procrastinate#1543).
#   side:    result, error, finish time, progress on the side row (inserted for a job deferred
#            without one, e.g. by raw procrastinate);
#   attempt: the history row of each ended attempt (not for a release);
#   then one call to the counters, one announcement for the batch when someone listens, and —
#   when a job that held a `lock` ended while another job of that lock waits — one wake-up on
#   the waiting jobs' queue channels, so a lock hand-over costs milliseconds, not a poll interval.
# Used by the worker for its batches, by stall recovery and by the supervisor's hard-limit kill.
# Returns one row per attempt that was still owned as described: (id, state, outcome, ...).
END_ATTEMPTS = """
WITH input AS (
    SELECT * FROM unnest(
        %(ids)s::bigint[], %(worker_ids)s::bigint[], %(attempts)s::int[], %(statuses)s::text[],
        %(outcomes)s::text[], %(retry_at)s::timestamptz[], %(results)s::jsonb[], %(error_types)s::text[],
        %(error_messages)s::text[],
        %(tracebacks)s::text[], %(started)s::timestamptz[], %(worker_names)s::text[], %(progress)s::int[],
        %(steps)s::text[]
    ) AS i(id, worker_id, attempts, status, outcome, retry_at, result, error_type,
           error_message, traceback, started_at, worker_name, progress, step)
),
ended AS (
    UPDATE procrastinate_jobs j
    SET status = (CASE WHEN i.status IN ('todo', 'requeue') AND j.abort_requested THEN 'failed'
                       WHEN i.status = 'snooze' AND j.abort_requested THEN 'aborted'
                       WHEN i.status IN ('requeue', 'release', 'snooze') THEN 'todo'
                       ELSE i.status END)::procrastinate_job_status,
        attempts = j.attempts + CASE WHEN i.status IN ('requeue', 'release', 'snooze') THEN 0 ELSE 1 END,
        abort_requested = i.status = 'release' AND j.abort_requested,
        worker_id = NULL,
        scheduled_at = CASE WHEN i.status IN ('todo', 'snooze') AND NOT j.abort_requested THEN i.retry_at
                            ELSE j.scheduled_at END,
        queueing_lock = CASE
            WHEN i.status IN ('todo', 'requeue', 'release', 'snooze') AND j.queueing_lock IS NOT NULL AND EXISTS (
                SELECT 1 FROM procrastinate_jobs q
                WHERE q.queueing_lock = j.queueing_lock AND q.status = 'todo' AND q.id <> j.id
            ) THEN NULL
            ELSE j.queueing_lock END
    FROM input i
    WHERE j.id = i.id AND j.status = 'doing' AND j.worker_id IS NOT DISTINCT FROM i.worker_id
      AND j.attempts = i.attempts
    RETURNING j.id, j.status::text AS state, j.attempts, j.task_name, j.queue_name, j.lock,
              j.skiplock_limit_key AS limit_key,
              (i.status IN ('todo', 'requeue') AND j.status = 'failed') AS retry_refused
),
result AS (
    SELECT e.*, i.result, i.error_type, i.error_message, i.traceback, i.progress, i.step, i.status AS asked,
           CASE WHEN e.retry_refused AND i.outcome = 'retried' THEN 'failed'
                WHEN i.status = 'snooze' AND e.state = 'aborted' THEN 'aborted'
                ELSE i.outcome END AS outcome,
           e.state IN ('succeeded', 'failed', 'aborted', 'discarded', 'expired') AS final,
           COALESCE(i.started_at, (SELECT max(ev.at) FROM procrastinate_events ev
                                   WHERE ev.job_id = e.id AND ev.type = 'started'), now()) AS started_at,
           COALESCE(i.worker_name, (SELECT w.name FROM skiplock_worker w WHERE w.worker_id = i.worker_id),
                    'worker-' || i.worker_id::text, '') AS worker_name
    FROM ended e JOIN input i ON i.id = e.id
),
side AS (
    UPDATE skiplock_job r
    SET started_at = COALESCE(r.started_at, x.started_at),
        finished_at = CASE WHEN x.final THEN now() END,
        worker_name = x.worker_name,
        result = CASE WHEN x.state = 'succeeded' THEN x.result ELSE r.result END,
        progress = CASE WHEN x.state = 'succeeded' THEN 100 ELSE COALESCE(x.progress, r.progress) END,
        step = COALESCE(x.step, r.step),
        progress_at = CASE WHEN x.state = 'succeeded' OR x.progress IS NOT NULL THEN now() ELSE r.progress_at END,
        -- a requeue or a snooze is no failure of the job: its error stays what the last failed attempt left
        error_type = CASE WHEN x.state = 'succeeded' THEN '' WHEN x.asked IN ('requeue', 'snooze') AND x.state = 'todo'
                          THEN r.error_type ELSE COALESCE(x.error_type, r.error_type) END,
        error_message = CASE WHEN x.state = 'succeeded' THEN '' WHEN x.asked IN ('requeue', 'snooze') AND x.state = 'todo'
                             THEN r.error_message ELSE COALESCE(x.error_message, r.error_message) END,
        error_traceback = CASE WHEN x.state = 'succeeded' THEN '' WHEN x.asked IN ('requeue', 'snooze') AND x.state = 'todo'
                               THEN r.error_traceback ELSE COALESCE(x.traceback, r.error_traceback) END
    FROM result x
    WHERE r.job_id = x.id AND x.asked <> 'release'
),
side_missing AS (
    INSERT INTO skiplock_job (job_id, started_at, finished_at, worker_name, result, progress, step,
                              progress_at, error_type, error_message, error_traceback)
    SELECT x.id, x.started_at, CASE WHEN x.final THEN now() END, x.worker_name,
           CASE WHEN x.state = 'succeeded' THEN x.result END,
           CASE WHEN x.state = 'succeeded' THEN 100 ELSE COALESCE(x.progress, 0) END,
           COALESCE(x.step, ''), now(),
           CASE WHEN x.state = 'succeeded' THEN '' ELSE COALESCE(x.error_type, '') END,
           CASE WHEN x.state = 'succeeded' THEN '' ELSE COALESCE(x.error_message, '') END,
           CASE WHEN x.state = 'succeeded' THEN '' ELSE COALESCE(x.traceback, '') END
    FROM result x
    WHERE x.asked <> 'release' AND NOT EXISTS (SELECT 1 FROM skiplock_job r WHERE r.job_id = x.id)
    ON CONFLICT (job_id) DO NOTHING
),
attempt AS (
    INSERT INTO skiplock_job_attempt (job_id, number, worker_name, started_at, finished_at, outcome,
                                      error_type, error_message, error_traceback)
    SELECT x.id, COALESCE((SELECT max(a.number) FROM skiplock_job_attempt a WHERE a.job_id = x.id), 0) + 1,
           x.worker_name, x.started_at, now(), x.outcome,
           CASE WHEN x.outcome = 'succeeded' THEN '' ELSE COALESCE(x.error_type, '') END,
           CASE WHEN x.outcome = 'succeeded' THEN '' ELSE COALESCE(x.error_message, '') END,
           CASE WHEN x.outcome = 'succeeded' THEN '' ELSE COALESCE(x.traceback, '') END
    FROM result x
    WHERE x.asked <> 'release'
),
woken AS (
    SELECT DISTINCT c.channel
    FROM (SELECT DISTINCT x.lock FROM result x WHERE x.lock IS NOT NULL) AS held
    JOIN procrastinate_jobs w ON w.lock = held.lock AND w.status = 'todo'
    CROSS JOIN LATERAL (VALUES ('procrastinate_queue_v1#' || w.queue_name), ('procrastinate_any_queue_v1')) AS c(channel)
    WHERE w.scheduled_at IS NULL OR w.scheduled_at <= now()
    UNION
    -- a job under a limit ended: its queue's workers may claim the next one
    SELECT c.channel
    FROM (SELECT DISTINCT x.queue_name FROM result x
          WHERE x.limit_key IS NOT NULL
             OR x.queue_name IN (SELECT q.name FROM skiplock_queue q WHERE q.concurrency IS NOT NULL)) AS limited
    CROSS JOIN LATERAL (VALUES ('procrastinate_queue_v1#' || limited.queue_name), ('procrastinate_any_queue_v1')) AS c(channel)
),
wake AS (
    SELECT count(pg_notify(channel, '{"type": "job_inserted", "job_id": 0}')) AS n FROM woken
),
stats AS (
    SELECT skiplock_count_ends(
        array_agg(x.task_name::text), array_agg(x.queue_name::text),
        array_agg(CASE WHEN x.asked <> 'release' THEN x.outcome END),
        array_agg(CASE WHEN x.final THEN x.state END),
        array_agg(extract(epoch FROM now() - x.started_at)::float8)
    ) AS counted
    FROM result x
),
announced AS (
    SELECT skiplock_announce(jsonb_agg(jsonb_build_object(
        'id', x.id, 'event', 'state', 'state', x.state,
        'progress', CASE WHEN x.state = 'succeeded' THEN 100 ELSE COALESCE(x.progress, r.progress, 0) END,
        'step', left(COALESCE(x.step, r.step, ''), 200), 'attempts', x.attempts
    ))) AS n
    FROM result x LEFT JOIN skiplock_job r ON r.job_id = x.id
    WHERE {listened}
)
SELECT x.id, x.state, x.outcome, (SELECT n FROM wake) AS woken,
       (SELECT counted FROM stats) + COALESCE((SELECT n FROM announced), 0) AS side
FROM result x
""".replace("{listened}", LISTENED)


def end_attempts_params(ends: Sequence[AttemptEnd]) -> dict[str, Any]:
    """END_ATTEMPTS' parallel arrays."""
    return {
        "ids": [e.job_id for e in ends],
        "worker_ids": [e.worker_id for e in ends],
        "attempts": [e.attempts for e in ends],
        "statuses": [e.status for e in ends],
        "outcomes": [e.outcome for e in ends],
        "retry_at": [e.retry_at for e in ends],
        "results": [e.result for e in ends],
        "error_types": [e.error_type for e in ends],
        "error_messages": [e.error_message for e in ends],
        "tracebacks": [e.error_traceback for e in ends],
        "started": [e.started_at for e in ends],
        "worker_names": [e.worker_name for e in ends],
        "progress": [e.progress for e in ends],
        "steps": [e.step for e in ends],
    }


def end_attempts(ends: Sequence[AttemptEnd], *, cursor: Any = None) -> dict[int, str]:
    """End these attempts (those still owned as described); returns {job_id: new status} of those ended."""
    if not ends:
        return {}
    if cursor is None:
        with connection.cursor() as own:
            return end_attempts(ends, cursor=own)
    cursor.execute(END_ATTEMPTS, end_attempts_params(ends))
    return {int(row[0]): str(row[1]) for row in cursor.fetchall()}


# --- stall recovery and pruning --------------------------------------------------------------------

_STALLED = """
SELECT j.id, j.task_name, j.attempts, j.worker_id,
       (SELECT count(*) FROM skiplock_job_attempt a WHERE a.job_id = j.id AND a.outcome = 'lost')
FROM procrastinate_jobs j
LEFT JOIN procrastinate_workers w ON w.id = j.worker_id
WHERE j.status = 'doing'
  AND (j.worker_id IS NULL OR w.id IS NULL OR w.last_heartbeat < now() - make_interval(secs => %(after)s)
       OR j.worker_id = ANY(%(dead)s))
ORDER BY j.id
LIMIT %(batch)s
FOR UPDATE OF j SKIP LOCKED
"""

_PRUNE_WORKERS = """
WITH gone AS (
    DELETE FROM procrastinate_workers
    WHERE id = ANY(%(dead)s) OR (%(by_heartbeat)s AND last_heartbeat < now() - make_interval(secs => %(after)s))
    RETURNING id
),
marked AS (
    UPDATE skiplock_worker SET stopped_at = COALESCE(stopped_at, now()) WHERE worker_id IN (SELECT id FROM gone)
)
SELECT count(*) FROM gone
"""


@dataclass
class Recovery:
    retried: list[int]
    failed: list[int]
    workers_pruned: int


def recover_stalled(
    *, stalled_after: float, worker_ids: Sequence[int] | None = None, batch: int = 500,
    reason: str | None = None, outcome: str = "lost",
) -> Recovery:
    """Take back the `doing` jobs of dead workers, in the transaction that forgets those workers.

    A worker is dead when it stopped heartbeating `stalled_after` seconds ago (or is in
    `worker_ids`, which the caller knows are dead). Each of its jobs goes back to `todo` without
    using up a retry (outcome `lost`), or fails once it was lost MAX_LOST_ATTEMPTS times. The
    workers' rows are deleted in the same transaction, so a worker that was only frozen finds its
    id gone when it resumes: its fence no longer matches, and its late writes change nothing.
    """
    dead = list(worker_ids or [])
    by_heartbeat = worker_ids is None
    after = stalled_after if by_heartbeat else 1.0e9  # ~31 years: make_interval overflows past ~3e11
    retried: list[int] = []
    failed: list[int] = []
    pruned = 0
    while True:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(_STALLED, {"after": after, "dead": dead, "batch": batch})
            rows = cursor.fetchall()
            ends = []
            for job_id, _task_name, attempts, worker_id, lost_before in rows:
                message = reason or (
                    f"the worker running this job (id {worker_id}) stopped heartbeating for more than "
                    f"{stalled_after:g} s; the job was taken back"
                    if worker_id is not None and by_heartbeat
                    else f"the worker running this job (id {worker_id}) is gone; the job was taken back"
                )
                give_up = lost_before + 1 >= MAX_LOST_ATTEMPTS
                ends.append(AttemptEnd(
                    job_id=job_id, worker_id=worker_id, attempts=attempts,
                    status="failed" if give_up else "requeue", outcome=outcome,
                    error_type="WorkerLost", error_message=message, error_traceback="",
                ))
            for job_id, status in end_attempts(ends, cursor=cursor).items():
                (retried if status == State.TODO else failed).append(job_id)
            if len(rows) < batch:
                cursor.execute(_PRUNE_WORKERS, {"dead": dead, "by_heartbeat": by_heartbeat, "after": after})
                pruned = int(cursor.fetchone()[0])
                break
    return Recovery(retried=sorted(retried), failed=sorted(failed), workers_pruned=pruned)


def end_one_attempt(
    cursor: Any, *, job_id: int, outcome: str, error_type: str, message: str, retry: bool,
) -> str | None:
    """End the running attempt of one `doing` job (whoever runs it) with `outcome`: retried or failed.

    For callers that already hold the row (the supervisor's hard-time-limit kill). Returns the
    job's new status, or None when it was no longer running.
    """
    cursor.execute("SELECT worker_id, attempts FROM procrastinate_jobs WHERE id = %s AND status = 'doing'", [job_id])
    row = cursor.fetchone()
    if row is None:
        return None
    end = AttemptEnd(
        job_id=job_id, worker_id=row[0], attempts=row[1], status="todo" if retry else "failed", outcome=outcome, error_type=error_type, error_message=message, error_traceback="",
    )
    return end_attempts([end], cursor=cursor).get(job_id)


# Finished jobs past the retention, oldest first, with their side rows and attempts (no trigger
# deletes them); procrastinate's events go by its own cascade. Each batch is its own transaction.
_PRUNE = """
WITH victims AS (
    SELECT j.id FROM skiplock_job r
    JOIN procrastinate_jobs j ON j.id = r.job_id
    WHERE r.finished_at < now() - make_interval(secs => %(older_than)s)
      AND j.status IN ('succeeded', 'failed', 'cancelled', 'aborted', 'discarded', 'expired')
    ORDER BY r.finished_at
    LIMIT %(batch)s
    FOR UPDATE OF j SKIP LOCKED
),
gone AS (DELETE FROM procrastinate_jobs WHERE id IN (SELECT id FROM victims) RETURNING id),
side AS (DELETE FROM skiplock_job WHERE job_id IN (SELECT id FROM gone)),
attempts AS (DELETE FROM skiplock_job_attempt WHERE job_id IN (SELECT id FROM gone))
SELECT count(*) FROM gone
"""


def prune_batch(*, older_than: float, batch: int) -> int:
    """Delete one batch of finished jobs older than `older_than` seconds; returns how many went."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL lock_timeout = '2s'")
        cursor.execute(_PRUNE, {"older_than": older_than, "batch": batch})
        return int(cursor.fetchone()[0])


# --- periodic defer: one tick of a schedule, on the worker's async connection ----------------------

# A tick's job is deferred with its side row, like any start. When its queueing lock is held by a
# waiting job that is not due (e.g. scheduled for year 9999), that job is cancelled and the tick
# takes its place: a periodic tick is never blocked by a job that will not run.
PERIODIC_REPLACE_NOT_DUE = """
WITH moved AS (
    UPDATE procrastinate_jobs j SET status = 'cancelled'
    WHERE j.queueing_lock = %(queueing_lock)s AND j.status = 'todo' AND j.scheduled_at > now()
    RETURNING j.*
),
side AS (
    INSERT INTO skiplock_job AS r (job_id, finished_at, error_type, error_message)
    SELECT id, now(), 'Replaced', 'a periodic tick found this job holding its queueing lock without being due; '
                                  'it was cancelled and the tick deferred'
    FROM moved
    ON CONFLICT (job_id) DO UPDATE SET finished_at = EXCLUDED.finished_at, error_type = EXCLUDED.error_type,
                                       error_message = EXCLUDED.error_message
)
SELECT count(*), (SELECT skiplock_count_ends(array_agg(task_name), array_agg(queue_name),
                                             array_agg(NULL::text), array_agg('cancelled'::text),
                                             array_agg(NULL::float8)) FROM moved)
FROM moved
"""

PERIODIC_DEFER = """
WITH job AS (
    SELECT procrastinate_defer_periodic_job_v2(
        %(queue)s, NULL, %(queueing_lock)s, %(task_name)s, %(priority)s, %(periodic_id)s, %(tick)s, %(args)s::jsonb
    ) AS job_id
),
side AS (INSERT INTO skiplock_job (job_id) SELECT job_id FROM job WHERE job_id IS NOT NULL)
SELECT job_id FROM job
"""


# --- worker hot path: claim, finish, release, progress ---------------------------------------------
#
# Every statement below is one autocommitted statement (one round trip, one commit), prepared by
# the worker's connections. Attempt identity is (job id, worker id, attempts as claimed): the
# finish, release and progress writes match a row only while it is still that attempt, so an
# attempt that was written off (stall recovery, shutdown release) changes nothing.

# Claim up to %(n)s jobs for %(worker_id)s: procrastinate's rule (procrastinate_fetch_job_v2) for
# many slots at once — candidates `todo`, in the queues (any when NULL), due; order priority DESC,
# id; a job with a `lock` only when it is the head of its lock: no job of that lock is `doing`, and
# none is `todo`, due and ahead of it. One difference, on purpose (procrastinate#1599, hardening 1):
# a same-lock job that is not due yet does not block (a retry waiting out its backoff, a job
# scheduled for year 9999). Flow control (issue 15): jobs of paused queues, expired jobs and jobs
# under a limit (a limited queue, a task limit key) are skipped — one hashed lookup of the few
# steered queues and two column tests; the limited ones are claimed by CLAIM_LIMITED, which the
# worker sends right after this statement in the same transaction only while jobs wait under a
# limit: every row says so in `limited_waiting` (two index probes), and when nothing is claimed
# the statement answers one row with a NULL id that carries it. The rule admits one head per lock per snapshot; two claimers with
# different snapshots may still pick two heads of one lock, and procrastinate's unique index on
# (lock) WHERE status = 'doing' refuses the second statement: the worker claims again at once.
CLAIM = """
WITH candidate AS MATERIALIZED (
    SELECT j.id
    FROM procrastinate_jobs j
    WHERE j.status = 'todo'
      AND (%(queues)s::varchar[] IS NULL OR j.queue_name = ANY(%(queues)s::varchar[]))
      AND (j.scheduled_at IS NULL OR j.scheduled_at <= now())
      AND j.skiplock_limit_key IS NULL
      AND (j.skiplock_expires_at IS NULL OR j.skiplock_expires_at > now())
      AND j.queue_name NOT IN (SELECT q.name FROM skiplock_queue q
                               WHERE q.paused OR q.concurrency IS NOT NULL OR q.rate_limit IS NOT NULL)
      AND (j.lock IS NULL OR NOT EXISTS (
          SELECT 1 FROM procrastinate_jobs b
          WHERE b.lock = j.lock AND b.id <> j.id
            AND (b.status = 'doing'
                 OR (b.status = 'todo'
                     AND (b.scheduled_at IS NULL OR b.scheduled_at <= now())
                     AND (b.priority > j.priority OR (b.priority = j.priority AND b.id < j.id))))
      ))
    ORDER BY j.priority DESC, j.id
    LIMIT %(n)s
    FOR NO KEY UPDATE OF j SKIP LOCKED
),
claimed AS (
    UPDATE procrastinate_jobs p
    SET status = 'doing', worker_id = %(worker_id)s
    WHERE p.id = ANY(ARRAY(SELECT c.id FROM candidate c))  -- by primary key, whatever the estimates
    RETURNING p.id, p.task_name, p.queue_name, p.priority, p.lock, p.queueing_lock, p.args, p.attempts,
              p.abort_requested
)
SELECT c.*, (
    SELECT skiplock_announce(jsonb_agg(jsonb_build_object(
        'id', x.id, 'event', 'state', 'state', CASE WHEN x.abort_requested THEN 'aborting' ELSE 'doing' END,
        'progress', COALESCE(r.progress, 0), 'step', left(COALESCE(r.step, ''), 200), 'attempts', x.attempts + 1
    )))
    FROM claimed x LEFT JOIN skiplock_job r ON r.job_id = x.id
    WHERE {listened}
) AS announced, g.limited_waiting
FROM (SELECT EXISTS (
          SELECT 1 FROM skiplock_queue q
          WHERE NOT q.paused AND (q.concurrency IS NOT NULL OR q.rate_limit IS NOT NULL)
            AND (%(queues)s::varchar[] IS NULL OR q.name = ANY(%(queues)s::varchar[]))
            AND EXISTS (SELECT 1 FROM procrastinate_jobs w WHERE w.queue_name = q.name AND w.status = 'todo')
      ) OR EXISTS (
          SELECT 1 FROM procrastinate_jobs w
          WHERE w.status = 'todo' AND w.skiplock_limit_key IS NOT NULL
            AND (%(queues)s::varchar[] IS NULL OR w.queue_name = ANY(%(queues)s::varchar[]))
      ) AS limited_waiting) g
LEFT JOIN claimed c ON true
""".replace("{listened}", LISTENED)

# Jobs under limits, claimed one at a time in claim order by `skiplock_claim_limited` (migration
# 0014): each limit (a queue's, a task key's) is checked under its own transaction-level advisory
# lock, taken with pg_try_advisory_xact_lock (a limit another claimer holds is skipped this time),
# and counted by the statements after the lock — their snapshot sees every claim committed before
# it was granted, so concurrent claimers never exceed a limit. Running counts come from the queue
# table (nothing to drift); a rate limit keeps a log of start times on its row. `held` is how many
# jobs the worker held before CLAIM ran in the same transaction, so the two take at most `n`
# together. A row with a NULL id carries `wake_in`: seconds until a rate limit admits a start.
CLAIM_LIMITED = """
SELECT * FROM skiplock_claim_limited(%(worker_id)s, %(queues)s::varchar[], %(n)s, %(held)s)
"""

# The latest progress of a running attempt; nothing when the attempt is no longer this worker's.
# The fence holds a share lock on the queue row, so an attempt ending concurrently (its finish,
# stall recovery) is either before this write (the fence fails) or after it (and overwrites it).
# The side row is created for a job deferred without one (raw procrastinate).
WRITE_PROGRESS = """
WITH mine AS (
    SELECT j.id, j.attempts, j.abort_requested FROM procrastinate_jobs j
    WHERE j.id = %(job_id)s AND j.status = 'doing' AND j.worker_id = %(worker_id)s AND j.attempts = %(attempts)s
    FOR SHARE OF j  -- waits for a finish or a take-back in flight, then re-checks the fence
),
written AS (
    INSERT INTO skiplock_job AS r (job_id, progress, step, progress_at)
    SELECT id, %(progress)s, COALESCE(%(step)s, ''), now() FROM mine
    ON CONFLICT (job_id) DO UPDATE
    SET progress = EXCLUDED.progress, step = COALESCE(%(step)s, r.step), progress_at = now()
    WHERE (r.progress, r.step) IS DISTINCT FROM (EXCLUDED.progress, COALESCE(%(step)s, r.step))
    RETURNING r.job_id, r.progress, r.step
)
SELECT skiplock_announce(jsonb_agg(jsonb_build_object(
    'id', w.job_id, 'event', 'progress', 'state', CASE WHEN m.abort_requested THEN 'aborting' ELSE 'doing' END,
    'progress', w.progress, 'step', left(w.step, 200), 'attempts', m.attempts + 1
))), count(*)
FROM written w JOIN mine m ON m.id = w.job_id
"""

# Register a worker (procrastinate's table + Skiplock's description of it).
REGISTER_WORKER = """
WITH w AS (INSERT INTO procrastinate_workers DEFAULT VALUES RETURNING id)
INSERT INTO skiplock_worker (worker_id, name, hostname, pid, queues, concurrency, processes,
                             started_at, last_seen_at)
SELECT id, %(name)s, %(hostname)s, %(pid)s, %(queues)s::jsonb, %(concurrency)s, %(processes)s, now(), now()
FROM w RETURNING worker_id
"""

# One heartbeat: refresh the worker's rows, and say which of its running jobs were asked to abort
# and which are no longer its attempt (taken back while it looked dead). Registered = false when
# the worker's row is gone (stall recovery removed it): the worker registers again.
HEARTBEAT = """
WITH beat AS (
    UPDATE procrastinate_workers SET last_heartbeat = now() WHERE id = %(worker_id)s RETURNING id
),
seen AS (UPDATE skiplock_worker SET last_seen_at = now() WHERE worker_id IN (SELECT id FROM beat)),
running AS (SELECT * FROM unnest(%(ids)s::bigint[], %(attempts)s::int[]) AS r(id, attempts))
SELECT EXISTS (SELECT 1 FROM beat),
       COALESCE(array_agg(r.id) FILTER (WHERE j.abort_requested AND j.status = 'doing'
                                        AND j.worker_id = %(worker_id)s AND j.attempts = r.attempts), '{}'),
       COALESCE(array_agg(r.id) FILTER (WHERE j.id IS NULL OR j.status <> 'doing'
                                        OR j.worker_id IS DISTINCT FROM %(worker_id)s
                                        OR j.attempts <> r.attempts), '{}')
FROM running r LEFT JOIN procrastinate_jobs j ON j.id = r.id
"""

# Jobs this worker holds in `doing` (to reconcile a claim whose answer was lost).
HELD_BY_WORKER = "SELECT id, attempts FROM procrastinate_jobs WHERE status = 'doing' AND worker_id = %(worker_id)s"

UNREGISTER_WORKER = """
WITH gone AS (DELETE FROM procrastinate_workers WHERE id = %(worker_id)s)
UPDATE skiplock_worker SET stopped_at = now(), last_seen_at = now() WHERE worker_id = %(worker_id)s
"""


# --- custom states and meta (issue 14): what a running task says about itself ----------------------
#
# `update_state(state=…, meta=…)` of jobs.celery, and JobContext.set_state: the label, the meta and
# (when the meta carries one) the progress of the running attempt, fenced like WRITE_PROGRESS on
# (job, worker, attempts as claimed): a run that was taken back changes nothing. One announcement,
# with the label, and the meta while it is small enough for a notification.
CUSTOM_STATE_MAX = 64
META_IN_EVENTS = 2000  # bytes of meta JSON carried by a notification

WRITE_CUSTOM_STATE = """
WITH mine AS (
    SELECT j.id, j.attempts, j.abort_requested FROM procrastinate_jobs j
    WHERE j.id = %(job_id)s AND j.status = 'doing' AND j.worker_id = %(worker_id)s AND j.attempts = %(attempts)s
    FOR SHARE OF j
),
written AS (
    INSERT INTO skiplock_job AS r (job_id, custom_state, custom_state_attempt, meta, progress, step, progress_at)
    SELECT id, %(state)s, attempts, %(meta)s::jsonb, COALESCE(%(progress)s, 0), COALESCE(%(step)s, ''), now()
    FROM mine
    ON CONFLICT (job_id) DO UPDATE
    SET custom_state = EXCLUDED.custom_state, custom_state_attempt = EXCLUDED.custom_state_attempt,
        meta = EXCLUDED.meta, progress = COALESCE(%(progress)s, r.progress), step = COALESCE(%(step)s, r.step),
        progress_at = CASE WHEN %(progress)s IS NULL THEN r.progress_at ELSE now() END
    RETURNING r.job_id, r.progress, r.step, r.custom_state, r.meta
)
SELECT skiplock_announce(jsonb_agg(jsonb_build_object(
    'id', w.job_id, 'event', 'progress', 'state', CASE WHEN m.abort_requested THEN 'aborting' ELSE 'doing' END,
    'progress', w.progress, 'step', left(w.step, 200), 'attempts', m.attempts + 1,
    'custom_state', w.custom_state,
    'meta', CASE WHEN octet_length(w.meta::text) <= %(meta_in_events)s THEN w.meta END
))), count(*)
FROM written w JOIN mine m ON m.id = w.job_id
"""


def write_custom_state(
    *, job_id: int, worker_id: int | None, attempts: int, state: str, meta: Any,
    progress: int | None = None, step: str | None = None,
) -> bool:
    """Store a running attempt's custom state and meta; False when the attempt is no longer running here.

    `state` must be 1 to CUSTOM_STATE_MAX characters; `meta` any JSON value (ValueError otherwise).
    """
    if not isinstance(state, str) or not 1 <= len(state) <= CUSTOM_STATE_MAX or "\x00" in state:
        raise ValueError(f"a custom state must be a name of 1 to {CUSTOM_STATE_MAX} characters, not {state!r}")
    try:
        meta_json = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"meta must be JSON (dicts, lists, strings, numbers, booleans, None): {exc}") from None
    if "\\u0000" in meta_json:
        raise ValueError("meta cannot hold NUL characters (\\u0000)")
    if progress is not None and not 0 <= progress <= 100:
        raise ValueError(f"progress must be from 0 to 100, not {progress!r}")
    with connection.cursor() as cursor:
        cursor.execute(WRITE_CUSTOM_STATE, {
            "job_id": job_id, "worker_id": worker_id, "attempts": attempts, "state": state, "meta": meta_json,
            "progress": progress, "step": None if step is None else str(step)[:255],
            "meta_in_events": META_IN_EVENTS,
        })
        row = cursor.fetchone()
    return bool(row and row[1])
