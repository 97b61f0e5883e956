"""Settings come from the environment through typed helpers that fail loudly, naming the variable."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpResponse

from project.env import env_bool, env_choice, env_float, env_int, env_list, env_secret, env_str
from tests.foundation_fixtures import BASE_DIR

SETTINGS_FILE = BASE_DIR / "project" / "settings.py"
# Variables a developer may have exported; each settings load below starts from none of them.
_CLEARED = ("DEBUG", "SECRET_KEY", "SECRET_KEY_FILE", "DATABASE_URL", "ALLOWED_HOSTS", "STATIC_ROOT", "LOG_LEVEL")


def load_settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> dict[str, Any]:
    """Execute project/settings.py afresh under `env` and return its names."""
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return runpy.run_path(str(SETTINGS_FILE))


PRODUCTION = {"SECRET_KEY": "k" * 20 + "-production-secret-0123456789abcdef", "ALLOWED_HOSTS": "jobs.example.com"}


# -- the helpers -------------------------------------------------------------------------------


def test_env_bool_reads_the_usual_spellings_and_names_the_variable_on_anything_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for raw, expected in [("true", True), ("1", True), ("YES", True), ("on", True), ("false", False), ("0", False), ("no", False)]:
        monkeypatch.setenv("SKIPLOCK_FLAG", raw)
        assert env_bool("SKIPLOCK_FLAG") is expected
    monkeypatch.delenv("SKIPLOCK_FLAG")
    assert env_bool("SKIPLOCK_FLAG", True) is True

    monkeypatch.setenv("SKIPLOCK_FLAG", "maybe")
    with pytest.raises(ImproperlyConfigured, match=r"SKIPLOCK_FLAG='maybe' is not a boolean; use true or false"):
        env_bool("SKIPLOCK_FLAG")


def test_env_int_and_env_float_check_type_and_minimum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKIPLOCK_N", "12")
    assert env_int("SKIPLOCK_N", 1, minimum=1) == 12
    monkeypatch.setenv("SKIPLOCK_N", "twelve")
    with pytest.raises(ImproperlyConfigured, match=r"SKIPLOCK_N='twelve' is not an integer"):
        env_int("SKIPLOCK_N", 1)
    monkeypatch.setenv("SKIPLOCK_N", "0")
    with pytest.raises(ImproperlyConfigured, match=r"SKIPLOCK_N=0 must be at least 1"):
        env_int("SKIPLOCK_N", 1, minimum=1)

    monkeypatch.setenv("SKIPLOCK_X", "0.25")
    assert env_float("SKIPLOCK_X", 1.0) == 0.25
    monkeypatch.setenv("SKIPLOCK_X", "fast")
    with pytest.raises(ImproperlyConfigured, match=r"SKIPLOCK_X='fast' is not a number"):
        env_float("SKIPLOCK_X", 1.0)
    monkeypatch.setenv("SKIPLOCK_X", "-1")
    with pytest.raises(ImproperlyConfigured, match=r"SKIPLOCK_X=-1.0 must be at least 0"):
        env_float("SKIPLOCK_X", 1.0, minimum=0.0)


def test_env_choice_list_and_str(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKIPLOCK_LEVEL", "loud")
    with pytest.raises(ImproperlyConfigured, match=r"SKIPLOCK_LEVEL='loud' is not one of: INFO, DEBUG"):
        env_choice("SKIPLOCK_LEVEL", "INFO", ("INFO", "DEBUG"))
    monkeypatch.setenv("SKIPLOCK_HOSTS", " a.example.com, ,b.example.com ")
    assert env_list("SKIPLOCK_HOSTS", []) == ["a.example.com", "b.example.com"]
    monkeypatch.setenv("SKIPLOCK_NAME", "")
    assert env_str("SKIPLOCK_NAME", "fallback") == "fallback"  # `NAME=` in a compose file means unset


def test_env_secret_reads_a_file_named_by_NAME_FILE(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("from-a-file\n")
    monkeypatch.setenv("SKIPLOCK_TOKEN", "from-the-env")
    monkeypatch.setenv("SKIPLOCK_TOKEN_FILE", str(secret))
    assert env_secret("SKIPLOCK_TOKEN") == "from-a-file"  # the file wins: Docker/Kubernetes secrets

    monkeypatch.setenv("SKIPLOCK_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ImproperlyConfigured, match=r"SKIPLOCK_TOKEN_FILE='.*missing' cannot be read"):
        env_secret("SKIPLOCK_TOKEN")


# -- the settings module -----------------------------------------------------------------------


def test_debug_is_off_unless_set_and_a_missing_secret_key_is_then_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    production_database = "postgresql://skiplock@db.internal/skiplock"
    with pytest.raises(ImproperlyConfigured, match="SECRET_KEY is not set and DEBUG is off; set SECRET_KEY"):
        load_settings(monkeypatch, DATABASE_URL=production_database)
    with pytest.raises(ImproperlyConfigured, match="SECRET_KEY is not set and DEBUG is off"):
        load_settings(monkeypatch, DEBUG="false", SECRET_KEY="", DATABASE_URL=production_database)


def test_the_embedded_database_is_development_so_commands_need_no_debug_or_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = load_settings(monkeypatch)  # a shell in a checkout beside `make run`

    assert names["DEBUG"] is False
    assert names["EMBEDDED_DATABASE"] is True
    assert names["SECRET_KEY"] == (BASE_DIR / ".skiplock" / "secret-key").read_text().strip()


def test_production_defaults_are_secure(monkeypatch: pytest.MonkeyPatch) -> None:
    names = load_settings(monkeypatch, **PRODUCTION)

    assert names["DEBUG"] is False
    assert names["SECRET_KEY"] == PRODUCTION["SECRET_KEY"]
    assert names["ALLOWED_HOSTS"] == ["jobs.example.com"]
    assert names["SESSION_COOKIE_SECURE"] is True
    assert names["CSRF_COOKIE_SECURE"] is True
    assert names["SECURE_SSL_REDIRECT"] is True
    assert names["SECURE_HSTS_SECONDS"] >= 3600


def test_secret_key_can_come_from_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "key").write_text("a-secret-key-from-a-mounted-file\n")
    names = load_settings(monkeypatch, SECRET_KEY_FILE=str(tmp_path / "key"), ALLOWED_HOSTS="x")
    assert names["SECRET_KEY"] == "a-secret-key-from-a-mounted-file"


def test_development_gets_a_local_secret_key_and_local_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    names = load_settings(monkeypatch, DEBUG="true")

    assert names["SECRET_KEY"] == (BASE_DIR / ".skiplock" / "secret-key").read_text().strip()
    assert len(names["SECRET_KEY"]) >= 50
    assert "127.0.0.1" in names["ALLOWED_HOSTS"]
    assert names["SESSION_COOKIE_SECURE"] is False


def test_database_url_is_parsed_into_databases(monkeypatch: pytest.MonkeyPatch) -> None:
    names = load_settings(
        monkeypatch, **PRODUCTION, DATABASE_URL="postgresql://job%40s:p%2Fss@db.internal:6432/queue?sslmode=require"
    )
    database = names["DATABASES"]["default"]

    assert names["EMBEDDED_DATABASE"] is False
    assert (database["USER"], database["PASSWORD"], database["HOST"], database["PORT"], database["NAME"]) == (
        "job@s", "p/ss", "db.internal", "6432", "queue",
    )
    assert database["OPTIONS"] == {"sslmode": "require"}


def test_without_database_url_the_embedded_cluster_of_the_instance_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKIPLOCK_PG_INSTANCE", "test_fdn_settings")
    monkeypatch.setenv("SKIPLOCK_PG_TEST_FDN_SETTINGS_PORT", "55432")
    names = load_settings(monkeypatch, **PRODUCTION)
    database = names["DATABASES"]["default"]

    assert names["EMBEDDED_DATABASE"] is True
    assert database["PORT"] == "55432"
    assert database["HOST"].endswith("test_fdn_settings/run")
    assert database["NAME"] == "skiplock"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DATABASE_URL": "mysql://db/skiplock"}, "DATABASE_URL must be a postgresql:// URL, not 'mysql'://"),
        ({"DATABASE_URL": "postgresql://db:5432/"}, r"DATABASE_URL names no database"),
        ({"SKIPLOCK_WORKER_CONCURRENCY": "0"}, "SKIPLOCK_WORKER_CONCURRENCY=0 must be at least 1"),
        ({"SKIPLOCK_OPEN_METRICS": "perhaps"}, "SKIPLOCK_OPEN_METRICS='perhaps' is not a boolean"),
        ({"CONN_MAX_AGE": "forever"}, "CONN_MAX_AGE='forever' is not an integer"),
        ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL='chatty' is not one of: DEBUG, INFO"),
        ({"SKIPLOCK_PG_INSTANCE": "../dev"}, r"SKIPLOCK_PG_INSTANCE='../dev': instance name"),
        ({"SKIPLOCK_PG_INSTANCE": "test_fdn_x", "SKIPLOCK_PG_TEST_FDN_X_PORT": "http"},
         r"SKIPLOCK_PG_TEST_FDN_X_PORT='http' is not a TCP port"),
    ],
)
def test_a_bad_value_is_an_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ImproperlyConfigured, match=message):
        load_settings(monkeypatch, **PRODUCTION, **env)


# -- static files ------------------------------------------------------------------------------


def test_a_source_checkout_serves_static_files_from_the_apps_without_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    from whitenoise.middleware import WhiteNoiseMiddleware

    names = load_settings(monkeypatch, **PRODUCTION)
    assert names["STATIC_ROOT"] is None
    assert names["WHITENOISE_USE_FINDERS"] is True

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        WhiteNoiseMiddleware(lambda request: HttpResponse())
    assert [str(w.message) for w in caught if "No directory at" in str(w.message)] == []


@pytest.mark.django_db(transaction=True)
def test_admin_static_files_are_served_over_http(asgi_server: str) -> None:
    response = httpx.get(f"{asgi_server}/static/admin/css/base.css")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/css")


def test_with_static_root_the_collected_compressed_files_are_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    names = load_settings(monkeypatch, **PRODUCTION, STATIC_ROOT=str(tmp_path))

    assert names["STATIC_ROOT"] == tmp_path
    assert names["WHITENOISE_USE_FINDERS"] is False
    assert names["STORAGES"]["staticfiles"]["BACKEND"] == "whitenoise.storage.CompressedManifestStaticFilesStorage"


@pytest.mark.slow
def test_collectstatic_fills_static_root_as_the_docker_image_does(tmp_path: Path) -> None:
    env = {**os.environ, "STATIC_ROOT": str(tmp_path / "static"), "DEBUG": "false", **PRODUCTION}

    result = subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput", "-v", "0"],
        cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=180,
    )

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "static" / "staticfiles.json").is_file()
    assert (tmp_path / "static" / "admin" / "css" / "base.css.gz").is_file()
