"""Maintenance: take back jobs of dead workers, and prune finished jobs past the retention.

procrastinate only *detects* stalled jobs (`get_stalled_jobs`); nothing retries them. Here a
periodic task (`skiplock.maintenance`, on `SKIPLOCK_MAINTENANCE_CRON`, deferred once per tick
however many workers run) sweeps them, and each worker also sweeps when it starts, so jobs
orphaned by a crash come back as soon as any worker runs again.

A job is stalled when it is `doing` and its worker stopped heartbeating more than
`SKIPLOCK_STALLED_AFTER` seconds ago (or its worker row is gone). Its attempt is closed with
outcome `lost`; the job is retried now if its retry policy has attempts left, failed otherwise.

Pruning deletes finished jobs (succeeded, failed, cancelled, aborted) whose `finished_at` is
older than `SKIPLOCK_RESULT_RETENTION`, from `procrastinate_jobs` (the triggers of migration
0002 delete their records and attempts; procrastinate's events cascade), in batches of
`SKIPLOCK_PRUNE_BATCH` rows, each its own short transaction that skips locked rows, so a
million-row table is never locked for long.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import connection, transaction

from jobs.registry import INTERNAL_PRIORITY, NO_RETRY, RetryPolicy, find_task, task

logger = logging.getLogger(__name__)

MAINTENANCE_TASK = "skiplock.maintenance"
MAINTENANCE_QUEUE = "skiplock"
FINAL_STATUSES = ("succeeded", "failed", "cancelled", "aborted")

_STALLED = """
SELECT j.id, j.task_name, j.attempts, j.worker_id
FROM procrastinate_jobs j
LEFT JOIN procrastinate_workers w ON w.id = j.worker_id
WHERE j.status = 'doing'
  AND (j.worker_id IS NULL OR w.last_heartbeat < now() - make_interval(secs => %s))
  {extra}
ORDER BY j.id
LIMIT %s
FOR UPDATE OF j SKIP LOCKED
"""

_ATTEMPT_ERROR = """
UPDATE skiplock_job_attempt SET error_type = %s, error_message = %s
WHERE job_id = %s AND finished_at IS NULL
"""

_JOB_ERROR = "UPDATE skiplock_job SET error_type = %s, error_message = %s, error_traceback = '' WHERE job_id = %s"


@dataclass
class SweepReport:
    retried: list[int]
    failed: list[int]
    workers_pruned: int

    def as_dict(self) -> dict[str, Any]:
        return {"retried": self.retried, "failed": self.failed, "workers_pruned": self.workers_pruned}


def policy_for(task_name: str) -> RetryPolicy:
    spec = find_task(task_name)
    return spec.retry if spec else NO_RETRY


def end_attempt(
    cursor: Any, *, job_id: int, task_name: str, attempts_done: int, outcome: str,
    error_type: str, message: str, force_retry: bool = False,
) -> str:
    """Close the running attempt of a `doing` job with `outcome` and retry or fail it.

    Runs inside the caller's transaction, on a row it holds locked. Returns 'retried' or 'failed'.
    """
    cursor.execute("SELECT set_config('skiplock.attempt_outcome', %s, true)", [outcome])
    cursor.execute(_ATTEMPT_ERROR, [error_type, message, job_id])
    cursor.execute(_JOB_ERROR, [error_type, message, job_id])
    policy = policy_for(task_name)
    if force_retry or attempts_done < policy.max_attempts:
        cursor.execute("SELECT procrastinate_retry_job_v2(%s, now(), NULL, NULL, NULL)", [job_id])
        verdict = "retried"
    else:
        cursor.execute("SELECT procrastinate_finish_job_v1(%s, 'failed', false)", [job_id])
        verdict = "failed"
    cursor.execute("SELECT set_config('skiplock.attempt_outcome', '', true)")
    return verdict


def recover_stalled_jobs(
    *, stalled_after: float | None = None, worker_ids: list[int] | None = None, batch: int = 500,
    reason: str | None = None, outcome: str = "lost", force_retry: bool = False,
) -> SweepReport:
    """Retry (or fail, when out of attempts) every `doing` job whose worker is gone.

    `worker_ids` limits the sweep to those workers and treats them as dead whatever their
    heartbeat (the supervisor uses it the moment a child process dies).
    """
    stalled_after = float(settings.SKIPLOCK_STALLED_AFTER if stalled_after is None else stalled_after)
    retried: list[int] = []
    failed: list[int] = []
    extra, params = "", []
    if worker_ids is not None:
        extra = "AND j.worker_id = ANY(%s)"
        params = [worker_ids]
        stalled_after = -1.0e9  # the caller knows these workers are dead
    while True:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(_STALLED.format(extra=extra), [stalled_after, *params, batch])
            rows = cursor.fetchall()
            for job_id, task_name, attempts, worker_id in rows:
                message = reason or (
                    f"the worker running this job (id {worker_id}) stopped heartbeating for more than "
                    f"{stalled_after:g} s; the job was taken back"
                    if worker_id is not None
                    else "the worker running this job is gone; the job was taken back"
                )
                verdict = end_attempt(
                    cursor, job_id=job_id, task_name=task_name, attempts_done=attempts + 1,
                    outcome=outcome, error_type="WorkerLost", message=message, force_retry=force_retry,
                )
                (retried if verdict == "retried" else failed).append(job_id)
        if len(rows) < batch:
            break
    pruned = prune_dead_workers(stalled_after=stalled_after, worker_ids=worker_ids)
    if retried or failed:
        logger.warning("stalled jobs taken back: %d retried %s, %d failed %s",
                       len(retried), retried[:20], len(failed), failed[:20])
    return SweepReport(retried=retried, failed=failed, workers_pruned=pruned)


def prune_dead_workers(*, stalled_after: float, worker_ids: list[int] | None = None) -> int:
    """Forget workers that stopped heartbeating (cheap: migration 0003 keeps finished jobs unlinked)."""
    with transaction.atomic(), connection.cursor() as cursor:
        if worker_ids is not None:
            cursor.execute("DELETE FROM procrastinate_workers WHERE id = ANY(%s) RETURNING id", [worker_ids])
        else:
            cursor.execute(
                "DELETE FROM procrastinate_workers WHERE last_heartbeat < now() - make_interval(secs => %s) "
                "RETURNING id",
                [stalled_after],
            )
        gone = [row[0] for row in cursor.fetchall()]
        if gone:
            cursor.execute(
                "UPDATE skiplock_worker SET stopped_at = COALESCE(stopped_at, now()) WHERE worker_id = ANY(%s)",
                [gone],
            )
    return len(gone)


@dataclass
class PruneReport:
    deleted: int
    batches: int
    seconds: float
    complete: bool  # False when the time budget ran out first


def prune_finished_jobs(
    *, older_than: float | None = None, batch: int | None = None, time_budget: float = 60.0,
    progress: Any = None,
) -> PruneReport:
    """Delete finished jobs whose record finished more than `older_than` seconds ago, in batches."""
    older_than = float(settings.SKIPLOCK_RESULT_RETENTION if older_than is None else older_than)
    batch = int(settings.SKIPLOCK_PRUNE_BATCH if batch is None else batch)
    started = time.monotonic()
    deleted = batches = 0
    while True:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET LOCAL lock_timeout = '2s'")
            cursor.execute(
                """
                WITH victims AS (
                    SELECT j.id FROM skiplock_job r
                    JOIN procrastinate_jobs j ON j.id = r.job_id
                    WHERE r.finished_at < now() - make_interval(secs => %s)
                      AND j.status IN ('succeeded', 'failed', 'cancelled', 'aborted')
                    ORDER BY r.finished_at
                    LIMIT %s
                    FOR UPDATE OF j SKIP LOCKED
                )
                DELETE FROM procrastinate_jobs WHERE id IN (SELECT id FROM victims)
                """,
                [older_than, batch],
            )
            count = cursor.rowcount
        deleted += count
        batches += 1
        if progress is not None:
            progress(deleted)
        if count < batch:
            return PruneReport(deleted, batches, time.monotonic() - started, True)
        if time.monotonic() - started > time_budget:
            return PruneReport(deleted, batches, time.monotonic() - started, False)


def run_maintenance() -> dict[str, Any]:
    """One maintenance tick: sweep stalled jobs, then prune (bounded in time)."""
    sweep = recover_stalled_jobs()
    prune = prune_finished_jobs(time_budget=float(settings.SKIPLOCK_PRUNE_TIME_BUDGET))
    return {
        "stalled": sweep.as_dict(),
        "pruned": prune.deleted,
        "prune_complete": prune.complete,
    }


@task(
    name=MAINTENANCE_TASK,
    queue=MAINTENANCE_QUEUE,
    priority=INTERNAL_PRIORITY,
    retry=NO_RETRY,
    queueing_lock="skiplock-maintenance",
    soft_time_limit=600,
    hard_time_limit=900,
)
def maintenance() -> dict[str, Any]:
    """Retry jobs of dead workers and prune finished jobs past the retention (runs on a schedule)."""
    return run_maintenance()


def ensure_schedule() -> None:
    from jobs.periodic import _SCHEDULES, register_periodic

    if (MAINTENANCE_TASK, "") not in _SCHEDULES:
        register_periodic(MAINTENANCE_TASK, cron=settings.SKIPLOCK_MAINTENANCE_CRON)
