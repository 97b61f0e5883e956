"""Test fixtures: a real PostgreSQL (the embedded "test" cluster unless DATABASE_URL is set)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings

from project.embedded_postgres import EmbeddedPostgres

INSTANCE = os.environ.get("SKIPLOCK_PG_INSTANCE", "")
if settings.EMBEDDED_DATABASE and not INSTANCE.startswith("test"):
    pytest.exit(
        "tests use their own PostgreSQL cluster: run `make test`, or set SKIPLOCK_PG_INSTANCE=test "
        "(or DATABASE_URL) before pytest",
        returncode=4,
    )


@pytest.fixture(scope="session")
def embedded_postgres() -> Iterator[EmbeddedPostgres | None]:
    """The test cluster, started for the session (and stopped after, if this session started it)."""
    if not settings.EMBEDDED_DATABASE:
        yield None
        return
    cluster = EmbeddedPostgres(INSTANCE)
    started = cluster.start()
    yield cluster
    if started and os.environ.get("SKIPLOCK_KEEP_TEST_DB") != "1":
        cluster.stop()


@pytest.fixture(scope="session")
def django_db_setup(embedded_postgres: EmbeddedPostgres | None, django_db_setup: None) -> None:
    """pytest-django's test database, created on the running test cluster."""
    return None


@pytest.fixture(autouse=True)
def _empty_queue_after_transactional_tests(request: pytest.FixtureRequest, django_db_blocker: Any) -> Iterator[None]:
    """pytest-django's flush skips procrastinate's unmanaged tables: leave the queue empty for the next test."""
    yield
    marker = request.node.get_closest_marker("django_db")
    transactional = "transactional_db" in request.fixturenames or bool(
        marker and (marker.kwargs.get("transaction") or (marker.args and marker.args[0]))
    )
    if not transactional:
        return
    from django.db import connection

    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute("DELETE FROM procrastinate_periodic_defers")
        cursor.execute("DELETE FROM procrastinate_jobs")
        cursor.execute("DELETE FROM procrastinate_workers")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def asgi_server(django_db_setup: None, django_db_blocker: Any) -> Iterator[str]:
    """The real ASGI app served by uvicorn on a free loopback port, on the test database.

    Use it with transactional tests (`transaction=True`): the server reads committed rows.
    """
    import threading

    import uvicorn

    port = free_port()
    config = uvicorn.Config(
        "project.asgi:application", host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="asgi-server", daemon=True)
    with django_db_blocker.unblock():
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the test ASGI server did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
        server.should_exit = True
        thread.join(timeout=10)
