"""The task authoring API: schemas from type hints, policies, the registry's listing."""

from __future__ import annotations

import asyncio
import datetime as dt
import statistics

import pytest
from procrastinate import exceptions as procrastinate_exceptions
from procrastinate.jobs import Job

import tests.core_fixtures  # noqa: F401  (registers the test tasks)
from jobs.exceptions import InvalidArguments, ResultNotSerializable, TaskNotFound
from jobs.registry import (
    DEFAULT_HARD_TIME_LIMIT,
    DEFAULT_SOFT_TIME_LIMIT,
    NO_RETRY,
    RetryPolicy,
    all_tasks,
    get_task,
    task,
)


def test_the_default_retry_policy_is_four_attempts_60_120_240_seconds_with_ten_percent_jitter() -> None:
    policy = RetryPolicy()
    assert policy.max_attempts == 4
    for retry_number, base in ((1, 60), (2, 120), (3, 240)):
        delays = [policy.delay(retry_number) for _ in range(2000)]
        assert min(delays) >= base * 0.9
        assert max(delays) <= base * 1.1
        # Jitter really spreads the retries: not one value, and centred on the base.
        assert statistics.pstdev(delays) > base * 0.03
        assert abs(statistics.mean(delays) - base) < base * 0.02


def test_backoff_is_capped_at_600_seconds_jitter_included() -> None:
    policy = RetryPolicy(max_retries=20)
    for retry_number in (5, 6, 10, 20):  # 60 * 2**4 = 960 > 600
        delays = [policy.delay(retry_number) for _ in range(1000)]
        assert max(delays) <= 600
        assert min(delays) >= 540
    # Large retry numbers do not overflow (procrastinate's own backoff would wait for years).
    assert policy.delay(200) <= 600


def _job(attempts: int) -> Job:
    return Job(id=1, queue="q", lock=None, queueing_lock=None, task_name="t", task_kwargs={},
               attempts=attempts)


def test_the_policy_retries_until_the_last_attempt_then_lets_the_job_fail() -> None:
    policy = RetryPolicy()
    before = dt.datetime.now(dt.UTC)
    decision = policy.get_retry_decision(exception=ValueError("x"), job=_job(attempts=0))
    assert decision is not None
    assert decision.retry_at is not None
    wait = (decision.retry_at - before).total_seconds()
    assert 54 <= wait <= 67
    assert policy.get_retry_decision(exception=ValueError("x"), job=_job(attempts=2)) is not None
    assert policy.get_retry_decision(exception=ValueError("x"), job=_job(attempts=3)) is None


def test_which_exceptions_retry_is_per_task() -> None:
    policy = get_task("tests.core.flaky").retry
    assert policy.should_retry(ConnectionResetError(), attempts_done=1)
    assert not policy.should_retry(ValueError(), attempts_done=1)
    assert not policy.should_retry(ConnectionRefusedError(), attempts_done=1)  # dont_retry_on wins
    # Aborts, bad arguments and unstorable results are never retried, whatever the policy says.
    everything = RetryPolicy(retry_on=(BaseException,))
    for never in (procrastinate_exceptions.JobAborted(), asyncio.CancelledError(),
                  InvalidArguments("x"), ResultNotSerializable("x")):
        assert not everything.should_retry(never, attempts_done=1)
    assert not NO_RETRY.should_retry(ValueError(), attempts_done=1)


def test_invalid_policies_and_limits_are_refused_at_declaration() -> None:
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=2)
    with pytest.raises(ValueError, match="max_retries"):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ValueError, match="soft_time_limit"):
        task(name="tests.core.bad_limits", soft_time_limit=10, hard_time_limit=5)(lambda: None)
    with pytest.raises(ValueError, match="'missing'"):

        @task(name="tests.core.bad_lock", lock="x-{missing}")
        def bad_lock(*, present: int) -> None: ...

    with pytest.raises(TypeError, match="needs a type hint"):

        @task(name="tests.core.no_hint")
        def no_hint(*, value) -> None: ...

    with pytest.raises(ValueError, match=r"two tasks are named 'tests\.core\.echo'"):

        @task(name="tests.core.echo")
        def another_echo() -> None: ...


def test_time_limits_default_to_one_and_two_hours_and_are_stored_per_task() -> None:
    assert (DEFAULT_SOFT_TIME_LIMIT, DEFAULT_HARD_TIME_LIMIT) == (3600, 7200)
    echo = get_task("tests.core.echo").describe()
    assert (echo["soft_time_limit_seconds"], echo["hard_time_limit_seconds"]) == (3600, 7200)
    deploy = get_task("deploy_stack").describe()
    assert (deploy["soft_time_limit_seconds"], deploy["hard_time_limit_seconds"]) == (600, 900)


def test_argument_schemas_come_from_type_hints() -> None:
    spec = get_task("optimize_route")
    schema = spec.json_schema()
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert schema["properties"]["points"] == {
        "default": 200, "title": "Points", "type": "integer", "minimum": 3, "maximum": 5000,
    }
    index = get_task("index_document").json_schema()
    assert index["required"] == ["title"]
    assert spec.validate({"points": "12"}) == {"points": 12, "seed": 1, "max_rounds": 100, "restarts": 40}
    with pytest.raises(InvalidArguments) as excinfo:
        spec.validate({"points": "many", "colour": "red"})
    assert excinfo.value.message == (
        "invalid arguments for task 'optimize_route': 'points': Input should be a valid integer, "
        "unable to parse string as an integer; no argument 'colour'; "
        "expected: points (int, optional), seed (int, optional), max_rounds (int, optional), "
        "restarts (int, optional)"
    )


def test_the_registry_lists_tasks_with_schema_queue_priority_and_policies() -> None:
    names = [spec.name for spec in all_tasks()]
    assert names == sorted(names)
    assert {"deploy_stack", "index_document", "optimize_route"} <= set(names)
    deploy = get_task("deploy_stack").describe()
    assert deploy["queue"] == "default"
    assert deploy["priority"] == 0
    assert deploy["lock"] == "deploy-{stack}-{environment}"
    assert deploy["retry"] == {
        "max_attempts": 4, "backoff_seconds": 2, "factor": 2, "max_backoff_seconds": 10,
        "jitter": 0.1, "retry_on": ["Exception"], "dont_retry_on": [],
    }
    assert "fail_at_step" in deploy["args_schema"]["properties"]
    assert get_task("optimize_route").describe()["queue"] == "cpu"
    assert get_task("tests.core.unique").describe()["queueing_lock"] == "unique-{key}"
    with pytest.raises(TaskNotFound, match=r"unknown task 'nope'; known tasks: .*deploy_stack"):
        get_task("nope")


def test_a_task_can_still_be_called_directly_as_a_function() -> None:
    assert get_task("tests.core.bad_result")(kind="set") == {1, 2, 3}


def test_constraints_and_checks_refuse_bad_starts_before_a_job_exists() -> None:
    with pytest.raises(InvalidArguments, match="'fail_at_step': Input should be less than or equal to 4"):
        get_task("deploy_stack").validate({"fail_at_step": 5})
    with pytest.raises(InvalidArguments, match="'points': Input should be greater than or equal to 3"):
        get_task("optimize_route").validate({"points": 2})
    index = get_task("index_document")
    with pytest.raises(InvalidArguments, match="give either 'text' or 'path'"):
        index.validate({"title": "t", "text": "x", "path": "y"})
    with pytest.raises(InvalidArguments, match="path must stay inside"):
        index.validate({"title": "t", "path": "../pyproject.toml"})
    assert index.validate({"title": "t", "path": "postgresql-queues.md"})["path"] == "postgresql-queues.md"
