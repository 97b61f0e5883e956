"""Reads shared by the API, the admin, the pages, the commands and the metrics."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from django.db import connection
from django.db.models import Q

from jobs.exceptions import JobNotFound
from jobs.models import JobAttempt, JobRecord


def job_get(*, job_id: int) -> JobRecord:
    record = JobRecord.objects.filter(pk=job_id).first()
    if record is None:
        raise JobNotFound(f"no job has id {job_id}")
    return record


def job_attempts(*, job_id: int) -> list[JobAttempt]:
    """The attempts of a job, oldest first: the ended ones, then the running one if it runs now.

    A running attempt has no row of its own (whoever ends it writes it): it is read from the queue
    row (status doing, its worker) and procrastinate's latest `started` event.
    """
    attempts = list(JobAttempt.objects.filter(job_id=job_id).order_by("number"))
    record = JobRecord.objects.filter(pk=job_id, status="doing").first()
    if record is not None:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT max(at) FROM procrastinate_events WHERE job_id = %s AND type = 'started'", [job_id]
            )
            started_at = cursor.fetchone()[0]
        attempts.append(JobAttempt(
            job_id=job_id, number=(attempts[-1].number if attempts else 0) + 1, worker_name=record.worker_name,
            started_at=started_at or record.started_at or dt.datetime.now(dt.UTC), finished_at=None, outcome=JobAttempt.Outcome.RUNNING,
            error_type="", error_message="", error_traceback="",
        ))
    return attempts


def job_events(*, job_id: int) -> list[dict[str, Any]]:
    """procrastinate's event timeline of a job (deferred, started, retried, failed, …)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT type::text, at FROM procrastinate_events WHERE job_id = %s ORDER BY at, id", [job_id]
        )
        return [{"type": row[0], "at": row[1]} for row in cursor.fetchall()]


def job_max_attempts(record: JobRecord) -> int | None:
    from jobs.registry import find_task

    spec = find_task(record.task_name)
    return spec.retry.max_attempts if spec else None


def time_since(moment: dt.datetime | None) -> float | None:
    if moment is None:
        return None
    return (dt.datetime.now(dt.UTC) - moment).total_seconds()


def state_filter(*states: str, now: dt.datetime | None = None) -> Q:
    """Rows whose display state is one of `states`, as conditions on the queue row's indexed status.

    Mirrors `jobs.states.display_state`, so a filter shows exactly the rows whose badge it names:
    todo = waiting to run now, scheduled = waiting for a future first run, retrying = waiting
    after a failed attempt. The API, the admin and the `job` command all filter through here.
    """
    from jobs.states import DisplayState, State

    now = now or dt.datetime.now(dt.UTC)
    query = Q()
    for value in dict.fromkeys(states):
        wanted = DisplayState(value)
        if wanted == DisplayState.TODO:
            query |= Q(status=State.TODO, attempts=0) & (Q(scheduled_at__isnull=True) | Q(scheduled_at__lte=now))
        elif wanted == DisplayState.SCHEDULED:
            query |= Q(status=State.TODO, attempts=0, scheduled_at__gt=now)
        elif wanted == DisplayState.RETRYING:
            query |= Q(status=State.TODO, attempts__gt=0)
        elif wanted == DisplayState.DOING:
            query |= Q(status=State.DOING, abort_requested=False)
        elif wanted == DisplayState.ABORTING:
            query |= Q(status=State.DOING, abort_requested=True)
        else:
            query |= Q(status=wanted.value)
    return query


def stored_state_filter(*states: str) -> Q:
    """Rows whose stored state (`JobRecord.state`: procrastinate's status, or aborting) is one of `states`."""
    from jobs.states import State

    query = Q()
    for value in dict.fromkeys(states):
        if value == State.DOING:
            query |= Q(status=State.DOING, abort_requested=False)
        elif value == State.ABORTING:
            query |= Q(status=State.DOING, abort_requested=True)
        else:
            query |= Q(status=value)
    return query


def job_list(
    *, task: str | None = None, state: str | None = None, queue: str | None = None, limit: int = 20
) -> list[JobRecord]:
    """The newest jobs matching the filters (index-backed: state, task or queue with -job_id)."""
    records = JobRecord.objects.order_by("-job_id")
    if task:
        records = records.filter(task_name=task)
    if queue:
        records = records.filter(queue_name=queue)
    if state:
        records = records.filter(state_filter(state))
    return list(records[:limit])


# --- what a waiting job waits for (hardening item 23) -------------------------------------------

# One statement of two index probes: the job by primary key, then the running holder of its lock
# through procrastinate_jobs_lock_idx_v1 (unique on lock for doing rows); the holder's owner by
# skiplock_job's primary key. A waiting job queued behind another *waiting* job of the same lock is
# not reported: finding those would walk the whole backlog (no index serves lock for todo rows),
# and the one ahead starts first anyway, after which this one names it as the holder.
_WAITING_FOR_SQL = """
SELECT job.lock, holder.id, record.owner_id
FROM procrastinate_jobs AS job
JOIN procrastinate_jobs AS holder ON holder.lock = job.lock AND holder.status = 'doing'
LEFT JOIN skiplock_job AS record ON record.job_id = holder.id
WHERE job.id = %(id)s AND job.status = 'todo' AND job.lock IS NOT NULL
LIMIT 1
"""


@dataclass(frozen=True)
class WaitingFor:
    """The running job whose `lock` a waiting job waits for."""

    lock: str
    job_id: int
    owner_id: int | None

    def describe(self, *, show_job: bool = True) -> str:
        """'lock deploy-shop-production held by job 412'; `show_job=False` hides a job the reader may not see."""
        return f"lock {self.lock} held by {f'job {self.job_id}' if show_job else 'another job'}"


def job_waiting_for(*, job_id: int) -> WaitingFor | None:
    """What keeps a waiting job from starting, or None (not waiting, no lock, or its lock is free)."""
    with connection.cursor() as cursor:
        cursor.execute(_WAITING_FOR_SQL, {"id": job_id})
        row = cursor.fetchone()
    if row is None:
        return None
    lock, holder_id, owner_id = row
    return WaitingFor(lock=lock, job_id=holder_id, owner_id=owner_id)
