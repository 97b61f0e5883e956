"""Every example of docs/operations.md runs: the Python blocks, and the shell commands."""

from __future__ import annotations

import io
import re
import shlex
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from procrastinate.contrib.django import app

from jobs import periodic, registry
from jobs.management.commands.worker import Command as WorkerCommand

DOC = (Path(settings.BASE_DIR) / "docs" / "operations.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC, flags=re.DOTALL)


def commands(name: str) -> list[list[str]]:
    found = []
    for block in blocks("console"):
        for line in block.splitlines():
            words = shlex.split(line.removeprefix("$ "), comments=True)
            if words[:3] == ["python", "manage.py", name]:
                found.append(words[3:])
    return found


def test_the_python_examples_declare_working_tasks_and_schedules() -> None:
    before_tasks, before_schedules = set(registry._REGISTRY), set(periodic._SCHEDULES)
    try:
        for code in blocks("python"):
            exec(compile(code, "docs/operations.md", "exec"), {"__name__": "docs_operations"})  # noqa: S102
        assert registry.get_task("build_report").hard_time_limit == 360
        assert periodic._SCHEDULES[("nightly_digest", "")].cron == "0 3 * * *"
        assert periodic._SCHEDULES[("sync_region", "eu")].args == {"region": "eu"}
        assert periodic._SCHEDULES[("sync_region", "us")].args == {"region": "us"}
    finally:
        for name in set(registry._REGISTRY) - before_tasks:
            registry._REGISTRY.pop(name)
            app.tasks.pop(name, None)
        for key in set(periodic._SCHEDULES) - before_schedules:
            periodic._SCHEDULES.pop(key)


def test_the_worker_command_lines_use_real_options() -> None:
    lines = commands("worker")
    assert len(lines) == 3
    parser = WorkerCommand().create_parser("manage.py", "worker")
    for args in lines:
        parser.parse_args(args)  # exits on an unknown option


@pytest.mark.django_db(transaction=True)
def test_the_prune_and_periodic_command_lines_run() -> None:
    lines = [("prune", args) for args in commands("prune")] + [("periodic", args) for args in commands("periodic")]
    assert len(lines) == 5
    for name, args in lines:
        out = io.StringIO()
        call_command(name, *args, stdout=out)
        assert out.getvalue().strip()
