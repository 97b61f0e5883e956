"""Django's tasks framework on Skiplock: a `TASKS` backend for `django.tasks`.

    # settings.py
    TASKS = {"default": {"BACKEND": "jobs.django_tasks.SkiplockTaskBackend", "QUEUES": []}}

    # myapp/tasks.py
    from django.tasks import task

    @task(priority=10, queue_name="emails")
    def send_welcome(user_id: int) -> str: ...

    result = send_welcome.enqueue(42)          # a Skiplock job, in the caller's transaction
    send_welcome.get_result(result.id).status  # read back from the job record

Every Django task becomes a Skiplock task named by its module path (`myapp.tasks.send_welcome`)
the moment `@task` runs, so the worker finds it once the module is imported: keep Django tasks
in an app's `tasks.py` (autodiscovered), or list their modules in SKIPLOCK_IMPORT_PATHS.
Arguments are stored as given — positional ones in order under the job's `__args__` key,
keyword ones by name — so a result's `args` and `kwargs` are what `enqueue()` was called with;
`*args`/`**kwargs` and positional-only parameters work. Arguments must be JSON values (anything
else raises `TypeError` at enqueue, as Django's own backends do) and are validated against the
type hints where there are some. `enqueue()` returns what `get_result()` reads back (one clock:
the database's). The `django.tasks` logger gets the enqueued/started/finished events Django's own
backends emit; a return value that is not JSON fails the task with Django's `TypeError`.
`OPTIONS["RETRY"]` sets a retry policy (default: none, one attempt, as Django's own backends do).
"""

from __future__ import annotations

import builtins
import datetime as dt
import functools
import inspect
import re
from collections.abc import Callable
from typing import Any

from django.tasks import Task, TaskContext, TaskResult, TaskResultStatus
from django.tasks.backends.base import BaseTaskBackend
from django.tasks.base import TaskError
from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
from django.tasks.signals import task_enqueued, task_finished, task_started
from django.utils.json import normalize_json
from django.utils.module_loading import import_string

from jobs import registry, services
from jobs.context import JobContext, current_job
from jobs.models import JobRecord
from jobs.selectors import job_attempts
from jobs.states import State

# Stored state → Django's status. Waiting jobs (scheduled, retrying) are READY; an aborting
# job still runs; cancelled, aborted, discarded and expired jobs did not succeed, which Django
# calls FAILED.
STATUS_OF: dict[State, TaskResultStatus] = {
    State.TODO: TaskResultStatus.READY,
    State.DOING: TaskResultStatus.RUNNING,
    State.ABORTING: TaskResultStatus.RUNNING,
    State.SUCCEEDED: TaskResultStatus.SUCCESSFUL,
    State.FAILED: TaskResultStatus.FAILED,
    State.CANCELLED: TaskResultStatus.FAILED,
    State.ABORTED: TaskResultStatus.FAILED,
    State.DISCARDED: TaskResultStatus.FAILED,
    State.EXPIRED: TaskResultStatus.FAILED,
}

_TASKS: dict[str, Task] = {}  # module path → the Django Task, for results and the worker


class SkiplockTaskBackend(BaseTaskBackend):
    """Runs `django.tasks` tasks as Skiplock jobs: enqueue → job_defer, get_result → job record."""

    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        retry = {str(k).lower(): v for k, v in (self.options.get("RETRY") or {"max_retries": 0}).items()}
        try:
            self.retry = registry.RetryPolicy(**retry)
        except (TypeError, ValueError) as exc:
            raise InvalidTask(f"TASKS[{alias!r}]['OPTIONS']['RETRY'] is invalid: {exc}") from None

    def validate_task(self, task: Task) -> None:
        super().validate_task(task)
        _register(task, self)

    def enqueue(self, task: Task, args: Any, kwargs: Any) -> TaskResult:
        self.validate_task(task)
        # TaskResult normalises the arguments to JSON and raises TypeError for anything else.
        given: TaskResult[Any, Any] = TaskResult(
            task=task, id="", status=TaskResultStatus.READY, enqueued_at=None, started_at=None,
            finished_at=None, last_attempted_at=None, args=list(args), kwargs=dict(kwargs),
            backend=self.alias, errors=[], worker_ids=[],
        )
        job = services.job_defer(
            task_name=task.module_path,
            args=registry.stored_arguments(given.args, given.kwargs),
            queue=task.queue_name,
            priority=task.priority,
            run_at=task.run_after,
        )
        stored = JobRecord.objects.filter(pk=job.job_id).values_list("args", "created_at").first()
        assert stored is not None  # just inserted, in this transaction
        positional, keywords = split_arguments(stored[0])
        result: TaskResult[Any, Any] = TaskResult(
            task=task, id=str(job.job_id), status=TaskResultStatus.READY, enqueued_at=stored[1],
            started_at=None, finished_at=None, last_attempted_at=None, args=positional, kwargs=keywords,
            backend=self.alias, errors=[], worker_ids=[],
        )
        task_enqueued.send(type(self), task_result=result)
        return result

    def get_result(self, result_id: str) -> TaskResult:
        try:
            job_id = int(result_id)
        except (TypeError, ValueError):
            raise TaskResultDoesNotExist(result_id) from None
        record = JobRecord.objects.filter(pk=job_id).first()
        task = _django_task(record.task_name) if record is not None else None
        if record is None or task is None:
            raise TaskResultDoesNotExist(result_id)
        attempts = job_attempts(job_id=job_id)  # the ended ones and the one running now
        status = STATUS_OF[State(record.state)]
        positional, keywords = split_arguments(record.args)
        result: TaskResult[Any, Any] = TaskResult(
            task=task, id=str(job_id), status=status, enqueued_at=record.created_at,
            started_at=record.started_at, finished_at=record.finished_at,
            last_attempted_at=attempts[-1].started_at if attempts else None,
            args=positional, kwargs=keywords, backend=self.alias,
            errors=[
                TaskError(exception_class_path=exception_path(a.error_type, a.error_traceback),
                          traceback=a.error_traceback)
                for a in attempts if a.error_type
            ],
            worker_ids=[a.worker_name for a in attempts],
        )
        if status == TaskResultStatus.SUCCESSFUL:
            object.__setattr__(result, "_return_value", record.result)
        return result


def split_arguments(stored: dict[str, Any] | None) -> tuple[list[Any], dict[str, Any]]:
    """A job's stored arguments as (args, kwargs): `__args__` in order, the rest by name."""
    stored = stored or {}
    return (list(stored.get(registry.ARGS_KEY, [])),
            {key: value for key, value in stored.items() if key not in registry.RESERVED_KEYS})


def exception_path(error_type: str, traceback: str) -> str:
    """The dotted path of a recorded exception class, read from its traceback's last line."""
    pattern = re.compile(r"^((?:\w+\.)*" + re.escape(error_type) + r")(?::|$)")
    for line in reversed(traceback.strip().splitlines()):
        found = pattern.match(line)
        if found:
            path = found.group(1)
            return path if "." in path else f"builtins.{path}"
    if hasattr(builtins, error_type):
        return f"builtins.{error_type}"
    if error_type == "JobAborted":
        return "procrastinate.exceptions.JobAborted"
    return "builtins.Exception"


def _django_task(name: str) -> Task | None:
    task = _TASKS.get(name)
    if task is None and "." in name:
        try:
            found = import_string(name)  # importing the module registers its tasks
        except ImportError:
            return None
        task = found if isinstance(found, Task) else None
    return task


def _register(task: Task, backend: SkiplockTaskBackend) -> None:
    """Make a Django task a Skiplock task (once per function), so the worker can run it."""
    name = task.module_path
    known = _TASKS.get(name)
    if known is not None and known.func is task.func:
        return
    registry.task(
        name=name, queue=task.queue_name, priority=task.priority, retry=backend.retry, context=False,
        require_hints=False, store_as_given=True,
    )(_runner(task, backend.alias))
    _TASKS[name] = task


def _runner(task: Task, alias: str) -> Callable[..., Any]:
    """What the worker calls: the Django task's function (with a TaskContext if it asks), between
    Django's task_started and task_finished signals; its return value normalised to JSON."""
    func = task.func
    parameters = list(inspect.signature(func).parameters.values())
    if task.takes_context:
        parameters = parameters[1:]

    def started(args: tuple[Any, ...], kwargs: dict[str, Any]) -> TaskResult:
        ctx = current_job()
        result = _running_result(task, ctx, alias)
        task_started.send(SkiplockTaskBackend, task_result=result)
        return result

    def finished(result: TaskResult, status: TaskResultStatus, value: Any = None) -> None:
        object.__setattr__(result, "status", status)
        if status == TaskResultStatus.SUCCESSFUL:
            object.__setattr__(result, "_return_value", value)
        task_finished.send(SkiplockTaskBackend, task_result=result)

    if inspect.iscoroutinefunction(func):

        async def run_async(*args: Any, **kwargs: Any) -> Any:
            result = started(args, kwargs)
            try:
                if task.takes_context:
                    value = await func(TaskContext(task_result=result), *args, **kwargs)
                else:
                    value = await func(*args, **kwargs)
                value = normalize_json(value)
            except BaseException:
                finished(result, TaskResultStatus.FAILED)  # inside the handler: the log line has exc_info
                raise
            finished(result, TaskResultStatus.SUCCESSFUL, value)
            return value

        runner: Callable[..., Any] = run_async
    else:

        def run(*args: Any, **kwargs: Any) -> Any:
            result = started(args, kwargs)
            try:
                if task.takes_context:
                    value = func(TaskContext(task_result=result), *args, **kwargs)
                else:
                    value = func(*args, **kwargs)
                value = normalize_json(value)
            except BaseException:
                finished(result, TaskResultStatus.FAILED)
                raise
            finished(result, TaskResultStatus.SUCCESSFUL, value)
            return value

        runner = run
    functools.update_wrapper(runner, func)
    runner.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return runner


def _running_result(task: Task, ctx: JobContext, alias: str) -> TaskResult:
    """The TaskResult of the attempt now running, built from the job's context (no query)."""
    positional, keywords = split_arguments(ctx.args)
    now = dt.datetime.now(dt.UTC)
    return TaskResult(
        task=task, id=str(ctx.job_id), status=TaskResultStatus.RUNNING, enqueued_at=None,
        started_at=now, finished_at=None, last_attempted_at=now, args=positional, kwargs=keywords,
        backend=alias, errors=[], worker_ids=[f"worker-{ctx.worker_id}"] * ctx.attempt,
    )
