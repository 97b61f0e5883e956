"""Flow control in the console: the Queues page (pause, resume, limits, task limits) and the
periodic page's switches (enable, disable, trigger now).

Reading needs what every console page needs (the view or change permission on jobs); every
change is a POST with the CSRF token and needs the change permission on jobs, the permission that
steers jobs in the job list. A change that cannot be made says why and changes nothing; every
form posts back and is redirected to its page (so a reload never posts twice).
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse

from jobs import periodic, queues
from jobs.console.jobs import short_duration
from jobs.console.pages import _context, _require_view
from jobs.exceptions import SkiplockError

CHANGE_PERMISSION = "jobs.change_jobrecord"


def may_steer(request: HttpRequest) -> bool:
    return bool(request.user.has_perm(CHANGE_PERMISSION))


def _require_steer(request: HttpRequest) -> None:
    if not may_steer(request):
        raise PermissionDenied("steering queues and schedules needs the 'change' permission on jobs")


def changed_by(request: HttpRequest) -> str:
    return f"admin:{request.user.get_username()}"


# --- the Queues page ------------------------------------------------------------------------------


def _rate(limit: int | None, period: float | None) -> str:
    if limit is None or period is None:
        return "—"
    return f"{limit} per {period:g} s"


def queues_view(request: HttpRequest) -> HttpResponse:
    _require_view(request)
    if request.method == "POST":
        _require_steer(request)
        _queue_change(request)
        return HttpResponseRedirect(reverse("admin:skiplock_queues"))
    rows = []
    for info in queues.list_queues():
        rows.append({
            "info": info,
            "depth": info.depth,
            "oldest": short_duration(info.oldest_waiting_seconds) if info.oldest_waiting_seconds else "—",
            "rate": _rate(info.rate_limit, info.rate_period),
            "rate_period": "" if info.rate_period is None else f"{info.rate_period:g}",
        })
    limits = [{"limit": item, "rate": _rate(item.rate_limit, item.rate_period),
               "oldest": short_duration(item.oldest_waiting_seconds) if item.waiting else "—"}
              for item in queues.list_task_limits()]
    context = {
        **_context(request, "Queues"),
        "queues": rows,
        "task_limits": limits,
        "can_steer": may_steer(request),
        "jobs_url": reverse("admin:jobs_jobrecord_changelist"),
    }
    return TemplateResponse(request, "admin/jobs/queues.html", context)


class _BadInput(ValueError):
    pass


def _whole(form: Any, name: str, label: str) -> int | None:
    text = str(form.get(name, "")).strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        raise _BadInput(f"{label} must be a whole number from 1 up (or empty to clear it); got “{text[:20]}”")
    return int(text)


def _seconds(form: Any, name: str, label: str) -> float | None:
    text = str(form.get(name, "")).strip()
    if not text:
        return None
    try:
        value = float(text) if text.isascii() and len(text) <= 12 else float("nan")
    except ValueError:
        value = float("nan")
    if not value == value or value in (float("inf"), float("-inf")):  # NaN or infinite
        raise _BadInput(f"{label} must be a number of seconds (e.g. 60); got “{text[:20]}”")
    return value


def _queue_change(request: HttpRequest) -> None:
    form = request.POST
    name = str(form.get("queue", "")).strip()
    action = form.get("action", "")
    by = changed_by(request)
    try:
        if action == "pause":
            done = queues.pause_queue(name, by=by)
            messages.success(request, f"Paused queue “{name}”: no worker starts its jobs until it is resumed "
                             "(running jobs finish; new jobs are still accepted)." if done
                             else f"Queue “{name}” was already paused; nothing changed.")
        elif action == "resume":
            done = queues.resume_queue(name, by=by)
            messages.success(request, f"Resumed queue “{name}”: workers start its jobs again." if done
                             else f"Queue “{name}” was not paused; nothing changed.")
        elif action == "limits":
            concurrency = _whole(form, "concurrency", "Concurrency")
            rate_limit = _whole(form, "rate_limit", "Rate limit")
            rate_period = _seconds(form, "rate_period", "Rate period")
            if (rate_limit is None) != (rate_period is None):
                raise _BadInput("give a rate limit and its period together (e.g. 100 per 60 s), "
                                "or leave both empty to clear the rate limit")
            limits = queues.set_queue_limits(name, concurrency=concurrency, rate_limit=rate_limit,
                                             rate_period=rate_period, by=by)
            messages.success(request, f"Queue “{name}”: concurrency "
                             f"{limits['concurrency'] if limits['concurrency'] is not None else 'unlimited'}, rate "
                             f"{_rate(limits['rate_limit'], limits['rate_period']).replace('—', 'unlimited')}.")
        else:
            messages.error(request, "Unknown queue action; use the Pause, Resume or Set limits buttons. "
                           "Nothing was changed.")
    except (_BadInput, queues.QueueProblem) as exc:
        message = str(exc)
        messages.error(request, f"Queue “{name[:60]}” not changed: {message[0].lower() + message[1:]}.")


# --- the periodic page's switches -----------------------------------------------------------------


def periodic_action_view(request: HttpRequest) -> HttpResponse:
    _require_view(request)
    back = HttpResponseRedirect(reverse("admin:skiplock_periodic"))
    if request.method != "POST":
        return back
    _require_steer(request)
    key = str(request.POST.get("key", ""))
    action = request.POST.get("action", "")
    try:
        if action in ("enable", "disable"):
            changed = periodic.set_periodic_enabled(key, action == "enable", by=changed_by(request))
            word = "enabled" if action == "enable" else "disabled"
            if changed:
                messages.success(request, f"Periodic task “{key}” {word}"
                                 + (": its ticks are skipped until it is enabled again." if word == "disabled"
                                    else ": it runs at its next tick."))
            else:
                messages.info(request, f"Periodic task “{key}” was already {word}; nothing changed.")
        elif action == "run":
            job = periodic.trigger_periodic(key)
            again = "" if job.created else " (an equal job was already waiting: it is that one)"
            messages.success(request, f"Started job #{job.job_id} for “{key}” now{again}; its schedule is unchanged.")
        else:
            messages.error(request, "Unknown periodic action; use Enable, Disable or Run now. Nothing was changed.")
    except (periodic.PeriodicProblem, SkiplockError) as exc:
        text = exc.message if isinstance(exc, SkiplockError) else str(exc)
        messages.error(request, f"Nothing was changed: {text}.")
    return back
