"""System checks that catch Skiplock configuration mistakes at start-up (and under --deploy)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register


@register()
def check_skiplock_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    problems: list[CheckMessage] = []
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


@register(Tags.security, deploy=True)
def check_production_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """`manage.py check --deploy`: what a production deployment must not forget."""
    problems: list[CheckMessage] = []
    if not settings.DEBUG and not settings.ALLOWED_HOSTS:
        problems.append(
            Error(
                "ALLOWED_HOSTS is empty while DEBUG is off: every request would be refused (400).",
                hint="Set ALLOWED_HOSTS to the host names clients use, comma-separated "
                "(e.g. ALLOWED_HOSTS=jobs.example.com).",
                id="skiplock.E003",
            )
        )
    if getattr(settings, "EMBEDDED_DATABASE", False):
        problems.append(
            Warning(
                "DATABASE_URL is unset: Skiplock runs on the embedded development PostgreSQL.",
                hint="Set DATABASE_URL=postgresql://user:password@host:5432/name to your PostgreSQL server.",
                id="skiplock.W001",
            )
        )
    return problems
