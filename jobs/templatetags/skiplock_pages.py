"""Template tags for embedding Skiplock's job status in any template (see docs/pages.md).

    {% load skiplock_pages %}
    <head>… {% skiplock_assets %} …</head>
    {% skiplock_job_status report.job_id %}      {# full card: badge, progress, result/error #}
    {% skiplock_job_status report.job_id compact=True %}   {# one line: badge and progress #}

Access follows jobs.auth's rule (the pages', the API's and the admin's): a job the visitor
may not see renders as "not available", exactly like one that does not exist.
"""

from __future__ import annotations

import re
from typing import Any

from django import template
from django.templatetags.static import static
from django.utils.html import conditional_escape, format_html
from django.utils.safestring import mark_safe

from jobs import pages
from jobs.models import JobRecord
from jobs.states import colour, label

register = template.Library()


@register.inclusion_tag("jobs/components/job_status.html", takes_context=True)
def skiplock_job_status(
    context: template.Context, job: Any, *, compact: bool = False, heading: bool = True, level: int = 2,
    return_to: str | None = None,
) -> dict[str, Any]:
    """The live status component of one job (an id, a JobRecord or a JobView).

    `level` is the heading level of its title (2: an <h2>); `return_to` where cancel/stop lead
    back to (default: the page it is on).
    """
    request = context.get("request")
    user = getattr(request, "user", None)
    view: pages.JobView | None
    if isinstance(job, pages.JobView):
        view = job
    elif isinstance(job, JobRecord):
        view = pages.job_view(job, user) if pages.visible_jobs(user).filter(pk=job.pk).exists() else None
    else:
        try:
            job_id = int(job)
        except (TypeError, ValueError):
            view = None
        else:
            record = pages.visible_jobs(user).filter(pk=job_id).first()
            view = pages.job_view(record, user) if record is not None else None
    if return_to is None:
        return_to = request.get_full_path() if request is not None else ""
    return pages.component_context(view, compact=compact, heading=heading, level=level, return_to=return_to)


@register.simple_tag
def skiplock_assets() -> str:
    """The component's stylesheet and script (plain files, no build step)."""
    return format_html(
        '<link rel="stylesheet" href="{}">\n'
        '<script src="{}" defer data-skiplock-states="{}"></script>',
        static("skiplock/pages/pages.css"),
        static("skiplock/pages/jobs.js"),
        pages.states_json(),
    )


@register.inclusion_tag("jobs/components/job_badge.html")
def skiplock_state_badge(display_state: str) -> dict[str, str]:
    """A coloured badge for one display state."""
    return {"state": display_state, "label": label(display_state), "colour": colour(display_state)}


@register.filter(needs_autoescape=True)
def skiplock_code(text: str, autoescape: bool = True) -> str:
    """Docstring text for a page: escaped, with `backticks` shown as code."""
    escaped = conditional_escape(text) if autoescape else text
    return mark_safe(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escaped)))  # noqa: S308  (escaped above)


@register.filter
def skiplock_duration(seconds: float | None) -> str:
    return "" if seconds is None else pages.format_duration(float(seconds))


@register.filter
def skiplock_json(value: Any) -> str:
    """A JSON value, indented, for a <pre> (autoescaped like any text)."""
    import json

    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
