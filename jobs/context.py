"""What a running task can reach: its job id, attempt, progress reporting and abort requests.

Works the same in sync tasks (run in a worker thread) and async tasks (on the worker's loop):
the worker sets the context in a ContextVar of the task (and of its thread).
`report_progress` does no I/O: it stores the latest value and, the first time since the last
write, asks the worker for a write; the worker writes at most one fenced UPDATE per
`SKIPLOCK_PROGRESS_INTERVAL`, and the finish statement carries what is still pending. A job that
never reports progress costs no progress machinery at all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from procrastinate import exceptions as procrastinate_exceptions

from jobs.exceptions import Discard, JobAborted, Snooze, SoftTimeLimitExceeded

_current: ContextVar[JobContext | None] = ContextVar("skiplock_job", default=None)


def current_job() -> JobContext:
    """The context of the job running in this task; raises outside a job."""
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError("current_job() is only available while a Skiplock job runs")
    return ctx


@dataclass
class _Progress:
    """The latest reported progress, handed from the task's thread to the worker's writer."""

    percent: int = 0
    step: str | None = None  # None: the job never named a step (the stored one is kept)
    dirty: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> tuple[int, str | None] | None:
        with self.lock:
            if not self.dirty:
                return None
            self.dirty = False
            return self.percent, self.step


@dataclass
class JobContext:
    """What a running job sees (`current_job()`, or its first argument when it asks for one)."""

    job_id: int
    attempt: int  # 1 on the first run
    task_name: str
    queue: str
    args: dict[str, Any]
    soft_time_limit: float
    hard_time_limit: float
    started_monotonic: float = field(default_factory=time.monotonic)
    # Called (from any thread) when progress becomes pending: the worker schedules a write.
    _on_progress: Callable[[], None] | None = field(default=None, repr=False)
    _progress: _Progress | None = field(default=None, repr=False)  # made at the first report
    abort_requested: bool = False  # set by the worker when it learns of an abort request
    soft_limit_hit: bool = False
    thread_id: int | None = field(default=None, repr=False)
    worker_id: int | None = None  # the worker running this attempt (the fence of what it writes)
    # A sync task that asks for it is interrupted (JobAborted, not an Exception) when an abort is
    # requested, instead of stopping cooperatively: Celery's revoke(terminate=True) (jobs.celery).
    interrupt_on_abort: bool = False

    @property
    def retries(self) -> int:
        """Attempts before this one (Celery's `request.retries`)."""
        return self.attempt - 1

    def set_state(self, state: str, meta: Any = None) -> bool:
        """Label this running job with a custom state and free-form JSON meta (one fenced write).

        A `progress` (0–100) or `current` + `total` in the meta sets the job's progress, and a
        `step` (or `status`) text its step. Returns False when this attempt no longer runs here.
        """
        from jobs.transitions import write_custom_state

        if self.should_abort():
            raise JobAborted(f"job {self.job_id} was asked to abort")
        progress, step = progress_in(meta)
        written = write_custom_state(
            job_id=self.job_id, worker_id=self.worker_id, attempts=self.attempt - 1, state=state, meta=meta,
            progress=progress, step=step,
        )
        if progress is not None and self._progress is not None:
            with self._progress.lock:  # a pending older report must not overwrite this value
                self._progress.percent = progress
                if step is not None:
                    self._progress.step = step[:255]
        return written

    def report_progress(self, percent: float, step: str | None = None) -> None:
        """Record progress (0–100) and an optional step text; raises JobAborted if abort was asked."""
        if isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 <= percent <= 100:
            raise ValueError(f"progress must be a number from 0 to 100, not {percent!r}")
        if self.should_abort():
            raise procrastinate_exceptions.JobAborted(f"job {self.job_id} was asked to abort")
        if self.soft_limit_hit:
            raise SoftTimeLimitExceeded(f"job {self.job_id} ran past its soft time limit")
        progress = self._progress
        if progress is None:  # only the job's own thread reports: no race creating it
            progress = self._progress = _Progress()
        with progress.lock:
            progress.percent = int(percent)
            if step is not None:
                progress.step = str(step)[:255]
            if progress.dirty:
                return  # the flusher is already due to write; it will take this newer value
            progress.dirty = True
        if self._on_progress is not None:
            self._on_progress()

    def take_progress(self) -> tuple[int, str | None] | None:
        """The progress reported since the last take, if any (for the worker's writes)."""
        return self._progress.take() if self._progress is not None else None

    def should_abort(self) -> bool:
        """True once an abort of this job was requested (cheap: no database round trip)."""
        return self.abort_requested

    def snooze(self, seconds: float) -> None:
        """Stop this run and run the job again in `seconds`, without using up an attempt (raises Snooze)."""
        raise Snooze(seconds)

    def discard(self, reason: str = "") -> None:
        """Stop this run and end the job `discarded` with `reason` (raises Discard); never retried."""
        raise Discard(reason)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started_monotonic


def progress_in(meta: Any) -> tuple[int | None, str | None]:
    """The progress (0–100) and step a custom state's meta describes, if it does."""
    if not isinstance(meta, dict):
        return None, None
    progress: int | None = None
    value = _number(meta.get("progress", meta.get("percent")))
    current, total = _number(meta.get("current")), _number(meta.get("total"))
    if value is not None:
        progress = int(max(0.0, min(100.0, value)))
    elif current is not None and total is not None and total > 0:
        progress = int(max(0.0, min(100.0, 100 * current / total)))
    step = meta.get("step", meta.get("status"))
    return progress, step if isinstance(step, str) else None


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value == value:
        return float(value)
    return None
