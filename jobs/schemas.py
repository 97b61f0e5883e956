"""The REST API's request and response bodies (django-ninja schemas) and their OpenAPI shapes.

Start requests are parsed loosely (`task: str`, `args: object`) so that the service layer decides
what an unknown task (404) or a bad argument (422) is; the OpenAPI document still describes each
task's own body (`task_start_schemas`), so clients and fuzzers see every argument schema.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from ninja import Schema
from pydantic import BeforeValidator, ConfigDict, Field

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


class JobBatchIn(StrictSchema):
    jobs: list[JobStartIn] = Field(min_length=1, max_length=1000)


class JobStartOut(Schema):
    id: int
    task: str
    queue: str
    state: State
    scheduled_at: dt.datetime | None
    created: bool = Field(description="false when an idempotency key returned an existing job")
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
    outcome: str = Field(description="running, succeeded, failed, retried, aborted, lost or timed_out")
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


# --- per-task OpenAPI shapes ----------------------------------------------------------------------


def camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.replace(".", "_").replace(":", "_").split("_"))


def task_components(ref_prefix: str = "#/components/schemas/") -> tuple[dict[str, Any], dict[str, str]]:
    """OpenAPI component schemas for every task: `<Task>Args` and `<Task>JobStart`.

    Returns the components and, per task name, the component name of its start body.
    """
    components: dict[str, Any] = {}
    start_names: dict[str, str] = {}
    common = JobStartIn.model_json_schema(ref_template=ref_prefix + "{model}")["properties"]
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
