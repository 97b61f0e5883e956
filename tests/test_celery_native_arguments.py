"""Positional and variadic arguments for native `@task` tasks: stored as given, validated, run."""

from __future__ import annotations

import pytest

from jobs import services
from jobs.context import JobContext
from jobs.exceptions import InvalidArguments
from jobs.models import JobRecord
from jobs.registry import NO_RETRY, get_task, task
from jobs.testing import run_jobs
from tests import core_fixtures
from tests.celery_tasks import swallow_every_exception

pytestmark = pytest.mark.django_db(transaction=True)
clean_queue = core_fixtures.clean_queue


@task(name="tests.native.scale", queue="native-args")
def scale(ctx: JobContext, factor: int, /, *values: float, rounding: int = 2, **labels: str) -> dict[str, object]:
    """Scale some values (positional-only factor, *values, keyword-only rounding, **labels)."""
    return {"job": ctx.job_id, "scaled": [round(v * factor, rounding) for v in values], "labels": labels}


@task(name="tests.native.stubborn", queue="native-args", retry=NO_RETRY, soft_time_limit=0.2, hard_time_limit=0.6)
def stubborn() -> str:
    """A native task that swallows every Exception in its loop."""
    return swallow_every_exception()


@task(name="tests.native.keywords", queue="native-args")
def keywords(*, a: int, b: int = 1) -> int:
    return a + b


def test_a_native_task_with_positional_and_variadic_arguments_runs_with_them() -> None:
    job_id = scale.defer(3, 1.5, "2", rounding=1, colour="red")
    record = JobRecord.objects.get(pk=job_id)
    # Stored as given (values validated: "2" is a float), defaults filled in as for any native task.
    assert record.args == {"__args__": [3, 1.5, 2.0], "rounding": 1, "colour": "red"}
    run_jobs(queues=["native-args"])
    assert JobRecord.objects.get(pk=job_id).result == {"job": job_id, "scaled": [4.5, 6.0], "labels": {"colour": "red"}}


def test_bad_positional_arguments_are_refused_naming_the_problem() -> None:
    with pytest.raises(InvalidArguments, match="missing a required argument: 'factor'"):
        scale.defer()
    with pytest.raises(InvalidArguments, match=r"values\.0"):
        scale.defer(2, "many")
    with pytest.raises(InvalidArguments, match=r"labels\.colour"):
        scale.defer(2, colour=3)
    with pytest.raises(InvalidArguments, match=r"too many positional arguments; expected: a \(int\)"):
        services.job_defer(task_name="tests.native.keywords", args={"__args__": [1]})
    with pytest.raises(InvalidArguments, match="positional arguments must be a JSON array"):
        services.job_defer(task_name="tests.native.scale", args={"__args__": 3})
    assert not JobRecord.objects.exists()


def test_the_schema_and_signature_describe_positional_arguments() -> None:
    spec = get_task("tests.native.scale")
    assert spec.signature() == "factor (int), *values (float), rounding (int), optional, **labels (str)"
    schema = spec.json_schema()
    positional = schema["properties"]["__args__"]
    assert positional["prefixItems"] == [{"title": "Factor", "type": "integer"}]
    assert positional["items"] == {"type": "number"}
    assert schema["additionalProperties"] == {"type": "string"}
    assert "factor" not in schema["properties"]  # positional-only: by position alone
    assert schema["anyOf"] == [{"required": ["__args__"]}]
    plain = get_task("tests.native.keywords").json_schema()
    assert "__args__" not in plain["properties"]
    assert plain["required"] == ["a"]


def test_a_reserved_name_cannot_be_a_parameter() -> None:
    def uses_reserved(__args__: int) -> None: ...

    with pytest.raises(TypeError, match="argument name '__args__' is reserved"):
        task(name="tests.native.reserved")(uses_reserved)


def test_the_hard_time_limit_of_a_native_task_is_not_swallowed_by_except_exception() -> None:
    job_id = stubborn.defer()
    run_jobs(queues=["native-args"])
    record = JobRecord.objects.get(pk=job_id)
    assert (record.state, record.error_type, record.result) == ("failed", "HardTimeLimitExceeded", None)
