"""docker-compose.yml and the Dockerfile agree with the code (no Docker engine here: we read them).

The settings module is executed with the environment compose would give each service, while a
recording `os.environ` notes what it reads: every variable compose sets must be one the settings
(or the gunicorn config) read, and every value must load.
"""

from __future__ import annotations

import os
import re
import runpy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.foundation_fixtures import BASE_DIR

COMPOSE = yaml.safe_load((BASE_DIR / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
APP_SERVICES = ("migrate", "web", "worker")
GUNICORN = ["gunicorn", "-c", "project/gunicorn.conf.py", "project.asgi:application"]
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def interpolate(value: object) -> str:
    """What compose substitutes for ${VAR:-default} / ${VAR:?error} when the shell sets nothing."""

    def replace(match: re.Match[str]) -> str:
        name, kind, rest = match.groups()
        if kind == "-":
            return rest
        if kind == "?":
            return f"placeholder-{name.lower()}-" + "x" * 40  # a required variable the user must set
        return ""

    return _INTERPOLATION.sub(replace, str(value)).replace("$$", "$")


def service_env(name: str) -> dict[str, str]:
    return {key: interpolate(value) for key, value in SERVICES[name].get("environment", {}).items()}


class RecordingEnviron(dict[str, str]):
    """os.environ that remembers which names were looked up."""

    def __init__(self, values: dict[str, str]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.read.add(key)
        return super().__contains__(key)


def load_as_service(name: str, monkeypatch: pytest.MonkeyPatch) -> RecordingEnviron:
    """Run project/settings.py and project/gunicorn.conf.py with exactly the service's environment."""
    environ = RecordingEnviron({"PATH": os.environ.get("PATH", ""), **service_env(name)})
    monkeypatch.setattr(os, "environ", environ)
    runpy.run_path(str(BASE_DIR / "project" / "settings.py"))
    runpy.run_path(str(BASE_DIR / "project" / "gunicorn.conf.py"))
    return environ


def test_the_services_are_postgres_a_one_shot_migration_web_and_workers() -> None:
    assert set(SERVICES) == {"db", "migrate", "web", "worker"}
    assert SERVICES["db"]["image"] == "postgres:17"
    assert "pg_isready" in str(SERVICES["db"]["healthcheck"]["test"])
    assert "pgdata" in COMPOSE["volumes"]


def test_migrate_runs_once_after_the_database_is_healthy() -> None:
    migrate = SERVICES["migrate"]

    assert migrate["command"] == ["python", "manage.py", "migrate", "--noinput"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"] == {"db": {"condition": "service_healthy"}}
    for name in ("web", "worker"):
        assert SERVICES[name]["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}


def test_web_runs_gunicorn_with_the_asgi_app_on_all_interfaces_and_checks_liveness() -> None:
    web = SERVICES["web"]

    assert web["command"] == GUNICORN
    assert service_env("web")["BIND"] == "0.0.0.0:8000"
    assert web["ports"] == ["${WEB_PORT:-8000}:8000"]
    assert "http://127.0.0.1:8000/health/live" in " ".join(web["healthcheck"]["test"])


def test_workers_scale_and_prove_their_heartbeat() -> None:
    worker = SERVICES["worker"]

    assert worker["command"] == ["python", "manage.py", "worker"]
    assert "container_name" not in worker  # --scale worker=N needs distinct names
    assert "ports" not in worker
    check = worker["healthcheck"]["test"]
    assert check[:3] == ["CMD", "python", "-c"]
    compile(check[3], "worker-healthcheck", "exec")  # the inline probe is valid Python
    assert "procrastinate_workers" in check[3]
    assert "last_heartbeat" in check[3]
    grace = float(service_env("worker")["SKIPLOCK_SHUTDOWN_GRACE"])
    assert float(worker["stop_grace_period"].rstrip("s")) > grace  # docker waits for running jobs


@pytest.mark.parametrize("service", APP_SERVICES)
def test_every_variable_compose_sets_is_read_by_the_settings_and_loads(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    environ = load_as_service(service, monkeypatch)
    unread = set(service_env(service)) - environ.read

    assert unread == set(), f"{service} sets variables nothing reads: {sorted(unread)}"
    assert {"DATABASE_URL", "SECRET_KEY", "ALLOWED_HOSTS", "DEBUG"} <= set(service_env(service))


def test_compose_settings_are_production_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "environ", RecordingEnviron(service_env("web")))
    names = runpy.run_path(str(BASE_DIR / "project" / "settings.py"))

    assert names["DEBUG"] is False
    assert names["EMBEDDED_DATABASE"] is False
    assert names["DATABASES"]["default"]["HOST"] == "db"
    assert names["DATABASES"]["default"]["NAME"] == "skiplock"
    assert "${SECRET_KEY:?" in SERVICES["web"]["environment"]["SECRET_KEY"]  # no default secret, ever


def test_the_dockerfile_builds_the_locked_app_and_runs_the_same_command() -> None:
    dockerfile = (BASE_DIR / "Dockerfile").read_text()
    ignored = (BASE_DIR / ".dockerignore").read_text().split()

    assert "FROM python:3.12-slim" in dockerfile
    assert "uv sync --frozen --no-dev" in dockerfile
    assert "manage.py collectstatic --noinput" in dockerfile
    assert "STATIC_ROOT=/app/staticfiles" in dockerfile
    assert "USER skiplock" in dockerfile
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE)
    assert cmd is not None
    assert yaml.safe_load(cmd.group(1)) == GUNICORN
    assert {".git", ".venv", ".skiplock", "tests"} <= set(ignored)


def test_python_version_matches_the_image() -> None:
    assert Path(BASE_DIR / ".python-version").read_text().strip() == "3.12"
