"""Job records: what Skiplock stores about every job and attempt, written by the real worker."""

from __future__ import annotations

import datetime as dt

import pytest
from django.conf import settings

from jobs import selectors, services
from jobs.models import JobAttempt, JobRecord
from jobs.testing import run_jobs
from tests import core_fixtures

pytestmark = pytest.mark.django_db(transaction=True)
clean_queue = core_fixtures.clean_queue


def test_a_succeeded_job_records_result_progress_timings_attempt_and_worker() -> None:
    before = dt.datetime.now(dt.UTC)
    job = services.job_defer(task_name="tests.core.echo", args={"value": 5, "label": "x"})
    record = JobRecord.objects.get(pk=job.job_id)
    assert (record.state, record.display_state, record.attempts, record.progress) == ("todo", "todo", 0, 0)
    assert record.started_at is None
    assert record.duration is None
    run_jobs(queues=["core-tests"], name="records-worker")
    record = JobRecord.objects.get(pk=job.job_id)
    assert (record.state, record.progress, record.attempts) == ("succeeded", 100, 1)
    assert record.result == {"job_id": job.job_id, "attempt": 1, "task_name": "tests.core.echo",
                             "value": 5, "label": "x", "sync": True}
    assert record.error is None
    assert record.created_at is not None  # the defer statement wrote the side row
    assert record.started_at is not None
    assert record.finished_at is not None
    assert before <= record.created_at <= record.started_at <= record.finished_at
    assert record.duration == record.finished_at - record.started_at
    assert "records-worker" in record.worker_name
    (attempt,) = selectors.job_attempts(job_id=job.job_id)
    assert (attempt.number, attempt.outcome, attempt.worker_name) == (1, "succeeded", record.worker_name)
    assert attempt.finished_at is not None
    events = [e["type"] for e in selectors.job_events(job_id=job.job_id)]
    assert events == ["deferred", "started", "succeeded"]


@pytest.mark.parametrize(("kind", "shown"), [("set", "a set"), ("nan", "a float")])
def test_a_result_that_is_not_json_fails_the_job_with_a_clear_error_and_no_retry(kind: str, shown: str) -> None:
    job = services.job_defer(task_name="tests.core.bad_result", args={"kind": kind})
    run_jobs(queues=["core-tests"], include_scheduled=True)
    record = JobRecord.objects.get(pk=job.job_id)
    # The task's policy is the default (4 attempts): this failure is not one another attempt fixes.
    assert (record.state, record.attempts) == ("failed", 1)
    assert record.result is None
    assert record.error_type == "ResultNotSerializable"
    assert record.error_message.startswith(f"the task returned {shown} that cannot be stored as JSON")
    assert "return dicts, lists, strings, numbers, booleans or None" in record.error_message
    assert [a.outcome for a in selectors.job_attempts(job_id=job.job_id)] == ["failed"]


def test_retries_wait_out_the_backoff_and_every_error_stays_in_the_history() -> None:
    job = services.job_defer(task_name="tests.core.flaky", args={"fail_times": 2})
    run_jobs(queues=["core-tests"])  # only what is runnable now: the first attempt
    record = JobRecord.objects.get(pk=job.job_id)
    assert (record.state, record.display_state, record.attempts) == ("todo", "retrying", 1)
    assert record.scheduled_at is not None
    failed_at = JobAttempt.objects.get(job_id=job.job_id).finished_at
    assert failed_at is not None
    wait = (record.scheduled_at - failed_at).total_seconds()
    assert 0.85 <= wait <= 1.15  # backoff 1 s ± 10 % jitter
    assert (record.error_type, record.error_message) == ("Flaky", "attempt 1 failed (flaky)")
    run_jobs(queues=["core-tests"], include_scheduled=True)
    record = JobRecord.objects.get(pk=job.job_id)
    assert (record.state, record.attempts, record.result) == ("succeeded", 3, 3)
    assert record.error is None  # the last error is cleared by a success; the history keeps them
    attempts = selectors.job_attempts(job_id=job.job_id)
    assert [(a.outcome, a.error_type, a.error_message) for a in attempts] == [
        ("retried", "Flaky", "attempt 1 failed (flaky)"),
        ("retried", "Flaky", "attempt 2 failed (flaky)"),
        ("succeeded", "", ""),
    ]
    assert all("Traceback (most recent call last)" in a.error_traceback for a in attempts[:2])
    events = [e["type"] for e in selectors.job_events(job_id=job.job_id)]
    assert events.count("deferred_for_retry") == 2


@pytest.mark.parametrize("error", ["value", "refused"])
def test_exceptions_outside_the_tasks_retry_list_fail_at_once(error: str) -> None:
    job = services.job_defer(task_name="tests.core.flaky", args={"fail_times": 5, "error": error})
    run_jobs(queues=["core-tests"], include_scheduled=True)
    record = JobRecord.objects.get(pk=job.job_id)
    assert (record.state, record.attempts) == ("failed", 1)
    assert record.error_type in ("ValueError", "ConnectionRefusedError")
    assert "Traceback" in record.error_traceback


def test_results_are_kept_for_the_configured_retention() -> None:
    assert settings.SKIPLOCK_RESULT_RETENTION == 7 * 24 * 3600
