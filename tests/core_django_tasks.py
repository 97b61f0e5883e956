"""Functions written with Django's tasks framework (django.tasks), run by Skiplock in the tests."""

from __future__ import annotations

import asyncio

from django.tasks import TaskContext, task


@task
def add(a: int, b: int = 0) -> int:
    """Add two numbers."""
    return a + b


@task(priority=5, queue_name="core-tests")
async def shout(text: str) -> str:
    await asyncio.sleep(0)
    return text.upper()


@task(takes_context=True)
def whoami(context: TaskContext, label: str) -> dict[str, object]:
    return {"id": context.task_result.id, "attempt": context.attempt, "label": label}


@task
def explode(message: str) -> None:
    raise ValueError(message)


@task
def untyped(payload, count=1):
    return {"payload": payload, "count": count}


@task
def gather(first, *rest, **options):
    return {"first": first, "rest": list(rest), "options": options}


@task
def unstorable():
    return {1, 2}  # a set: not JSON
