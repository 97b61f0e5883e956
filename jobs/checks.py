"""System checks that catch Skiplock configuration mistakes at start-up."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, Warning, register


@register()
def check_skiplock_settings(app_configs: Any = None, **kwargs: Any) -> list[Error | Warning]:
    problems: list[Error | Warning] = []
    if settings.SKIPLOCK_STALLED_AFTER < 3 * settings.SKIPLOCK_HEARTBEAT_INTERVAL:
        problems.append(
            Error(
                "SKIPLOCK_STALLED_AFTER is shorter than three heartbeats.",
                hint="A live worker would look dead between two heartbeats; raise SKIPLOCK_STALLED_AFTER "
                "or lower SKIPLOCK_HEARTBEAT_INTERVAL.",
                id="skiplock.E001",
            )
        )
    if settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        problems.append(
            Error("Skiplock needs PostgreSQL.", hint="Set DATABASE_URL to a postgresql:// URL.", id="skiplock.E002")
        )
    return problems
