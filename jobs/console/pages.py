"""Console pages beside the job list: dashboard, workers and periodic schedules."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from django.conf import settings
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone

from jobs import dashboard
from jobs.console.charts import stacked_bars
from jobs.console.jobs import badge, short_duration
from jobs.states import DISPLAY, DisplayState


def _require_view(request: HttpRequest) -> None:
    if not (request.user.has_perm("jobs.view_jobrecord") or request.user.has_perm("jobs.change_jobrecord")):
        raise PermissionDenied


def _context(request: HttpRequest, title: str) -> dict[str, Any]:
    return {**admin.site.each_context(request), "title": title, "console_nav": nav(request)}


def nav(request: HttpRequest) -> list[dict[str, Any]]:
    here = request.path
    items = [
        ("Dashboard", reverse("admin:skiplock_dashboard"), "d"),
        ("Jobs", reverse("admin:jobs_jobrecord_changelist"), "j"),
        ("Queues", reverse("admin:skiplock_queues"), "q"),
        ("Workers", reverse("admin:jobs_workerinfo_changelist"), "w"),
        ("Periodic tasks", reverse("admin:skiplock_periodic"), "p"),
        ("API keys", reverse("admin:jobs_apikey_changelist"), "k"),
    ]
    return [{"label": text, "url": url, "key": key, "current": here.startswith(url)} for text, url, key in items]


def dashboard_view(request: HttpRequest) -> HttpResponse:
    _require_view(request)
    board = dashboard.dashboard()
    jobs_url = reverse("admin:jobs_jobrecord_changelist")
    active = board.active_by_state
    tiles = []
    for state in (DisplayState.TODO, DisplayState.SCHEDULED, DisplayState.RETRYING, DisplayState.DOING,
                  DisplayState.ABORTING):
        tiles.append({"badge": badge(state), "count": active.get(state.value, 0),
                      "url": f"{jobs_url}?state={state.value}", "note": "now"})
    for state in (DisplayState.SUCCEEDED, DisplayState.FAILED, DisplayState.CANCELLED, DisplayState.ABORTED,
                  DisplayState.DISCARDED, DisplayState.EXPIRED):
        tiles.append({"badge": badge(state), "count": board.finished_by_state.get(state.value, 0),
                      "url": f"{jobs_url}?state={state.value}&finished=24h", "note": "last 24 h",
                      "estimated": board.estimated_by_state.get(state.value)})
    context = {
        **_context(request, "Job dashboard"),
        "board": board,
        "tiles": tiles,
        "jobs_url": jobs_url,
        "minute_chart": stacked_bars(board.per_minute, title="Jobs finished per minute, last hour",
                                     label=lambda t: t.strftime("%H:%M"), tick_every=10),
        "hour_chart": stacked_bars(board.per_hour, title="Jobs finished per hour, last 24 hours",
                                   label=lambda t: t.strftime("%H:00"), tick_every=4),
        "percentiles": [{**row, **{k: short_duration(row[k]) for k in ("p50", "p95", "p99", "max")}}
                        for row in board.percentiles],
        "oldest_age": short_duration((board.now - board.oldest_waiting["since"]).total_seconds())
        if board.oldest_waiting else None,
        "stalled": [{**job, "age": _age(board.now, job["heartbeat"])} for job in board.stalled],
        "queue_threshold": settings.SKIPLOCK_ALERT_QUEUE_DEPTH,
        "failure_rate": f"{board.failure_rate_hour:.1%}" if board.failure_rate_hour is not None else "—",
        "refresh": refresh_seconds(request.GET.get("refresh")),
        "queues_url": reverse("admin:skiplock_queues"),
    }
    return TemplateResponse(request, "admin/jobs/dashboard.html", context)


# The dashboard reloads itself through a <meta http-equiv="refresh">: the value must be a plain
# number of seconds (a string there could carry `;url=…`, an open redirect), and not so small
# that the page reloads in a loop. 0 turns the reload off.
REFRESH_DEFAULT, REFRESH_MIN, REFRESH_MAX = 15, 2, 3600


def refresh_seconds(raw: str | None) -> int:
    """`?refresh=` as whole seconds in [REFRESH_MIN, REFRESH_MAX], 0 for off, the default for anything else."""
    text = (raw or "").strip()
    if not text.isascii() or not text.lstrip("-").isdigit() or len(text) > 12:
        return REFRESH_DEFAULT
    seconds = int(text)
    return 0 if seconds == 0 else min(REFRESH_MAX, max(REFRESH_MIN, seconds))


def _age(now: dt.datetime, moment: dt.datetime | None) -> str:
    return short_duration((now - moment).total_seconds()) + " ago" if moment else "never"


def workers_view(request: HttpRequest) -> HttpResponse:
    _require_view(request)
    now = timezone.now()
    rows = [{**w, "seen": _age(now, w["heartbeat"]), "uptime": short_duration(
        ((w["stopped_at"] or now) - w["started_at"]).total_seconds()) if w["started_at"] else "—"}
        for w in dashboard.workers(now=now)]
    context = {
        **_context(request, "Workers"),
        "workers": rows,
        "live": sum(1 for w in rows if w["live"]),
        "in_flight": sum(w["in_flight"] for w in rows),
        "live_after": short_duration(dashboard.live_after().total_seconds()),
        "jobs_url": reverse("admin:jobs_jobrecord_changelist"),
        "opts": None,
    }
    return TemplateResponse(request, "admin/jobs/workers.html", context)


def periodic_view(request: HttpRequest) -> HttpResponse:
    _require_view(request)
    now = timezone.now()
    rows = []
    for row in dashboard.periodic_rows(now=now):
        state = row.get("last_state")
        rows.append({
            **row,
            "last_badge": badge(state) if state in {s.value for s in DISPLAY} else None,
            "next_in": short_duration((row["next_run_at"] - now).total_seconds()) if row["next_run_at"] else "—",
            "last_ago": _age(now, row["last_run_at"]) if row["last_run_at"] else "",
            "args_json": json.dumps(row["args"], sort_keys=True) if row.get("args") else "",
        })
    context = {**_context(request, "Periodic tasks"), "schedules": rows,
               "jobs_url": reverse("admin:jobs_jobrecord_changelist"),
               "can_steer": request.user.has_perm("jobs.change_jobrecord"),
               "action_url": reverse("admin:skiplock_periodic_action")}
    return TemplateResponse(request, "admin/jobs/periodic.html", context)
