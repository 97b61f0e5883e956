"""Job pages for end users: a launcher that starts tasks from forms, and a live status page.

Server-rendered first (every page shows the current state at once and works without
JavaScript, refreshing itself while a job runs); `static/skiplock/pages/jobs.js` then follows
jobs live over the API's Server-Sent Events, polling `GET /api/jobs/{id}` if the stream fails.

Who sees what (jobs.auth, the same rule as the API and the admin): every page needs a login;
users see their own jobs, staff with the view permission on jobs everyone's (anything else is a
404, so ids cannot be probed); the traceback of a failure is shown to the latter only. Writes go
through `jobs.services`.

The status component is reusable: `{% load skiplock_pages %}{% skiplock_job_status job_id %}`
(see docs/pages.md); `job_view()` builds what it renders.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import URLPattern, get_script_prefix, path, reverse, reverse_lazy
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme, urlencode
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from jobs import services
from jobs.auth import Principal, user_principal
from jobs.exceptions import InvalidArguments, InvalidTransition, JobNotFound, SkiplockError
from jobs.models import JobRecord
from jobs.registry import TaskSpec, find_task, startable_tasks
from jobs.selectors import job_max_attempts, job_waiting_for
from jobs.states import DISPLAY, FINAL_STATES, State, colour, label

LOGIN_URL = reverse_lazy("pages-login")
RECENT_JOBS = 10
# While a job is unfinished, pages without JavaScript reload themselves this often.
REFRESH_SECONDS = 3
# Lists longer than this are folded away in a formatted result (a 300-point route, say).
LONG_LIST = 12

# --- who may see and act on a job ----------------------------------------------------------------


def visible_jobs(user: Any) -> Any:
    """The jobs `user` may see (jobs.auth's rule): their own, everyone's with the view permission."""
    if not getattr(user, "is_authenticated", False):
        return JobRecord.objects.none()
    owner_id = user_principal(user).owner_filter
    return JobRecord.objects.all() if owner_id is None else JobRecord.objects.filter(owner_id=owner_id)


def get_visible_job(user: Any, job_id: int) -> JobRecord:
    """The job, or Http404 when it does not exist or belongs to someone else (the same answer)."""
    record = visible_jobs(user).filter(pk=job_id).first()
    if record is None:
        raise Http404("No such job.")
    return record


def can_act(user: Any, record: JobRecord, action: str = "cancel") -> bool:
    """Owners may cancel or abort their job; others need the change permission (jobs.auth)."""
    if not getattr(user, "is_authenticated", False):
        return False
    principal = user_principal(user)
    return principal.can_see(record.owner_id) and principal.can_act(action, record.owner_id)


# --- what a page shows of a job -----------------------------------------------------------------


@dataclass(frozen=True)
class ResultItem:
    """One top-level entry of a formatted result."""

    key: str
    label: str
    text: str = ""  # a short value, shown as is
    block: str = ""  # a structured value, shown as indented JSON
    count: int | None = None  # a long list: how many items it folds away
    pairs: list[tuple[str, str]] = field(default_factory=list)  # a flat object, as labelled lines
    columns: list[str] = field(default_factory=list)  # a list of flat objects, as a table
    rows: list[list[str]] = field(default_factory=list)


@dataclass(frozen=True)
class JobView:
    """Everything the status component renders of one job, computed once on the server."""

    id: int
    task: str
    title: str
    description: str
    state: str
    display_state: str
    label: str
    colour: str
    progress: int
    step: str
    attempts: int
    max_attempts: int | None
    args: dict[str, Any]
    args_json: str
    created_at: dt.datetime | None
    scheduled_at: dt.datetime | None
    expires_at: dt.datetime | None  # a waiting job is never run after it (it ends expired)
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    elapsed_seconds: float
    elapsed_text: str
    elapsed_label: str
    is_final: bool
    is_running: bool
    has_result: bool
    result_items: list[ResultItem]
    result_json: str
    error: dict[str, str | None] | None  # the traceback only for operators (jobs.auth)
    waiting_for: str | None  # "lock deploy-shop-production held by job 412"
    can_cancel: bool
    can_abort: bool
    urls: dict[str, str] = field(default_factory=dict)
    custom_state: str = ""  # a label the running task gave itself (jobs.celery's update_state)
    meta: Any = None  # free-form JSON stored with it

    @property
    def attempts_text(self) -> str:
        return attempts_text(self.attempts, self.max_attempts)

    @property
    def dom_id(self) -> str:
        return f"sk-job-{self.id}"


def job_view(record: JobRecord, user: Any = None, *, now: dt.datetime | None = None) -> JobView:
    """Build the view of one job for `user` (who decides whether cancel/abort are offered)."""
    now = now or timezone.now()
    shown = record.display_state
    final = record.state in FINAL_STATES
    spec = find_task(record.task_name)
    elapsed_label, elapsed = _elapsed(record, now)
    principal = user_principal(user)
    act = can_act(user, record)
    result = record.result
    return JobView(
        id=record.job_id,
        task=record.task_name,
        title=_humanize(record.task_name),
        description=_summary(spec),
        state=record.state,
        display_state=shown,
        label=label(shown),
        colour=colour(shown),
        progress=int(record.progress or 0),
        step=record.step or "",
        attempts=record.attempts,
        max_attempts=job_max_attempts(record),
        args=record.args or {},
        args_json=json.dumps(record.args or {}, indent=2, sort_keys=True),
        created_at=record.created_at,
        scheduled_at=record.scheduled_at,
        expires_at=record.expires_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        elapsed_seconds=round(elapsed, 1),
        elapsed_text=format_duration(elapsed),
        elapsed_label=elapsed_label,
        is_final=final,
        is_running=record.state in (State.DOING, State.ABORTING),
        has_result=record.state == State.SUCCEEDED,
        result_items=format_result(result) if record.state == State.SUCCEEDED else [],
        result_json=json.dumps(result, indent=2, sort_keys=True) if result is not None else "",
        error=principal.error_of(record.error_type, record.error_message, record.error_traceback),
        waiting_for=_waiting_for(record, principal),
        can_cancel=act and record.state == State.TODO,
        can_abort=act and record.state == State.DOING,
        urls=job_urls(record.job_id),
        custom_state=record.custom_state or "",
        meta=record.meta,
    )


def _waiting_for(record: JobRecord, principal: Principal) -> str | None:
    waiting = job_waiting_for(job_id=record.job_id) if record.state == State.TODO else None
    return waiting.describe(show_job=principal.can_see(waiting.owner_id)) if waiting else None


def job_urls(job_id: int) -> dict[str, str]:
    """The page's own URLs and the REST API's, which the JavaScript follows."""
    api = f"{get_script_prefix()}api/jobs/{job_id}"
    return {
        "page": reverse("pages-job", args=[job_id]),
        "fragment": reverse("pages-job-fragment", args=[job_id]),
        "cancel": reverse("pages-job-cancel", args=[job_id]),
        "abort": reverse("pages-job-abort", args=[job_id]),
        "api": api,
        "api_events": f"{api}/events",
        "api_cancel": f"{api}/cancel",
        "api_abort": f"{api}/abort",
    }


def attempts_text(attempts: int, max_attempts: int | None) -> str:
    if max_attempts:
        return f"{attempts} of {max_attempts}"
    return str(attempts)


def _summary(spec: TaskSpec | None) -> str:
    if spec is None or not spec.description:
        return ""
    return spec.description.split("\n\n", 1)[0].replace("\n", " ")


def _elapsed(record: JobRecord, now: dt.datetime) -> tuple[str, float]:
    """What the clock on the page measures: waiting time, running time, or the final duration."""
    if record.state == State.TODO and record.attempts:
        # Waiting for a retry: since the last attempt ended (or started, if its end is unknown).
        since = record.finished_at or record.started_at or record.created_at or now
        return "Waiting for", max(0.0, (now - since).total_seconds())
    if record.started_at is None:
        if record.state in FINAL_STATES:
            start = record.created_at or now
            return "Waited", max(0.0, ((record.finished_at or now) - start).total_seconds())
        return "Waiting for", max(0.0, (now - (record.created_at or now)).total_seconds())
    if record.finished_at is not None and record.state in FINAL_STATES:
        return "Took", max(0.0, (record.finished_at - record.started_at).total_seconds())
    return "Running for", max(0.0, (now - record.started_at).total_seconds())


def format_duration(seconds: float) -> str:
    """A duration as a person reads it: 0.4 s, 12 s, 3 min 05 s, 2 h 01 min."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def format_result(result: Any) -> list[ResultItem]:
    """A task's JSON result as labelled entries: scalars inline, structures as JSON, long lists folded."""
    if not isinstance(result, dict):
        if result is None:
            return []
        return [ResultItem(key="", label="Result", **_format_value(result))]
    items = [ResultItem(key=str(key), label=_humanize(str(key)), **_format_value(value)) for key, value in result.items()]
    # PostgreSQL's jsonb does not keep key order: show short values first, structures after.
    return sorted(items, key=lambda item: 0 if item.text else 1 if item.pairs or item.columns else 2)


def _format_value(value: Any) -> dict[str, Any]:
    if _is_scalar(value):
        return {"text": _format_scalar(value)}
    if isinstance(value, list) and len(value) > LONG_LIST:
        return {"block": json.dumps(value), "count": len(value)}
    if isinstance(value, list) and all(_is_scalar(v) for v in value):
        return {"text": ", ".join(_format_scalar(v) for v in value) or "—"}
    if isinstance(value, dict) and value and all(_is_flat(v) for v in value.values()):
        return {"pairs": [(_humanize(str(k)), _format_flat(v)) for k, v in value.items()]}
    if (
        isinstance(value, list) and value and all(isinstance(row, dict) for row in value)
        and all(_is_flat(v) for row in value for v in row.values())
    ):
        columns = list(dict.fromkeys(key for row in value for key in row))
        if len(columns) <= 8:
            return {
                "columns": [_humanize(str(c)) for c in columns],
                "rows": [[_format_flat(row.get(c)) if c in row else "" for c in columns] for row in value],
            }
    return {"block": json.dumps(value, indent=2, sort_keys=True)}


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _is_flat(value: Any) -> bool:
    return _is_scalar(value) or (isinstance(value, list) and len(value) <= LONG_LIST and all(_is_scalar(v) for v in value))


def _format_flat(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_format_scalar(v) for v in value) or "—"
    return _format_scalar(value)


def _format_scalar(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _humanize(key: str) -> str:
    text = key.replace("_", " ").strip()
    return text[:1].upper() + text[1:] if text else key


# --- the launcher's forms, generated from each task's JSON schema ----------------------------------


@dataclass
class ArgField:
    """One input of a task form, derived from one property of the task's argument schema."""

    name: str
    label: str
    kind: str  # text, textarea, integer, number, boolean, list, select, json
    required: bool
    default: Any
    nullable: bool
    help: str = ""
    choices: list[str] = field(default_factory=list)
    minimum: float | None = None
    maximum: float | None = None
    max_length: int | None = None
    numeric_choices: bool = False
    value: str = ""
    checked: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def input_name(self) -> str:
        return f"arg-{self.name}"

    @property
    def type_hint(self) -> str:
        hint = {
            "integer": "whole number", "number": "number", "list": "list, comma-separated",
            "json": "JSON", "boolean": "yes/no",
        }.get(self.kind, "")
        low, high = _plain(self.minimum), _plain(self.maximum)
        if low and high:
            hint += f" from {low} to {high}"
        elif low:
            hint += f", at least {low}"
        elif high:
            hint += f", at most {high}"
        return hint.strip(", ")

    @property
    def default_text(self) -> str:
        if self.default is None or self.kind == "boolean":
            return ""
        if isinstance(self.default, list):
            return ", ".join(str(v) for v in self.default)
        if isinstance(self.default, dict):
            return json.dumps(self.default)
        return str(self.default)


@dataclass
class TaskForm:
    """A form for one task: its fields, the values last submitted and the errors they got."""

    name: str
    title: str
    summary: str
    description: str
    queue: str
    fields: list[ArgField]
    errors: list[str] = field(default_factory=list)
    delay_seconds: str = ""
    delay_errors: list[str] = field(default_factory=list)
    open: bool = False

    @property
    def has_errors(self) -> bool:
        return bool(self.errors or self.delay_errors or any(f.errors for f in self.fields))

    @property
    def error_count(self) -> int:
        return len(self.errors) + len(self.delay_errors) + sum(len(f.errors) for f in self.fields)

    @property
    def field_errors(self) -> list[tuple[str, str, str]]:
        """(input id, label, message) of every error tied to an input, for the summary's links."""
        found = [(f"id-{self.name}-{arg.name}", arg.label, error) for arg in self.fields for error in arg.errors]
        found += [(f"id-{self.name}-delay", "Start after", error) for error in self.delay_errors]
        return found


def launcher_tasks() -> list[TaskSpec]:
    """The tasks the launcher offers: SKIPLOCK_PAGES_TASKS, or all but Skiplock's own (`skiplock.*`)."""
    chosen = list(getattr(settings, "SKIPLOCK_PAGES_TASKS", []) or [])
    startable = {spec.name: spec for spec in startable_tasks()}  # never Skiplock's own (jobs.registry)
    if chosen:
        return [startable[name] for name in chosen if name in startable]
    return list(startable.values())


def task_form(spec: TaskSpec) -> TaskForm:
    """The empty form of a task, every input at its default."""
    schema = spec.json_schema()
    required = set(schema.get("required", []))
    fields = [
        _arg_field(name, prop, schema, name in required)
        for name, prop in schema.get("properties", {}).items()
    ]
    description = spec.description or ""
    return TaskForm(
        name=spec.name,
        title=_humanize(spec.name),
        summary=_summary(spec),
        description=description.split("\n\n", 1)[1].strip() if "\n\n" in description else "",
        queue=spec.queue,
        fields=fields,
    )


def _resolve(prop: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = prop.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return {**schema.get("$defs", {}).get(ref.removeprefix("#/$defs/"), {}), **{k: v for k, v in prop.items() if k != "$ref"}}
    return prop


def _arg_field(name: str, prop: dict[str, Any], schema: dict[str, Any], required: bool) -> ArgField:
    prop = _resolve(prop, schema)
    options = [_resolve(p, schema) for p in prop.get("anyOf", prop.get("oneOf", [prop]))]
    nullable = any(o.get("type") == "null" for o in options)
    concrete = [o for o in options if o.get("type") != "null"]
    main = concrete[0] if len(concrete) == 1 else {}
    kind = _kind(name, main, prop) if main else "json"
    default = prop.get("default")
    arg = ArgField(
        name=name,
        label=prop.get("title") or _humanize(name),
        kind=kind,
        required=required,
        default=default,
        nullable=nullable,
        help=str(prop.get("description") or main.get("description") or ""),
        choices=[str(c) for c in main.get("enum", [main.get("const")])] if kind == "select" else [],
        minimum=_bound(main, "minimum", "exclusiveMinimum"),
        maximum=_bound(main, "maximum", "exclusiveMaximum"),
        max_length=main.get("maxLength") if isinstance(main.get("maxLength"), int) else None,
        numeric_choices=kind == "select" and all(
            isinstance(c, int | float) and not isinstance(c, bool) for c in main.get("enum", [main.get("const")])
        ),
    )
    arg.value = arg.default_text
    arg.checked = bool(default) if kind == "boolean" else False
    return arg


def _kind(name: str, main: dict[str, Any], prop: dict[str, Any]) -> str:
    widget = prop.get("x-widget") or main.get("x-widget")
    if isinstance(widget, str):
        return widget
    if "enum" in main or "const" in main:
        return "select"
    kind = main.get("type")
    if kind == "string":
        long = main.get("format") == "textarea" or name in ("text", "body", "content")
        return "textarea" if long else "text"
    if kind in ("integer", "number", "boolean"):
        return str(kind)
    if kind == "array" and main.get("items", {}).get("type") in ("string", "integer", "number"):
        return "list"
    return "json"


def _bound(main: dict[str, Any], inclusive: str, exclusive: str) -> float | None:
    value = main.get(inclusive, main.get(exclusive))
    return float(value) if isinstance(value, int | float) else None


def _plain(bound: float | None) -> str:
    if bound is None:
        return ""
    return str(int(bound)) if bound == int(bound) else str(bound)


def read_form(form: TaskForm, data: Any) -> tuple[dict[str, Any], float | None]:
    """The task's arguments from submitted form data, as the JSON the API would receive.

    Values are passed on as typed, so the task's own validation (the same that answers the API's
    422) judges them; only the form's own shapes (lists, checkboxes, JSON boxes) are decoded here.
    """
    args: dict[str, Any] = {}
    for arg in form.fields:
        if arg.kind == "boolean":
            arg.checked = data.get(arg.input_name) in ("on", "true", "1")
            args[arg.name] = arg.checked
            continue
        raw = str(data.get(arg.input_name, ""))
        arg.value = raw
        text = raw.strip()
        if not text:
            if arg.required:
                continue  # left out: validation reports it as required
            if arg.nullable and arg.default is not None:
                args[arg.name] = None  # cleared on purpose: null rather than the default
            continue
        if arg.kind == "list":
            args[arg.name] = [item.strip() for item in text.replace("\n", ",").split(",") if item.strip()]
        elif arg.kind == "json":
            try:
                args[arg.name] = json.loads(text)
            except json.JSONDecodeError as exc:
                arg.errors.append(f"Not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}).")
        elif arg.kind in ("integer", "number") or arg.numeric_choices:
            args[arg.name] = _number(text)
        else:
            args[arg.name] = raw if arg.kind == "textarea" else text
    delay: float | None = None
    form.delay_seconds = str(data.get("delay_seconds", "")).strip()
    if form.delay_seconds:
        try:
            delay = float(form.delay_seconds)
        except ValueError:
            form.delay_errors.append("Enter a number of seconds.")
    return args, delay


def _number(text: str) -> Any:
    """Typed digits become a JSON number; anything else is passed on for validation to judge."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return text
    return value if value == value and abs(value) != float("inf") else text


def attach_errors(form: TaskForm, details: Any, message: str) -> None:
    """Put the API's 422 details (`[{field, message, type}]`) beside the inputs they name."""
    by_name = {arg.name: arg for arg in form.fields}
    placed = False
    for detail in details if isinstance(details, list) else []:
        where = str(detail.get("field", ""))
        text = _sentence(str(detail.get("message", "")))
        head = where.split(".", 1)[0]
        if head in by_name:
            target = by_name[head]
            if detail.get("type") == "missing":
                text = "This field is required."
            elif "." in where:
                text = f"Item {where.split('.', 1)[1]}: {text}"
            target.errors.append(text)
            placed = True
        elif head == "delay_seconds":
            form.delay_errors.append(text)
            placed = True
        elif detail.get("type") == "extra_forbidden":
            form.errors.append(f"The task has no argument '{where}'.")
            placed = True
        else:
            form.errors.append(f"{where}: {text}" if where and where != "args" else text)
            placed = True
    if not placed:
        form.errors.append(_sentence(message))


def _sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return text
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


# --- views --------------------------------------------------------------------------------------


@login_required(login_url=LOGIN_URL)
@never_cache
@require_http_methods(["GET", "HEAD", "POST"])
def launcher(request: HttpRequest) -> HttpResponse:
    """`/`: a form per task, and the visitor's recent jobs. POST starts a job and shows it."""
    forms = [task_form(spec) for spec in launcher_tasks()]
    status = 200
    chosen = request.POST.get("task") if request.method == "POST" else request.GET.get("task")
    if request.method == "POST":
        form = next((f for f in forms if f.name == chosen), None)
        if form is None:
            status = 404
            messages.error(request, f"There is no task named “{chosen or ''}”.")
        else:
            started, status = _start(request, form)
            if started is not None:
                return HttpResponseRedirect(reverse("pages-job", args=[started]), status=303)
    for form in forms:
        form.open = form.name == chosen or form.has_errors
    if not any(f.open for f in forms) and forms:
        forms[0].open = True
    recent = recent_jobs(request.user)
    return render(
        request, "jobs/launcher.html",
        {"forms": forms, "recent": recent, "follow_url": follow_url(recent)}, status=status,
    )


def _start(request: HttpRequest, form: TaskForm) -> tuple[int | None, int]:
    args, delay = read_form(form, request.POST)
    if form.has_errors:
        return None, 422
    try:
        job = services.job_defer(
            task_name=form.name, args=args, delay_seconds=delay, owner_id=request.user.pk,
        )
    except InvalidArguments as exc:
        attach_errors(form, exc.details, exc.message)
        return None, exc.status
    except SkiplockError as exc:
        form.errors.append(_sentence(exc.message))
        return None, exc.status
    messages.success(request, f"Started job #{job.job_id} ({form.title}).")
    return job.job_id, 303


def follow_url(jobs: list[JobView]) -> str:
    """The API's multi-job event stream for the unfinished jobs of a list (one connection for all)."""
    ids = [str(job.id) for job in jobs if not job.is_final]
    return f"{get_script_prefix()}api/events?ids={','.join(ids)}" if ids else ""


def recent_jobs(user: Any, *, limit: int = RECENT_JOBS) -> list[JobView]:
    """The visitor's own latest jobs (staff included: the admin is where they see everyone's)."""
    if not getattr(user, "is_authenticated", False):
        return []
    now = timezone.now()
    rows = JobRecord.objects.filter(owner_id=user.pk).order_by("-job_id")[:limit]
    return [job_view(row, user, now=now) for row in rows]


@login_required(login_url=LOGIN_URL)
@never_cache
@require_GET
def job_detail(request: HttpRequest, job_id: int) -> HttpResponse:
    """`/jobs/<id>/`: the status page; refreshes itself without JavaScript until the job ends."""
    job = job_view(get_visible_job(request.user, job_id), request.user)
    return render(
        request, "jobs/job_detail.html",
        {"job": job, "refresh_seconds": None if job.is_final else REFRESH_SECONDS},
    )


def component_context(
    job: JobView | None, *, compact: bool = False, heading: bool = True, level: int = 2, return_to: str = "",
) -> dict[str, Any]:
    """What templates/jobs/components/job_status.html renders; the fragment URL keeps the options."""
    level = min(5, max(1, int(level)))
    query = {"level": str(level)}
    if compact:
        query["compact"] = "1"
    if not heading:
        query["heading"] = "0"
    if return_to:
        query["next"] = return_to
    return {
        "job": job, "compact": compact, "heading": heading, "level": level, "sublevel": level + 1,
        "return_to": return_to, "fragment_query": urlencode(query),
    }


@login_required(login_url=LOGIN_URL)
@never_cache
@require_GET
def job_fragment(request: HttpRequest, job_id: int) -> HttpResponse:
    """The status component alone, for the script to swap in when a job changes state."""
    job = job_view(get_visible_job(request.user, job_id), request.user)
    options = request.GET
    try:
        level = int(options.get("level", "2"))
    except ValueError:
        level = 2
    return_to = options.get("next", "")
    if not url_has_allowed_host_and_scheme(return_to, {request.get_host()}, require_https=request.is_secure()):
        return_to = job.urls["page"]
    return render(
        request, "jobs/components/job_status.html",
        component_context(
            job, compact=options.get("compact") == "1", heading=options.get("heading") != "0",
            level=level, return_to=return_to,
        ),
    )


@login_required(login_url=LOGIN_URL)
@require_POST
def job_cancel(request: HttpRequest, job_id: int) -> HttpResponse:
    """Cancel a waiting job (the form's no-JavaScript path; the script calls the API)."""
    return _act(request, job_id, "cancel")


@login_required(login_url=LOGIN_URL)
@require_POST
def job_abort(request: HttpRequest, job_id: int) -> HttpResponse:
    """Ask a running job to stop; a job still waiting is cancelled instead."""
    return _act(request, job_id, "abort")


def _act(request: HttpRequest, job_id: int, action: str) -> HttpResponse:
    record = get_visible_job(request.user, job_id)
    if not can_act(request.user, record, action):
        raise PermissionDenied(f"You may not {action} other users' jobs: that needs the change permission on jobs.")
    try:
        if action == "cancel":
            services.job_cancel(job_id=job_id)
            messages.success(request, f"Job #{job_id} was cancelled.")
        else:
            outcome = services.job_abort(job_id=job_id)
            messages.success(
                request,
                f"Job #{job_id} was cancelled." if outcome == State.CANCELLED
                else f"Job #{job_id} was asked to stop; it stops at its next check.",
            )
    except InvalidTransition as exc:
        messages.error(request, f"Job #{job_id} could not be {action}ed: it is {label_of(exc.state)}.")
    except JobNotFound as exc:
        raise Http404(exc.message) from None
    target = request.POST.get("next") or reverse("pages-job", args=[job_id])
    if not url_has_allowed_host_and_scheme(target, {request.get_host()}, require_https=request.is_secure()):
        target = reverse("pages-job", args=[job_id])
    return HttpResponseRedirect(target, status=303)


def label_of(state: str) -> str:
    try:
        return label(state).lower()
    except ValueError:
        return state


class LoginView(auth_views.LoginView):
    """Sign-in for everyone (the admin's login admits staff only)."""

    template_name = "jobs/login.html"
    redirect_authenticated_user = True


def states_json() -> str:
    """Labels and colours of every display state, for the script (one vocabulary: jobs.states)."""
    return json.dumps({
        "states": {str(state): {"label": text, "colour": tone} for state, (text, tone) in DISPLAY.items()},
        "final": sorted(str(state) for state in FINAL_STATES),
    })


urlpatterns: list[URLPattern] = [
    path("", launcher, name="pages-launcher"),
    path("jobs/<int:job_id>/", job_detail, name="pages-job"),
    path("jobs/<int:job_id>/status", job_fragment, name="pages-job-fragment"),
    path("jobs/<int:job_id>/cancel", job_cancel, name="pages-job-cancel"),
    path("jobs/<int:job_id>/abort", job_abort, name="pages-job-abort"),
    path("login/", LoginView.as_view(), name="pages-login"),
    path("logout/", auth_views.LogoutView.as_view(next_page=LOGIN_URL), name="pages-logout"),
]
