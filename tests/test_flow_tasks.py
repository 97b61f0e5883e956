"""Flow control a task or a start asks for: unique starts, snooze, discard and expiry (issue 15)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection, connections, transaction

from jobs import services, transitions
from jobs.flow import ConcurrencyLimit, RateLimit, Unique
from jobs.models import JobAttempt, JobRecord, TaskLimit
from jobs.registry import task
from jobs.testing import run_jobs
from tests import flow_tasks
from tests.core_fixtures import wait_for_state

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def flow_tables(transactional_db: None) -> Iterator[None]:
    flow_tasks.empty_tables()
    yield
    flow_tasks.empty_tables()


def outcomes(job_id: int) -> list[str]:
    return list(JobAttempt.objects.filter(job_id=job_id).order_by("number").values_list("outcome", flat=True))


# --- unique starts ---------------------------------------------------------------------------------

def test_50_concurrent_unique_starts_of_the_same_arguments_create_exactly_one_job() -> None:
    barrier = threading.Barrier(50)
    answers: list[tuple[int, bool]] = []
    errors: list[BaseException] = []

    def start(n: int) -> None:
        try:
            barrier.wait(timeout=30)
            job = services.job_defer(task_name="tests.flow.sync_account", args={"account_id": 42, "full": n % 2 == 0})
            answers.append((job.job_id, job.created))
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=start, args=(n,)) for n in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert len(answers) == 50
    assert len({job_id for job_id, _ in answers}) == 1
    assert sorted(created for _, created in answers) == [False] * 49 + [True]
    assert JobRecord.objects.filter(task_name="tests.flow.sync_account").count() == 1


def test_a_unique_start_inside_a_transaction_holds_its_place_until_commit_and_leaves_nothing_on_rollback() -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        services.job_defer(task_name="tests.flow.sync_account", args={"account_id": 1})
        raise RuntimeError("the caller's work failed")
    assert not JobRecord.objects.exists()
    first = services.job_defer(task_name="tests.flow.sync_account", args={"account_id": 1})
    assert first.created


def test_unique_covers_the_chosen_states_and_period_only() -> None:
    first = services.job_defer(task_name="tests.flow.sync_account", args={"account_id": 5})
    assert services.job_defer(task_name="tests.flow.sync_account", args={"account_id": 5, "full": True}).job_id == first.job_id
    assert services.job_defer(task_name="tests.flow.sync_account", args={"account_id": 6}).created
    run_jobs(queues=["ftest"])
    assert JobRecord.objects.get(pk=first.job_id).state == "succeeded"
    # Finished: no longer waiting or running, so the next start is a new job.
    assert services.job_defer(task_name="tests.flow.sync_account", args={"account_id": 5}).created
    # A start can ask for its own rule: here, any state within an hour — the finished one counts.
    again = services.job_defer(task_name="tests.flow.plain_call", args={"n": 1},
                               unique=Unique(period=3600, states=("todo", "doing", "succeeded")))
    run_jobs(queues=["ftest"])
    same = services.job_defer(task_name="tests.flow.plain_call", args={"n": 1},
                              unique=Unique(period=3600, states=("todo", "doing", "succeeded")))
    assert (same.job_id, same.created) == (again.job_id, False)
    other = services.job_defer(task_name="tests.flow.plain_call", args={"n": 2},
                               unique=Unique(period=3600, states=("todo", "doing", "succeeded")))
    assert other.created


def test_a_batch_holding_the_same_unique_job_twice_starts_it_once() -> None:
    jobs = services.job_defer_batch(requests=[
        services.DeferRequest(task_name="tests.flow.sync_account", args={"account_id": 9}),
        services.DeferRequest(task_name="tests.flow.sync_account", args={"account_id": 9, "full": True}),
    ])
    assert jobs[0].job_id == jobs[1].job_id
    assert [j.created for j in jobs] == [True, False]
    assert JobRecord.objects.count() == 1


def test_bad_flow_declarations_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="concurrency limit must be an integer from 1"):
        ConcurrencyLimit(0)
    with pytest.raises(ValueError, match="rate limit's period"):
        RateLimit(5, per=0)
    with pytest.raises(ValueError, match="unique states must be job states"):
        Unique(states=("waiting",))

    def call(*, a: int) -> int:
        return a

    with pytest.raises(ValueError, match="not an argument of the task"):
        task(name="tests.flow.bad_key", concurrency=ConcurrencyLimit(2, key="{nope}"))(call)
    with pytest.raises(ValueError, match="must use the same key"):
        task(name="tests.flow.bad_keys", concurrency=ConcurrencyLimit(2, key="{a}"), rate_limit=RateLimit(5, per=1))(call)


def test_a_limited_start_records_its_key_and_the_declared_numbers() -> None:
    job = services.job_defer(task_name="tests.flow.partner_call", args={"partner_id": 3})
    assert JobRecord.objects.get(pk=job.job_id).limit_key == "tests.flow.partner_call:partner:3"
    limit = TaskLimit.objects.get(key="tests.flow.partner_call:partner:3")
    assert (limit.task_name, limit.concurrency, limit.rate_limit) == ("tests.flow.partner_call", 3, None)


# --- snooze, discard -------------------------------------------------------------------------------

def test_snooze_reschedules_without_spending_an_attempt() -> None:
    job = services.job_defer(task_name="tests.flow.snoozer", args={"times": 2, "seconds": 0.2})
    run_jobs(queues=["ftest"], include_scheduled=True)
    record = JobRecord.objects.get(pk=job.job_id)
    assert record.state == "succeeded"
    # Three runs, one attempt: the task saw attempt 1 each time, and its policy (no retry) never
    # came into it.
    assert record.result == {"runs": 3, "attempt": 1}
    assert record.attempts == 1
    assert outcomes(job.job_id) == ["snoozed", "snoozed", "succeeded"]


def test_a_snoozed_job_waits_out_its_time() -> None:
    job = services.job_defer(task_name="tests.flow.snoozer", args={"times": 1, "seconds": 3600})
    run_jobs(queues=["ftest"])
    record = JobRecord.objects.get(pk=job.job_id)
    assert record.state == "todo"
    assert record.display_state == "scheduled"
    assert record.scheduled_at is not None
    assert record.scheduled_at > dt.datetime.now(dt.UTC) + dt.timedelta(minutes=59)
    assert record.attempts == 0


def test_discard_ends_the_job_in_its_own_state_with_the_reason_and_no_retry() -> None:
    job = services.job_defer(task_name="tests.flow.discarder", args={"reason": "the order was cancelled"})
    run_jobs(queues=["ftest"], include_scheduled=True)
    record = JobRecord.objects.get(pk=job.job_id)
    assert (record.state, record.error_type, record.error_message) == (
        "discarded", "Discard", "the order was cancelled")
    assert record.finished_at is not None
    assert outcomes(job.job_id) == ["discarded"]
    # An operator may still run it again.
    assert services.job_retry(job_id=job.job_id) == "todo"


# --- expiry ----------------------------------------------------------------------------------------

def test_an_expired_job_is_never_run_and_ends_expired() -> None:
    job = services.job_defer(task_name="tests.flow.plain_call", args={"n": 1}, expires_in=0.3)
    fresh = services.job_defer(task_name="tests.flow.plain_call", args={"n": 2},
                               expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    time.sleep(0.4)
    assert JobRecord.objects.get(pk=job.job_id).display_state == "expired"  # before the sweep, too
    run_jobs(queues=["ftest"])
    assert JobRecord.objects.get(pk=fresh.job_id).state == "succeeded"
    assert JobRecord.objects.get(pk=job.job_id).state == "todo"  # skipped by every claim
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM ftest_spans WHERE job_id = %s", [job.job_id])
        assert cursor.fetchone()[0] == 0
    assert transitions.expire_jobs() == 1
    record = JobRecord.objects.get(pk=job.job_id)
    assert (record.state, record.error_type) == ("expired", "JobExpired")
    assert record.finished_at is not None
    assert transitions.expire_jobs() == 0


@pytest.mark.parametrize(("fields", "field"), [
    ({"expires_in": -1}, "expires_in"),
    ({"expires_at": dt.datetime(2020, 1, 1, tzinfo=dt.UTC)}, "expires_at"),
    ({"expires_at": dt.datetime(2030, 1, 1)}, "expires_at"),
    ({"expires_in": 5, "expires_at": dt.datetime(2030, 1, 1, tzinfo=dt.UTC)}, "expires_at"),
])
def test_a_bad_expiry_is_refused_and_starts_nothing(fields: dict[str, Any], field: str) -> None:
    from jobs.exceptions import InvalidArguments

    with pytest.raises(InvalidArguments) as caught:
        services.job_defer(task_name="tests.flow.plain_call", args={"n": 1}, **fields)
    assert caught.value.details[0]["field"] == field
    assert not JobRecord.objects.exists()


def test_a_waiting_job_can_change_priority_and_run_time_and_nothing_else_can() -> None:
    job = services.job_defer(task_name="tests.flow.plain_call", args={"n": 1})
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    transitions.job_change(job_id=job.job_id, priority=7, run_at=later)
    record = JobRecord.objects.get(pk=job.job_id)
    assert (record.priority, record.display_state) == (7, "scheduled")
    transitions.job_change(job_id=job.job_id, run_at=None)
    assert JobRecord.objects.get(pk=job.job_id).display_state == "todo"
    from jobs.exceptions import InvalidArguments, InvalidTransition

    with pytest.raises(InvalidArguments):
        transitions.job_change(job_id=job.job_id, priority=10_000)
    run_jobs(queues=["ftest"])
    with pytest.raises(InvalidTransition):
        transitions.job_change(job_id=job.job_id, priority=1)
    assert JobRecord.objects.get(pk=job.job_id).priority == 7
    wait_for_state(job.job_id, "succeeded")
