"""`manage.py check --deploy` under production settings: clean, and loud about what is missing."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest

from tests.foundation_fixtures import BASE_DIR

pytestmark = pytest.mark.slow

PRODUCTION = {
    "DEBUG": "false",
    "SECRET_KEY": secrets.token_urlsafe(50),
    "ALLOWED_HOSTS": "jobs.example.com",
    "DATABASE_URL": "postgresql://skiplock:secret@db.internal:5432/skiplock",
}


def check_deploy(**env: str | None) -> subprocess.CompletedProcess[str]:
    """Run the deploy checks in a fresh process: settings are computed once, at import."""
    environment = {k: v for k, v in os.environ.items() if k not in PRODUCTION and k != "SECRET_KEY_FILE"}
    environment.update({k: v for k, v in {**PRODUCTION, **env}.items() if v is not None})
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=BASE_DIR, env=environment, capture_output=True, text=True, timeout=120,
    )


def test_check_deploy_is_clean_under_production_settings() -> None:
    result = check_deploy()

    assert result.returncode == 0, result.stderr
    assert "System check identified no issues (0 silenced)." in result.stdout


def test_check_deploy_flags_an_empty_allowed_hosts_and_the_embedded_database() -> None:
    result = check_deploy(ALLOWED_HOSTS=None, DATABASE_URL=None, SKIPLOCK_PG_INSTANCE="test_fdn_deploy")

    assert result.returncode == 1
    assert "(skiplock.E003) ALLOWED_HOSTS is empty while DEBUG is off" in result.stderr
    assert "(skiplock.W001) DATABASE_URL is unset: Skiplock runs on the embedded development PostgreSQL" in result.stderr
    assert "Traceback" not in result.stderr


def test_production_without_a_secret_key_refuses_to_start() -> None:
    result = check_deploy(SECRET_KEY=None)

    assert result.returncode != 0
    assert result.stderr.startswith("configuration error: SECRET_KEY is not set and DEBUG is off")
    assert "Traceback" not in result.stderr
