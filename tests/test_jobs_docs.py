"""Every example in docs/jobs.md and docs/testing.md runs, against real PostgreSQL and the real worker."""

from __future__ import annotations

import io
import re
import shlex
import sys
import types
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from jobs import services
from jobs.models import JobRecord
from tests import core_fixtures

pytestmark = pytest.mark.django_db(transaction=True)
clean_queue = core_fixtures.clean_queue

DOCS = Path(settings.BASE_DIR) / "docs"


def blocks(name: str, language: str) -> list[str]:
    found: list[str] = re.findall(rf"```{language}\n(.*?)```", (DOCS / name).read_text(), re.S)
    return found


def run_as_module(name: str, sources: list[str]) -> types.ModuleType:
    """Run the blocks in order as one importable module (tasks defined there are real tasks)."""
    module = types.ModuleType(name)
    sys.modules[name] = module
    for number, source in enumerate(sources, start=1):
        exec(compile(source, f"docs/{name}#block{number}", "exec"), module.__dict__)  # noqa: S102
    return module


def test_the_python_examples_of_jobs_md_run() -> None:
    sources = blocks("jobs.md", "python")
    assert len(sources) >= 10
    module = run_as_module("docs_jobs_md", sources)
    assert JobRecord.objects.get(pk=module.job_id).state == "succeeded"


def test_the_shell_examples_of_jobs_md_run() -> None:
    ran = 0
    for block in blocks("jobs.md", "console"):
        lines = block.strip().splitlines()
        for index, line in enumerate(lines):
            if not line.startswith("$ python manage.py job ") or "<ID>" in line:
                continue
            args = shlex.split(line.removeprefix("$ python manage.py job "))
            following = lines[index + 1] if index + 1 < len(lines) else "$"
            if following.startswith("CommandError: "):
                with pytest.raises(CommandError) as excinfo:
                    call_command("job", *args, stdout=io.StringIO())
                assert f"CommandError: {excinfo.value}" == following
            else:
                call_command("job", *args, stdout=io.StringIO())
            ran += 1
    assert ran >= 6


def test_the_examples_of_testing_md_run() -> None:
    module = run_as_module("docs_testing_md", blocks("testing.md", "python"))
    tests = [getattr(module, name) for name in dir(module) if name.startswith("test_")]
    assert len(tests) == 2
    for test in tests:
        test()
    # The abort recipe, on a task that waits to be aborted.
    job_id = services.job_defer(task_name="tests.core.wait_for_abort", args={"timeout": 20}).job_id
    thread = module.run_in_background()
    module.wait_until_running(job_id)
    services.job_abort(job_id=job_id)
    thread.join(timeout=30)
    assert JobRecord.objects.get(pk=job_id).state == "aborted"
    # A worker running beside the test.
    record = module.watch_a_deploy_run()
    assert (record.state, record.progress) == ("succeeded", 100)
