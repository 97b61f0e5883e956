"""Builders for the job console tests: users with given permissions, and jobs in given states."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import Permission, User
from django.db import connection

from jobs.models import JobRecord
from jobs.testing import run_jobs

PASSWORD = "console-pass-123"
QUICK_DEPLOY = {"check_interval": 0, "build_megabytes": 1, "health_checks": 1}


def make_user(username: str, *, perms: tuple[str, ...] = (), superuser: bool = False, staff: bool = True) -> User:
    if superuser:
        return User.objects.create_superuser(username, f"{username}@example.com", PASSWORD)
    user = User.objects.create_user(username, f"{username}@example.com", PASSWORD, is_staff=staff)
    for codename in perms:
        app_label, code = codename.split(".")
        user.user_permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=code))
    return user


def insert_jobs(count: int, *, task: str = "deploy_stack", queue: str = "default", status: str = "todo",
                args: dict[str, Any] | None = None) -> list[int]:
    """Rows straight into procrastinate_jobs with their side rows, then moved to `status` the way
    procrastinate would (todo → doing → final), with the timings the writers record."""
    import json

    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args, status) "
            "SELECT %s, %s, %s::jsonb, 'todo' FROM generate_series(1, %s) RETURNING id",
            [queue, task, json.dumps(args or {}), count],
        )
        ids = [row[0] for row in cursor.fetchall()]
        cursor.execute("INSERT INTO skiplock_job (job_id) SELECT unnest(%s::bigint[])", [ids])
        if status != "todo":
            cursor.execute("UPDATE procrastinate_jobs SET status = 'doing' WHERE id = ANY(%s)", [ids])
        if status not in ("todo", "doing"):
            cursor.execute(
                "UPDATE procrastinate_jobs SET status = %s::procrastinate_job_status, attempts = 1, worker_id = NULL "
                "WHERE id = ANY(%s)",
                [status, ids],
            )
            cursor.execute("UPDATE skiplock_job SET started_at = now(), finished_at = now() WHERE job_id = ANY(%s)",
                           [ids])
            cursor.execute(  # counted as the writers count what they end (the counters and the dashboard's rollups)
                "SELECT skiplock_count_ends(array_fill(%s::text, ARRAY[%s]), array_fill(%s::text, ARRAY[%s]), "
                "array_fill(%s::text, ARRAY[%s]), array_fill(%s::text, ARRAY[%s]), array_fill(0.0::float8, ARRAY[%s]))",
                [task, count, queue, count, status if status != "cancelled" else None, count, status, count,
                 count],
            )
    return ids


def failed_deploy_job() -> int:
    """A deploy_stack job that fails for real on its only attempt (a traceback is recorded)."""
    from jobs.services import job_defer

    job = job_defer(task_name="deploy_stack", args={**QUICK_DEPLOY, "fail_at_step": 1, "fail_times": 99})
    run_jobs(include_scheduled=True)
    record = JobRecord.objects.get(pk=job.job_id)
    assert record.state == "failed", record.state
    return job.job_id


# While other areas are mid-change the project URLconf may not import; the console needs only
# the admin, so its tests fall back to an admin-only URLconf (this module) in that case.
def _admin_only_urls() -> list[Any]:
    from django.contrib import admin
    from django.urls import path

    return [path("admin/", admin.site.urls)]


urlpatterns = _admin_only_urls()


def console_urlconf() -> str:
    try:
        import project.urls  # noqa: F401
    except ImportError:
        return "tests.admin_fixtures"
    return "project.urls"
