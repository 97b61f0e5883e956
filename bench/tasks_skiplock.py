"""The bench's task bodies as Skiplock tasks (defined once in bench.bodies, shared with bare procrastinate)."""

from __future__ import annotations

from bench.bodies import TASKS
from jobs.registry import find_task, task


def register() -> None:
    """Register the bench tasks with Skiplock (idempotent: a test may have unregistered them)."""
    for func in TASKS:
        if find_task(func.__name__) is None:
            task(name=func.__name__)(func)


register()
