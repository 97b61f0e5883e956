"""Every write and state change of a job. The API, the admin, the pages and the commands call these.

Each change is one conditional statement on the queue row (through procrastinate's job manager
where it has one), so two callers racing on one job cannot both win; the wrong state raises
InvalidTransition naming the state the job is really in. Defers run on the Django connection and
so join the caller's `transaction.atomic()`: roll back, and the job never existed.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.db.models import Q
from procrastinate import exceptions as procrastinate_exceptions
from procrastinate import jobs as procrastinate_jobs
from procrastinate.contrib.django.django_connector import DjangoConnector
from procrastinate.manager import JobManager

from jobs.exceptions import (
    AlreadyQueued,
    IdempotencyConflict,
    InvalidArguments,
    InvalidTransition,
    JobNotFound,
)
from jobs.models import JobRecord
from jobs.registry import MAX_PRIORITY, MIN_PRIORITY, TaskSpec, get_startable_task, queue_problem
from jobs.states import FINAL_STATES, State

# How far ahead a job may be scheduled, by `delay_seconds` or `run_at` alike.
MAX_DELAY_SECONDS = 366 * 24 * 3600


@functools.cache
def _job_manager() -> JobManager:
    """procrastinate's job manager on Django's connection: defers join the caller's transaction."""
    return JobManager(DjangoConnector())


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
) -> DeferredJob:
    """Start one job. Joins the caller's transaction; an invalid request changes nothing."""
    request = DeferRequest(
        task_name=task_name, args=args or {}, queue=queue, priority=priority, run_at=run_at,
        delay_seconds=delay_seconds, idempotency_key=idempotency_key, owner_id=owner_id,
    )
    return job_defer_batch(requests=[request])[0]


def job_defer_batch(*, requests: Sequence[DeferRequest]) -> list[DeferredJob]:
    """Start many jobs in one round trip for the inserts; all valid or none started."""
    prepared = _prepare_all(requests)
    with transaction.atomic():
        existing = _existing_by_key([r for r, _, _ in prepared])
        to_insert = [(r, spec, job) for r, spec, job in prepared if _key_of(r) not in existing]
        inserted: list[procrastinate_jobs.Job] = []
        if to_insert:
            try:
                with transaction.atomic():
                    inserted = _job_manager().batch_defer_jobs([job for _, _, job in to_insert])
                    _annotate([(r, job.id) for (r, _, _), job in zip(to_insert, inserted, strict=True)])
            except procrastinate_exceptions.AlreadyEnqueued as exc:
                raise AlreadyQueued(
                    f"a job with this queueing lock is already waiting: {exc}",
                ) from None
            except IntegrityError:
                # Another request took one of these idempotency keys meanwhile: answer as if we came second.
                existing = _existing_by_key([r for r, _, _ in prepared])
                if not existing:
                    raise
                return job_defer_batch(requests=requests)
    by_key = iter(inserted)
    results: list[DeferredJob] = []
    for request, _spec, job in prepared:
        if _key_of(request) in existing:
            results.append(existing[_key_of(request)])
            continue
        done = next(by_key)
        assert done.id is not None
        results.append(
            DeferredJob(job_id=done.id, task_name=job.task_name, queue=job.queue, state=State.TODO,
                        scheduled_at=job.scheduled_at, created=True)
        )
    return results


def _prepare_all(requests: Sequence[DeferRequest]) -> list[tuple[DeferRequest, TaskSpec, procrastinate_jobs.Job]]:
    if not requests:
        raise InvalidArguments("no jobs to start", details=[{"field": "jobs", "message": "empty", "type": "empty"}])
    prepared = []
    problems: list[dict[str, Any]] = []
    for index, request in enumerate(requests):
        try:
            spec = get_startable_task(request.task_name)
            prepared.append((request, spec, _build_job(request, spec)))
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


def _build_job(request: DeferRequest, spec: TaskSpec) -> procrastinate_jobs.Job:
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
    if request.idempotency_key is not None and not 1 <= len(request.idempotency_key) <= 255:
        problems.append({"field": "idempotency_key", "message": "must be 1 to 255 characters", "type": "value_error"})
    if isinstance(request.idempotency_key, str) and "\x00" in request.idempotency_key:
        problems.append({"field": "idempotency_key", "message": "cannot hold NUL characters", "type": "value_error"})
    try:
        lock, queueing_lock = spec.lock_for(args), spec.queueing_lock_for(args)
    except (KeyError, IndexError) as exc:
        problems.append({"field": "args", "message": f"lock template needs argument {exc}", "type": "value_error"})
        lock = queueing_lock = None
    if problems:
        raise InvalidArguments(
            "; ".join(f"{p['field']}: {p['message']}" for p in problems), details=problems
        )
    return procrastinate_jobs.Job(
        id=None, queue=queue, task_name=spec.name, priority=priority, lock=lock,
        queueing_lock=queueing_lock, task_kwargs=args, scheduled_at=scheduled_at,
    )


def _key_of(request: DeferRequest) -> tuple[str, str | None]:
    """An idempotency key as it is unique: per principal."""
    return request.started_by, request.idempotency_key


def _existing_by_key(requests: Sequence[DeferRequest]) -> dict[tuple[str, str | None], DeferredJob]:
    """The jobs the same principals already started under these idempotency keys (never another's)."""
    keyed = {_key_of(r): r for r in requests if r.idempotency_key}
    if not keyed:
        return {}
    wanted = Q()
    for started_by, key in keyed:
        wanted |= Q(started_by=started_by, idempotency_key=key)
    found: dict[tuple[str, str | None], DeferredJob] = {}
    for record in JobRecord.objects.filter(wanted):
        request = keyed[(record.started_by, record.idempotency_key)]
        args = get_startable_task(request.task_name).validate(request.args)
        if record.task_name != request.task_name or record.args != args:
            raise IdempotencyConflict(
                f"idempotency key '{record.idempotency_key}' was used for job {record.job_id} "
                f"({record.task_name}) with other arguments; use a new key for a new job",
                details={"job_id": record.job_id, "idempotency_key": record.idempotency_key},
            )
        found[_key_of(request)] = DeferredJob(
            job_id=record.job_id, task_name=record.task_name, queue=record.queue_name,
            state=record.state, scheduled_at=record.scheduled_at, created=False,
        )
    return found


def _annotate(pairs: list[tuple[DeferRequest, int | None]]) -> None:
    """Store what the queue row cannot hold (idempotency key, owner, who started it) on the new records."""
    rows = [(job_id, r.idempotency_key, r.owner_id, r.started_by) for r, job_id in pairs if r.idempotency_key or r.started_by]
    if not rows:
        return
    with connection.cursor() as cursor:
        cursor.execute(
            """
            UPDATE skiplock_job AS j SET idempotency_key = v.key, owner_id = v.owner, started_by = v.started_by
            FROM unnest(%s::bigint[], %s::text[], %s::bigint[], %s::text[]) AS v(id, key, owner, started_by)
            WHERE j.job_id = v.id
            """,
            [[r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows]],
        )


# --- transitions ---------------------------------------------------------------------------------


def job_cancel(*, job_id: int) -> str:
    """Cancel a waiting job (todo → cancelled)."""
    if not _job_manager().cancel_job_by_id(job_id, abort=False):
        raise _wrong_state(job_id, "cancel")
    return State.CANCELLED


def job_abort(*, job_id: int) -> str:
    """Ask a running job to stop (doing → aborting → aborted); a waiting job is cancelled."""
    state = _state_of(job_id)
    if state not in (State.TODO, State.DOING):
        raise InvalidTransition(job_id=job_id, action="abort", state=state)
    if not _job_manager().cancel_job_by_id(job_id, abort=True):
        raise _wrong_state(job_id, "abort")
    return State.CANCELLED if state == State.TODO else State.ABORTING


def job_retry(*, job_id: int) -> str:
    """Run a failed job again now (failed → todo); its attempts and errors stay in its history."""
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                "SELECT status FROM procrastinate_jobs WHERE id = %s FOR UPDATE", [job_id]
            )
            row = cursor.fetchone()
            if row is None:
                raise JobNotFound(f"no job has id {job_id}")
            if row[0] != State.FAILED:
                raise InvalidTransition(job_id=job_id, action="retry", state=_state_of(job_id))
            cursor.execute(
                "SELECT procrastinate_retry_job_v2(%s, now(), NULL, NULL, NULL)", [job_id]
            )
    except IntegrityError:
        # procrastinate#1543: the job's queueing lock is held by a newer waiting job.
        raise AlreadyQueued(
            f"cannot retry job {job_id}: another job with its queueing lock is already waiting"
        ) from None
    return State.TODO


def job_run_now(*, job_id: int) -> str:
    """Make a scheduled job runnable now."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE procrastinate_jobs SET scheduled_at = now() "
            "WHERE id = %s AND status = 'todo' AND scheduled_at > now()",
            [job_id],
        )
        if cursor.rowcount != 1:
            raise _wrong_state(job_id, "run now")
    return State.TODO


def job_delete(*, job_id: int) -> None:
    """Delete a finished or waiting job with its record, attempts and events."""
    with connection.cursor() as cursor:
        cursor.execute(
            "DELETE FROM procrastinate_jobs WHERE id = %s AND status IN "
            "('todo', 'succeeded', 'failed', 'cancelled', 'aborted')",
            [job_id],
        )
        if cursor.rowcount != 1:
            raise _wrong_state(job_id, "delete")


def _state_of(job_id: int) -> str:
    state = JobRecord.objects.filter(pk=job_id).values_list("state", flat=True).first()
    if state is None:
        raise JobNotFound(f"no job has id {job_id}")
    return state


def _wrong_state(job_id: int, action: str) -> InvalidTransition:
    return InvalidTransition(job_id=job_id, action=action, state=_state_of(job_id))


def is_final(state: str) -> bool:
    return state in FINAL_STATES
