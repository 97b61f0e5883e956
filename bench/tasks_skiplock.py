"""The bench's task bodies as Skiplock tasks (defined once in bench.bodies, shared with bare procrastinate)."""

from __future__ import annotations

from bench.bodies import TASKS
from jobs.registry import RateLimit, find_task, task


async def bench_limited(*, key: int) -> None:
    """A no-op under a per-key rate limit (bench/flow.py keeps its window spent)."""


def register() -> None:
    """Register the bench tasks with Skiplock (idempotent: a test may have unregistered them)."""
    for func in TASKS:
        if find_task(func.__name__) is None:
            task(name=func.__name__)(func)
    if find_task("bench_limited") is None:
        task(name="bench_limited", queue="bench-limited", rate_limit=RateLimit(1, per=3600, key="k{key}"))(bench_limited)


register()
