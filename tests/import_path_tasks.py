"""A task module named only by SKIPLOCK_IMPORT_PATHS in tests/test_hardening_api.py: nothing imports it."""

from __future__ import annotations

from jobs.registry import task


@task(name="tests.import_path.greet", queue="default")
def greet(*, name: str = "world") -> str:
    """Say hello (registered only where SKIPLOCK_IMPORT_PATHS names this module)."""
    return f"hello {name}"
