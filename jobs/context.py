"""What a running task can reach: its job id, attempt, progress reporting and abort requests.

Works the same in sync tasks (run in a worker thread) and async tasks (on the worker's loop):
the context lives in a ContextVar that asgiref copies into the task's thread.
`report_progress` does no I/O: it stores the latest value and wakes the worker's flusher,
which writes at most one UPDATE per `SKIPLOCK_PROGRESS_INTERVAL` and always the last value.
"""

from __future__ import annotations

import asyncio
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from procrastinate import exceptions as procrastinate_exceptions

from jobs.exceptions import SoftTimeLimitExceeded

_current: ContextVar[JobContext | None] = ContextVar("skiplock_job", default=None)


def current_job() -> JobContext:
    """The context of the job running in this task; raises outside a job."""
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError("current_job() is only available while a Skiplock job runs")
    return ctx


@dataclass
class _Progress:
    """The latest reported progress, handed from the task's thread to the loop's flusher."""

    percent: int = 0
    step: str = ""
    dirty: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def take(self) -> tuple[int, str] | None:
        with self.lock:
            if not self.dirty:
                return None
            self.dirty = False
            return self.percent, self.step


@dataclass
class JobContext:
    job_id: int
    attempt: int  # 1 on the first run
    task_name: str
    queue: str
    args: dict[str, Any]
    soft_time_limit: float
    hard_time_limit: float
    started_monotonic: float = field(default_factory=time.monotonic)
    _procrastinate: Any = field(default=None, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _progress: _Progress = field(default_factory=_Progress, repr=False)
    soft_limit_hit: bool = False
    thread_id: int | None = field(default=None, repr=False)

    def report_progress(self, percent: float, step: str | None = None) -> None:
        """Record progress (0–100) and an optional step text; raises JobAborted if abort was asked."""
        if isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 <= percent <= 100:
            raise ValueError(f"progress must be a number from 0 to 100, not {percent!r}")
        if self.should_abort():
            raise procrastinate_exceptions.JobAborted(f"job {self.job_id} was asked to abort")
        if self.soft_limit_hit:
            raise SoftTimeLimitExceeded(f"job {self.job_id} ran past its soft time limit")
        progress = self._progress
        with progress.lock:
            progress.percent = int(percent)
            if step is not None:
                progress.step = str(step)[:255]
            if progress.dirty:
                return  # the flusher is already due to write; it will take this newer value
            progress.dirty = True
        self._wake_flusher()

    def should_abort(self) -> bool:
        """True once an abort of this job was requested (cheap: no database round trip)."""
        return bool(self._procrastinate is not None and self._procrastinate.should_abort())

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started_monotonic

    def _wake_flusher(self) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._progress.wake.set()
        else:
            loop.call_soon_threadsafe(self._progress.wake.set)
