"""Maintenance: take back jobs of dead workers, and prune finished jobs past the retention.

procrastinate only *detects* stalled jobs (`get_stalled_jobs`); nothing retries them. Here a
periodic task (`skiplock.maintenance`, on `SKIPLOCK_MAINTENANCE_CRON`, deferred once per tick
however many workers run) sweeps them, and each worker also sweeps when it starts, so jobs
orphaned by a crash come back as soon as any worker runs again.

A job is stalled when it is `doing` and its worker stopped heartbeating more than
`SKIPLOCK_STALLED_AFTER` seconds ago (or its worker row is gone). Its attempt is closed with
outcome `lost` and the job waits again without using up a retry (it fails once its worker was
lost `transitions.MAX_LOST_ATTEMPTS` times); the dead workers' rows go in the same transaction.

Pruning deletes finished jobs (succeeded, failed, cancelled, aborted) whose `finished_at` is
older than `SKIPLOCK_RESULT_RETENTION`, from `procrastinate_jobs` with their side rows and
attempts in the same statement (procrastinate's events cascade), in batches of
`SKIPLOCK_PRUNE_BATCH` rows, each its own short transaction that skips locked rows, so a
million-row table is never locked for long.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from jobs import queues, transitions
from jobs.registry import INTERNAL_PRIORITY, NO_RETRY, RetryPolicy, find_task, task

logger = logging.getLogger(__name__)

MAINTENANCE_TASK = "skiplock.maintenance"
MAINTENANCE_QUEUE = "skiplock"

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
    """Close the running attempt of a `doing` job with `outcome` and retry or fail it by its policy.

    Runs inside the caller's transaction (see transitions.end_one_attempt). Returns 'retried' or 'failed'.
    """
    retry = force_retry or attempts_done < policy_for(task_name).max_attempts
    status = transitions.end_one_attempt(
        cursor, job_id=job_id, outcome=outcome, error_type=error_type, message=message, retry=retry,
    )
    return "retried" if status == "todo" else "failed"


def recover_stalled_jobs(
    *, stalled_after: float | None = None, worker_ids: list[int] | None = None, batch: int = 500,
    reason: str | None = None, outcome: str = "lost",
) -> SweepReport:
    """Requeue (or fail, when lost too often) every `doing` job whose worker is gone; forget those workers.

    `worker_ids` limits the sweep to those workers and treats them as dead whatever their
    heartbeat (the supervisor uses it the moment a child process dies). A lost-worker requeue
    uses up no retry.
    """
    stalled_after = float(settings.SKIPLOCK_STALLED_AFTER if stalled_after is None else stalled_after)
    recovery = transitions.recover_stalled(
        stalled_after=stalled_after, worker_ids=worker_ids, batch=batch, reason=reason, outcome=outcome,
    )
    if recovery.retried or recovery.failed:
        logger.warning("stalled jobs taken back: %d requeued %s, %d failed %s",
                       len(recovery.retried), recovery.retried[:20], len(recovery.failed), recovery.failed[:20])
    return SweepReport(retried=recovery.retried, failed=recovery.failed, workers_pruned=recovery.workers_pruned)


def prune_dead_workers(*, stalled_after: float, worker_ids: list[int] | None = None) -> int:
    """Forget workers that stopped heartbeating, taking their jobs back first (see recover_stalled_jobs)."""
    return recover_stalled_jobs(stalled_after=stalled_after, worker_ids=worker_ids).workers_pruned


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
        count = transitions.prune_batch(older_than=older_than, batch=batch)
        deleted += count
        batches += 1
        if progress is not None:
            progress(deleted)
        if count < batch:
            return PruneReport(deleted, batches, time.monotonic() - started, True)
        if time.monotonic() - started > time_budget:
            return PruneReport(deleted, batches, time.monotonic() - started, False)


def run_maintenance() -> dict[str, Any]:
    """One maintenance tick: sweep stalled jobs, end expired ones, then prune (bounded in time)."""
    sweep = recover_stalled_jobs()
    expired = transitions.expire_jobs()
    prune = prune_finished_jobs(time_budget=float(settings.SKIPLOCK_PRUNE_TIME_BUDGET))
    queues.prune_task_limits()
    return {
        "stalled": sweep.as_dict(),
        "expired": expired,
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
