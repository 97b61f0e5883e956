"""Services against real PostgreSQL with the real worker path (jobs.testing.run_jobs)."""

from __future__ import annotations

import datetime as dt
import itertools
import threading
from typing import Any

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from jobs import services
from jobs.exceptions import (
    AlreadyQueued,
    IdempotencyConflict,
    InvalidArguments,
    InvalidTransition,
    JobNotFound,
    TaskNotFound,
)
from jobs.models import JobAttempt, JobRecord
from jobs.testing import run_jobs
from tests import core_fixtures
from tests.core_fixtures import wait_for_state, worker_in_background

pytestmark = pytest.mark.django_db(transaction=True)
clean_queue = core_fixtures.clean_queue

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


# --- locks, idempotency, batches, transitions (test tasks from tests/core_fixtures.py) ----------


def test_a_queueing_lock_allows_one_waiting_job_per_key() -> None:
    first = services.job_defer(task_name="tests.core.unique", args={"key": "a"})
    with pytest.raises(AlreadyQueued, match="already waiting"):
        services.job_defer(task_name="tests.core.unique", args={"key": "a"})
    other_key = services.job_defer(task_name="tests.core.unique", args={"key": "b"})
    # The refused start poisoned nothing: the caller's transaction goes on.
    with transaction.atomic():
        with pytest.raises(AlreadyQueued):
            services.job_defer(task_name="tests.core.unique", args={"key": "a"})
        inside = services.job_defer(task_name="tests.core.unique", args={"key": "c"})
    assert JobRecord.objects.filter(pk=inside.job_id).exists()
    run_jobs(queues=["core-tests"])
    # Once the waiting job ran, the key is free again.
    again = services.job_defer(task_name="tests.core.unique", args={"key": "a"})
    assert again.job_id not in (first.job_id, other_key.job_id)


def test_retrying_a_failed_job_whose_queueing_lock_is_taken_gives_up_the_key() -> None:
    failed = services.job_defer(task_name="tests.core.unique", args={"key": "k", "fail": True})
    run_jobs(queues=["core-tests"])
    assert JobRecord.objects.get(pk=failed.job_id).state == "failed"
    waiting = services.job_defer(task_name="tests.core.unique", args={"key": "k"})
    # procrastinate alone raises a unique violation here (procrastinate#1543).
    assert services.job_retry(job_id=failed.job_id) == "todo"
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, queueing_lock FROM procrastinate_jobs ORDER BY id")
        assert cursor.fetchall() == [(failed.job_id, None), (waiting.job_id, "unique-k")]


def test_an_automatic_retry_never_collides_with_a_waiting_job_of_its_queueing_lock() -> None:
    first = services.job_defer(task_name="tests.core.unique_slow", args={"key": "k", "hold": 0.5})
    # include_scheduled: the worker keeps going until the 0.1 s retry has run, whatever the timing.
    with worker_in_background(queues=["core-tests"], include_scheduled=True):
        wait_for_state(first.job_id, "doing")
        second = services.job_defer(task_name="tests.core.unique_slow", args={"key": "k", "hold": 0})
    # The first attempt failed while the second job waited: the retry still happened.
    assert [a.outcome for a in JobAttempt.objects.filter(job_id=first.job_id)] == ["retried", "succeeded"]
    assert JobRecord.objects.get(pk=second.job_id).state == "succeeded"


def test_jobs_sharing_a_lock_never_overlap_even_with_two_workers_slots() -> None:
    for label in "abc":
        services.job_defer(task_name="tests.core.locked", args={"resource": "db", "hold": 0.3, "label": label})
    # A job on another resource may run beside them: this shows that concurrency 2 is real.
    services.job_defer(task_name="tests.core.locked", args={"resource": "other", "hold": 0.3, "label": "x"})
    run_jobs(queues=["core-tests"], concurrency=2)
    results: list[dict[str, Any]] = [
        r.result or {} for r in JobRecord.objects.filter(task_name="tests.core.locked", state="succeeded")
    ]
    assert len(results) == 4
    same = sorted((r for r in results if r["resource"] == "db"), key=lambda r: r["started"])
    for before, after in itertools.pairwise(same):
        assert before["finished"] <= after["started"], (before, after)
    other = next(r for r in results if r["resource"] == "other")
    assert any(r["started"] < other["finished"] and other["started"] < r["finished"] for r in same)


def test_concurrent_starts_with_one_idempotency_key_make_one_job() -> None:
    barrier = threading.Barrier(6)
    answers: list[int] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            barrier.wait()
            job = services.job_defer(task_name="tests.core.echo", args={"value": 3}, idempotency_key="race")
            answers.append(job.job_id)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(answers) == 6
    assert len(set(answers)) == 1
    assert JobRecord.objects.filter(idempotency_key="race").count() == 1
    assert JobRecord.objects.count() == 1


def test_an_idempotency_key_names_one_job_across_tasks_too() -> None:
    services.job_defer(task_name="tests.core.echo", args={"value": 1}, idempotency_key="k")
    with pytest.raises(IdempotencyConflict, match="idempotency key 'k' was used for job"):
        services.job_defer(task_name="tests.core.aecho", args={"value": 1}, idempotency_key="k")
    # Arguments are compared after validation: the same values, written differently, match.
    same = services.job_defer(task_name="tests.core.echo", args={"value": "1"}, idempotency_key="k")
    assert not same.created


def test_batch_defer_inserts_any_number_of_jobs_in_one_statement() -> None:
    def statements(count: int) -> list[str]:
        requests = [services.DeferRequest(task_name="tests.core.echo", args={"value": i}) for i in range(count)]
        with CaptureQueriesContext(connection) as queries:
            jobs = services.job_defer_batch(requests=requests)
        assert len(jobs) == count
        control = ("BEGIN", "COMMIT", "SAVEPOINT", "RELEASE SAVEPOINT")
        return [q["sql"] for q in queries.captured_queries if not q["sql"].startswith(control)]

    one, many = statements(1), statements(500)
    assert len(one) == len(many) == 1
    # The queue rows and their side rows, in the one statement (no trigger writes the side rows).
    assert "INSERT INTO procrastinate_jobs" in many[0]
    assert "INSERT INTO skiplock_job" in many[0]
    assert JobRecord.objects.filter(task_name="tests.core.echo").count() == 501


def test_a_batch_joins_the_callers_transaction() -> None:
    requests = [services.DeferRequest(task_name="tests.core.echo", args={"value": i}) for i in range(3)]
    with pytest.raises(RuntimeError), transaction.atomic():
        services.job_defer_batch(requests=requests)
        raise RuntimeError("roll back")
    assert JobRecord.objects.count() == 0


def test_transitions_in_the_wrong_state_name_the_real_state() -> None:
    job = services.job_defer(task_name="tests.core.echo")
    for action in (services.job_retry, services.job_run_now):
        with pytest.raises(InvalidTransition) as excinfo:
            action(job_id=job.job_id)
        assert excinfo.value.state == "todo"
    run_jobs(queues=["core-tests"])
    for action in (services.job_cancel, services.job_abort, services.job_retry, services.job_run_now):
        with pytest.raises(InvalidTransition) as excinfo:
            action(job_id=job.job_id)
        assert excinfo.value.state == "succeeded"
        assert excinfo.value.message.endswith(f"job {job.job_id}: it is succeeded")
    with pytest.raises(JobNotFound):
        services.job_cancel(job_id=10**12)


def test_aborting_a_waiting_job_cancels_it() -> None:
    job = services.job_defer(task_name="tests.core.echo")
    assert services.job_abort(job_id=job.job_id) == "cancelled"
    assert JobRecord.objects.get(pk=job.job_id).state == "cancelled"
    assert run_jobs(queues=["core-tests"]) == 0


def test_deleting_a_running_job_is_refused_and_a_finished_one_goes_with_its_history() -> None:
    job = services.job_defer(task_name="tests.core.wait_for_abort", args={"timeout": 20})
    with worker_in_background(queues=["core-tests"]):
        wait_for_state(job.job_id, "doing")
        with pytest.raises(InvalidTransition) as excinfo:
            services.job_delete(job_id=job.job_id)
        assert excinfo.value.state == "doing"
        services.job_abort(job_id=job.job_id)
    services.job_delete(job_id=job.job_id)
    assert not JobRecord.objects.filter(pk=job.job_id).exists()
    assert not JobAttempt.objects.filter(job_id=job.job_id).exists()
    with pytest.raises(JobNotFound):
        services.job_delete(job_id=job.job_id)


def test_run_now_makes_a_scheduled_job_runnable() -> None:
    later = services.job_defer(task_name="tests.core.echo", delay_seconds=3600)
    record = JobRecord.objects.get(pk=later.job_id)
    assert record.display_state == "scheduled"
    assert run_jobs(queues=["core-tests"]) == 0
    assert services.job_run_now(job_id=later.job_id) == "todo"
    assert JobRecord.objects.get(pk=later.job_id).display_state == "todo"
    assert run_jobs(queues=["core-tests"]) == 1
    assert JobRecord.objects.get(pk=later.job_id).state == "succeeded"


def test_run_at_needs_a_time_zone_and_cannot_come_with_a_delay() -> None:
    with pytest.raises(InvalidArguments, match="must include a time zone"):
        services.job_defer(task_name="tests.core.echo", run_at=dt.datetime(2030, 1, 1))
    with pytest.raises(InvalidArguments, match="not both"):
        services.job_defer(task_name="tests.core.echo", run_at=dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
                           delay_seconds=5)
    soon = dt.datetime(dt.datetime.now(dt.UTC).year + 1, 1, 1, tzinfo=dt.UTC)  # within the 366 days allowed
    at = services.job_defer(task_name="tests.core.echo", run_at=soon)
    assert JobRecord.objects.get(pk=at.job_id).scheduled_at == soon


def test_nul_characters_are_refused_before_they_reach_postgresql() -> None:
    with pytest.raises(InvalidArguments, match="idempotency_key: cannot hold NUL characters"):
        services.job_defer(task_name="tests.core.echo", idempotency_key="a\x00")
    with pytest.raises(InvalidArguments, match="'label': text cannot hold NUL characters"):
        services.job_defer(task_name="tests.core.echo", args={"label": "a\x00"})
    assert JobRecord.objects.count() == 0
