"""The writes people ask for, under their historical names: thin re-exports of `jobs.transitions`.

The API, the admin, the pages and the commands call these; `jobs.transitions` is the one module
that changes job rows (see docs/architecture.md), `jobs.queues` the one that steers queues.
"""

from __future__ import annotations

from jobs.queues import (
    QueueProblem,
    every_queue,
    get_queue,
    list_queues,
    list_task_limits,
    pause_queue,
    resume_queue,
    set_queue_limits,
)
from jobs.transitions import (
    MAX_DELAY_SECONDS,
    DeferredJob,
    DeferRequest,
    is_final,
    job_abort,
    job_cancel,
    job_change,
    job_defer,
    job_defer_batch,
    job_delete,
    job_retry,
    job_run_now,
)

__all__ = [
    "MAX_DELAY_SECONDS",
    "DeferRequest",
    "DeferredJob",
    "QueueProblem",
    "every_queue",
    "get_queue",
    "is_final",
    "job_abort",
    "job_cancel",
    "job_change",
    "job_defer",
    "job_defer_batch",
    "job_delete",
    "job_retry",
    "job_run_now",
    "list_queues",
    "list_task_limits",
    "pause_queue",
    "resume_queue",
    "set_queue_limits",
]
