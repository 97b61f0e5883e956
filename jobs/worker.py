"""Running a procrastinate worker with Skiplock's recording, in this process.

Used by the `worker` command, the in-web worker and the testing helper alike, so every path
runs jobs the same way. Workers get their own psycopg pool (procrastinate's Django connector
has none), sized to the concurrency plus the connections the worker itself needs.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from django.conf import settings
from procrastinate.contrib.django import app
from procrastinate.contrib.django.utils import connector_params
from procrastinate.psycopg_connector import PsycopgConnector


def worker_connector(*, concurrency: int) -> PsycopgConnector:
    return PsycopgConnector(
        kwargs=connector_params("default"),
        min_size=1,
        max_size=concurrency + 3,  # jobs' record writes + fetch/finish + heartbeat + abort polls
        name="skiplock-worker",
    )


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def worker_options(
    *,
    queues: list[str] | None,
    concurrency: int,
    name: str | None,
    wait: bool,
    listen_notify: bool = True,
    install_signal_handlers: bool = True,
    shutdown_grace: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "queues": queues or None,
        "concurrency": concurrency,
        "name": name or default_worker_name(),
        "wait": wait,
        "listen_notify": listen_notify,
        "install_signal_handlers": install_signal_handlers,
        "shutdown_graceful_timeout": settings.SKIPLOCK_SHUTDOWN_GRACE if shutdown_grace is None else shutdown_grace,
        "update_heartbeat_interval": settings.SKIPLOCK_HEARTBEAT_INTERVAL,
        "delete_jobs": "never",
        **extra,
    }


async def run_worker(**options: Any) -> None:
    """Run a worker until it is stopped (or, with wait=False, until the queues are empty)."""
    connector = worker_connector(concurrency=options.get("concurrency", 1))
    with app.replace_connector(connector):
        async with app.open_async():
            await app.run_worker_async(**worker_options(**options))
