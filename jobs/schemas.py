"""The REST API's request and response bodies (django-ninja schemas) and their OpenAPI shapes.

Start requests are parsed loosely (`task: str`, `args: object`) so that the service layer decides
what an unknown task (404) or a bad argument (422) is; the OpenAPI document still describes each
task's own body (`task_start_schemas`), so clients and fuzzers see every argument schema.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from ninja import Schema
from pydantic import BeforeValidator, ConfigDict, Field, WithJsonSchema

from jobs.flow import MAX_LIMIT, MAX_PERIOD_SECONDS, MAX_RATE_PER_PERIOD
from jobs.registry import (
    MAX_PRIORITY,
    MAX_QUEUE_LENGTH,
    MIN_PRIORITY,
    QUEUE_PATTERN,
    TaskSpec,
    startable_tasks,
)
from jobs.states import DisplayState, State

# Strings stored in PostgreSQL text columns may not contain NUL.
NO_NUL = r"^[^\x00]*$"


def _iso_8601(value: Any) -> Any:
    """pydantic takes numbers (and numeric text) as Unix timestamps: a time here is ISO 8601 text."""
    if isinstance(value, dt.datetime):
        return value
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return value
    raise ValueError("must be an ISO 8601 date and time, e.g. 2030-01-01T09:00:00Z")


IsoDateTime = Annotated[dt.datetime, BeforeValidator(_iso_8601)]


class StrictSchema(Schema):
    model_config = ConfigDict(extra="forbid")


class UniqueIn(StrictSchema):
    """No second job of the task with the same arguments (or `fields` of them, or a formatted `key`)."""

    period: float | None = Field(default=None, gt=0, le=MAX_PERIOD_SECONDS, strict=True,
                                 description="seconds back a duplicate counts; any age when left out")
    fields: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        default=None, max_length=100, description="only these arguments make two starts the same (not with key)",
    )
    key: str | None = Field(default=None, min_length=1, max_length=255, pattern=NO_NUL,
                            description="a key formatted from the arguments, e.g. 'report:{account_id}' (not with fields)")
    states: list[str] | None = Field(default=None, min_length=1, max_length=20,
                                     description="the job states a duplicate may be in (default: todo, doing)")


# A start's `unique`: true or a UniqueIn object, checked in jobs.api (so that an error names
# `unique.period`, not pydantic's union branches); the OpenAPI document shows both shapes.
UNIQUE_SCHEMA = {"anyOf": [{"type": "boolean", "enum": [True]}, UniqueIn.model_json_schema(), {"type": "null"}]}


class JobStartIn(StrictSchema):
    """One job to start: a task by name with its arguments and optional placement."""

    task: str = Field(min_length=1, max_length=128, pattern=NO_NUL, description="the task's name (GET /api/tasks)")
    args: dict[str, Any] = Field(default_factory=dict, description="the task's keyword arguments")
    queue: str | None = Field(
        default=None, min_length=1, max_length=MAX_QUEUE_LENGTH, pattern=QUEUE_PATTERN,
        description="another queue than the task's: one of the known queues (a task's, or settings.TASKS'); "
        "any other name needs the `manage` scope",
    )
    priority: int | None = Field(
        default=None, ge=MIN_PRIORITY, le=MAX_PRIORITY, strict=True,
        description="higher runs first; another priority than the task's needs the `manage` scope",
    )
    run_at: IsoDateTime | None = Field(
        default=None, description="ISO 8601 time with a zone, at most 366 days ahead; not with delay_seconds",
    )
    delay_seconds: float | None = Field(default=None, ge=0, le=366 * 24 * 3600, strict=True,
                                        description="run this many seconds from now; not with run_at")
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=255, pattern=NO_NUL,
        description="starting twice with the same key and arguments returns the first job",
    )
    expires_at: IsoDateTime | None = Field(
        default=None, description="ISO 8601 time with a zone: not run by then, the job ends `expired`; not with expires_in",
    )
    expires_in: float | None = Field(default=None, gt=0, le=366 * 24 * 3600, strict=True,
                                     description="seconds from now after which the job is never run (ends `expired`)")
    unique: Annotated[Any, WithJsonSchema(UNIQUE_SCHEMA)] = Field(
        default=None,
        description="true, or {period, fields, key, states}: a duplicate start returns the existing job "
        "(200, created: false) instead of a second one; the task's own rule applies when left out",
    )


class JobBatchIn(StrictSchema):
    jobs: list[JobStartIn] = Field(min_length=1, max_length=1000)


class JobStartOut(Schema):
    id: int
    task: str
    queue: str
    state: State
    scheduled_at: dt.datetime | None
    created: bool = Field(description="false when an idempotency key or a unique rule returned an existing job")
    status_url: str
    events_url: str


class JobBatchOut(Schema):
    jobs: list[JobStartOut]


class JobErrorOut(Schema):
    type: str
    message: str
    traceback: str | None = Field(
        description="for operators only (the view permission on jobs, or a `manage` key); null for everyone else"
    )


class JobSummaryOut(Schema):
    id: int
    task: str
    queue: str
    priority: int
    state: State
    display_state: DisplayState
    progress: int
    step: str
    attempts: int
    created_at: dt.datetime
    scheduled_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    expires_at: dt.datetime | None = Field(default=None, description="not run by then, the job ends `expired`")
    duration_ms: int | None
    status_url: str


class JobOut(JobSummaryOut):
    """A job in full: the summary plus arguments, result or error, worker and policy."""

    max_attempts: int | None
    args: dict[str, Any] = Field(
        description="keyword arguments by name; positional ones, for tasks that take them, in order under `__args__`"
    )
    custom_state: str | None = Field(
        default=None,
        description="a label the running task gave itself (Celery's update_state, e.g. 'BUILDING'); only "
        "while that run lasts, beside `state`, never a queue state of its own",
    )
    meta: Any = Field(default=None, description="free-form JSON the task stored with its custom state, as last written")
    result: Any = None
    error: JobErrorOut | None
    waiting_for: str | None = Field(
        default=None, description="why a waiting job does not start, e.g. 'lock deploy-shop-production held by job 412'"
    )
    worker: str | None
    idempotency_key: str | None
    events_url: str


class AttemptOut(Schema):
    number: int
    worker: str | None
    outcome: str = Field(description="running, succeeded, failed, retried, aborted, lost, timed_out, snoozed, "
                         "discarded or expired")
    started_at: dt.datetime
    finished_at: dt.datetime | None
    duration_ms: int | None
    error: JobErrorOut | None


class AttemptListOut(Schema):
    attempts: list[AttemptOut]


class JobPageOut(Schema):
    jobs: list[JobSummaryOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")


class TransitionOut(Schema):
    id: int
    state: State
    display_state: DisplayState
    status_url: str


class RetryPolicyOut(Schema):
    max_attempts: int
    backoff_seconds: float
    factor: float
    max_backoff_seconds: float
    jitter: float
    retry_on: list[str]
    dont_retry_on: list[str]


class TaskOut(Schema):
    name: str
    description: str
    queue: str
    priority: int
    retry: RetryPolicyOut
    soft_time_limit_seconds: float
    hard_time_limit_seconds: float
    lock: str | None
    queueing_lock: str | None
    args_schema: dict[str, Any]


class TaskListOut(Schema):
    tasks: list[TaskOut]


class ErrorBody(Schema):
    code: str = Field(description="stable machine-readable code, e.g. invalid_arguments")
    message: str = Field(description="what happened and what to do")
    details: Any = Field(default=None,
                         description="for invalid_arguments: [{field, message, type}]")


class ErrorOut(Schema):
    error: ErrorBody


# --- which jobs: the filters of GET /api/jobs and POST /api/jobs/bulk ---------------------------------


def _stored_state(value: Any) -> Any:
    """`state` is the stored state: a display-only state gets a pointer to `display_state`."""
    if value in (DisplayState.SCHEDULED, DisplayState.RETRYING):
        raise ValueError(f"'{value}' is a display state (its stored state is todo): filter with display_state={value}")
    return value


class JobMatch(StrictSchema):
    """Which jobs: every given filter must hold."""

    task: str | None = Field(default=None, min_length=1, max_length=128, pattern=NO_NUL)
    queue: str | None = Field(default=None, min_length=1, max_length=128, pattern=NO_NUL)
    state: list[Annotated[State, BeforeValidator(_stored_state)]] | None = Field(
        default=None, description="the stored state (the `state` field); repeat to match any of several",
    )
    display_state: list[DisplayState] | None = Field(
        default=None, description="the display state (the `display_state` field: scheduled, retrying, ...); repeatable",
    )
    created_after: IsoDateTime | None = Field(default=None, description="ISO 8601, e.g. 2030-01-01T09:00:00Z")
    created_before: IsoDateTime | None = Field(default=None, description="ISO 8601, e.g. 2030-01-01T09:00:00Z")


# --- flow control: queues, limits, changing and bulk-steering jobs ---------------------------------------


class LimitsOut(Schema):
    concurrency: int | None = Field(description="at most this many running at once, across every worker")
    rate_limit: int | None = Field(description="at most this many starts per `rate_period` seconds")
    rate_period: float | None


class QueueDepthOut(Schema):
    todo: int = Field(description="waiting and runnable now")
    scheduled: int = Field(description="waiting for a later run time")
    doing: int
    aborting: int


class QueueOut(Schema):
    name: str
    paused: bool = Field(description="a paused queue keeps accepting jobs; no worker starts one until it is resumed")
    paused_at: dt.datetime | None
    limits: LimitsOut
    depth: QueueDepthOut
    running: int = Field(description="jobs running now (doing and aborting)")
    oldest_waiting_seconds: float = Field(description="how long the oldest runnable job has waited")
    starts_in_window: int | None = Field(description="for a rate-limited queue: starts in the current window")


class QueueListOut(Schema):
    queues: list[QueueOut]


class QueueLimitsIn(StrictSchema):
    """Only the fields given change; null clears a limit. rate_limit and rate_period go together."""

    concurrency: int | None = Field(default=None, ge=1, le=MAX_LIMIT, strict=True)
    rate_limit: int | None = Field(default=None, ge=1, le=MAX_RATE_PER_PERIOD, strict=True)
    rate_period: float | None = Field(default=None, gt=0, le=MAX_PERIOD_SECONDS, strict=True)


class TaskLimitOut(Schema):
    key: str = Field(description="the task's name, or '<task>:<key formatted from the arguments>'")
    task: str
    limits: LimitsOut
    running: int
    waiting: int = Field(description="runnable jobs waiting under this key (held back by the limit while it is full)")
    oldest_waiting_seconds: float = Field(description="how long the oldest of them has waited")
    starts_in_window: int | None


class TaskLimitListOut(Schema):
    limits: list[TaskLimitOut]


class JobChangeIn(StrictSchema):
    """A waiting job's new priority and/or run time (null: runnable now)."""

    priority: int | None = Field(default=None, ge=MIN_PRIORITY, le=MAX_PRIORITY, strict=True)
    run_at: IsoDateTime | None = Field(default=None, description="ISO 8601 time with a zone; null runs it now")


class JobBulkIn(StrictSchema):
    action: Literal["cancel", "retry", "delete"]
    filter: JobMatch = Field(default_factory=JobMatch, description="the filters of GET /api/jobs (no limit, cursor)")
    dry_run: bool = Field(default=False, strict=True, description="count what would change; change nothing")


class JobBulkOut(Schema):
    action: str
    dry_run: bool
    matched: int = Field(description="jobs the filter matches (that the caller may see)")
    changed: int = Field(description="jobs changed (dry run: that the action applies to now)")
    skipped: int = Field(description="matched jobs the action does not apply to (their state, or the caller's rights)")
    max_jobs: int = Field(description="one call acts on at most this many jobs; narrow the filter above it")


# --- per-task OpenAPI shapes ----------------------------------------------------------------------


def camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.replace(".", "_").replace(":", "_").split("_"))


def task_components(ref_prefix: str = "#/components/schemas/") -> tuple[dict[str, Any], dict[str, str]]:
    """OpenAPI component schemas for every task: `<Task>Args` and `<Task>JobStart`.

    Returns the components and, per task name, the component name of its start body.
    """
    components: dict[str, Any] = {}
    start_names: dict[str, str] = {}
    start_schema = JobStartIn.model_json_schema(ref_template=ref_prefix + "{model}")
    common = start_schema["properties"]
    components.update(start_schema.get("$defs", {}))  # e.g. UniqueIn
    for spec in startable_tasks():
        args_name, start_name = _task_component_names(spec)
        schema = spec.json_schema(ref_template=ref_prefix + "{model}")  # `__args__` for positional arguments
        for name, sub in schema.pop("$defs", {}).items():
            components.setdefault(name, sub)
        schema["title"] = args_name
        schema.setdefault("additionalProperties", False)
        components[args_name] = schema
        properties = {key: value for key, value in common.items() if key not in ("task", "args")}
        components[start_name] = {
            "title": start_name,
            "type": "object",
            "description": f"Start a `{spec.name}` job. {spec.description.splitlines()[0] if spec.description else ''}".strip(),
            "properties": {
                "task": {"type": "string", "enum": [spec.name], "title": "Task"},
                "args": {"$ref": ref_prefix + args_name},
                **properties,
            },
            "required": ["task", "args"] if schema.get("required") else ["task"],
            "additionalProperties": False,
        }
        start_names[spec.name] = start_name
    return components, start_names


def _task_component_names(spec: TaskSpec) -> tuple[str, str]:
    base = camel(spec.name)
    return f"{base}Args", f"{base}JobStart"
