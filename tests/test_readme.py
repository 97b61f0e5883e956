"""The README and the Celery migration guide say what the code does: their examples run here."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from django.db import connection

from jobs.models import JobRecord
from jobs.testing import run_jobs
from tests.api_fixtures import WorkerThread
from tests.foundation_fixtures import BASE_DIR

README = (BASE_DIR / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def code_blocks(markdown: str, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(markdown) if lang == language]


def section(markdown: str, title: str) -> str:
    start = markdown.index(f"## {title}")
    end = markdown.find("\n## ", start + 3)
    return markdown[start : end if end != -1 else None]


def database_url() -> str:
    """The test database as a DATABASE_URL, for commands the examples run in a subprocess."""
    db = connection.settings_dict
    user = quote(str(db["USER"]), safe="")
    password = f":{quote(str(db['PASSWORD']), safe='')}" if db["PASSWORD"] else ""
    host, port, name = str(db["HOST"]), str(db["PORT"]), str(db["NAME"])
    if host.startswith("/"):
        return f"postgresql://{user}{password}@/{name}?host={host}&port={port}"
    return f"postgresql://{user}{password}@{host}:{port}/{name}"


# -- the two commands ----------------------------------------------------------------------------


def test_the_readme_opens_with_the_two_commands() -> None:
    first_block = FENCE.search(README)
    assert first_block is not None
    assert README.index(first_block.group(0)) < README.index("## ")  # before any section
    commands = [line.split("#")[0].strip() for line in first_block.group(2).splitlines()]
    assert commands == ["make run", "make test"]


def test_ci_runs_the_readme_test_command_and_nothing_else() -> None:
    script = (BASE_DIR / ".ci" / "run").read_text()
    commands = [line for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == "make test"
    assert all(line.startswith(("set ", "cd ")) for line in commands[:-1])
    assert os.access(BASE_DIR / ".ci" / "run", os.X_OK)


def test_make_test_runs_ruff_mypy_and_pytest_and_fails_when_no_test_ran() -> None:
    makefile = (BASE_DIR / "Makefile").read_text()
    test_target = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert test_target is not None
    assert "lint typecheck pytest" in test_target.group(1)
    assert "ruff check ." in makefile
    assert "mypy ." in makefile
    pytest_target = re.search(r"^pytest:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert pytest_target is not None
    assert "-eq 5" in pytest_target.group(1)  # pytest's "no tests collected" becomes a failure
    assert "db --instance test stop" in pytest_target.group(1)  # and no PostgreSQL is left running


# -- the settings table --------------------------------------------------------------------------


def test_every_variable_the_settings_read_is_in_the_readme_table(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_compose import RecordingEnviron

    table = section(README, "Settings")
    read: set[str] = set()
    for env in ({"DEBUG": "true"}, {"SECRET_KEY": "x" * 50, "DATABASE_URL": "postgresql://u@db/skiplock"}):
        environ = RecordingEnviron({"PATH": os.environ.get("PATH", ""), **env})
        monkeypatch.setattr(os, "environ", environ)
        runpy.run_path(str(BASE_DIR / "project" / "settings.py"))
        runpy.run_path(str(BASE_DIR / "project" / "gunicorn.conf.py"))
        read |= environ.read
    missing = sorted(name for name in read if f"`{name}`" not in table)

    assert missing == [], f"README.md's settings table lacks: {missing}"


def test_the_readme_links_to_the_docs() -> None:
    links = re.findall(r"\]\((docs/[\w-]+\.md)\)", README)
    expected = {f"docs/{name}.md" for name in (
        "architecture", "jobs", "api", "operations", "admin", "pages", "benchmarks", "testing",
        "migrating-from-celery",
    )}
    assert expected <= set(links)
    assert [link for link in set(links) if not (BASE_DIR / link).is_file()] == []


# -- the tour --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_readme_tour_in_the_shell_runs_against_the_real_server(asgi_server: str) -> None:
    script = "\n".join(code_blocks(section(README, "A five-minute tour"), "bash"))
    env = {**os.environ, "SKIPLOCK": asgi_server, "DATABASE_URL": database_url(), "DEBUG": "true"}

    with WorkerThread(name="readme-worker"):
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script], cwd=BASE_DIR, env=env,
            capture_output=True, text=True, timeout=120,
        )

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert '"status_url": "/api/jobs/' in out
    assert '"events_url": "/api/jobs/' in out
    assert "event: progress" in out
    assert "event: end" in out
    job = JobRecord.objects.get(task_name="deploy_stack")  # the worker's maintenance job aside
    assert job.state == "succeeded"
    assert f'"id": {job.job_id}, "task": "deploy_stack"' in out
    assert out.rstrip().endswith("}")  # the status read ends the tour
    assert '"state": "succeeded"' in out.rstrip().splitlines()[-1]


@pytest.mark.django_db(transaction=True)
def test_the_readme_python_example_defers_inside_the_callers_transaction(
    capsys: pytest.CaptureFixture[str],
) -> None:
    (example,) = code_blocks(section(README, "A five-minute tour"), "python")
    namespace: dict[str, Any] = {}

    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation

    assert capsys.readouterr().out.strip() == "todo"
    run_jobs()
    assert JobRecord.objects.get(job_id=namespace["job_id"]).state == "succeeded"


# -- migrating from Celery (its examples run in tests/test_celery_guide.py) ------------------------


def test_the_celery_guide_is_linked_from_the_readme() -> None:
    assert "docs/migrating-from-celery.md" in README
    assert Path(BASE_DIR / "docs" / "migrating-from-celery.md").is_file()
