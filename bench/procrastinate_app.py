"""Bare procrastinate: a plain App with PsycopgConnector and the bench's task bodies, no Skiplock layer."""

from __future__ import annotations

import procrastinate
from procrastinate.psycopg_connector import PsycopgConnector

from bench.bodies import TASKS


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
