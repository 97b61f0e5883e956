"""Services against real PostgreSQL with the real worker path (jobs.testing.run_jobs)."""

from __future__ import annotations

import pytest
from django.db import transaction

from jobs import services
from jobs.exceptions import IdempotencyConflict, InvalidArguments, InvalidTransition, TaskNotFound
from jobs.models import JobAttempt, JobRecord
from jobs.testing import run_jobs

pytestmark = pytest.mark.django_db(transaction=True)

FAST_DEPLOY = {"check_interval": 0, "build_megabytes": 1, "health_checks": 1}


def test_a_job_deferred_in_a_rolled_back_transaction_never_exists() -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        job = services.job_defer(task_name="optimize_route", args={"points": 10})
        assert JobRecord.objects.filter(pk=job.job_id).exists()
        raise RuntimeError("the business write failed")
    assert not JobRecord.objects.filter(pk=job.job_id).exists()
    assert run_jobs() == 0


def test_a_job_deferred_in_a_committed_transaction_runs() -> None:
    with transaction.atomic():
        job = services.job_defer(task_name="optimize_route", args={"points": 10})
    run_jobs()
    record = JobRecord.objects.get(pk=job.job_id)
    assert record.state == "succeeded"
    assert isinstance(record.result, dict)
    assert record.result["points"] == 10


def test_deploy_failing_twice_at_step_two_succeeds_on_the_third_attempt() -> None:
    job = services.job_defer(
        task_name="deploy_stack", args={**FAST_DEPLOY, "fail_at_step": 2, "fail_times": 2}
    )
    run_jobs(include_scheduled=True)
    record = JobRecord.objects.get(pk=job.job_id)
    assert (record.state, record.attempts, record.progress) == ("succeeded", 3, 100)
    attempts = list(JobAttempt.objects.filter(job_id=job.job_id).order_by("number"))
    assert [a.outcome for a in attempts] == ["retried", "retried", "succeeded"]
    assert all("step 2 (build) failed" in a.error_message for a in attempts[:2])


def test_deploy_failing_every_attempt_ends_failed_after_four_attempts_with_tracebacks() -> None:
    job = services.job_defer(
        task_name="deploy_stack", args={**FAST_DEPLOY, "fail_at_step": 1, "fail_times": 99}
    )
    run_jobs(include_scheduled=True)
    record = JobRecord.objects.get(pk=job.job_id)
    assert (record.state, record.attempts) == ("failed", 4)
    assert record.error_type == "DeployStepFailed"
    attempts = JobAttempt.objects.filter(job_id=job.job_id).order_by("number")
    assert [a.outcome for a in attempts] == ["retried", "retried", "retried", "failed"]
    assert all("Traceback" in a.error_traceback for a in attempts)


def test_unknown_task_and_bad_arguments_are_refused_and_change_nothing() -> None:
    with pytest.raises(TaskNotFound, match="unknown task 'nope'"):
        services.job_defer(task_name="nope")
    with pytest.raises(InvalidArguments) as excinfo:
        services.job_defer(task_name="optimize_route", args={"points": "many", "colour": 1})
    fields = {d["field"] for d in excinfo.value.details}
    assert fields == {"points", "colour"}
    assert "expected: points (int, optional)" in excinfo.value.message
    assert JobRecord.objects.count() == 0


def test_the_same_idempotency_key_returns_the_same_job_and_conflicts_on_other_arguments() -> None:
    first = services.job_defer(task_name="optimize_route", args={"points": 10}, idempotency_key="k1")
    again = services.job_defer(task_name="optimize_route", args={"points": 10}, idempotency_key="k1")
    assert (again.job_id, again.created) == (first.job_id, False)
    with pytest.raises(IdempotencyConflict):
        services.job_defer(task_name="optimize_route", args={"points": 11}, idempotency_key="k1")
    assert JobRecord.objects.count() == 1


def test_cancel_only_applies_to_waiting_jobs() -> None:
    job = services.job_defer(task_name="optimize_route", args={"points": 10})
    assert services.job_cancel(job_id=job.job_id) == "cancelled"
    with pytest.raises(InvalidTransition) as excinfo:
        services.job_cancel(job_id=job.job_id)
    assert excinfo.value.state == "cancelled"
    assert JobRecord.objects.get(pk=job.job_id).finished_at is not None


def test_retrying_a_failed_job_keeps_its_history() -> None:
    job = services.job_defer(task_name="index_document", args={"title": "empty", "text": "   "})
    run_jobs(include_scheduled=True)
    assert JobRecord.objects.get(pk=job.job_id).state == "failed"
    assert services.job_retry(job_id=job.job_id) == "todo"
    with pytest.raises(InvalidTransition):
        services.job_retry(job_id=job.job_id)
    run_jobs(include_scheduled=True)
    # A manual retry grants one more attempt; the four before it stay in the history.
    outcomes = list(JobAttempt.objects.filter(job_id=job.job_id).values_list("outcome", flat=True))
    assert outcomes == ["retried", "retried", "retried", "failed", "failed"]


def test_batch_defer_is_all_or_nothing() -> None:
    good = services.DeferRequest(task_name="optimize_route", args={"points": 10})
    bad = services.DeferRequest(task_name="optimize_route", args={"points": "x"})
    with pytest.raises(InvalidArguments) as excinfo:
        services.job_defer_batch(requests=[good, bad])
    assert excinfo.value.details[0]["field"] == "jobs.1.points"
    assert JobRecord.objects.count() == 0
    jobs = services.job_defer_batch(requests=[good, good])
    assert len({j.job_id for j in jobs}) == 2
