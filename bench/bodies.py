"""The bench's task bodies, one definition shared by Skiplock and bare procrastinate (and mirrored by Celery's)."""

from __future__ import annotations

import asyncio
import time

from bench.stamp import send_stamp


async def bench_noop() -> None:
    """Do nothing: what is left is the queue's own cost per job."""


async def bench_io10() -> None:
    """Wait 10 ms, like a call to another service."""
    await asyncio.sleep(0.01)


def bench_noop_sync() -> None:
    """Do nothing in a worker thread: the cost of a sync task's thread hop."""


def bench_io10_sync() -> None:
    """Block 10 ms in a worker thread."""
    time.sleep(0.01)


async def bench_stamp(*, port: int, marker: int) -> None:
    """Tell the bench this job started."""
    send_stamp(port, marker)


TASKS = (bench_noop, bench_io10, bench_noop_sync, bench_io10_sync, bench_stamp)
