"""The REST API under /api/: start jobs, read and steer them, follow them live (django-ninja).

Writes go through `jobs.services`, reads through Skiplock's own indexed queries (never
procrastinate's unpaginated `list_jobs`). Every error leaves through `error_response`, the one
exception handler, as `{"error": {"code", "message", "details"}}`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import psycopg_pool
from asgiref.sync import sync_to_async
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation, TooManyFieldsSent
from django.db import (
    DatabaseError,
    DataError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    connection,
)
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from ninja import NinjaAPI, Query
from ninja.errors import AuthenticationError, AuthorizationError, HttpError, ValidationError
from ninja.parser import Parser
from ninja.responses import Status
from pydantic import Field
from pydantic import ValidationError as PydanticValidationError

from jobs import api_flow, services
from jobs.auth import API_AUTH, Principal, manages_jobs, principal_of
from jobs.events import end_event_id, job_event_stream
from jobs.exceptions import InvalidArguments, JobNotFound, SkiplockError
from jobs.flow import Unique
from jobs.models import JobRecord
from jobs.registry import find_task, startable_tasks
from jobs.schemas import (
    AttemptListOut,
    ErrorOut,
    JobBatchIn,
    JobBatchOut,
    JobMatch,
    JobOut,
    JobPageOut,
    JobStartIn,
    JobStartOut,
    StrictSchema,
    TaskListOut,
    TransitionOut,
    UniqueIn,
    task_components,
)
from jobs.selectors import job_attempts, job_get, job_max_attempts, job_waiting_for, state_filter
from jobs.states import FINAL_STATES
from jobs.streams import limited_stream

logger = logging.getLogger(__name__)

MAX_PAGE = 500
MAX_STREAM_JOBS = 100


class StrictJSONParser(Parser):
    """JSON as RFC 8259 has it: no NaN/Infinity; strings PostgreSQL can store (no NUL, no lone surrogate)."""

    def parse_body(self, request: HttpRequest) -> Any:
        def no_constant(name: str) -> float:
            raise ValueError(f"{name} is not valid JSON")

        def finite(text: str) -> float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(f"the number {text} is out of range")
            return value

        data = json.loads(request.body, parse_constant=no_constant, parse_float=finite)
        _check_strings(data)
        return data


def _check_strings(value: Any, path: str = "") -> None:
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"the string at {path or 'the top'} contains NUL (\\u0000), which cannot be stored")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"the string at {path or 'the top'} contains an unpaired surrogate") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key, path)
            _check_strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_strings(item, f"{path}.{index}" if path else str(index))


class SkiplockAPI(NinjaAPI):
    """NinjaAPI whose OpenAPI document also describes each task's start body (oneOf on `task`)."""

    def get_openapi_schema(self, *, path_prefix: str | None = None, path_params: dict[str, Any] | None = None) -> Any:
        schema = super().get_openapi_schema(path_prefix=path_prefix, path_params=path_params)
        components, start_names = task_components()
        if not start_names:
            return schema
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(components)
        refs = {name: f"#/components/schemas/{component}" for name, component in start_names.items()}
        one_of = {
            "oneOf": [{"$ref": ref} for ref in refs.values()],
            "discriminator": {"propertyName": "task", "mapping": refs},
        }
        schemas["JobBatchStart"] = {
            "title": "JobBatchStart", "type": "object", "additionalProperties": False, "required": ["jobs"],
            "properties": {"jobs": {"type": "array", "minItems": 1, "maxItems": 1000, "items": one_of}},
        }
        paths = schema.get("paths", {})
        for path, body in (("/api/jobs", one_of), ("/api/jobs/batch", {"$ref": "#/components/schemas/JobBatchStart"})):
            operation = paths.get(path, {}).get("post")
            if operation and "requestBody" in operation:
                operation["requestBody"]["content"] = {"application/json": {"schema": body}}
        return schema


api = SkiplockAPI(
    title="Skiplock API",
    version="1",
    description=(
        "Start background jobs on PostgreSQL, read their state and result, follow their progress live. "
        "Authenticate with `Authorization: Bearer <API key>` (scopes start, read, manage) or a Django session. "
        "Errors are `{\"error\": {\"code\", \"message\", \"details\"}}`."
    ),
    auth=API_AUTH,
    parser=StrictJSONParser(),
    urls_namespace="api",
)

# Every endpoint may answer these (auth, bad input, database down); each declares the rest.
COMMON = {400: ErrorOut, 401: ErrorOut, 403: ErrorOut, 413: ErrorOut, 422: ErrorOut, 503: ErrorOut}


# --- the one exception handler --------------------------------------------------------------------


def error_response(request: HttpRequest, exc: Exception) -> HttpResponse:
    """Every error of the API, as one JSON shape; never a traceback."""
    status, code, message, details = _describe(exc)
    response = api.create_response(request, {"error": {"code": code, "message": message, "details": details}}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="skiplock"'
    if status == 503:
        response["Retry-After"] = "5"
    return response


def _database_cause(exc: BaseException) -> BaseException | None:
    """The database error behind `exc`, through wrappers such as procrastinate's ConnectorException."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, DatabaseError | psycopg.Error | psycopg_pool.PoolTimeout):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _describe(exc: Exception) -> tuple[int, str, str, Any]:
    cause = _database_cause(exc) if not isinstance(exc, SkiplockError | HttpError | ValidationError) else None
    if cause is not None and cause is not exc:
        return _describe(cause)  # type: ignore[arg-type]
    if isinstance(exc, SkiplockError):
        return exc.status, exc.code, exc.message, exc.details
    if isinstance(exc, ValidationError):
        details = [_validation_detail(error) for error in exc.errors]
        message = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        return 422, "invalid_request", f"invalid request: {message}", details
    if isinstance(exc, AuthenticationError):
        message = exc.message if exc.message != "Unauthorized" else (
            "authentication required: send `Authorization: Bearer <API key>` or sign in"
        )
        return 401, "unauthenticated", message, None
    if isinstance(exc, AuthorizationError):
        return 403, "forbidden", exc.message, None
    if isinstance(exc, HttpError):
        if exc.status_code == 400 and exc.__cause__ is not None:
            return 400, "malformed_json", f"the request body is not valid JSON: {exc.__cause__}", None
        if exc.status_code == 403 and "CSRF" in exc.message:
            return 403, "csrf_failed", exc.message, None
        return exc.status_code, f"http_{exc.status_code}", exc.message, None
    if isinstance(exc, RequestDataTooBig):
        from django.conf import settings

        return 413, "body_too_large", f"the request body is over {settings.SKIPLOCK_MAX_BODY_BYTES} bytes", {
            "max_bytes": settings.SKIPLOCK_MAX_BODY_BYTES
        }
    if isinstance(exc, TooManyFieldsSent):
        from django.conf import settings

        limit = settings.DATA_UPLOAD_MAX_NUMBER_FIELDS
        return 400, "too_many_parameters", (
            f"the request has more than {limit} query parameters or form fields; send at most {limit}"
        ), {"max_parameters": limit}
    if isinstance(exc, SuspiciousOperation):
        return 400, "bad_request", f"the request was refused: {exc}", None
    if isinstance(exc, Http404):
        return 404, "not_found", "not found", None
    if isinstance(exc, IntegrityError | psycopg.IntegrityError):
        return 409, "conflict", "the request conflicts with the current state; read it again and retry", None
    if isinstance(exc, DataError | psycopg.DataError):
        return 422, "invalid_value", "a value is out of range or cannot be stored", None
    if isinstance(exc, OperationalError | InterfaceError | psycopg.OperationalError | psycopg.InterfaceError
                  | psycopg_pool.PoolTimeout):
        logger.warning("API: database unavailable (%s)", type(exc).__name__)
        return 503, "database_unavailable", "the database is unavailable; retry shortly", None
    incident = uuid.uuid4().hex[:12]
    logger.error("API: unexpected error (incident %s)", incident, exc_info=exc)
    if isinstance(exc, DatabaseError):
        return 503, "database_error", f"a database error happened (incident {incident}); retry shortly", None
    return 500, "internal_error", f"an unexpected error happened (incident {incident}); it was logged", None


def _validation_detail(error: dict[str, Any]) -> dict[str, Any]:
    loc = [str(part) for part in error.get("loc", ())]
    # ("body", "payload", "jobs", 0, "priority") → "jobs.0.priority"; ("query", "limit") → "limit"
    if loc and loc[0] in ("body", "query", "path", "header", "cookie", "form"):
        loc = loc[1:]
    if loc and loc[0] in ("payload", "filters"):
        loc = loc[1:]
    return {"field": ".".join(loc) or "body", "message": str(error.get("msg", "")), "type": str(error.get("type", ""))}


for _exc_class in (Exception, ValidationError, HttpError, AuthenticationError, AuthorizationError, Http404):
    api.add_exception_handler(_exc_class, error_response)  # type: ignore[arg-type]


# --- helpers -----------------------------------------------------------------------------------------


def job_url(job_id: int) -> str:
    return f"/api/jobs/{job_id}"


def events_url(job_id: int) -> str:
    return f"/api/jobs/{job_id}/events"


def _duration_ms(started: dt.datetime | None, finished: dt.datetime | None) -> int | None:
    if started is None:
        return None
    end = finished or dt.datetime.now(dt.UTC)
    return max(0, int((end - started).total_seconds() * 1000))


def _visible_job(principal: Principal, job_id: int) -> JobRecord:
    record = job_get(job_id=job_id)
    if not principal.can_see(record.owner_id):
        raise JobNotFound(f"no job has id {job_id}")
    return record


def _job_out(record: JobRecord, principal: Principal) -> dict[str, Any]:
    return {
        "id": record.job_id,
        "task": record.task_name,
        "queue": record.queue_name,
        "priority": record.priority,
        "state": record.state,
        "display_state": record.display_state,
        "progress": record.progress,
        "step": record.step,
        "attempts": record.attempts,
        "max_attempts": job_max_attempts(record),
        "args": record.args,
        "custom_state": record.custom_state or None,
        "meta": record.meta,
        "result": record.result,
        "error": principal.error_of(record.error_type, record.error_message, record.error_traceback),
        "waiting_for": _waiting_for(record, principal),
        "created_at": record.created_at,
        "scheduled_at": record.scheduled_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "expires_at": record.expires_at,
        "duration_ms": _duration_ms(record.started_at, record.finished_at),
        "worker": record.worker_name or None,
        "idempotency_key": record.idempotency_key,
        "status_url": job_url(record.job_id),
        "events_url": events_url(record.job_id),
    }


def _waiting_for(record: JobRecord, principal: Principal) -> str | None:
    waiting = job_waiting_for(job_id=record.job_id) if record.state == "todo" else None
    return waiting.describe(show_job=principal.can_see(waiting.owner_id)) if waiting else None


def _start_out(job: services.DeferredJob) -> dict[str, Any]:
    return {
        "id": job.job_id, "task": job.task_name, "queue": job.queue, "state": job.state,
        "scheduled_at": job.scheduled_at, "created": job.created,
        "status_url": job_url(job.job_id), "events_url": events_url(job.job_id),
    }


def _utc(run_at: dt.datetime | None, field: str) -> dt.datetime | None:
    """run_at in UTC (PostgreSQL takes offsets up to ±15:59 only; Python's go to ±23:59)."""
    if run_at is None or run_at.tzinfo is None:
        return run_at  # the service names the missing time zone
    try:
        return run_at.astimezone(dt.UTC)
    except OverflowError:
        raise InvalidArguments(
            f"{field}: out of range", details=[{"field": field, "message": "out of range", "type": "value_error"}]
        ) from None


def _defer_request(item: JobStartIn, principal: Principal, prefix: str = "") -> services.DeferRequest:
    _check_placement(item, principal, prefix)
    return services.DeferRequest(
        task_name=item.task, args=item.args, queue=item.queue, priority=item.priority,
        run_at=_utc(item.run_at, f"{prefix}run_at"), delay_seconds=item.delay_seconds,
        idempotency_key=item.idempotency_key,
        owner_id=principal.user_id if principal.kind == "user" else None,
        api_key_id=principal.key_id if principal.kind == "key" else None,
        expires_at=_utc(item.expires_at, f"{prefix}expires_at"), expires_in=item.expires_in,
        unique=_unique(item, prefix),
    )


def _unique(item: JobStartIn, prefix: str) -> Unique | None:
    """A start's own unique rule (None: the task's), or a 422 naming the field."""
    field = f"{prefix}unique"
    value = item.unique
    try:
        if value is None:
            return None
        if value is True:
            return Unique()
        if not isinstance(value, dict):
            raise ValueError("must be true or an object with period, fields, key, states")
        rule = UniqueIn.model_validate(value)
        return Unique.from_request(rule.model_dump(exclude_none=True))
    except PydanticValidationError as exc:
        details = [{"field": ".".join([field, *map(str, error["loc"])]), "message": error["msg"], "type": error["type"]}
                   for error in exc.errors()]
        raise InvalidArguments("; ".join(f"{d['field']}: {d['message']}" for d in details), details=details) from None
    except ValueError as exc:
        where = next((f"{field}.{name}" for name in ("states", "period") if f"unique {name}" in str(exc)), field)
        raise InvalidArguments(
            f"{where}: {exc}", details=[{"field": where, "message": str(exc), "type": "value_error"}]
        ) from None


def _check_placement(item: JobStartIn, principal: Principal, prefix: str) -> None:
    """Another priority or queue than the task's is for managers only.

    A high priority with a far `run_at` let any starter hold a task's `lock` against everyone's
    jobs; free queue names grew every per-queue view and metric (issue 13 items 1 and 5).
    """
    spec = find_task(item.task)
    if spec is None or manages_jobs(principal):
        return  # an unknown task is the service's 404
    needs = "needs the 'manage' scope (or, signed in, the change permission on jobs)"
    if item.priority is not None and item.priority != spec.priority:
        raise AuthorizationError(
            message=f"{prefix}priority: choosing a job's priority {needs}; leave it out to use the task's ({spec.priority})"
        )
    if item.queue is not None and item.queue != spec.queue:
        raise AuthorizationError(
            message=f"{prefix}queue: choosing a job's queue {needs}; leave it out to use the task's ('{spec.queue}')"
        )


# --- tasks ------------------------------------------------------------------------------------------


@api.get("/tasks", response={200: TaskListOut, **COMMON}, tags=["tasks"], summary="List tasks and their argument schemas")
def list_tasks(request: HttpRequest) -> dict[str, Any]:
    """Every task that can be started: argument JSON schema, queue, priority, retry and time limits."""
    principal_of(request).require("read")
    return {"tasks": [spec.describe() for spec in startable_tasks()]}


# --- starting jobs -------------------------------------------------------------------------------------


@api.post(
    "/jobs",
    response={202: JobStartOut, 200: JobStartOut, 404: ErrorOut, 409: ErrorOut, **COMMON},
    tags=["jobs"],
    summary="Start a job",
)
def start_job(request: HttpRequest, response: HttpResponse, payload: JobStartIn) -> Status:
    """Start a job of a task with JSON arguments, validated against the task's schema.

    The job is committed before the answer (`202`). A start that an idempotency key or a unique
    rule matched to an existing job answers `200` with that job and `created: false`. `404`
    unknown task, `422` invalid arguments (each field named), `409` idempotency key reused with
    other arguments or queueing lock taken.
    """
    principal = principal_of(request)
    principal.require("start")
    job = services.job_defer_batch(requests=[_defer_request(payload, principal)])[0]
    response["Location"] = job_url(job.job_id)
    return Status(202 if job.created else 200, _start_out(job))


@api.post(
    "/jobs/batch",
    response={202: JobBatchOut, 404: ErrorOut, 409: ErrorOut, **COMMON},
    tags=["jobs"],
    summary="Start many jobs at once",
)
def start_jobs(request: HttpRequest, payload: JobBatchIn) -> Status:
    """Start up to 1,000 jobs in one request: all valid or none started; one round trip for the inserts."""
    principal = principal_of(request)
    principal.require("start")
    requests = [_defer_request(item, principal, f"jobs.{i}.") for i, item in enumerate(payload.jobs)]
    jobs = services.job_defer_batch(requests=requests)
    return Status(202, {"jobs": [_start_out(job) for job in jobs]})


# --- reading jobs ---------------------------------------------------------------------------------------


class JobFilters(JobMatch):
    limit: int = Field(default=50, ge=1, le=MAX_PAGE)
    cursor: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9_=-]*$")


def reject_unknown_parameters(request: HttpRequest, schema: type[StrictSchema]) -> None:
    """422 naming each query parameter the endpoint does not know (a typo must not widen a filter)."""
    unknown = sorted(set(request.GET) - set(schema.model_fields))
    if unknown:
        raise InvalidArguments(
            f"unknown query parameter(s): {', '.join(unknown)}; known: {', '.join(schema.model_fields)}",
            details=[{"field": name, "message": "unknown query parameter", "type": "extra_forbidden"} for name in unknown],
        )


def encode_cursor(job_id: int) -> str:
    return base64.urlsafe_b64encode(f"j{job_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not raw.startswith("j") or not raw[1:].isdigit():
            raise ValueError(raw)
        return int(raw[1:])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArguments(
            "cursor is not one this API gave out; pass next_cursor from the previous page",
            details=[{"field": "cursor", "message": "unknown cursor", "type": "value_error"}],
        ) from None


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def matching_jobs(filters: JobMatch, *, owner_id: int | None) -> QuerySet[JobRecord]:
    """The jobs a filter matches, within what the caller may see (`owner_id`: confined to their own)."""
    query: QuerySet[JobRecord] = JobRecord.objects.all()
    if owner_id is not None:
        query = query.filter(owner_id=owner_id)
    if filters.task:
        query = query.filter(task_name=filters.task)
    if filters.queue:
        query = query.filter(queue_name=filters.queue)
    if filters.state:
        query = query.filter(state__in=filters.state)
    if filters.display_state:
        query = query.filter(state_filter(*filters.display_state))
    if filters.created_after:
        query = query.filter(created_at__gte=_aware(filters.created_after))
    if filters.created_before:
        query = query.filter(created_at__lt=_aware(filters.created_before))
    return query


def jobs_page(filters: JobFilters, *, owner_id: int | None) -> tuple[list[dict[str, Any]], str | None]:
    """One page of jobs, newest first, by keyset on job_id: cost independent of the page number."""
    query = matching_jobs(filters, owner_id=owner_id)
    if filters.cursor:
        query = query.filter(job_id__lt=decode_cursor(filters.cursor))
    rows = query.order_by("-job_id").values(
        "job_id", "task_name", "queue_name", "priority", "state", "progress", "step", "attempts",
        "created_at", "scheduled_at", "started_at", "finished_at", "expires_at",
    )[: filters.limit + 1]
    fetched = list(rows)
    page = fetched[: filters.limit]
    next_cursor = encode_cursor(page[-1]["job_id"]) if len(fetched) > filters.limit else None
    now = dt.datetime.now(dt.UTC)
    from jobs.states import display_state

    jobs = [
        {
            "id": row["job_id"], "task": row["task_name"], "queue": row["queue_name"], "priority": row["priority"],
            "state": row["state"],
            "display_state": display_state(row["state"], scheduled_at=row["scheduled_at"], attempts=row["attempts"],
                                           now=now, expires_at=row["expires_at"]),
            "progress": row["progress"], "step": row["step"], "attempts": row["attempts"],
            "created_at": row["created_at"], "scheduled_at": row["scheduled_at"], "started_at": row["started_at"],
            "finished_at": row["finished_at"], "expires_at": row["expires_at"],
            "duration_ms": _duration_ms(row["started_at"], row["finished_at"]),
            "status_url": job_url(row["job_id"]),
        }
        for row in page
    ]
    return jobs, next_cursor


@api.get("/jobs", response={200: JobPageOut, **COMMON}, tags=["jobs"], summary="List jobs")
def list_jobs(request: HttpRequest, filters: Query[JobFilters]) -> dict[str, Any]:
    """Newest first; filter by task, queue, state, display state, creation time; cursor pagination.

    An unknown query parameter is a `422` naming it.
    """
    principal = principal_of(request)
    principal.require("read")
    reject_unknown_parameters(request, JobFilters)
    jobs, next_cursor = jobs_page(filters, owner_id=principal.owner_filter)
    return {"jobs": jobs, "next_cursor": next_cursor}


# Flow control: queues, task limits, changing and bulk-steering jobs (jobs/api_flow.py). Registered
# here, before `/jobs/{job_id}`: Django tries paths in order, so `/jobs/bulk` comes first.
api_flow.register(api, COMMON)


@api.get("/jobs/{job_id}", response={200: JobOut, 404: ErrorOut, **COMMON}, tags=["jobs"], summary="Read a job")
def get_job(request: HttpRequest, job_id: int) -> dict[str, Any]:
    """State, progress, attempts, timings, and the result or the last error."""
    principal = principal_of(request)
    principal.require("read")
    return _job_out(_visible_job(principal, job_id), principal)


@api.get("/jobs/{job_id}/attempts", response={200: AttemptListOut, 404: ErrorOut, **COMMON}, tags=["jobs"],
         summary="A job's attempts")
def get_job_attempts(request: HttpRequest, job_id: int) -> dict[str, Any]:
    """Every run of the job: worker, start and end, outcome, and the error it ended with."""
    principal = principal_of(request)
    principal.require("read")
    _visible_job(principal, job_id)
    return {"attempts": [
        {
            "number": attempt.number, "worker": attempt.worker_name or None, "outcome": attempt.outcome,
            "started_at": attempt.started_at, "finished_at": attempt.finished_at,
            "duration_ms": _duration_ms(attempt.started_at, attempt.finished_at),
            "error": principal.error_of(attempt.error_type, attempt.error_message, attempt.error_traceback),
        }
        for attempt in job_attempts(job_id=job_id)
    ]}


# --- steering jobs ----------------------------------------------------------------------------------------


def _transition(request: HttpRequest, job_id: int, action: str) -> dict[str, Any]:
    principal = principal_of(request)
    principal.require(action)
    principal.require_on(action, _visible_job(principal, job_id).owner_id)
    {"cancel": services.job_cancel, "abort": services.job_abort, "retry": services.job_retry}[action](job_id=job_id)
    record = job_get(job_id=job_id)
    return {"id": job_id, "state": record.state, "display_state": record.display_state, "status_url": job_url(job_id)}


TRANSITION_RESPONSES = {200: TransitionOut, 404: ErrorOut, 409: ErrorOut, **COMMON}


@api.post("/jobs/{job_id}/cancel", response=TRANSITION_RESPONSES, tags=["jobs"], summary="Cancel a waiting job")
def cancel_job(request: HttpRequest, job_id: int) -> dict[str, Any]:
    """todo → cancelled; `409` with the current state otherwise (abort a running job instead)."""
    return _transition(request, job_id, "cancel")


@api.post("/jobs/{job_id}/abort", response=TRANSITION_RESPONSES, tags=["jobs"], summary="Abort a running job")
def abort_job(request: HttpRequest, job_id: int) -> dict[str, Any]:
    """doing → aborting → aborted (the task is asked to stop); a waiting job is cancelled."""
    return _transition(request, job_id, "abort")


@api.post("/jobs/{job_id}/retry", response=TRANSITION_RESPONSES, tags=["jobs"], summary="Retry a failed job")
def retry_job(request: HttpRequest, job_id: int) -> dict[str, Any]:
    """failed → todo, to run again now; earlier attempts stay in its history."""
    return _transition(request, job_id, "retry")


# --- live events ------------------------------------------------------------------------------------------

SSE_DOC = {
    "responses": {
        "200": {
            "description": (
                "Server-Sent Events: `state` and `progress` events (data: JSON with id, state, display_state, "
                "progress, step, attempts), then `end` (data adds result and error) when the job finishes, "
                "then the stream closes. The first events are the current snapshot; `: heartbeat` comments "
                "keep the connection open; send `Last-Event-ID` to resume."
            ),
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        "204": {"description": "Resumed after the final event (Last-Event-ID): nothing more will come."},
    }
}


def _check_stream_access(principal: Principal, job_ids: list[int]) -> bool:
    """Raise 404 for a job the caller cannot see; True when every job has already ended."""
    try:
        principal.require("read")
        rows = {
            row["job_id"]: row
            for row in JobRecord.objects.filter(job_id__in=job_ids).values("job_id", "owner_id", "state")
        }
        missing = [job_id for job_id in job_ids if job_id not in rows or not principal.can_see(rows[job_id]["owner_id"])]
        if missing:
            raise JobNotFound(
                f"no job has id {', '.join(map(str, missing))}", details={"missing": missing}
            )
        return all(row["state"] in FINAL_STATES for row in rows.values())
    finally:
        # The stream may stay open for hours: give this request's database connection back now.
        connection.close()


async def _stream(request: HttpRequest, job_ids: list[int]) -> HttpResponseBase:
    principal = principal_of(request)
    all_final = await sync_to_async(_check_stream_access)(principal, job_ids)
    last_event_id = request.headers.get("Last-Event-ID")
    if all_final and last_event_id and last_event_id.endswith(":end") and len(job_ids) == 1 \
            and last_event_id == end_event_id(job_ids[0]):
        return HttpResponse(status=204)  # tells EventSource to stop reconnecting
    # The caller's limits (jobs/streams.py): 429 over the cap, credentials re-checked, a maximum lifetime.
    stream = job_event_stream(job_ids, last_event_id=last_event_id, tracebacks=principal.sees_tracebacks)
    return sse_response(limited_stream(request, principal, stream))


def sse_response(stream: AsyncIterator[str]) -> StreamingHttpResponse:
    response = StreamingHttpResponse(stream, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    return response


@api.get(
    "/jobs/{job_id}/events", response={404: ErrorOut, **COMMON}, tags=["events"],
    summary="Follow a job (Server-Sent Events)", openapi_extra=SSE_DOC,
)
async def job_events(request: HttpRequest, job_id: int) -> HttpResponseBase:
    """Live `state`/`progress` events for one job, pushed from PostgreSQL LISTEN/NOTIFY."""
    return await _stream(request, [job_id])


class StreamFilters(StrictSchema):
    ids: str = Field(min_length=1, max_length=2000, pattern=r"^\d{1,18}(,\d{1,18})*$",
                     description="comma-separated job ids (at most 100)")


@api.get(
    "/events", response={404: ErrorOut, **COMMON}, tags=["events"],
    summary="Follow several jobs (Server-Sent Events)", openapi_extra=SSE_DOC,
)
async def jobs_events(request: HttpRequest, filters: Query[StreamFilters]) -> HttpResponseBase:
    """One stream for several jobs: each job's events carry its id; closes when all have ended."""
    reject_unknown_parameters(request, StreamFilters)
    job_ids = list(dict.fromkeys(int(part) for part in filters.ids.split(",")))
    if len(job_ids) > MAX_STREAM_JOBS:
        raise InvalidArguments(
            f"at most {MAX_STREAM_JOBS} jobs per stream",
            details=[{"field": "ids", "message": f"at most {MAX_STREAM_JOBS} ids", "type": "too_long"}],
        )
    return await _stream(request, job_ids)


def api_not_found(request: HttpRequest) -> HttpResponse:
    """Unknown paths under /api/ answer in the API's error shape, not an HTML page."""
    from django.http import JsonResponse

    return JsonResponse(
        {"error": {"code": "not_found", "message": f"no API endpoint at {request.path}; see /api/docs", "details": None}},
        status=404,
    )
