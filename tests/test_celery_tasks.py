"""Celery-style task modules (jobs.celery) run unchanged on the real worker and real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator

import pytest

from jobs import transitions
from jobs.celery import (
    AsyncResult,
    MaxRetriesExceededError,
    Task,
    TaskRevokedError,
    TimeoutError,
    shared_task,
)
from jobs.models import JobAttempt, JobRecord
from jobs.registry import get_task
from jobs.testing import run_jobs
from tests import celery_tasks, core_fixtures
from tests.core_fixtures import wait_for_state, worker_in_background

pytestmark = pytest.mark.django_db(transaction=True)
clean_queue = core_fixtures.clean_queue


@pytest.fixture(autouse=True)
def fresh_task_state() -> Iterator[None]:
    celery_tasks.release.clear()
    celery_tasks.calls.clear()
    yield
    celery_tasks.release.set()  # never leave a worker thread waiting


def record(result: AsyncResult) -> JobRecord:
    return JobRecord.objects.get(pk=int(result.id))


def waited(job: JobRecord, since: dt.datetime) -> dt.timedelta:
    """How long after `since` the job is scheduled to run."""
    assert job.scheduled_at is not None
    return job.scheduled_at - since


def wait_for_celery_state(result: AsyncResult, state: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while result.state != state:
        assert time.monotonic() < deadline, f"job {result.id} never reached {state}: {result.state}"
        time.sleep(0.02)


def test_delay_stores_positional_arguments_in_order_and_the_result_reads_like_celery() -> None:
    result = celery_tasks.add.delay(2, y=3)
    assert isinstance(result, AsyncResult)
    assert record(result).args == {"__args__": [2], "y": 3}
    assert (result.state, result.status, result.ready(), result.result, result.info) == (
        "PENDING", "PENDING", False, None, None)
    run_jobs()
    assert (result.state, result.ready(), result.successful(), result.failed()) == ("SUCCESS", True, True, False)
    assert result.result == result.info == result.get(timeout=1) == 5
    assert result.traceback is None
    assert (result.name, result.args, result.kwargs) == ("tests.celery_tasks.add", [2], {"y": 3})


def test_a_bound_task_sees_its_request_and_takes_positional_star_args_and_star_kwargs() -> None:
    result = celery_tasks.whoami.apply_async(args=[1, 2, 3, 4], kwargs={"colour": "red"})
    assert record(result).queue_name == "celery-tests"
    run_jobs(queues=["celery-tests"])
    assert result.get(timeout=1) == {
        "id": result.id, "retries": 0, "args": [1, 2, 3, 4], "kwargs": {"colour": "red"},
        "seen": [1, 2, [3, 4], {"colour": "red"}],
    }


def test_hints_are_validated_where_they_exist_star_args_included() -> None:
    from jobs.exceptions import InvalidArguments

    with pytest.raises(InvalidArguments, match=r"names\.1"):
        celery_tasks.typed.delay(1, "a", 2)
    with pytest.raises(InvalidArguments, match="missing a required argument: 'count'"):
        celery_tasks.typed.delay()
    result = celery_tasks.typed.delay("3", "a", "b", dry_run=True)
    assert record(result).args == {"__args__": [3, "a", "b"], "dry_run": True}
    run_jobs()
    assert result.get(timeout=1) == {"count": 3, "names": ["a", "b"], "flags": {"dry_run": True}}


def test_update_state_sets_a_custom_state_and_meta_that_drive_the_progress_bar() -> None:
    result = celery_tasks.build.delay(7)
    with worker_in_background():
        wait_for_celery_state(result, "BUILDING")
        assert result.info == result.result == {"project_id": 7, "current": 1, "total": 4}
        job = record(result)
        assert (job.state, job.custom_state, job.progress) == ("doing", "BUILDING", 25)
        assert not result.ready()
        celery_tasks.release.set()
        assert result.get(timeout=15) == {"project_id": 7, "built": True}
    job = record(result)
    assert (job.state, job.custom_state) == ("succeeded", "")  # a label on a running job only
    assert result.state == "SUCCESS"


def test_retry_with_an_exponential_countdown_waits_in_retry_then_succeeds() -> None:
    result = celery_tasks.flaky.delay(2)
    before = dt.datetime.now(dt.UTC)
    run_jobs()
    job = record(result)
    assert result.state == "RETRY"
    assert job.display_state == "retrying"
    assert dt.timedelta(seconds=55) < waited(job, before) < dt.timedelta(seconds=65)
    assert isinstance(result.info, Exception)
    assert "RateLimited" in str(result.info)
    run_jobs()  # not due yet: nothing runs
    assert celery_tasks.calls == [0]
    run_jobs(include_scheduled=True)
    assert result.get(timeout=1) == {"retries": 2}
    assert celery_tasks.calls == [0, 1, 2]
    assert [a.outcome for a in JobAttempt.objects.filter(job_id=job.job_id)] == ["retried", "retried", "succeeded"]


def test_the_second_backoff_doubles() -> None:
    result = celery_tasks.flaky.delay(5)
    run_jobs()
    job = record(result)
    from jobs.transitions import make_runnable_now

    make_runnable_now()
    before = dt.datetime.now(dt.UTC)
    run_jobs()
    job = record(result)
    assert job.attempts == 2
    assert dt.timedelta(seconds=115) < waited(job, before) < dt.timedelta(seconds=125)


def test_max_retries_is_honoured_and_the_last_error_is_the_tasks_exception() -> None:
    result = celery_tasks.flaky.delay(10)
    run_jobs(include_scheduled=True)
    assert celery_tasks.calls == [0, 1, 2, 3]  # max_retries=3: four attempts
    assert result.state == "FAILURE"
    assert result.failed()
    assert result.ready()
    assert not result.successful()
    error = result.result
    assert type(error) is celery_tasks.RateLimited
    assert str(error) == "attempt 4"
    assert "RateLimited: attempt 4" in (result.traceback or "")
    with pytest.raises(celery_tasks.RateLimited, match="attempt 4"):
        result.get(timeout=1)
    assert isinstance(result.get(timeout=1, propagate=False), celery_tasks.RateLimited)


def test_retry_without_exc_past_max_retries_raises_max_retries_exceeded() -> None:
    result = celery_tasks.give_up.delay()
    run_jobs(include_scheduled=True)
    assert result.state == "FAILURE"
    assert record(result).attempts == 2
    with pytest.raises(MaxRetriesExceededError, match=r"Can't retry tests.celery_tasks.give_up\["):
        result.get(timeout=1)


def test_retry_without_countdown_waits_default_retry_delay() -> None:
    result = celery_tasks.retry_default_delay.delay()
    before = dt.datetime.now(dt.UTC)
    run_jobs()
    assert dt.timedelta(seconds=40) < waited(record(result), before) < dt.timedelta(seconds=50)
    run_jobs(include_scheduled=True)
    assert result.get(timeout=1) == "second time"


def test_an_exception_outside_autoretry_for_is_not_retried() -> None:
    result = celery_tasks.broken.delay("missing")
    run_jobs(include_scheduled=True)
    assert (result.state, record(result).attempts) == ("FAILURE", 1)  # Celery retries only when asked
    with pytest.raises(KeyError):
        result.get(timeout=1)


def test_autoretry_for_with_retry_backoff_retries_until_max_retries() -> None:
    result = celery_tasks.auto.delay(1)
    before = dt.datetime.now(dt.UTC)
    run_jobs()
    # retry_backoff=True: 1 s, 2 s, 4 s… (no jitter here)
    assert dt.timedelta(seconds=0) < waited(record(result), before) < dt.timedelta(seconds=3)
    run_jobs(include_scheduled=True)
    assert result.get(timeout=1) == 2
    celery_tasks.calls.clear()
    doomed = celery_tasks.auto.delay(10)
    run_jobs(include_scheduled=True)
    assert (doomed.state, record(doomed).attempts) == ("FAILURE", 3)
    assert type(doomed.result) is celery_tasks.RateLimited


def test_revoke_terminate_stops_a_running_task_even_when_it_catches_exception() -> None:
    result = celery_tasks.swallow_everything.delay(20)
    with worker_in_background():
        wait_for_celery_state(result, "WORKING")
        result.revoke(terminate=True)
        wait_for_state(int(result.id), "aborted", timeout=15)
    assert result.state == "REVOKED"
    assert record(result).result is None  # it did not get to return its failure dict
    with pytest.raises(TaskRevokedError):
        result.get(timeout=1)


def test_revoke_of_a_waiting_task_cancels_it() -> None:
    result = celery_tasks.add.apply_async((1, 2), countdown=600)
    assert record(result).display_state == "scheduled"
    result.revoke()
    assert (result.state, result.ready(), result.successful()) == ("REVOKED", True, False)
    assert isinstance(result.result, TaskRevokedError)


def test_a_hard_time_limit_stops_a_task_that_catches_exception() -> None:
    result = celery_tasks.runaway.delay()
    run_jobs()
    job = record(result)
    assert result.state == "FAILURE"
    assert job.result is None
    assert job.error_type == "HardTimeLimitExceeded"
    assert [a.outcome for a in JobAttempt.objects.filter(job_id=job.job_id)] == ["timed_out"]


def test_an_expired_job_is_not_run_and_ends_revoked() -> None:
    result = celery_tasks.add.apply_async((1, 1), expires=0.05)
    time.sleep(0.1)
    run_jobs()
    assert record(result).display_state == "expired"  # skipped by the claim, never run
    assert result.state == "REVOKED"
    transitions.expire_jobs()  # the maintenance tick stores it
    job = record(result)
    assert (job.state, job.error_type) == ("expired", "JobExpired")
    assert result.state == "REVOKED"
    fresh = celery_tasks.add.apply_async((1, 1), expires=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    run_jobs()
    assert fresh.get(timeout=1) == 2


def test_get_times_out_on_a_job_nobody_runs() -> None:
    result = celery_tasks.add.delay(1, 1)
    with pytest.raises(TimeoutError, match="timed out"):
        result.get(timeout=0.2)
    assert AsyncResult("12345678901").state == "PENDING"  # unknown ids are PENDING, as in Celery
    assert AsyncResult("not-a-job").state == "PENDING"


def test_apply_async_places_the_job_as_asked() -> None:
    eta = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    result = celery_tasks.add.apply_async((1, 2), eta=eta, queue="celery-tests", priority=7)
    job = record(result)
    assert (job.queue_name, job.priority, job.scheduled_at) == ("celery-tests", 7, eta)
    later = celery_tasks.add.apply_async(kwargs={"x": 1, "y": 2}, countdown=30)
    assert record(later).args == {"x": 1, "y": 2}
    with pytest.raises(TypeError, match="link"):
        celery_tasks.add.apply_async((1, 2), link=None)


def test_signatures_start_jobs_with_their_arguments() -> None:
    partial = celery_tasks.add.s(2)
    started = partial.delay(5)  # mutable: new arguments come first, as in Celery
    assert record(started).args == {"__args__": [5, 2]}
    frozen = celery_tasks.add.si(1, 1).set(queue="celery-tests")
    assert record(frozen.delay(99)).args == {"__args__": [1, 1]}
    assert partial(3) == 5  # calling a signature runs the function here
    run_jobs(queues=["default", "celery-tests"])
    assert started.get(timeout=1) == 7


def test_an_async_task_reports_its_custom_state_and_returns() -> None:
    result = celery_tasks.async_steps.delay(4)
    run_jobs(queues=["celery-tests"])
    assert result.get(timeout=1) == 8
    assert record(result).meta == {"current": 1, "total": 4}


def test_celery_options_are_supported_accepted_as_no_ops_or_refused_by_name() -> None:
    assert celery_tasks.quiet.ignored_options.keys() == {"ignore_result", "acks_late", "track_started"}
    with pytest.raises(TypeError, match="rate_limit"):
        shared_task(rate_limit="10/m")(lambda: None)
    with pytest.raises(TypeError, match="unknown Celery task option"):
        shared_task(colour="red")(lambda: None)
    spec = get_task("tests.celery_tasks.flaky")
    assert spec.retry.describe()["retry_on"] == ["Retry"]
    assert isinstance(celery_tasks.flaky, Task)
    assert celery_tasks.add(2, 3) == 5  # calling the task runs it here, as in Celery


def test_retry_and_request_outside_a_job() -> None:
    assert celery_tasks.whoami.request.called_directly
    with pytest.raises(RuntimeError, match="while the task runs as a job"):
        celery_tasks.flaky.retry()


def test_delay_joins_the_callers_transaction() -> None:
    from django.db import transaction

    with pytest.raises(RuntimeError), transaction.atomic():
        rolled_back = celery_tasks.add.delay(1, 2)
        raise RuntimeError("roll back")
    assert not JobRecord.objects.filter(pk=int(rolled_back.id)).exists()
    assert rolled_back.state == "PENDING"  # an id nobody knows, as Celery says of unknown ids
    with transaction.atomic():
        kept = celery_tasks.add.delay(1, 2)
    run_jobs()
    assert kept.get(timeout=1) == 3


def test_a_soft_time_limit_is_celerys_catchable_exception() -> None:
    from jobs.celery import SoftTimeLimitExceeded, TimeLimitExceeded

    assert issubclass(SoftTimeLimitExceeded, Exception)
    assert not issubclass(TimeLimitExceeded, Exception)
    result = celery_tasks.cleans_up.delay()
    run_jobs()
    assert result.get(timeout=1) == "cleaned up"


def test_a_hard_time_limit_stops_a_task_that_swallows_every_exception_in_its_loop() -> None:
    result = celery_tasks.stubborn.delay()
    run_jobs()
    job = record(result)
    assert (job.state, job.error_type, job.result) == ("failed", "HardTimeLimitExceeded", None)
    assert [a.outcome for a in JobAttempt.objects.filter(job_id=job.job_id)] == ["timed_out"]
