"""The task context, in sync and async tasks, through the real worker path on real PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from jobs import services
from jobs.models import JobAttempt, JobRecord
from jobs.testing import run_jobs
from tests import core_fixtures
from tests.core_fixtures import drain, wait_for_state, worker_in_background

listener = core_fixtures.listener
write_counter = core_fixtures.write_counter

pytestmark = pytest.mark.django_db(transaction=True)
clean_queue = core_fixtures.clean_queue


@pytest.mark.parametrize("task_name", ["tests.core.echo", "tests.core.aecho"])
def test_sync_and_async_tasks_see_their_job_id_attempt_and_task_name(task_name: str) -> None:
    job = services.job_defer(task_name=task_name, args={"value": 7})
    assert run_jobs(queues=["core-tests"]) == 1
    record = JobRecord.objects.get(pk=job.job_id)
    assert record.state == "succeeded"
    assert record.result is not None
    assert (record.result["job_id"], record.result["attempt"], record.result["task_name"]) == (
        job.job_id, 1, task_name,
    )
    assert record.result["value"] == 7


@pytest.mark.parametrize("task_name", ["tests.core.progress_storm", "tests.core.aprogress_storm"])
def test_ten_thousand_progress_reports_make_few_writes_and_the_last_value_is_stored(
    task_name: str, write_counter: Callable[[int], int], listener: psycopg.Connection[Any]
) -> None:
    job = services.job_defer(task_name=task_name, args={"calls": 10_000})
    run_jobs(queues=["core-tests"])
    record = JobRecord.objects.get(pk=job.job_id)
    assert record.state == "succeeded"
    assert (record.progress, record.step) == (100, "item 10000")
    writes = write_counter(job.job_id)
    print(f"{task_name}: 10,000 progress reports -> {writes} writes to skiplock_job")
    # Progress is written at most every SKIPLOCK_PROGRESS_INTERVAL (0.1 s) over about 0.5 s,
    # plus the state changes: a handful of writes, not 10,000.
    assert 2 <= writes <= 20, writes
    events = [n for n in drain(listener) if n["id"] == job.job_id]
    progress = [(n["progress"], n["step"]) for n in events if n["event"] == "progress"]
    assert 2 <= len(progress) <= 15, progress
    # The last value reported was announced, then the end of the attempt announced it at 100.
    assert progress[-1] == (99, "item 10000")
    assert (events[-1]["event"], events[-1]["state"], events[-1]["progress"]) == ("state", "succeeded", 100)


def test_a_failing_task_keeps_the_last_progress_it_reported(write_counter: Callable[[int], int]) -> None:
    job = services.job_defer(
        task_name="tests.core.progress_storm", args={"calls": 5000, "spread": 0.2, "fail": True}
    )
    run_jobs(queues=["core-tests"])
    record = JobRecord.objects.get(pk=job.job_id)
    assert (record.state, record.progress, record.step) == ("failed", 99, "item 5000")
    assert record.error_type == "RuntimeError"
    assert write_counter(job.job_id) <= 15


def test_state_changes_and_progress_are_announced_with_notify(listener: psycopg.Connection[Any]) -> None:
    job = services.job_defer(task_name="tests.core.echo", args={"value": 1})
    run_jobs(queues=["core-tests"])
    events = [(n["event"], n["state"], n["progress"]) for n in drain(listener) if n["id"] == job.job_id]
    assert events[0] == ("state", "doing", 0)
    assert ("progress", "doing", 50) in events
    assert events[-1] == ("state", "succeeded", 100)


def test_should_abort_is_cheap_no_database_round_trip() -> None:
    job = services.job_defer(task_name="tests.core.check_abort_often", args={"calls": 100_000})
    run_jobs(queues=["core-tests"])
    result = JobRecord.objects.get(pk=job.job_id).result
    assert result is not None
    # 100,000 calls: a dictionary lookup each (a database round trip would take ~100 s).
    assert result["seconds"] < 2.0, result


def test_aborting_a_running_sync_task_ends_it_aborted() -> None:
    job = services.job_defer(task_name="tests.core.wait_for_abort", args={"timeout": 20})
    with worker_in_background(queues=["core-tests"]):
        wait_for_state(job.job_id, "doing")
        assert services.job_abort(job_id=job.job_id) == "aborting"
        assert JobRecord.objects.get(pk=job.job_id).state == "aborting"
    record = JobRecord.objects.get(pk=job.job_id)
    assert (record.state, record.attempts) == ("aborted", 1)
    assert record.error_type == "JobAborted"
    assert [a.outcome for a in JobAttempt.objects.filter(job_id=job.job_id)] == ["aborted"]


def test_aborting_a_running_async_task_with_a_retry_policy_ends_it_aborted_not_failed() -> None:
    # procrastinate alone would end it `failed`: the cancelled task raises CancelledError, which a
    # retry strategy accepts, and a retry of an abort-requested job is turned into a failure.
    job = services.job_defer(task_name="tests.core.await_abort", args={"timeout": 20})
    with worker_in_background(queues=["core-tests"]):
        wait_for_state(job.job_id, "doing")
        services.job_abort(job_id=job.job_id)
    record = JobRecord.objects.get(pk=job.job_id)
    assert (record.state, record.attempts) == ("aborted", 1)
    assert record.finished_at is not None
    assert [a.outcome for a in JobAttempt.objects.filter(job_id=job.job_id)] == ["aborted"]


def test_current_job_outside_a_job_says_so() -> None:
    from jobs.context import current_job

    with pytest.raises(RuntimeError, match="only available while a Skiplock job runs"):
        current_job()


def test_progress_outside_0_to_100_fails_the_task_with_a_clear_error() -> None:
    job = services.job_defer(task_name="tests.core.bad_progress", args={"percent": 150})
    run_jobs(queues=["core-tests"])
    record = JobRecord.objects.get(pk=job.job_id)
    assert (record.state, record.error_type) == ("failed", "ValueError")
    assert record.error_message == "progress must be a number from 0 to 100, not 150.0"
