"""The task authoring API: `@task` wraps procrastinate's `app.task` and registers a TaskSpec.

    from jobs.registry import task, RetryPolicy, JobContext

    @task(queue="reports", retry=RetryPolicy(max_retries=5), soft_time_limit=600)
    def build_report(ctx: JobContext, *, account_id: int, month: str) -> dict:
        ctx.report_progress(10, "loading")
        ...

Arguments are keyword-only JSON values described by the function's type hints: one pydantic
model per task validates every start (API, command, Python) and publishes the JSON schema.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import inspect
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import pydantic
from procrastinate import exceptions as procrastinate_exceptions
from procrastinate import retry as procrastinate_retry
from procrastinate.contrib.django import app
from procrastinate.jobs import Job

from jobs.exceptions import InvalidArguments, ResultNotSerializable, TaskNotFound

DEFAULT_SOFT_TIME_LIMIT = 3600.0
DEFAULT_HARD_TIME_LIMIT = 7200.0

# Skiplock's own tasks (`skiplock.*`) run on its schedule: no principal may start them, and no
# listing of startable tasks shows them (`startable_tasks`, `get_startable_task`).
INTERNAL_PREFIX = "skiplock."
# The priorities a task or a caller may give (higher runs first). Internal tasks run above them,
# so no job a caller starts can jump ahead of maintenance.
MIN_PRIORITY = -1000
MAX_PRIORITY = 1000
INTERNAL_PRIORITY = MAX_PRIORITY + 1
# procrastinate NOTIFYs on the channel `procrastinate_queue_v1#<queue>`, and PostgreSQL cuts a
# channel name at 63 bytes: a longer queue name fails in the database. ASCII only, so chars = bytes.
QUEUE_CHANNEL_PREFIX = "procrastinate_queue_v1#"
MAX_QUEUE_LENGTH = 63 - len(QUEUE_CHANNEL_PREFIX)
QUEUE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


@dataclass(frozen=True)
class RetryPolicy(procrastinate_retry.BaseRetryStrategy):
    """Capped exponential backoff with jitter: 60 s → 120 s → 240 s, at most 600 s, 3 retries."""

    max_retries: int = 3
    backoff: float = 60.0
    factor: float = 2.0
    max_backoff: float = 600.0
    jitter: float = 0.1  # ± this fraction of each delay, so retries of many jobs spread out
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    dont_retry_on: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        if self.backoff < 0 or self.max_backoff < 0 or self.factor < 1:
            raise ValueError("backoff and max_backoff must be 0 or more, factor at least 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be a fraction from 0 to 1 (0.1 = ±10 %)")

    @property
    def max_attempts(self) -> int:
        return self.max_retries + 1

    def delay(self, retry_number: int) -> float:
        """Seconds before retry number `retry_number` (1-based), jitter included."""
        base = min(self.backoff * self.factor ** (retry_number - 1), self.max_backoff)
        spread = base * self.jitter
        return max(0.0, min(base + random.uniform(-spread, spread), self.max_backoff))

    def should_retry(self, exception: BaseException, attempts_done: int) -> bool:
        if attempts_done >= self.max_attempts:
            return False
        if isinstance(exception, _NEVER_RETRY + self.dont_retry_on):
            return False
        return isinstance(exception, self.retry_on)

    def get_retry_decision(
        self, *, exception: BaseException, job: Job
    ) -> procrastinate_retry.RetryDecision | None:
        attempts_done = job.attempts + 1  # procrastinate counts finished attempts; this one is ending
        if not self.should_retry(exception, attempts_done):
            return None
        retry_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.delay(attempts_done))
        return procrastinate_retry.RetryDecision(retry_at=retry_at)

    def describe(self) -> dict[str, Any]:
        return {
            "max_attempts": self.max_attempts,
            "backoff_seconds": self.backoff,
            "factor": self.factor,
            "max_backoff_seconds": self.max_backoff,
            "jitter": self.jitter,
            "retry_on": [exc.__name__ for exc in self.retry_on],
            "dont_retry_on": [exc.__name__ for exc in self.dont_retry_on],
        }


NO_RETRY = RetryPolicy(max_retries=0)

# Failures that another attempt cannot fix. An async task cancelled by an abort request raises
# CancelledError: never retrying it is what makes an aborted async job end `aborted`, not `failed`.
_NEVER_RETRY: tuple[type[BaseException], ...] = (
    procrastinate_exceptions.JobAborted,
    asyncio.CancelledError,
    InvalidArguments,
    ResultNotSerializable,
)


@dataclass
class TaskSpec:
    """Everything Skiplock knows about a task: its function, schema and policies."""

    name: str
    func: Callable[..., Any]
    args_model: type[pydantic.BaseModel]
    queue: str
    priority: int
    retry: RetryPolicy
    soft_time_limit: float
    hard_time_limit: float
    lock: str | None
    queueing_lock: str | None
    takes_context: bool
    description: str
    procrastinate_task: Any = field(repr=False, default=None)
    check: Callable[[dict[str, Any]], None] | None = field(repr=False, default=None)

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.func)

    def validate(self, args: dict[str, Any] | None) -> dict[str, Any]:
        """Validated arguments as JSON values; InvalidArguments names each bad field."""
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise InvalidArguments(
                f"arguments of task '{self.name}' must be a JSON object",
                details=[{"field": "args", "message": "expected an object", "type": "type_error"}],
            )
        try:
            model = self.args_model.model_validate(args)
        except pydantic.ValidationError as exc:
            raise InvalidArguments(
                f"invalid arguments for task '{self.name}': "
                + "; ".join(_describe_error(err) for err in exc.errors())
                + f"; expected: {self.signature()}",
                details=[
                    {
                        "field": ".".join(str(p) for p in err["loc"]) or "args",
                        "message": err["msg"],
                        "type": err["type"],
                    }
                    for err in exc.errors()
                ],
            ) from None
        values = model.model_dump(mode="json")
        if self.check is not None:
            try:
                self.check(values)
            except ValueError as exc:
                raise InvalidArguments(
                    f"invalid arguments for task '{self.name}': {exc}",
                    details=[{"field": "args", "message": str(exc), "type": "value_error"}],
                ) from None
        nul = _nul_field(values)
        if nul is not None:
            # PostgreSQL's jsonb cannot store U+0000: refuse it here with a clear message.
            raise InvalidArguments(
                f"invalid arguments for task '{self.name}': '{nul}': text cannot hold NUL characters (\\u0000)",
                details=[{"field": nul, "message": "text cannot hold NUL characters", "type": "value_error"}],
            )
        return values

    def json_schema(self) -> dict[str, Any]:
        return self.args_model.model_json_schema()

    def signature(self) -> str:
        parts = []
        for name, info in self.args_model.model_fields.items():
            hint = getattr(info.annotation, "__name__", None) or str(info.annotation).replace("typing.", "")
            parts.append(f"{name} ({hint})" if info.is_required() else f"{name} ({hint}, optional)")
        return ", ".join(parts) or "no arguments"

    def lock_for(self, args: dict[str, Any]) -> str | None:
        return self.lock.format(**args) if self.lock else None

    def queueing_lock_for(self, args: dict[str, Any]) -> str | None:
        return self.queueing_lock.format(**args) if self.queueing_lock else None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "queue": self.queue,
            "priority": self.priority,
            "retry": self.retry.describe(),
            "soft_time_limit_seconds": self.soft_time_limit,
            "hard_time_limit_seconds": self.hard_time_limit,
            "lock": self.lock,
            "queueing_lock": self.queueing_lock,
            "args_schema": self.json_schema(),
        }

    # Python callers: `my_task.defer(x=1)` validates, then joins the caller's transaction.
    def defer(self, **args: Any) -> int:
        from jobs import services

        return services.job_defer(task_name=self.name, args=args).job_id

    async def adefer(self, **args: Any) -> int:
        from asgiref.sync import sync_to_async

        return await sync_to_async(self.defer)(**args)

    def configure(self, **options: Any) -> _Configured:
        return _Configured(self, options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function directly (no queue), as a plain function call."""
        return self.func(*args, **kwargs)


@dataclass
class _Configured:
    spec: TaskSpec
    options: dict[str, Any]

    def defer(self, **args: Any) -> int:
        from jobs import services

        return services.job_defer(task_name=self.spec.name, args=args, **self.options).job_id


def _nul_field(value: Any, path: str = "") -> str | None:
    """The path of the first string (or key) holding U+0000, if any."""
    if isinstance(value, str):
        return (path or "args") if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if "\x00" in str(key):
                return where
            found = _nul_field(item, where)
            if found:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _nul_field(item, f"{path}.{index}" if path else str(index))
            if found:
                return found
    return None


def _describe_error(err: Any) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "args"
    if err["type"] == "extra_forbidden":
        return f"no argument '{where}'"
    if err["type"] == "missing":
        return f"'{where}' is required"
    return f"'{where}': {err['msg']}"


_REGISTRY: dict[str, TaskSpec] = {}


def task(
    func: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    queue: str = "default",
    priority: int = 0,
    retry: RetryPolicy | None = None,
    soft_time_limit: float = DEFAULT_SOFT_TIME_LIMIT,
    hard_time_limit: float = DEFAULT_HARD_TIME_LIMIT,
    lock: str | None = None,
    queueing_lock: str | None = None,
    args_model: type[pydantic.BaseModel] | None = None,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> Any:
    """Declare a Skiplock task. `lock`/`queueing_lock` are format strings over the arguments.

    `check(args)` validates what type hints cannot (one argument or another, a path inside a
    folder): it raises ValueError, and the start is refused with InvalidArguments. Constraints
    on one argument go in its hint: `Annotated[int, pydantic.Field(ge=1, le=4)]`.
    `args_model` replaces the model built from the type hints (adapters such as the Django
    tasks backend use it to describe a function whose wrapper takes `**kwargs`).
    """

    def decorate(fn: Callable[..., Any]) -> TaskSpec:
        if soft_time_limit <= 0 or hard_time_limit <= 0:
            raise ValueError("time limits must be positive")
        if soft_time_limit > hard_time_limit:
            raise ValueError("soft_time_limit must not exceed hard_time_limit")
        task_name = name or fn.__name__
        _check_placement(task_name, fn, queue=queue, priority=priority)
        if task_name in _REGISTRY and _REGISTRY[task_name].func.__qualname__ != fn.__qualname__:
            raise ValueError(f"two tasks are named '{task_name}'")
        if args_model is None:
            takes_context, model = _arguments_model(fn, task_name)
        else:
            takes_context, model = False, args_model
        for template, what in ((lock, "lock"), (queueing_lock, "queueing_lock")):
            unknown = _template_fields(template) - set(model.model_fields)
            if unknown:
                raise ValueError(
                    f"task '{task_name}': {what} {template!r} names {', '.join(repr(u) for u in sorted(unknown))}, "
                    f"which is not an argument of the task"
                )
        policy = retry if retry is not None else RetryPolicy()
        spec = TaskSpec(
            name=task_name, func=fn, args_model=model, queue=queue, priority=priority,
            retry=policy, soft_time_limit=float(soft_time_limit), hard_time_limit=float(hard_time_limit),
            lock=lock, queueing_lock=queueing_lock, takes_context=takes_context,
            description=inspect.getdoc(fn) or "", check=check,
        )
        spec.procrastinate_task = app.task(
            name=task_name, queue=queue, priority=priority, retry=policy, pass_context=False,
        )(_runner(spec))
        _REGISTRY[task_name] = spec
        return spec

    return decorate(func) if func is not None else decorate


def _check_placement(task_name: str, fn: Callable[..., Any], *, queue: str, priority: int) -> None:
    """A task's own queue and priority obey the rules callers' do; `skiplock.*` is Skiplock's."""
    if is_internal(task_name):
        if not fn.__module__.startswith("jobs."):
            raise ValueError(f"task '{task_name}': names starting with '{INTERNAL_PREFIX}' are Skiplock's own")
    elif isinstance(priority, bool) or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ValueError(f"task '{task_name}': priority must be from {MIN_PRIORITY} to {MAX_PRIORITY}")
    problem = queue_problem(queue)
    if problem:
        raise ValueError(f"task '{task_name}': queue {problem}")


def queue_problem(queue: object) -> str | None:
    """Why `queue` cannot be a queue name (None when it can): it must fit a NOTIFY channel name."""
    if not isinstance(queue, str) or not 1 <= len(queue) <= MAX_QUEUE_LENGTH:
        return f"must be 1 to {MAX_QUEUE_LENGTH} characters"
    if not re.match(QUEUE_PATTERN, queue):
        return "may hold only ASCII letters, digits, '_', '-' and '.', and must start with a letter or digit"
    return None


def _arguments_model(fn: Callable[..., Any], task_name: str) -> tuple[bool, type[pydantic.BaseModel]]:
    hints = get_type_hints(fn, include_extras=True)  # keep Annotated[..., Field(...)] constraints
    params = list(inspect.signature(fn).parameters.values())
    takes_context = bool(params) and (
        hints.get(params[0].name) is JobContext or params[0].name in ("ctx", "context")
    )
    if takes_context:
        params = params[1:]
    fields: dict[str, Any] = {}
    for param in params:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"task '{task_name}': *args/**kwargs are not allowed; name each argument")
        if param.name not in hints:
            raise TypeError(f"task '{task_name}': argument '{param.name}' needs a type hint")
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (hints[param.name], default)
    model = pydantic.create_model(
        f"{_camel(task_name)}Args",
        __config__=pydantic.ConfigDict(extra="forbid"),
        **fields,
    )
    return takes_context, model


def _template_fields(template: str | None) -> set[str]:
    if not template:
        return set()
    return {
        field_name.split(".")[0].split("[")[0]
        for _, field_name, _, _ in string.Formatter().parse(template)
        if field_name
    }


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.replace(".", "_").split("_"))


def _runner(spec: TaskSpec) -> Callable[..., Any]:
    """What procrastinate runs: validate the stored JSON arguments, then call the function."""
    from jobs.context import current_job

    def arguments(kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        model = spec.args_model.model_validate(kwargs)
        values = {name: getattr(model, name) for name in spec.args_model.model_fields}
        return ([current_job()] if spec.takes_context else []), values

    if spec.is_async:

        @functools.wraps(spec.func)
        async def run_async(**kwargs: Any) -> Any:
            positional, values = arguments(kwargs)
            return await spec.func(*positional, **values)

        return run_async

    @functools.wraps(spec.func)
    def run_sync(**kwargs: Any) -> Any:
        positional, values = arguments(kwargs)
        return spec.func(*positional, **values)

    return run_sync


def get_task(name: str) -> TaskSpec:
    """Any registered task, Skiplock's own included (workers and schedules); see get_startable_task."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise TaskNotFound(f"unknown task '{name}'; known tasks: {_startable_names()}") from None


def all_tasks() -> list[TaskSpec]:
    return sorted(_REGISTRY.values(), key=lambda spec: spec.name)


def find_task(name: str) -> TaskSpec | None:
    return _REGISTRY.get(name)


# --- the one rule of what principals may start ---------------------------------------------------


def is_internal(name: str) -> bool:
    """Skiplock's own tasks (`skiplock.*`): they run on its schedule, never at a principal's request."""
    return name.startswith(INTERNAL_PREFIX)


def startable_tasks() -> list[TaskSpec]:
    """The tasks a principal may start, and the only ones listed to them (API, pages, console, CLI)."""
    return [spec for spec in all_tasks() if not is_internal(spec.name)]


def get_startable_task(name: str) -> TaskSpec:
    """The task `name` if a principal may start it; TaskNotFound (404) otherwise."""
    if is_internal(name) and name in _REGISTRY:
        raise TaskNotFound(
            f"task '{name}' is internal to Skiplock and runs on its own schedule; it cannot be started. "
            f"Known tasks: {_startable_names()}"
        )
    return get_task(name)


def _startable_names() -> str:
    return ", ".join(spec.name for spec in startable_tasks()) or "none"


from jobs.context import JobContext  # noqa: E402  (the one import for task authors)

__all__ = [
    "NO_RETRY", "JobContext", "RetryPolicy", "TaskSpec", "all_tasks", "get_startable_task", "get_task",
    "startable_tasks", "task",
]

