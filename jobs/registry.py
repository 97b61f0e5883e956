"""The task authoring API: `@task` wraps procrastinate's `app.task` and registers a TaskSpec.

    from jobs.registry import task, RetryPolicy, JobContext

    @task(queue="reports", retry=RetryPolicy(max_retries=5), soft_time_limit=600)
    def build_report(ctx: JobContext, *, account_id: int, month: str) -> dict:
        ctx.report_progress(10, "loading")
        ...

Arguments are JSON values described by the function's type hints: one pydantic model per task
validates every start (API, command, Python) and publishes the JSON schema. A job's arguments are
one JSON object: keyword arguments by name, and positional ones — for tasks that take them
(`def f(a, b, *rest, **extra)`) — in order under the reserved key `"__args__"` (ARGS_KEY), stored
as given. `"__expires__"` (EXPIRES_KEY, an ISO 8601 time) is the other reserved key: past it the
job is not run and ends failed with `JobExpired`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import inspect
import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, get_args, get_type_hints

import pydantic
import pydantic.json_schema
from procrastinate import exceptions as procrastinate_exceptions
from procrastinate import retry as procrastinate_retry
from procrastinate.contrib.django import app
from procrastinate.jobs import Job

from jobs.exceptions import (
    Discard,
    InvalidArguments,
    JobAborted,
    JobExpired,
    ResultNotSerializable,
    Snooze,
    TaskNotFound,
)
from jobs.flow import ConcurrencyLimit, RateLimit, TaskLimits, Unique

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
# Reserved keys of a job's argument object (module docstring).
ARGS_KEY = "__args__"
EXPIRES_KEY = "__expires__"
RESERVED_KEYS = frozenset({ARGS_KEY, EXPIRES_KEY})
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


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

    def retry_delay(self, exception: BaseException, retry_number: int) -> float:
        """Seconds before the retry that `exception` asks for (policies may read the exception)."""
        return self.delay(retry_number)

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
        retry_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.retry_delay(exception, attempts_done))
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
    JobAborted,
    asyncio.CancelledError,
    InvalidArguments,
    ResultNotSerializable,
    JobExpired,
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
    # The function's parameters (its context excluded). Empty: keyword arguments only, described
    # by `args_model` alone (a hand-made model).
    parameters: tuple[inspect.Parameter, ...] = field(repr=False, default=())
    # Store arguments exactly as given (adapters: Django tasks, Celery); native tasks store their
    # keyword arguments with the defaults filled in.
    store_as_given: bool = False
    # Flow control (jobs.flow): limits across every worker, and what makes two starts one job.
    limits: TaskLimits = field(default_factory=TaskLimits)
    unique: Unique | None = None

    @property
    def takes_positional(self) -> bool:
        """True when the function takes positional-only, `*args` or `**kwargs` parameters."""
        return any(p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in self.parameters)

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
        extra = {key: args[key] for key in RESERVED_KEYS if key in args}
        if EXPIRES_KEY in extra:
            extra[EXPIRES_KEY] = self._expires(extra[EXPIRES_KEY])
        if self.parameters and (ARGS_KEY in args or self.takes_positional or self.store_as_given):
            return {**self._validate_bound(args), **{k: v for k, v in extra.items() if k != ARGS_KEY}}
        if ARGS_KEY in args:
            raise self._invalid(ARGS_KEY, f"task '{self.name}' takes no positional arguments; expected: "
                                f"{self.signature()}")
        args = {key: value for key, value in args.items() if key not in RESERVED_KEYS}
        values = self._checked(self._model(args).model_dump(mode="json"))
        return {**values, **extra}

    def _invalid(self, where: str, message: str, kind: str = "type_error") -> InvalidArguments:
        return InvalidArguments(
            f"invalid arguments for task '{self.name}': {message}",
            details=[{"field": where, "message": message, "type": kind}],
        )

    def _expires(self, value: Any) -> str:
        try:
            when = dt.datetime.fromisoformat(value) if isinstance(value, str) else None
        except ValueError:
            when = None
        if when is None or when.tzinfo is None:
            raise self._invalid(EXPIRES_KEY, "must be an ISO 8601 time with a time zone", "value_error")
        return when.isoformat()

    def bind(self, args: dict[str, Any]) -> inspect.BoundArguments:
        """The stored arguments (`__args__` + keywords) bound to the function's parameters."""
        positional = args.get(ARGS_KEY, [])
        if not isinstance(positional, list):
            raise self._invalid(ARGS_KEY, "positional arguments must be a JSON array")
        keywords = {key: value for key, value in args.items() if key not in RESERVED_KEYS}
        try:
            return inspect.Signature(list(self.parameters)).bind(*positional, **keywords)
        except TypeError as exc:
            raise self._invalid("args", f"{exc}; expected: {self.signature()}") from None

    def _bound_model(self, bound: inspect.BoundArguments) -> pydantic.BaseModel:
        return self._model({name: list(value) if isinstance(value, tuple) else value
                            for name, value in bound.arguments.items()})

    def _validate_bound(self, args: dict[str, Any]) -> dict[str, Any]:
        """Validated arguments in the shape they were given: `__args__` in order, then the keywords."""
        bound = self.bind(args)
        dumped = self._bound_model(bound).model_dump(mode="json")
        given = len(args.get(ARGS_KEY, []))
        named = [p for p in self.parameters if p.kind in _POSITIONAL]
        var_positional = next((p for p in self.parameters if p.kind == p.VAR_POSITIONAL), None)
        var_keyword = next((p for p in self.parameters if p.kind == p.VAR_KEYWORD), None)
        positional = [dumped[p.name] for p in named[:given]]
        if var_positional is not None and given > len(named):
            positional += dumped[var_positional.name]
        by_name = {p.name for p in self.parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        keywords: dict[str, Any] = {}
        for key in args:
            if key in RESERVED_KEYS:
                continue
            keywords[key] = dumped[key] if key in by_name or var_keyword is None else dumped[var_keyword.name][key]
        if not self.store_as_given:  # native tasks: defaults filled in, as for keyword-only tasks
            for p in self.parameters:
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in bound.arguments:
                    keywords[p.name] = dumped[p.name]
        self._checked(dumped)
        return {**keywords, **({ARGS_KEY: positional} if positional else {})}

    def call_arguments(self, args: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """The stored arguments as Python values for the call: (positional, keywords)."""
        if not self.parameters or (ARGS_KEY not in args and not self.takes_positional):
            model = self._model({k: v for k, v in args.items() if k not in RESERVED_KEYS})
            return [], {name: getattr(model, name) for name in self.args_model.model_fields}
        bound = self.bind(args)
        model = self._bound_model(bound)
        positional: list[Any] = []
        keywords: dict[str, Any] = {}
        has_rest = bool(bound.arguments.get(next(
            (p.name for p in self.parameters if p.kind == p.VAR_POSITIONAL), ""), ()))
        for p in self.parameters:
            if p.kind == p.POSITIONAL_ONLY or (p.kind == p.POSITIONAL_OR_KEYWORD and has_rest):
                positional.append(getattr(model, p.name))
            elif p.kind == p.VAR_POSITIONAL:
                positional.extend(getattr(model, p.name))
            elif p.kind == p.VAR_KEYWORD:
                keywords.update(getattr(model, p.name))
            elif p.name in bound.arguments or not self.store_as_given:
                keywords[p.name] = getattr(model, p.name)
        return positional, keywords

    def _model(self, values: dict[str, Any]) -> pydantic.BaseModel:
        try:
            return self.args_model.model_validate(values)
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

    def _checked(self, values: dict[str, Any]) -> dict[str, Any]:
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

    def json_schema(self, ref_template: str = pydantic.json_schema.DEFAULT_REF_TEMPLATE) -> dict[str, Any]:
        """The JSON schema of a job's argument object, as stored (`__args__` for positional ones)."""
        schema = self.args_model.model_json_schema(ref_template=ref_template)
        if not self.takes_positional and not self.store_as_given:
            return schema
        properties = schema.setdefault("properties", {})
        required = schema.get("required", [])
        positional_items = []
        rest: dict[str, Any] | None = None  # no positional argument past the named ones, unless *args
        for p in self.parameters:
            field_schema = properties.get(p.name, {})
            if p.kind == p.POSITIONAL_ONLY:
                positional_items.append(properties.pop(p.name, {}))
                required = [r for r in required if r != p.name]
            elif p.kind == p.POSITIONAL_OR_KEYWORD:
                positional_items.append(field_schema)
            elif p.kind == p.VAR_POSITIONAL:
                rest = properties.pop(p.name, {}).get("items", {})
            elif p.kind == p.VAR_KEYWORD:
                extra = properties.pop(p.name, {})
                schema["additionalProperties"] = extra.get("additionalProperties", True)
        names = ", ".join(self._parameter_text(p) for p in self.parameters if p.kind != p.KEYWORD_ONLY
                          and p.kind != p.VAR_KEYWORD)
        if names:  # a task taking no positional argument has no `__args__`
            properties[ARGS_KEY] = {
                "type": "array", "title": "Positional arguments",
                "description": f"positional arguments in order: {names}",
                **({"prefixItems": positional_items} if positional_items else {}),
                **({"items": rest} if rest is not None else {"maxItems": len(positional_items)}),
            }
        # Parameters that may come positionally are required by name, or else `__args__` is given.
        by_position = {p.name for p in self.parameters if p.kind == p.POSITIONAL_OR_KEYWORD}
        keyword_only = [name for name in required if name not in by_position]
        either = [name for name in required if name in by_position]
        schema.pop("required", None)
        if keyword_only:
            schema["required"] = keyword_only
        if names and (either or any(p.kind == p.POSITIONAL_ONLY and p.default is p.empty for p in self.parameters)):
            schema["anyOf"] = [{"required": [ARGS_KEY]}] + ([{"required": either}] if either else [])
        return schema

    def _parameter_text(self, p: inspect.Parameter) -> str:
        prefix = "*" if p.kind == p.VAR_POSITIONAL else "**" if p.kind == p.VAR_KEYWORD else ""
        info = self.args_model.model_fields.get(p.name)
        annotation = None if info is None else info.annotation
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and get_args(annotation):
            annotation = get_args(annotation)[-1]  # list[int] / dict[str, bool]: the item's type
        hint = "" if annotation is None else _hint_text(annotation)
        return f"{prefix}{p.name}" + (f" ({hint})" if hint and hint != "Any" else "")

    def signature(self) -> str:
        if self.parameters and self.takes_positional:
            parts = []
            for p in self.parameters:
                text = self._parameter_text(p)
                parts.append(text if p.default is inspect.Parameter.empty else f"{text}, optional")
            return ", ".join(parts) or "no arguments"
        parts = []
        for name, info in self.args_model.model_fields.items():
            hint = _hint_text(info.annotation)
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
            "concurrency_limit": (
                {"limit": self.limits.concurrency.limit, "key": self.limits.concurrency.key}
                if self.limits.concurrency else None),
            "rate_limit": (
                {"limit": self.limits.rate.limit, "per_seconds": self.limits.rate.per, "key": self.limits.rate.key}
                if self.limits.rate else None),
            "unique": (
                {"period_seconds": self.unique.period, "fields": list(self.unique.fields) if self.unique.fields
                 is not None else None, "key": self.unique.key, "states": list(self.unique.states)}
                if self.unique else None),
            "args_schema": self.json_schema(),
        }

    # Python callers: `my_task.defer(x=1)` validates, then joins the caller's transaction.
    # Positional arguments go to tasks that take them (stored under `__args__`).
    def defer(self, *positional: Any, **args: Any) -> int:
        from jobs import services

        return services.job_defer(task_name=self.name, args=stored_arguments(positional, args)).job_id

    async def adefer(self, *positional: Any, **args: Any) -> int:
        from asgiref.sync import sync_to_async

        return await sync_to_async(self.defer)(*positional, **args)

    def configure(self, **options: Any) -> _Configured:
        return _Configured(self, options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function directly (no queue), as a plain function call."""
        return self.func(*args, **kwargs)


@dataclass
class _Configured:
    spec: TaskSpec
    options: dict[str, Any]

    def defer(self, *positional: Any, **args: Any) -> int:
        from jobs import services

        return services.job_defer(task_name=self.spec.name, args=stored_arguments(positional, args),
                                  **self.options).job_id


def stored_arguments(positional: Sequence[Any], keywords: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments as a job stores them: keywords by name, positional ones under `__args__`."""
    return {**keywords, ARGS_KEY: list(positional)} if positional else dict(keywords)


def _hint_text(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


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
    context: bool | None = None,
    require_hints: bool = True,
    store_as_given: bool = False,
    concurrency: ConcurrencyLimit | int | None = None,
    rate_limit: RateLimit | None = None,
    unique: Unique | bool | None = None,
) -> Any:
    """Declare a Skiplock task. `lock`/`queueing_lock` are format strings over the arguments.

    Flow control (jobs.flow, docs/flow-control.md): `concurrency=ConcurrencyLimit(5, key="p:{p_id}")`
    (or a number) caps the jobs running at once across every worker, `rate_limit=RateLimit(100,
    per=60)` the starts in any window, both per formatted key; `unique=Unique(period=3600)` (or
    True) makes a repeated start return the job already waiting or running.

    `check(args)` validates what type hints cannot (one argument or another, a path inside a
    folder): it raises ValueError, and the start is refused with InvalidArguments. Constraints
    on one argument go in its hint: `Annotated[int, pydantic.Field(ge=1, le=4)]`.
    `args_model` replaces the model built from the type hints (adapters such as the Django
    tasks backend use it to describe a function whose wrapper takes `**kwargs`).
    Adapters (Django tasks, `jobs.celery`) also say whether the first parameter is a context
    (`context`; default: guessed from its name or hint), accept parameters without hints as any
    JSON value (`require_hints=False`) and store arguments as given (`store_as_given`).
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
        parameters: tuple[inspect.Parameter, ...] = ()
        if args_model is None:
            takes_context, parameters, model = _arguments_model(
                fn, task_name, context=context, require_hints=require_hints)
        else:
            takes_context, model = False, args_model
        limits = TaskLimits(
            concurrency=ConcurrencyLimit(concurrency) if isinstance(concurrency, int) else concurrency,
            rate=rate_limit,
        )
        limits.check(task_name)
        rule = Unique() if unique is True else (unique or None)
        for template, what in ((lock, "lock"), (queueing_lock, "queueing_lock"),
                               (limits.key_template, "limit key"), (rule.key if rule else None, "unique key")):
            unknown = _template_fields(template) - set(model.model_fields)
            if unknown:
                raise ValueError(
                    f"task '{task_name}': {what} {template!r} names {', '.join(repr(u) for u in sorted(unknown))}, "
                    f"which is not an argument of the task"
                )
        if rule is not None and rule.fields is not None:
            unknown_fields = set(rule.fields) - set(model.model_fields)
            if unknown_fields:
                raise ValueError(f"task '{task_name}': unique fields {sorted(unknown_fields)} are not arguments of the task")
        policy = retry if retry is not None else RetryPolicy()
        spec = TaskSpec(
            name=task_name, func=fn, args_model=model, queue=queue, priority=priority,
            retry=policy, soft_time_limit=float(soft_time_limit), hard_time_limit=float(hard_time_limit),
            lock=lock, queueing_lock=queueing_lock, takes_context=takes_context,
            description=inspect.getdoc(fn) or "", check=check, parameters=parameters,
            store_as_given=store_as_given, limits=limits, unique=rule,
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


def _arguments_model(
    fn: Callable[..., Any], task_name: str, *, context: bool | None = None, require_hints: bool = True,
) -> tuple[bool, tuple[inspect.Parameter, ...], type[pydantic.BaseModel]]:
    try:
        hints = get_type_hints(fn, include_extras=True)  # keep Annotated[..., Field(...)] constraints
    except Exception:
        if require_hints:
            raise
        hints = {}  # unresolvable forward references (adapters): any JSON value
    params = list(inspect.signature(fn).parameters.values())
    takes_context = bool(params) and (
        context if context is not None else (
            hints.get(params[0].name) is JobContext or params[0].name in ("ctx", "context"))
    )
    if takes_context:
        params = params[1:]
    fields: dict[str, Any] = {}
    for param in params:
        if param.name in RESERVED_KEYS:
            raise TypeError(f"task '{task_name}': argument name '{param.name}' is reserved")
        if param.name not in hints and require_hints and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"task '{task_name}': argument '{param.name}' needs a type hint")
        hint = hints.get(param.name, Any)
        if param.kind == param.VAR_POSITIONAL:
            fields[param.name] = (list[hint], [])  # type: ignore[valid-type]
        elif param.kind == param.VAR_KEYWORD:
            fields[param.name] = (dict[str, hint], {})  # type: ignore[valid-type]
        else:
            fields[param.name] = (hint, ... if param.default is inspect.Parameter.empty else param.default)
    model = pydantic.create_model(
        f"{_camel(task_name)}Args",
        __config__=pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=not require_hints),
        **fields,
    )
    return takes_context, tuple(params), model


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

    def arguments(stored: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        expires = stored.get(EXPIRES_KEY)
        if expires is not None and dt.datetime.fromisoformat(expires) <= dt.datetime.now(dt.UTC):
            raise JobExpired(f"the job expired at {expires} before it ran; it was not run")
        positional, values = spec.call_arguments(stored)
        return ([current_job()] if spec.takes_context else []) + positional, values

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
    "ARGS_KEY", "EXPIRES_KEY", "NO_RETRY", "ConcurrencyLimit", "Discard", "JobContext", "RateLimit", "RetryPolicy",
    "Snooze", "TaskSpec", "Unique", "all_tasks", "get_startable_task", "get_task", "startable_tasks", "task",
]

