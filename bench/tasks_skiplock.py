"""The bench's task bodies as Skiplock tasks (the same bodies as bench.procrastinate_app and bench.celery_app)."""

from __future__ import annotations

import asyncio
import time

from bench.stamp import send_stamp
from jobs.registry import task


@task(name="bench_noop")
async def bench_noop() -> None:
    """Do nothing: what is left is the queue's own cost per job."""


@task(name="bench_io10")
async def bench_io10() -> None:
    """Wait 10 ms, like a call to another service."""
    await asyncio.sleep(0.01)


@task(name="bench_noop_sync")
def bench_noop_sync() -> None:
    """Do nothing in a worker thread: the cost of a sync task's thread hop."""


@task(name="bench_io10_sync")
def bench_io10_sync() -> None:
    """Block 10 ms in a worker thread."""
    time.sleep(0.01)


@task(name="bench_stamp")
async def bench_stamp(*, port: int, marker: int) -> None:
    """Tell the bench this job started."""
    send_stamp(port, marker)
