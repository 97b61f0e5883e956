"""Code written with Django's tasks framework runs on Skiplock (TASKS backend, real worker)."""

from __future__ import annotations

import datetime as dt

import pytest
from django.db import transaction
from django.tasks import TaskResultStatus, default_task_backend, task_backends
from django.tasks.exceptions import TaskResultDoesNotExist, TaskResultMismatch

from jobs import services
from jobs.django_tasks import SkiplockTaskBackend, exception_path
from jobs.exceptions import InvalidArguments
from jobs.models import JobRecord
from jobs.registry import get_task
from jobs.testing import run_jobs
from tests import core_fixtures
from tests.core_django_tasks import add, explode, gather, shout, unstorable, untyped, whoami

pytestmark = pytest.mark.django_db(transaction=True)
clean_queue = core_fixtures.clean_queue


def test_the_default_tasks_backend_is_skiplock() -> None:
    backend = task_backends["default"]
    assert isinstance(backend, SkiplockTaskBackend)
    assert backend.supports_get_result
    assert backend.supports_defer


def test_enqueue_makes_a_skiplock_job_that_the_worker_runs_and_get_result_reads_back() -> None:
    result = add.enqueue(2, b=3)
    assert result.status == TaskResultStatus.READY
    record = JobRecord.objects.get(pk=int(result.id))
    assert (record.task_name, record.args, record.state) == (
        "tests.core_django_tasks.add", {"__args__": [2], "b": 3}, "todo")
    run_jobs()
    done = add.get_result(result.id)
    assert done.status == TaskResultStatus.SUCCESSFUL
    assert done.return_value == 5
    assert done.attempts == 1
    assert done.worker_ids == [JobRecord.objects.get(pk=record.pk).worker_name]
    assert done.started_at is not None
    assert done.finished_at is not None
    assert done.errors == []
    result.refresh()
    assert (result.status, result.return_value) == (TaskResultStatus.SUCCESSFUL, 5)


def test_enqueue_joins_the_callers_transaction() -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        rolled_back = add.enqueue(1)
        raise RuntimeError("roll back")
    with pytest.raises(TaskResultDoesNotExist):
        add.get_result(rolled_back.id)
    with transaction.atomic():
        committed = add.enqueue(1)
    run_jobs()
    assert add.get_result(committed.id).return_value == 1


def test_async_tasks_priority_queue_and_run_after_map_to_the_job() -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    result = shout.using(priority=7, run_after=later).enqueue("hi")
    record = JobRecord.objects.get(pk=int(result.id))
    assert (record.queue_name, record.priority, record.scheduled_at) == ("core-tests", 7, later)
    assert record.display_state == "scheduled"
    run_jobs(queues=["core-tests"], include_scheduled=True)
    assert shout.get_result(result.id).return_value == "HI"


def test_a_task_taking_context_sees_its_result_id_and_attempt() -> None:
    result = whoami.enqueue(label="x")
    run_jobs()
    assert whoami.get_result(result.id).return_value == {"id": result.id, "attempt": 1, "label": "x"}


def test_a_failure_is_failed_with_the_exception_class_and_traceback() -> None:
    result = explode.enqueue("boom")
    run_jobs(include_scheduled=True)
    failed = explode.get_result(result.id)
    assert failed.status == TaskResultStatus.FAILED
    assert failed.attempts == 1  # no retry unless OPTIONS["RETRY"] asks for it
    (error,) = failed.errors
    assert error.exception_class is ValueError
    assert "ValueError: boom" in error.traceback
    with pytest.raises(ValueError, match="Task failed"):
        _ = failed.return_value


def test_arguments_are_validated_against_the_signature() -> None:
    with pytest.raises(InvalidArguments, match="missing a required argument: 'a'"):
        add.enqueue()  # type: ignore[call-arg]
    with pytest.raises(InvalidArguments, match="'a': Input should be a valid integer"):
        add.enqueue("two")  # type: ignore[arg-type]
    # Without hints, any JSON value goes.
    result = untyped.enqueue({"k": [1, 2]})
    run_jobs()
    assert untyped.get_result(result.id).return_value == {"payload": {"k": [1, 2]}, "count": 1}


def test_django_tasks_are_listed_with_skiplock_tasks_and_can_be_started_by_name() -> None:
    spec = get_task("tests.core_django_tasks.add")
    schema = spec.describe()["args_schema"]
    assert schema["anyOf"] == [{"required": ["__args__"]}, {"required": ["a"]}]  # by position or by name
    assert schema["properties"]["__args__"]["type"] == "array"
    assert spec.describe()["retry"]["max_attempts"] == 1
    job = services.job_defer(task_name="tests.core_django_tasks.add", args={"a": 40, "b": 2})
    run_jobs()
    assert add.get_result(str(job.job_id)).return_value == 42


def test_results_of_other_jobs_are_not_django_results() -> None:
    job = services.job_defer(task_name="tests.core.echo")
    for result_id in (str(job.job_id), "999999999", "not-a-number"):
        with pytest.raises(TaskResultDoesNotExist):
            default_task_backend.get_result(result_id)
    other = add.enqueue(1)
    with pytest.raises(TaskResultMismatch):
        explode.get_result(other.id)


def test_positional_and_star_arguments_stay_as_given_and_enqueue_agrees_with_get_result() -> None:
    result = gather.enqueue(1, 2, 3, colour="red")
    assert (result.args, result.kwargs) == ([1, 2, 3], {"colour": "red"})
    assert JobRecord.objects.get(pk=int(result.id)).args == {"__args__": [1, 2, 3], "colour": "red"}
    assert gather.get_result(result.id) == result
    read_back = gather.get_result(result.id)
    assert (read_back.args, read_back.kwargs, read_back.enqueued_at) == (result.args, result.kwargs, result.enqueued_at)
    defaults = add.enqueue(1)
    assert (defaults.args, defaults.kwargs) == ([1], {})  # defaults are not filled in
    assert add.get_result(defaults.id).kwargs == {}
    run_jobs()
    assert gather.get_result(result.id).return_value == {"first": 1, "rest": [2, 3], "options": {"colour": "red"}}
    assert add.get_result(defaults.id).return_value == 1


def test_arguments_that_are_not_json_raise_type_error_and_start_nothing() -> None:
    with pytest.raises(TypeError, match="Unsupported type"):
        gather.enqueue(dt.datetime.now())
    assert not JobRecord.objects.exists()


def test_a_return_value_that_is_not_json_fails_with_djangos_type_error() -> None:
    result = unstorable.enqueue()
    run_jobs()
    failed = unstorable.get_result(result.id)
    assert failed.status == TaskResultStatus.FAILED
    (error,) = failed.errors
    assert error.exception_class is TypeError
    assert "Unsupported type" in error.traceback


def test_the_django_tasks_logger_gets_enqueued_started_and_finished(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    with caplog.at_level(logging.DEBUG, logger="django.tasks"):
        ok = add.enqueue(1, 2)
        bad = explode.enqueue("boom")
        run_jobs()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "django.tasks"]
    path = "tests.core_django_tasks"
    assert ("DEBUG", f"Task id={ok.id} path={path}.add enqueued backend=default") in lines
    assert ("INFO", f"Task id={ok.id} path={path}.add state=RUNNING") in lines
    assert ("INFO", f"Task id={ok.id} path={path}.add state=SUCCESSFUL") in lines
    assert ("ERROR", f"Task id={bad.id} path={path}.explode state=FAILED") in lines
    failed_record = next(r for r in caplog.records if r.getMessage().endswith("explode state=FAILED"))
    assert failed_record.exc_info is not None
    assert failed_record.exc_info[0] is ValueError


def test_exception_paths_are_read_from_the_traceback() -> None:
    assert exception_path("ValueError", "Traceback...\nValueError: x") == "builtins.ValueError"
    assert exception_path("DeployStepFailed", "T\njobs.examples.deploy.DeployStepFailed: step 2") == (
        "jobs.examples.deploy.DeployStepFailed"
    )
    assert exception_path("JobAborted", "T\nasyncio.exceptions.CancelledError") == (
        "procrastinate.exceptions.JobAborted"
    )


def test_the_async_api_enqueues_and_reads_results_too() -> None:
    from asgiref.sync import async_to_sync

    result = async_to_sync(add.aenqueue)(20, 22)
    run_jobs()
    done = async_to_sync(add.aget_result)(result.id)
    assert (done.status, done.return_value) == (TaskResultStatus.SUCCESSFUL, 42)
