"""Celery's task and result API on Skiplock: a Celery module moves over with its imports changed.

    from jobs.celery import AsyncResult, shared_task   # was: from celery import shared_task
                                                       #      from celery.result import AsyncResult

    @shared_task(bind=True, max_retries=3, default_retry_delay=60, queue="llm")
    def summarise(self, document_id, **params):
        self.update_state(state="READING", meta={"current": 1, "total": 3})
        try:
            ...
        except RateLimited as exc:
            raise self.retry(exc=exc, countdown=60 * 2 ** self.request.retries)

    result = summarise.delay(42, model="small")        # a Skiplock job, in the caller's transaction
    AsyncResult(result.id).state                       # PENDING, READING, SUCCESS…

Each task is a Skiplock task underneath (jobs.registry): transactional enqueue, the worker, time
limits, the admin, the API and SSE all apply. Positional arguments are stored in order under the
job's reserved `__args__` key, keyword arguments by name. What differs from Celery, option by
option and member by member, is listed in docs/migrating-from-celery.md.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import datetime as dt
import functools
import inspect
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from jobs import registry
from jobs.context import JobContext, _current
from jobs.exceptions import (
    HardTimeLimitExceeded,
    InvalidTransition,
    JobAborted,
    SoftTimeLimitExceeded,
)
from jobs.states import State

__all__ = [
    "AsyncResult", "Celery", "Ignore", "MaxRetriesExceededError", "Retry", "Signature", "SoftTimeLimitExceeded",
    "Task", "TaskRevokedError", "TimeLimitExceeded", "TimeoutError", "shared_task", "signature", "states",
]

# celery.exceptions' time-limit names: the soft limit a task may catch, and the hard one it cannot.
TimeLimitExceeded = HardTimeLimitExceeded


class states:
    """Celery's state names. Custom states (`update_state(state="BUILDING")`) are any other name."""

    PENDING = "PENDING"
    RECEIVED = "RECEIVED"
    STARTED = "STARTED"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    REVOKED = "REVOKED"
    REJECTED = "REJECTED"
    RETRY = "RETRY"
    IGNORED = "IGNORED"
    READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED})
    UNREADY_STATES = frozenset({PENDING, RECEIVED, STARTED, REJECTED, RETRY})
    EXCEPTION_STATES = frozenset({RETRY, FAILURE, REVOKED})
    PROPAGATE_STATES = frozenset({FAILURE, REVOKED})
    ALL_STATES = frozenset({PENDING, RECEIVED, STARTED, SUCCESS, FAILURE, RETRY, REVOKED})


# Celery's defaults.
DEFAULT_MAX_RETRIES = 3
DEFAULT_RETRY_DELAY = 180.0
DEFAULT_RETRY_BACKOFF_MAX = 600.0
# A task retries as often as it asks (`self.retry`), up to its max_retries; this caps a task whose
# max_retries is None (Celery: for ever).
RETRY_CAP = 10_000


# --- exceptions ------------------------------------------------------------------------------------


class Retry(Exception):
    """The task asked to be retried (`raise self.retry(...)`); the worker schedules the next attempt."""

    def __init__(self, message: str | None = None, exc: BaseException | None = None,
                 when: float | None = None) -> None:
        self.exc = exc
        self.when = when
        self.message = message
        super().__init__(message or self.humanize())

    @property
    def countdown(self) -> float:
        return max(0.0, float(self.when or 0.0))

    def humanize(self) -> str:
        reason = f": {self.exc!r}" if self.exc is not None else ""
        return f"Retry in {self.countdown:g}s{reason}"


class MaxRetriesExceededError(Exception):
    """The task called `self.retry` after its last allowed retry."""


class TaskRevokedError(Exception):
    """The task was revoked (cancelled, aborted or expired) and has no result."""


class TimeoutError(builtins.TimeoutError):
    """`AsyncResult.get(timeout=…)` waited that long and the task was not ready."""


class Ignore(Exception):
    """Celery's `Ignore` is not supported: Skiplock records every end of a job."""


# --- options -------------------------------------------------------------------------------------

# Celery task options that Skiplock accepts and ignores, with the reason.
NO_OP_OPTIONS: dict[str, str] = {
    "ignore_result": "results are always stored (SKIPLOCK_RESULT_RETENTION prunes them)",
    "acks_late": "a job is claimed in PostgreSQL and taken back from a dead worker by stall recovery",
    "track_started": "a running job is always STARTED (or its custom state)",
    "reject_on_worker_lost": "a job whose worker died is requeued by stall recovery (at most 3 times)",
    "store_errors_even_if_ignored": "errors are always stored",
    "serializer": "arguments and results are JSON",
    "typing": "arguments are checked against the signature at enqueue time",
    "throws": "expected errors are logged like any other",
    "trail": "no parent/child tracking",
    "shared": "every task is shared",
    "lazy": "tasks register at import",
    "send_events": "job changes are announced to SSE listeners",
    "pydantic": "arguments with type hints are validated by pydantic anyway",
}
# Celery task options that Skiplock refuses (TypeError at decoration), with the reason.
UNSUPPORTED_OPTIONS: dict[str, str] = {
    "rate_limit": "Skiplock has no rate limiting; use a dedicated queue with a small worker concurrency",
    "base": "custom Task classes are not supported; use a plain function (and bind=True for self)",
    "filter": "not supported",
}
# apply_async options accepted and ignored (the message routing Celery needs and Skiplock does not).
NO_OP_SEND_OPTIONS = frozenset({
    "serializer", "compression", "retry", "retry_policy", "routing_key", "exchange", "headers", "shadow",
    "ignore_result", "add_to_parent", "time_limit", "soft_time_limit", "connection", "producer", "publisher",
})


# --- the request a running task sees --------------------------------------------------------------


@dataclass
class Request:
    """`self.request` of a bound task: the running job, in Celery's names."""

    id: str | None = None
    task: str | None = None
    retries: int = 0
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    delivery_info: dict[str, Any] = field(default_factory=dict)
    eta: str | None = None
    expires: str | None = None
    hostname: str | None = None
    called_directly: bool = True
    is_eager: bool = False
    job: JobContext | None = field(default=None, repr=False)  # the Skiplock context (jobs.context)

    @property
    def attempt(self) -> int:
        return self.retries + 1


def _request_of(ctx: JobContext) -> Request:
    stored = ctx.args or {}
    return Request(
        id=str(ctx.job_id), task=ctx.task_name, retries=ctx.attempt - 1,
        args=list(stored.get(registry.ARGS_KEY, [])),
        kwargs={k: v for k, v in stored.items() if k not in registry.RESERVED_KEYS},
        delivery_info={"routing_key": ctx.queue, "queue": ctx.queue}, expires=stored.get(registry.EXPIRES_KEY),
        called_directly=False, job=ctx,
    )


# --- retries -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CeleryRetries(registry.RetryPolicy):
    """Celery's rule: a job is retried only when its task raises `Retry` (`self.retry`), after its countdown."""

    max_retries: int = RETRY_CAP
    jitter: float = 0.0
    retry_on: tuple[type[BaseException], ...] = (Retry,)

    def retry_delay(self, exception: BaseException, retry_number: int) -> float:
        return exception.countdown if isinstance(exception, Retry) else 0.0


CELERY_RETRIES = CeleryRetries()


def exponential_backoff(*, factor: float, retries: int, maximum: float, full_jitter: bool) -> float:
    """Celery's `retry_backoff` countdown: factor · 2^retries, capped, with full jitter if asked."""
    countdown = min(maximum, factor * (2 ** retries))
    if full_jitter:
        countdown = random.randrange(int(countdown) + 1)
    return max(0.0, float(countdown))


# --- tasks ---------------------------------------------------------------------------------------


class Task:
    """A Celery-style task over a Skiplock task (`.spec`): `delay`, `apply_async`, `s`, `retry`…"""

    def __init__(self, fn: Callable[..., Any], *, bind: bool = False, name: str | None = None,
                 queue: str | None = None, priority: int | None = None,
                 max_retries: int | None = DEFAULT_MAX_RETRIES, default_retry_delay: float = DEFAULT_RETRY_DELAY,
                 autoretry_for: Iterable[type[BaseException]] = (), retry_kwargs: dict[str, Any] | None = None,
                 retry_backoff: bool | float = False, retry_backoff_max: float = DEFAULT_RETRY_BACKOFF_MAX,
                 retry_jitter: bool = True, soft_time_limit: float | None = None, time_limit: float | None = None,
                 expires: float | dt.datetime | None = None, **options: Any) -> None:
        unsupported = sorted(set(options) & set(UNSUPPORTED_OPTIONS))
        unknown = sorted(set(options) - set(NO_OP_OPTIONS) - set(UNSUPPORTED_OPTIONS))
        task_name = name or f"{fn.__module__}.{fn.__qualname__}"
        if unsupported:
            raise TypeError(f"task '{task_name}': {', '.join(f'{o} ({UNSUPPORTED_OPTIONS[o]})' for o in unsupported)}")
        if unknown:
            raise TypeError(f"task '{task_name}': unknown Celery task option(s) {', '.join(unknown)}")
        self.run = fn
        self.bind = bind
        self.name = task_name
        self.max_retries = max_retries
        self.default_retry_delay = float(default_retry_delay)
        self.autoretry_for = tuple(autoretry_for)
        self.retry_kwargs = dict(retry_kwargs or {})
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = float(retry_backoff_max)
        self.retry_jitter = retry_jitter
        self.expires = expires
        self.ignored_options = {key: NO_OP_OPTIONS[key] for key in options}
        # Celery: time_limit alone is a hard limit; Skiplock always has a soft one first. With no
        # soft limit asked, a run that swallows the soft one still ends as timed out (see _call).
        self._hard_only = time_limit is not None and soft_time_limit is None
        hard = float(time_limit) if time_limit is not None else max(
            registry.DEFAULT_HARD_TIME_LIMIT, float(soft_time_limit or 0))
        soft = float(soft_time_limit) if soft_time_limit is not None else min(registry.DEFAULT_SOFT_TIME_LIMIT, hard)
        self.spec: registry.TaskSpec = registry.task(
            name=task_name, queue=queue or "default", priority=0 if priority is None else priority,
            retry=CELERY_RETRIES, soft_time_limit=soft, hard_time_limit=hard, context=False,
            require_hints=False, store_as_given=True,
        )(self._runner())
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<@task: {self.name}>"

    # -- calling ------------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the function here and now, as Celery does (no job)."""
        if self.bind:
            return self.run(self, *args, **kwargs)
        return self.run(*args, **kwargs)

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """Start a job: `apply_async(args, kwargs)`."""
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Iterable[Any] | None = None, kwargs: dict[str, Any] | None = None, *,
                    countdown: float | None = None, eta: dt.datetime | None = None,
                    expires: float | dt.datetime | None = None, queue: str | None = None,
                    priority: int | None = None, **options: Any) -> AsyncResult:
        """Start a job in the caller's transaction; `countdown`/`eta` delay it, `expires` bounds it."""
        from jobs import services

        unknown = sorted(set(options) - NO_OP_SEND_OPTIONS)
        if unknown:
            raise TypeError(
                f"apply_async of '{self.name}': {', '.join(unknown)} not supported "
                "(no task_id, link, link_error or chains: start follow-up jobs from the task)"
            )
        if countdown is not None and eta is not None:
            raise TypeError("give countdown or eta, not both")
        stored = registry.stored_arguments(list(args or ()), dict(kwargs or {}))
        expiry = _expiry(expires if expires is not None else self.expires)
        if expiry is not None:
            stored[registry.EXPIRES_KEY] = expiry.isoformat()
        if eta is not None and eta.tzinfo is None:
            eta = eta.replace(tzinfo=dt.UTC)  # Celery reads a naive eta as UTC
        job = services.job_defer(task_name=self.name, args=stored, queue=queue, priority=priority,
                                 run_at=eta, delay_seconds=countdown)
        return AsyncResult(str(job.job_id))

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        return Signature(self, list(args), kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        return Signature(self, list(args), kwargs, immutable=True)

    def signature(self, args: Iterable[Any] | None = None, kwargs: dict[str, Any] | None = None,
                  **options: Any) -> Signature:
        return Signature(self, list(args or ()), dict(kwargs or {}), options=options)

    def AsyncResult(self, task_id: str) -> AsyncResult:
        return AsyncResult(task_id)

    # -- inside a running task ----------------------------------------------------------------------
    @property
    def request(self) -> Request:
        """The running job in Celery's names (`id`, `retries`, `args`, `kwargs`); empty outside a job."""
        ctx = _current.get()
        if ctx is None or ctx.task_name != self.name:
            return Request()
        return _request_of(ctx)

    def retry(self, args: Any = None, kwargs: Any = None, exc: BaseException | None = None, throw: bool = True,
              eta: dt.datetime | None = None, countdown: float | None = None, max_retries: int | None = None,
              **options: Any) -> Retry:
        """Ask for another attempt (raises `Retry`); past `max_retries`, raise `exc` or MaxRetriesExceededError."""
        request = self.request
        if request.called_directly:
            raise RuntimeError(f"{self.name}.retry() can only be called while the task runs as a job")
        if args is not None or kwargs is not None:
            raise TypeError("retry(args=, kwargs=) is not supported: a job retries with its own arguments")
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and request.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}] args:{request.args} kwargs:{request.kwargs}"
            )
        if eta is not None:
            when = (eta if eta.tzinfo else eta.replace(tzinfo=dt.UTC)) - dt.datetime.now(dt.UTC)
            countdown = when.total_seconds()
        if countdown is None:
            countdown = self.default_retry_delay
        raise Retry(exc=exc, when=countdown)

    def update_state(self, task_id: str | None = None, state: str | None = None, meta: Any = None,
                     **kwargs: Any) -> None:
        """Label the running job with `state` and free-form JSON `meta` (shown by the API, pages, admin)."""
        ctx = _current.get()
        if ctx is None or (task_id is not None and task_id != str(ctx.job_id)):
            raise RuntimeError("update_state() sets the state of the running job only (task_id= another job "
                               "is not supported)")
        if state is None:
            raise TypeError("update_state() needs a state")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            ctx.set_state(state, meta)
            return
        raise RuntimeError("update_state() blocks on the database; in an async task use `await self.aupdate_state(...)`")

    async def aupdate_state(self, task_id: str | None = None, state: str | None = None, meta: Any = None) -> None:
        from asgiref.sync import sync_to_async

        ctx = _current.get()
        if ctx is None:
            raise RuntimeError("aupdate_state() sets the state of the running job only")

        def write() -> None:
            token = _current.set(ctx)
            try:
                self.update_state(task_id, state, meta)
            finally:
                _current.reset(token)

        await sync_to_async(write, thread_sensitive=False)()

    # -- what the worker runs -------------------------------------------------------------------------
    def _runner(self) -> Callable[..., Any]:
        fn = self.run
        parameters = list(inspect.signature(fn).parameters.values())
        if self.bind:
            if not parameters:
                raise TypeError(f"task '{self.name}': bind=True needs a first parameter (self)")
            parameters = parameters[1:]

        if inspect.iscoroutinefunction(fn):

            async def run_async(*args: Any, **kwargs: Any) -> Any:
                self._started()
                try:
                    return await (fn(self, *args, **kwargs) if self.bind else fn(*args, **kwargs))
                except self.autoretry_for as exc:
                    self._autoretry(exc)
                    raise

            runner: Callable[..., Any] = run_async
        else:

            def run(*args: Any, **kwargs: Any) -> Any:
                self._started()
                try:
                    value = fn(self, *args, **kwargs) if self.bind else fn(*args, **kwargs)
                except self.autoretry_for as exc:
                    self._autoretry(exc)
                    raise
                self._check_hard_limit()
                return value

            runner = run
        functools.update_wrapper(runner, fn)
        runner.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        return runner

    def _started(self) -> None:
        ctx = _current.get()
        if ctx is None:
            return
        ctx.interrupt_on_abort = True  # revoke(terminate=True) stops it, whatever it catches
        if ctx.abort_requested:
            raise JobAborted(f"job {ctx.job_id} was revoked before it started")

    def _check_hard_limit(self) -> None:
        ctx = _current.get()
        if ctx is not None and self._hard_only and ctx.soft_limit_hit:
            # Only time_limit was asked: the soft limit Skiplock raised at the same moment was
            # swallowed by the task; the run still ends as a hard time-out, as under Celery.
            raise HardTimeLimitExceeded(f"hard time limit exceeded ({ctx.hard_time_limit:g} s)")

    def _autoretry(self, exc: BaseException) -> None:
        if isinstance(exc, Retry | MaxRetriesExceededError):
            return
        countdown = self.retry_kwargs.get("countdown")
        if self.retry_backoff and countdown is None:
            factor = 1.0 if self.retry_backoff is True else float(self.retry_backoff)
            countdown = exponential_backoff(factor=factor, retries=self.request.retries,
                                            maximum=self.retry_backoff_max, full_jitter=self.retry_jitter)
        options = {k: v for k, v in self.retry_kwargs.items() if k != "countdown"}
        raise self.retry(exc=exc, countdown=countdown, **options)


def _expiry(expires: float | dt.datetime | None) -> dt.datetime | None:
    if expires is None:
        return None
    if isinstance(expires, dt.datetime):
        return expires if expires.tzinfo else expires.replace(tzinfo=dt.UTC)
    if isinstance(expires, int | float) and not isinstance(expires, bool):
        return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=float(expires))
    raise TypeError(f"expires must be seconds or a datetime, not {expires!r}")


def shared_task(*args: Any, **options: Any) -> Any:
    """Declare a task, as Celery's `@shared_task` / `@shared_task(bind=True, …)`."""
    if len(args) == 1 and callable(args[0]) and not options:
        return Task(args[0])
    if args:
        raise TypeError("shared_task takes the function, or keyword options only")

    def decorate(fn: Callable[..., Any]) -> Task:
        return Task(fn, **options)

    return decorate


class Celery:
    """Stands in for `celery.Celery` so `app = Celery(...)` and `@app.task` keep working.

    Broker, backend and configuration arguments are accepted and ignored: PostgreSQL is both.
    """

    def __init__(self, main: str | None = None, *args: Any, **kwargs: Any) -> None:
        self.main = main

    def task(self, *args: Any, **options: Any) -> Any:
        return shared_task(*args, **options)

    def config_from_object(self, *args: Any, **kwargs: Any) -> None:
        """No-op: Skiplock is configured by Django settings (SKIPLOCK_*)."""

    def autodiscover_tasks(self, *args: Any, **kwargs: Any) -> None:
        """No-op: each app's tasks.py is imported by Skiplock (and SKIPLOCK_IMPORT_PATHS)."""

    def AsyncResult(self, task_id: str) -> AsyncResult:
        return AsyncResult(task_id)


# --- signatures ----------------------------------------------------------------------------------


@dataclass
class Signature:
    """A task with arguments to start later (`task.s(1, 2).delay()`); chains and groups are not supported."""

    task: Task
    args: list[Any]
    kwargs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    immutable: bool = False

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return self.apply_async(args, kwargs)

    def apply_async(self, args: Iterable[Any] | None = None, kwargs: dict[str, Any] | None = None,
                    **options: Any) -> AsyncResult:
        more_args, more_kwargs = (list(args or ()), dict(kwargs or {})) if not self.immutable else ([], {})
        return self.task.apply_async([*more_args, *self.args] if more_args else self.args,
                                     {**self.kwargs, **more_kwargs}, **{**self.options, **options})

    def set(self, **options: Any) -> Signature:
        self.options.update(options)
        return self

    def clone(self, args: Iterable[Any] | None = None, kwargs: dict[str, Any] | None = None,
              **options: Any) -> Signature:
        return Signature(self.task, [*(args or ()), *self.args], {**self.kwargs, **(kwargs or {})},
                         {**self.options, **options}, self.immutable)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.task(*self.args, *args, **{**self.kwargs, **kwargs})

    def __or__(self, other: Any) -> Any:
        raise NotImplementedError("chains (a | b) are not supported: start the next job at the end of the task")


def signature(task: Task, args: Iterable[Any] | None = None, kwargs: dict[str, Any] | None = None,
              **options: Any) -> Signature:
    return task.signature(args, kwargs, **options)


# --- results -------------------------------------------------------------------------------------


class AsyncResult:
    """Celery's `AsyncResult(task_id)` over a Skiplock job: state, result, info, traceback, get, revoke.

    Every member reads the job afresh (one query); an unknown id is PENDING, as in Celery.
    """

    def __init__(self, id: str | int, backend: Any = None, task_name: str | None = None, app: Any = None) -> None:
        self.id = str(id)

    task_id = property(lambda self: self.id)

    def __repr__(self) -> str:
        return f"<AsyncResult: {self.id}>"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsyncResult):
            return other.id == self.id
        return isinstance(other, str) and other == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def _record(self) -> Any:
        from jobs.models import JobRecord

        try:
            job_id = int(self.id)
        except ValueError:
            return None
        return JobRecord.objects.filter(pk=job_id).first()

    @property
    def state(self) -> str:
        """PENDING, RETRY, STARTED (or the task's custom state), SUCCESS, FAILURE or REVOKED."""
        return celery_state(self._record())

    status = state

    @property
    def name(self) -> str | None:
        record = self._record()
        return record.task_name if record is not None else None

    @property
    def args(self) -> list[Any] | None:
        record = self._record()
        return list((record.args or {}).get(registry.ARGS_KEY, [])) if record is not None else None

    @property
    def kwargs(self) -> dict[str, Any] | None:
        record = self._record()
        if record is None:
            return None
        return {k: v for k, v in (record.args or {}).items() if k not in registry.RESERVED_KEYS}

    @property
    def queue(self) -> str | None:
        record = self._record()
        return record.queue_name if record is not None else None

    @property
    def retries(self) -> int | None:
        record = self._record()
        if record is None:
            return None
        return max(0, record.attempts - (1 if record.status == "doing" else 0))

    @property
    def worker(self) -> str | None:
        record = self._record()
        return (record.worker_name or None) if record is not None else None

    @property
    def date_done(self) -> dt.datetime | None:
        record = self._record()
        return record.finished_at if record is not None else None

    @property
    def result(self) -> Any:
        """The return value (SUCCESS), the exception (FAILURE, RETRY, REVOKED), else the meta."""
        record = self._record()
        state = celery_state(record)
        if record is None or state == states.PENDING:
            return None
        if state == states.SUCCESS:
            return record.result
        if state in states.EXCEPTION_STATES:
            return _exception_of(record, state)
        return record.meta

    info = result

    @property
    def traceback(self) -> str | None:
        record = self._record()
        if record is None or not record.error_traceback or celery_state(record) not in states.EXCEPTION_STATES:
            return None
        return str(record.error_traceback)

    def ready(self) -> bool:
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        return self.state == states.FAILURE

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5,
            no_ack: bool = True, follow_parents: bool = True, disable_sync_subtasks: bool = True,
            **kwargs: Any) -> Any:
        """Wait for the job to end and return its result; raise its exception if it failed (propagate)."""
        if disable_sync_subtasks and _current.get() is not None:
            raise RuntimeError("Never call result.get() within a task: it holds a worker slot while another "
                               "job it waits for may need it; start follow-up work as a new job")
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = min(0.05, interval)
        while True:
            record = self._record()
            state = celery_state(record)
            if state in states.READY_STATES:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("The operation timed out.")
            wait = pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic()))
            time.sleep(wait)
            pause = min(interval, pause * 2)
        if state == states.SUCCESS:
            return record.result
        error = _exception_of(record, state)
        if propagate:
            raise error
        return error

    wait = get

    def revoke(self, connection: Any = None, terminate: bool = False, signal: Any = None, wait: bool = False,
               timeout: float | None = None) -> None:
        """Cancel a waiting job; with terminate=True also stop a running one (it ends REVOKED)."""
        from jobs import services

        record = self._record()
        if record is None:
            return
        try:
            if terminate:
                services.job_abort(job_id=record.job_id)
            else:
                services.job_cancel(job_id=record.job_id)
        except InvalidTransition:
            return  # already ended, or running without terminate: Celery leaves it be too
        if wait:
            with contextlib.suppress(TimeoutError):
                self.get(timeout=timeout, propagate=False, disable_sync_subtasks=False)

    def forget(self) -> None:
        """No-op: a job's result is kept for SKIPLOCK_RESULT_RETENTION, then pruned."""


def celery_state(record: Any) -> str:
    """A job's state in Celery's vocabulary (None: an unknown id, PENDING as in Celery)."""
    if record is None:
        return states.PENDING
    state = record.state
    if state == State.TODO:
        if record.expires_at is not None and record.expires_at <= dt.datetime.now(dt.UTC):
            return states.REVOKED  # expired: it will never run
        return states.RETRY if record.attempts > 0 else states.PENDING
    if state in (State.DOING, State.ABORTING):
        return record.custom_state or states.STARTED
    if state == State.SUCCEEDED:
        return states.SUCCESS
    if state == State.FAILED:
        return states.REVOKED if record.error_type == "JobExpired" else states.FAILURE
    return states.REVOKED  # cancelled, aborted, discarded, expired


def _exception_of(record: Any, state: str) -> BaseException:
    message = record.error_message or ""
    if state == states.REVOKED:
        return TaskRevokedError(message or f"job {record.job_id} was revoked ({record.state})")
    return rebuild_exception(record.error_type or "Exception", message, record.error_traceback or "")


def rebuild_exception(error_type: str, message: str, traceback: str = "") -> BaseException:
    """An exception like the one the task raised: its class when it is a builtin or its module is
    already imported here, else a stand-in class of that name (as Celery does for unknown types)."""
    from jobs.django_tasks import exception_path

    if error_type == "Retry":
        return Retry(message)
    module_name, _, class_name = exception_path(error_type, traceback).rpartition(".")
    module = sys.modules.get(module_name)  # never imports anything on the strength of stored text
    known = getattr(module, class_name, None) if module is not None else None
    if isinstance(known, type) and issubclass(known, BaseException):
        with contextlib.suppress(Exception):  # a class whose constructor wants more than a message
            return known(message)
    return type(error_type, (Exception,), {"__module__": module_name or "builtins"})(message)
