"""Reads shared by the API, the admin, the pages, the commands and the metrics."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.db import connection

from jobs.exceptions import JobNotFound
from jobs.models import JobAttempt, JobRecord


def job_get(*, job_id: int) -> JobRecord:
    record = JobRecord.objects.filter(pk=job_id).first()
    if record is None:
        raise JobNotFound(f"no job has id {job_id}")
    return record


def job_attempts(*, job_id: int) -> list[JobAttempt]:
    return list(JobAttempt.objects.filter(job_id=job_id).order_by("number"))


def job_events(*, job_id: int) -> list[dict[str, Any]]:
    """procrastinate's event timeline of a job (deferred, started, retried, failed, …)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT type::text, at FROM procrastinate_events WHERE job_id = %s ORDER BY at, id", [job_id]
        )
        return [{"type": row[0], "at": row[1]} for row in cursor.fetchall()]


def job_max_attempts(record: JobRecord) -> int | None:
    from jobs.registry import find_task

    spec = find_task(record.task_name)
    return spec.retry.max_attempts if spec else None


def time_since(moment: dt.datetime | None) -> float | None:
    if moment is None:
        return None
    return (dt.datetime.now(dt.UTC) - moment).total_seconds()
