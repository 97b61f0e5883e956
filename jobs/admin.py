"""The job console on the default admin site (the code lives in jobs/console/).

procrastinate's own job admin is unregistered: it counts every row and lists DISTINCT values of
unindexed columns on each page view. The console adds a dashboard, a queues page, a workers page and
a periodic tasks page beside the models, and lists them first in the "Jobs" section.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.urls import URLPattern, URLResolver, path, reverse
from procrastinate.contrib.django.models import ProcrastinateJob

from jobs.console import flow, pages
from jobs.console.apikeys import ApiKeyAdmin
from jobs.console.jobs import JobRecordAdmin
from jobs.models import ApiKey, JobRecord, WorkerInfo

if admin.site.is_registered(ProcrastinateJob):
    admin.site.unregister(ProcrastinateJob)

admin.site.register(JobRecord, JobRecordAdmin)
admin.site.register(ApiKey, ApiKeyAdmin)


@admin.register(WorkerInfo)
class WorkerInfoAdmin(admin.ModelAdmin):
    """The workers page: WorkerInfo joined with procrastinate's heartbeats and jobs in flight."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_view_permission(self, request: HttpRequest, obj: WorkerInfo | None = None) -> bool:
        return super().has_view_permission(request, obj) or request.user.has_perm("jobs.view_jobrecord")

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        return pages.workers_view(request)


def _console_urls(original: Any) -> Any:
    def get_urls() -> list[URLPattern | URLResolver]:
        ours: list[URLPattern | URLResolver] = [
            path("jobs/dashboard/", admin.site.admin_view(pages.dashboard_view), name="skiplock_dashboard"),
            path("jobs/periodic/", admin.site.admin_view(pages.periodic_view), name="skiplock_periodic"),
            path("jobs/periodic/switch/", admin.site.admin_view(flow.periodic_action_view),
                 name="skiplock_periodic_action"),
            path("jobs/queues/", admin.site.admin_view(flow.queues_view), name="skiplock_queues"),
        ]
        return ours + list(original())

    return get_urls


def _console_app_list(original: Any) -> Any:
    def get_app_list(request: HttpRequest, app_label: str | None = None) -> list[dict[str, Any]]:
        apps = original(request, app_label)
        if not (request.user.has_perm("jobs.view_jobrecord") or request.user.has_perm("jobs.change_jobrecord")):
            return apps
        for app in apps:
            if app["app_label"] == "jobs":
                pages_first = [
                    {"name": "Dashboard", "object_name": "Dashboard", "admin_url": reverse("admin:skiplock_dashboard"),
                     "add_url": None, "view_only": True, "perms": {"view": True}},
                    {"name": "Queues", "object_name": "Queues", "admin_url": reverse("admin:skiplock_queues"),
                     "add_url": None, "view_only": True, "perms": {"view": True}},
                    {"name": "Periodic tasks", "object_name": "Periodic", "admin_url": reverse("admin:skiplock_periodic"),
                     "add_url": None, "view_only": True, "perms": {"view": True}},
                ]
                app["models"] = pages_first + app["models"]
        return apps

    return get_app_list


# The default site is the project's (project/urls.py mounts admin.site.urls); extend it in place.
admin.site.get_urls = _console_urls(admin.site.get_urls)  # type: ignore[method-assign]
admin.site.get_app_list = _console_app_list(admin.site.get_app_list)  # type: ignore[method-assign]
admin.site.site_header = "Skiplock"
admin.site.site_title = "Skiplock job console"
admin.site.index_title = "Job console"
