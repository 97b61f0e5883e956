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
Positional arguments are bound to parameter names; arguments are JSON values, validated against
the type hints like any Skiplock task. `OPTIONS["RETRY"]` sets a retry policy (default: none,
one attempt, as Django's own backends do).
"""

from __future__ import annotations

import builtins
import functools
import inspect
import re
from collections.abc import Callable
from typing import Any, get_type_hints

import pydantic
from django.tasks import Task, TaskContext, TaskResult, TaskResultStatus
from django.tasks.backends.base import BaseTaskBackend
from django.tasks.base import TaskError
from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
from django.tasks.signals import task_enqueued
from django.utils import timezone
from django.utils.module_loading import import_string

from jobs import registry, services
from jobs.context import current_job
from jobs.models import JobRecord
from jobs.selectors import job_attempts
from jobs.states import State

# Stored state → Django's status. Waiting jobs (scheduled, retrying) are READY; an aborting
# job still runs; cancelled and aborted jobs did not succeed, which Django calls FAILED.
STATUS_OF: dict[State, TaskResultStatus] = {
    State.TODO: TaskResultStatus.READY,
    State.DOING: TaskResultStatus.RUNNING,
    State.ABORTING: TaskResultStatus.RUNNING,
    State.SUCCEEDED: TaskResultStatus.SUCCESSFUL,
    State.FAILED: TaskResultStatus.FAILED,
    State.CANCELLED: TaskResultStatus.FAILED,
    State.ABORTED: TaskResultStatus.FAILED,
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
        job = services.job_defer(
            task_name=task.module_path,
            args=_bind(task, list(args), dict(kwargs)),
            queue=task.queue_name,
            priority=task.priority,
            run_at=task.run_after,
        )
        result: TaskResult[Any, Any] = TaskResult(
            task=task, id=str(job.job_id), status=TaskResultStatus.READY, enqueued_at=timezone.now(),
            started_at=None, finished_at=None, last_attempted_at=None, args=[], kwargs=dict(kwargs),
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
        result: TaskResult[Any, Any] = TaskResult(
            task=task, id=str(job_id), status=status, enqueued_at=record.created_at,
            started_at=record.started_at, finished_at=record.finished_at,
            last_attempted_at=attempts[-1].started_at if attempts else None,
            args=[], kwargs=record.args, backend=self.alias,
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
    parameters = _parameters(task)
    model = _arguments_model(task, parameters)
    registry.task(
        name=name, queue=task.queue_name, priority=task.priority, retry=backend.retry, args_model=model,
    )(_runner(task))
    _TASKS[name] = task


def _parameters(task: Task) -> list[inspect.Parameter]:
    parameters = list(inspect.signature(task.func).parameters.values())
    if task.takes_context:
        parameters = parameters[1:]
    for parameter in parameters:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise InvalidTask(
                f"task {task.module_path}: Skiplock stores arguments as named JSON values; "
                f"replace *{parameter.name} with named parameters"
            )
        if parameter.kind == parameter.POSITIONAL_ONLY:
            raise InvalidTask(f"task {task.module_path}: positional-only parameters cannot be stored by name")
    return parameters


def _arguments_model(task: Task, parameters: list[inspect.Parameter]) -> type[pydantic.BaseModel]:
    try:
        hints = get_type_hints(task.func)
    except Exception:  # unresolvable forward references: validate as plain JSON values
        hints = {}
    fields: dict[str, Any] = {
        p.name: (hints.get(p.name, Any), ... if p.default is inspect.Parameter.empty else p.default)
        for p in parameters
    }
    return pydantic.create_model(
        "DjangoTask_" + re.sub(r"\W", "_", task.module_path),
        __config__=pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True),
        **fields,
    )


def _bind(task: Task, args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional arguments → names, as Skiplock stores them."""
    parameters = _parameters(task)
    signature = inspect.Signature(parameters)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        from jobs.exceptions import InvalidArguments

        raise InvalidArguments(
            f"invalid arguments for task '{task.module_path}': {exc}",
            details=[{"field": "args", "message": str(exc), "type": "type_error"}],
        ) from None
    return dict(bound.arguments)


def _runner(task: Task) -> Callable[..., Any]:
    """What the worker calls: the Django task's function, with Django's TaskContext if it asks."""
    func = task.func

    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def run_async(**kwargs: Any) -> Any:
            if task.takes_context:
                result = await task.get_backend().aget_result(str(current_job().job_id))
                return await func(TaskContext(task_result=result), **kwargs)
            return await func(**kwargs)

        return run_async

    @functools.wraps(func)
    def run(**kwargs: Any) -> Any:
        if task.takes_context:
            result = task.get_backend().get_result(str(current_job().job_id))
            return func(TaskContext(task_result=result), **kwargs)
        return func(**kwargs)

    return run
