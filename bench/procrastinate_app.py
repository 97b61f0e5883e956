"""Bare procrastinate: a plain App with PsycopgConnector and the bench's task bodies, no Skiplock layer."""

from __future__ import annotations

import asyncio
import time

import procrastinate
from procrastinate.psycopg_connector import PsycopgConnector

from bench.stamp import send_stamp


async def bench_noop() -> None:
    """Do nothing."""


async def bench_io10() -> None:
    await asyncio.sleep(0.01)


def bench_noop_sync() -> None:
    """Do nothing in a worker thread."""


def bench_io10_sync() -> None:
    time.sleep(0.01)


async def bench_stamp(*, port: int, marker: int) -> None:
    send_stamp(port, marker)


TASKS = (bench_noop, bench_io10, bench_noop_sync, bench_io10_sync, bench_stamp)


def make_app(conninfo: str, *, concurrency: int = 1) -> procrastinate.App:
    """The same pool sizing as Skiplock's worker (jobs.worker.worker_connector)."""
    app = procrastinate.App(
        connector=PsycopgConnector(conninfo=conninfo, min_size=1, max_size=concurrency + 3)
    )
    for func in TASKS:
        app.task(name=func.__name__)(func)
    return app


# The same worker settings as Skiplock's jobs.worker.worker_options.
WORKER_OPTIONS = {
    "listen_notify": True,
    "delete_jobs": "never",
    "update_heartbeat_interval": 10.0,
    "shutdown_graceful_timeout": 30.0,
}
