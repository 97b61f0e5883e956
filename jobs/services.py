"""The writes people ask for, under their historical names: thin re-exports of `jobs.transitions`.

The API, the admin, the pages and the commands call these; `jobs.transitions` is the one module
that changes job rows (see docs/architecture.md).
"""

from __future__ import annotations

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
    "is_final",
    "job_abort",
    "job_cancel",
    "job_change",
    "job_defer",
    "job_defer_batch",
    "job_delete",
    "job_retry",
    "job_run_now",
]
