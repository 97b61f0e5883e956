"""Test fixtures: a real PostgreSQL (the embedded "test" cluster unless DATABASE_URL is set)."""

from __future__ import annotations

import os
from collections.abc import Iterator

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
