"""The job list and detail: index-backed filters, estimated counts, confirmed actions via services."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Callable
from typing import Any, cast

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.models import CHANGE, DELETION, LogEntry
from django.core.exceptions import PermissionDenied
from django.db.models import Q, QuerySet, TextField
from django.db.models.functions import Cast
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html

from jobs import dashboard, selectors, services
from jobs.console.paginator import EXACT_COUNT_CAP, EstimatedCountPaginator
from jobs.exceptions import SkiplockError
from jobs.models import JobRecord
from jobs.registry import MAX_PRIORITY, MIN_PRIORITY, find_task
from jobs.states import DISPLAY, FINAL_STATES, DisplayState, State, colour, label

# A bulk action touches at most this many jobs (each goes through its service, one by one).
MAX_BULK = 10_000
MAX_MESSAGES = 20

# --- display helpers (shared with the templates) ----------------------------------------------------


def badge(state: DisplayState | str) -> str:
    return format_html('<span class="sl-badge sl-{}" data-state="{}">{}</span>', colour(state), state, label(state))


def progress_bar(percent: int, state: str) -> str:
    return format_html(
        '<span class="sl-progress sl-progress-{}" role="progressbar" aria-valuemin="0" aria-valuemax="100" '
        'aria-valuenow="{}" title="{}%"><span style="width:{}%"></span></span>',
        state, percent, percent, percent,
    )


def short_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    return f"{hours // 24}d {hours % 24}h"


def state_of(record: JobRecord, now: dt.datetime | None = None) -> DisplayState:
    from jobs.states import display_state

    return display_state(record.state, scheduled_at=record.scheduled_at, attempts=record.attempts, now=now,
                         expires_at=record.expires_at)


# --- filters ------------------------------------------------------------------------------------
# Every filter and search term comes from the URL: anything PostgreSQL cannot take (NUL bytes, lone
# surrogates, NaN or 1e999 in JSON) or that names nothing lists no job and says why, never a 500.


def printable(value: str, limit: int = 60) -> str:
    """A URL value quoted back to the user: control characters shown escaped, long ones cut."""
    text = value.encode("unicode_escape", "backslashreplace").decode("ascii") if not value.isprintable() else value
    return text if len(text) <= limit else text[:limit] + "…"


def unstorable(value: Any) -> str | None:
    """Why PostgreSQL could not compare with `value` (a string or decoded JSON), or None."""
    if isinstance(value, dict):
        return next((problem for item in value.items() for part in item if (problem := unstorable(part))), None)
    if isinstance(value, list):
        return next((problem for part in value if (problem := unstorable(part))), None)
    if not isinstance(value, str):
        return None
    if "\x00" in value:
        return "contains a NUL byte (\\x00)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired surrogate"
    return None


def refuse(request: HttpRequest, queryset: QuerySet[JobRecord], message: str) -> QuerySet[JobRecord]:
    messages.warning(request, message)
    return queryset.none()



class StateFilter(admin.SimpleListFilter):
    """Display states; each refines a stored state, so the (state, job_id) index does the work."""

    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(state.value, text) for state, (text, _) in DISPLAY.items()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[JobRecord]) -> QuerySet[JobRecord]:
        value = self.value()
        if not value:
            return queryset
        try:
            wanted = DisplayState(value)
        except ValueError:
            return refuse(request, queryset, f"There is no state “{printable(value)}”; choose one of: "
                          + ", ".join(state.value for state in DISPLAY) + ". No job is listed.")
        return queryset.filter(selectors.state_filter(wanted))


def _names(request: HttpRequest) -> tuple[list[str], list[str]]:
    """Task and queue names, looked up once per request by a loose index scan (never DISTINCT)."""
    cached = getattr(request, "_skiplock_names", None)
    if cached is None:
        cached = dashboard.distinct_tasks_and_queues()
        request._skiplock_names = cached  # type: ignore[attr-defined]
    return cached


class TaskFilter(admin.SimpleListFilter):
    title = "task"
    parameter_name = "task"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(name, name) for name in _names(request)[0]]

    def queryset(self, request: HttpRequest, queryset: QuerySet[JobRecord]) -> QuerySet[JobRecord]:
        value = self.value()
        if value and (problem := unstorable(value)):
            return refuse(request, queryset, f"The task filter {problem}; no job has such a name.")
        return queryset.filter(task_name=value) if value else queryset


class QueueFilter(admin.SimpleListFilter):
    title = "queue"
    parameter_name = "queue"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(name, name) for name in _names(request)[1]]

    def queryset(self, request: HttpRequest, queryset: QuerySet[JobRecord]) -> QuerySet[JobRecord]:
        value = self.value()
        if value and (problem := unstorable(value)):
            return refuse(request, queryset, f"The queue filter {problem}; no queue has such a name.")
        return queryset.filter(queue_name=value) if value else queryset


WINDOWS = {"15m": dt.timedelta(minutes=15), "1h": dt.timedelta(hours=1), "24h": dt.timedelta(hours=24),
           "7d": dt.timedelta(days=7)}
WINDOW_LABELS = {"15m": "Last 15 minutes", "1h": "Last hour", "24h": "Last 24 hours", "7d": "Last 7 days"}


class _WindowFilter(admin.SimpleListFilter):
    field = ""

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return list(WINDOW_LABELS.items())

    def queryset(self, request: HttpRequest, queryset: QuerySet[JobRecord]) -> QuerySet[JobRecord]:
        value = self.value()
        if not value:
            return queryset
        window = WINDOWS.get(value)
        if window is None:
            return refuse(request, queryset, f"“{printable(value)}” is not a time window for {self.title}; choose one "
                          f"of: {', '.join(WINDOWS)}. No job is listed.")
        return queryset.filter(**{f"{self.field}__gte": timezone.now() - window})


class CreatedFilter(_WindowFilter):
    title = "created"
    parameter_name = "created"
    field = "created_at"


class FinishedFilter(_WindowFilter):
    title = "finished"
    parameter_name = "finished"
    field = "finished_at"


# Arguments have no index (a GIN index would tax every enqueue for a console search), so a search
# in them walks the primary key over the newest jobs only, and stays bounded at any table size.
ARGS_SEARCH_WINDOW = 100_000


class _NotANumber(ValueError):
    """NaN, Infinity or a number too large for a double: PostgreSQL's jsonb takes none of them."""


def _no_constant(name: str) -> float:
    raise _NotANumber(name)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotANumber(text)
    return value


def _newest(queryset: QuerySet[JobRecord]) -> QuerySet[JobRecord]:
    top = JobRecord.objects.order_by("-job_id").values_list("job_id", flat=True).first()
    return queryset.filter(job_id__gt=(top or 0) - ARGS_SEARCH_WINDOW)


# --- actions ------------------------------------------------------------------------------------

ACTIONS: dict[str, dict[str, Any]] = {
    "retry": {"verb": "retry", "done": "Retried", "service": services.job_retry, "perm": "change",
              "states": {State.FAILED, State.DISCARDED, State.EXPIRED},
              "help": "Run the failed (or discarded, or expired) job again now; its history stays."},
    "cancel": {"verb": "cancel", "done": "Cancelled", "service": services.job_cancel, "perm": "change",
               "states": {State.TODO}, "help": "Cancel a waiting job; it will not run."},
    "abort": {"verb": "abort", "done": "Asked to abort", "service": services.job_abort, "perm": "change",
              "states": {State.DOING, State.TODO}, "help": "Ask a running job to stop (a waiting one is cancelled)."},
    "run_now": {"verb": "run now", "done": "Made runnable now", "service": services.job_run_now, "perm": "change",
                "states": {State.TODO}, "help": "Run a scheduled job now instead of at its scheduled time."},
    "change": {"verb": "change priority / run time", "done": "Changed", "service": services.job_change,
               "perm": "change", "states": {State.TODO},
               "help": "Give waiting jobs another priority and/or run time (running and finished jobs keep theirs)."},
    "delete": {"verb": "delete", "done": "Deleted", "service": services.job_delete, "perm": "delete",
               "states": {State.TODO, *FINAL_STATES}, "help": "Delete the job with its record, attempts and events."},
}


def action_allowed(name: str, record: JobRecord, now: dt.datetime | None = None) -> bool:
    """Whether `name` makes sense for the job's current state (the service decides for real)."""
    if record.state not in ACTIONS[name]["states"]:
        return False
    if name == "run_now":
        return record.scheduled_at is not None and record.scheduled_at > (now or timezone.now())
    return True


def _make_action(name: str) -> Callable[..., HttpResponse | None]:
    spec = ACTIONS[name]

    def action(modeladmin: JobRecordAdmin, request: HttpRequest, queryset: QuerySet[JobRecord]) -> HttpResponse | None:
        return modeladmin.run_action(request, queryset, name)

    action.__name__ = f"{name}_jobs"
    return admin.action(description=f"{spec['verb'].capitalize()} selected jobs",
                        permissions=[spec["perm"]])(action)


# --- the ModelAdmin -----------------------------------------------------------------------------


class JobRecordAdmin(admin.ModelAdmin):
    list_display = ("job_link", "state_badge", "task", "queue", "priority", "attempts_of",
                    "progress_column", "step_column", "age", "duration_column", "worker_name")
    list_display_links = None
    list_filter = (StateFilter, TaskFilter, QueueFilter, CreatedFilter, FinishedFilter)
    search_fields = ("task_name",)  # the box; get_search_results decides what a term means
    search_help_text = ("Job id (123 or #123), a task name, key=value to match an argument, or any text "
                        f"in the arguments (arguments are searched in the newest {ARGS_SEARCH_WINDOW:,} jobs).")
    ordering = ("-job_id",)
    sortable_by = ("job_link", "age")
    list_per_page = 50
    list_max_show_all = 200
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # "show counts" would COUNT every filter choice over the table
    paginator = EstimatedCountPaginator
    actions = [_make_action(name) for name in ACTIONS]
    change_list_template = "admin/jobs/jobrecord/change_list.html"
    detail_template = "admin/jobs/jobrecord/detail.html"
    confirmation_template = "admin/jobs/jobrecord/action_confirmation.html"

    class Media:
        css = {"all": ("skiplock/admin/console.css",)}
        js = ("skiplock/admin/console.js",)

    # -- permissions: jobs are made by tasks and changed by services, never edited in a form
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:  # type: ignore[override]
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # Django's would delete rows directly, past the services
        return actions

    # -- columns
    @admin.display(description="job", ordering="job_id")
    def job_link(self, obj: JobRecord) -> str:
        # One reverse() per page, not per row: URL resolution is a visible share of a page's time.
        if not hasattr(self, "_changelist_url"):
            self._changelist_url = reverse("admin:jobs_jobrecord_changelist")
        return format_html('<a href="{}{}/change/">#{}</a>', self._changelist_url, obj.pk, obj.pk)

    @admin.display(description="task")
    def task(self, obj: JobRecord) -> str:
        return obj.task_name

    @admin.display(description="queue")
    def queue(self, obj: JobRecord) -> str:
        return obj.queue_name

    @admin.display(description="state")
    def state_badge(self, obj: JobRecord) -> str:
        return badge(state_of(obj))

    @admin.display(description="attempts")
    def attempts_of(self, obj: JobRecord) -> str:
        most = selectors.job_max_attempts(obj)
        return f"{obj.attempts}/{most}" if most else str(obj.attempts)

    @admin.display(description="progress")
    def progress_column(self, obj: JobRecord) -> str:
        # Rows of active jobs are refreshed in place by console.js through status.json?ids=…
        return format_html('<span class="sl-row-live" data-job="{}" data-state="{}">{} <small class="sl-muted">{}%</small></span>',
                           obj.pk, obj.state, progress_bar(obj.progress, obj.state), obj.progress)

    @admin.display(description="step")
    def step_column(self, obj: JobRecord) -> str:
        return format_html('<span class="sl-step" title="{}">{}</span>', obj.step, obj.step[:40]) if obj.step else "—"

    @admin.display(description="age", ordering="created_at")
    def age(self, obj: JobRecord) -> str:
        if obj.created_at is None:  # a job deferred by procrastinate itself has no side row
            return "—"
        seconds = (timezone.now() - obj.created_at).total_seconds()
        return format_html('<time datetime="{}" title="{}">{}</time>', obj.created_at.isoformat(),
                           obj.created_at.strftime("%Y-%m-%d %H:%M:%S %Z"), short_duration(seconds))

    @admin.display(description="duration")
    def duration_column(self, obj: JobRecord) -> str:
        duration = obj.duration
        return short_duration(duration.total_seconds()) if duration is not None else "—"

    # -- search: every kind of term is answered by an index or a bounded scan
    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[JobRecord], search_term: str
    ) -> tuple[QuerySet[JobRecord], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        if problem := unstorable(term):
            return refuse(request, queryset, f"The search {problem}; no job matches it."), False
        if re.fullmatch(r"#?\d{1,18}", term):
            return queryset.filter(pk=int(term.lstrip("#"))), False
        match = re.fullmatch(r"(?:args\.)?([A-Za-z_][\w]*)\s*[=:]\s*(.+)", term)
        if match:
            key, raw = match.groups()
            try:
                value = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
            except _NotANumber:
                return refuse(request, queryset, f"“{printable(raw)}” is not a number a job's arguments can hold "
                              "(JSON has no NaN or infinity); no job matches it."), False
            except ValueError:
                value = raw
            if problem := unstorable(value):
                return refuse(request, queryset, f"The search {problem}; no job matches it."), False
            request._skiplock_scan = True  # type: ignore[attr-defined]
            return _newest(queryset).filter(args__contains={key: value}), False
        tasks, _queues = _names(request)
        named = [t for t in tasks if t == term or t.rsplit(".", 1)[-1] == term]
        if named:
            return queryset.filter(task_name__in=named), False
        request._skiplock_scan = True  # type: ignore[attr-defined]
        return (
            _newest(queryset).alias(args_text=Cast("args", output_field=TextField())).filter(
                Q(task_name__startswith=term) | Q(idempotency_key=term) | Q(args_text__icontains=term)
            ),
            False,
        )

    def get_paginator(self, request: HttpRequest, queryset: Any, per_page: int, orphans: int = 0,
                      allow_empty_first_page: bool = True) -> EstimatedCountPaginator:
        paginator = EstimatedCountPaginator(queryset, per_page, orphans, allow_empty_first_page)
        # A search in the arguments walks the newest jobs; counting its matches would walk them twice.
        paginator.exact = not getattr(request, "_skiplock_scan", False)
        return paginator

    # -- actions: confirmed, permission-checked, per-job outcome, logged
    def run_action(self, request: HttpRequest, queryset: QuerySet[JobRecord], name: str) -> HttpResponse | None:
        spec = ACTIONS[name]
        if not getattr(self, f"has_{spec['perm']}_permission")(request):
            raise PermissionDenied
        jobs = list(queryset.order_by("-job_id")[: MAX_BULK + 1])
        if len(jobs) > MAX_BULK:
            self.message_user(request, f"{spec['verb'].capitalize()}: more than {MAX_BULK} jobs selected; "
                              "narrow the filters and run it again (nothing was changed).", messages.ERROR)
            return None
        if request.POST.get("confirm") != "yes":
            return self._confirmation(request, jobs, name)
        changes: dict[str, Any] = {}
        if name == "change":
            try:
                changes = change_request(request.POST)
            except ValueError as exc:
                self.message_user(request, f"{exc} Nothing was changed.", messages.ERROR)
                return self._confirmation(request, jobs, name)
        done: list[JobRecord] = []
        refused: list[str] = []
        for record in jobs:
            try:
                spec["service"](job_id=record.job_id, **changes)
            except SkiplockError as exc:
                refused.append(exc.message)
            else:
                done.append(record)
        if done:
            flag = DELETION if name == "delete" else CHANGE
            message = [{"changed": {"fields": [f"{name} (via job console)"]}}] if flag == CHANGE else ""
            LogEntry.objects.log_actions(cast(int, request.user.pk), done, flag, change_message=message)
            self.message_user(request, f"{spec['done']} {len(done)} job(s): "
                              + ", ".join(f"#{r.job_id}" for r in done[:MAX_MESSAGES])
                              + (" …" if len(done) > MAX_MESSAGES else ""), messages.SUCCESS)
        for text in refused[:MAX_MESSAGES]:
            self.message_user(request, text.capitalize() + ".", messages.WARNING)
        if len(refused) > MAX_MESSAGES:
            self.message_user(request, f"… and {len(refused) - MAX_MESSAGES} more job(s) refused to "
                              f"{spec['verb']} for their state.", messages.WARNING)
        back = request.POST.get("next", "")
        if back.startswith("/") and not back.startswith("//"):
            if name == "delete" and done and back.rstrip("/").endswith(f"/{done[0].pk}/change"):
                back = reverse("admin:jobs_jobrecord_changelist")
            return HttpResponseRedirect(back)
        return None

    def _confirmation(self, request: HttpRequest, jobs: list[JobRecord], name: str) -> HttpResponse:
        now = timezone.now()
        rows = [(record, state_of(record, now), action_allowed(name, record, now)) for record in jobs]
        context = {
            **self.admin_site.each_context(request),
            "title": f"{ACTIONS[name]['verb'].capitalize()} {len(jobs)} job(s)?",
            "opts": self.opts,
            "action_name": f"{name}_jobs",
            "action": ACTIONS[name],
            "rows": [(r, badge(s), ok) for r, s, ok in rows[:200]],
            "hidden_more": max(0, len(rows) - 200),
            "applicable": sum(1 for _, _, ok in rows if ok),
            "total": len(rows),
            "selected_ids": [r.pk for r in jobs] if request.POST.get("select_across") != "1" else [],
            "select_across": request.POST.get("select_across", "0"),
            "selected_posted": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
            "next": request.POST.get("next", ""),
            "form_url": request.get_full_path(),
            "console_nav": _nav(request),
            "change_form": {"priority": request.POST.get("priority", ""), "run_at": request.POST.get("run_at", ""),
                            "run_now": request.POST.get("run_now") == "on",
                            "min": MIN_PRIORITY, "max": MAX_PRIORITY,
                            "zone": timezone.get_current_timezone_name()} if name == "change" else None,
        }
        return TemplateResponse(request, self.confirmation_template, context)

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        unknown = [name for name in request.GET if name not in self.url_parameters()]
        if unknown and request.method == "GET":
            # Django would pass `field__lookup=…` through to SQL unchecked (`task_name__regex=(` was a 500).
            kept = request.GET.copy()
            for name in unknown:
                del kept[name]
            messages.warning(request, "Ignored what the job list has no filter for: "
                             + ", ".join(printable(name, 40) for name in unknown[:5])
                             + (" …" if len(unknown) > 5 else "") + ". Use the filters on the right.")
            return HttpResponseRedirect(f"{request.path}?{kept.urlencode()}" if kept else request.path)
        extra = {"title": "Jobs", **(extra_context or {}), "console_nav": _nav(request), "exact_cap": EXACT_COUNT_CAP,
                 "can_start": self.has_change_permission(request)}
        return super().changelist_view(request, extra)

    def url_parameters(self) -> set[str]:
        """The query parameters the job list understands: its filters' and the admin's own (page, order, search…)."""
        from django.contrib.admin.views import main

        # Not _popup/_to_field (no form picks a job in a popup; a bad _to_field is a 400) nor _facets (off).
        own = {main.ALL_VAR, main.ORDER_VAR, main.PAGE_VAR, main.SEARCH_VAR, main.ERROR_FLAG}
        return own | {str(getattr(f, "parameter_name", "")) for f in self.list_filter}

    # -- the detail page replaces the change form
    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "",
                    extra_context: dict[str, Any] | None = None) -> HttpResponse:
        if not self.has_view_or_change_permission(request):
            raise PermissionDenied
        try:
            record = selectors.job_get(job_id=int(object_id))
        except (ValueError, SkiplockError):
            raise Http404(f"no job has id {object_id}") from None
        return TemplateResponse(request, self.detail_template, self.detail_context(request, record))

    def detail_context(self, request: HttpRequest, record: JobRecord) -> dict[str, Any]:
        now = timezone.now()
        state = state_of(record, now)
        spec = find_task(record.task_name)
        can = {"change": self.has_change_permission(request, record),
               "delete": self.has_delete_permission(request, record)}
        actions = [
            {"name": f"{name}_jobs", "verb": a["verb"], "help": a["help"], "danger": name in ("delete", "abort")}
            for name, a in ACTIONS.items() if can[a["perm"]] and action_allowed(name, record, now)
        ]
        duration = record.duration
        events = selectors.job_events(job_id=record.job_id)
        return {
            **self.admin_site.each_context(request),
            "title": f"Job #{record.job_id}",
            "subtitle": record.task_name,
            "opts": self.opts,
            "original": record,
            "job": record,
            "state": state,
            "state_badge": badge(state),
            "progress_bar": progress_bar(record.progress, record.state),
            "final": record.state in FINAL_STATES,
            "max_attempts": selectors.job_max_attempts(record),
            "waiting_for": _waiting_for(record),
            "limits": {"soft": spec.soft_time_limit, "hard": spec.hard_time_limit} if spec else None,
            "args_json": json.dumps(record.args, indent=2, sort_keys=True, ensure_ascii=False),
            "result_json": (json.dumps(record.result, indent=2, sort_keys=True, ensure_ascii=False)
                            if record.result is not None else None),
            "attempts": [
                {"attempt": a,
                 "badge": format_html('<span class="sl-badge sl-{}">{}</span>', _outcome_colour(a.outcome),
                                      a.get_outcome_display()),
                 "duration": short_duration(((a.finished_at or now) - a.started_at).total_seconds())}
                for a in selectors.job_attempts(job_id=record.job_id)
            ],
            "events": [{**e, "label": e["type"].replace("_", " ")} for e in events],
            "console_nav": _nav(request),
            "duration": short_duration(duration.total_seconds()) if duration is not None else "—",
            "waited": short_duration((record.started_at - record.created_at).total_seconds())
            if record.started_at and record.created_at else None,
            "actions": actions,
            "api_url": f"/api/jobs/{record.job_id}",
            "events_url": f"/api/jobs/{record.job_id}/events",
            "status_url": reverse("admin:jobs_jobrecord_status", args=[record.job_id]),
            "next": request.get_full_path(),
            "changelist_url": reverse("admin:jobs_jobrecord_changelist"),
        }

    def delete_view(self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        # Deleting goes through the confirmed "delete" action (and job_delete), never a bare row delete.
        return HttpResponseRedirect(reverse("admin:jobs_jobrecord_change", args=[object_id]))

    # -- a JSON status for the live progress fallback (the staff session, no API key needed)
    def get_urls(self) -> list[URLPattern]:
        status = path("<int:job_id>/status.json", self.admin_site.admin_view(self.status_view),
                      name="jobs_jobrecord_status")
        statuses = path("status.json", self.admin_site.admin_view(self.statuses_view), name="jobs_jobrecord_statuses")
        start = path("start/", self.admin_site.admin_view(self.start_view), name="jobs_jobrecord_start")
        return [status, statuses, start, *super().get_urls()]

    def start_view(self, request: HttpRequest) -> HttpResponse:
        from jobs.console.start import start_view

        return start_view(self, request)

    def status_view(self, request: HttpRequest, job_id: int) -> JsonResponse:
        if not self.has_view_or_change_permission(request):
            raise PermissionDenied
        record = JobRecord.objects.filter(pk=job_id).first()
        if record is None:
            return JsonResponse({"error": {"code": "job_not_found", "message": f"no job has id {job_id}"}}, status=404)
        return JsonResponse(_status(record))

    def statuses_view(self, request: HttpRequest) -> JsonResponse:
        """Status of up to 200 jobs (`?ids=1,2,3`): the job list refreshes its active rows with it."""
        if not self.has_view_or_change_permission(request):
            raise PermissionDenied
        ids = [int(part) for part in request.GET.get("ids", "").split(",") if part.strip().isdigit()][:200]
        only = ("job_id", "state", "scheduled_at", "attempts", "progress", "step", "expires_at")
        return JsonResponse({"jobs": [_status(r) for r in JobRecord.objects.filter(pk__in=ids).only(*only)]})


def change_request(form: Any) -> dict[str, Any]:
    """The change form's priority and run time as job_change's arguments; ValueError says what is wrong.

    An empty priority keeps the jobs' own; an empty run time keeps theirs; "run now" makes them due now.
    A run time without a zone is in the console's time zone (settings.TIME_ZONE).
    """
    changes: dict[str, Any] = {}
    raw_priority = str(form.get("priority", "")).strip()
    if raw_priority:
        text = raw_priority[1:] if raw_priority[:1] in "+-" else raw_priority
        if not (text.isascii() and text.isdigit()) or len(text) > 6 \
                or not MIN_PRIORITY <= int(raw_priority) <= MAX_PRIORITY:
            raise ValueError(f"The priority must be a whole number from {MIN_PRIORITY} to {MAX_PRIORITY}; "
                             f"got “{printable(raw_priority, 20)}”.")
        changes["priority"] = int(raw_priority)
    raw_run_at = str(form.get("run_at", "")).strip()
    if form.get("run_now") == "on":
        if raw_run_at:
            raise ValueError("Give a run time or tick “run now”, not both.")
        changes["run_at"] = None
    elif raw_run_at:
        try:
            moment = dt.datetime.fromisoformat(raw_run_at.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"The run time must be a date and time like 2026-12-31T09:30 (or with a zone, "
                             f"+02:00); got “{printable(raw_run_at, 40)}”.") from None
        if moment.tzinfo is None:
            moment = timezone.make_aware(moment, timezone.get_current_timezone())
        if moment > timezone.now() + dt.timedelta(seconds=services.MAX_DELAY_SECONDS):
            raise ValueError(f"The run time must be at most {services.MAX_DELAY_SECONDS // 86400} days from now.")
        changes["run_at"] = moment
    if not changes:
        raise ValueError("Give a new priority, a run time, or tick “run now”.")
    return changes


def _waiting_for(record: JobRecord) -> str | None:
    # The console's readers have the view permission: they may see the job in the way.
    waiting = selectors.job_waiting_for(job_id=record.job_id) if record.state == State.TODO else None
    return waiting.describe() if waiting else None


def _status(record: JobRecord) -> dict[str, Any]:
    state = state_of(record)
    return {
        "id": record.job_id, "state": record.state, "display_state": state.value, "label": label(state),
        "colour": colour(state), "progress": record.progress, "step": record.step, "attempts": record.attempts,
        "final": record.state in FINAL_STATES,
    }


def _nav(request: HttpRequest) -> list[dict[str, Any]]:
    from jobs.console.pages import nav

    return nav(request)


def _outcome_colour(outcome: str) -> str:
    return {"running": "cyan", "succeeded": "green", "failed": "red", "retried": "orange", "aborted": "purple",
            "lost": "orange", "timed_out": "red", "snoozed": "blue", "discarded": "grey",
            "expired": "grey"}.get(outcome, "grey")
