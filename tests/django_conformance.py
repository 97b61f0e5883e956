"""Django's own tests of its tasks framework (`tests/tasks` of the Django sdist in uv.lock), adapted
to run against Skiplock's backend: tests/test_django_tasks_conformance.py runs them.

They are not copied into this repository: the first run downloads the sdist of the installed
Django version with pip (through the project's private uv), unpacks `tests/tasks` into
`.skiplock/django-tests/<version>/`, and writes an adapted copy beside it. The adaptation is the
minimum, listed in ADAPTATIONS: which backend (Skiplock's, where the tests name Django's
ImmediateBackend), and how the queue runs (SkiplockRunNowBackend runs the worker right after
enqueue, as ImmediateBackend runs the task; tests touching the database need TransactionTestCase).
docs/jobs.md lists the tests left out and why (EXCLUDED).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import django
from django.db import connection
from django.tasks import Task, TaskResult

from jobs.django_tasks import SkiplockTaskBackend
from tests.foundation_fixtures import BASE_DIR

VERSION = django.__version__
CACHE = BASE_DIR / ".skiplock" / "django-tests" / VERSION
PRISTINE = CACHE / "pristine" / "tasks"
ADAPTED = CACHE / "adapted"
# Django's test modules that exercise a backend through the public API; test_dummy_backend.py and
# test_custom_backend.py test backends defined by Django itself or inside the test, not ours.
MODULES = ("tasks", "test_tasks", "test_immediate_backend")

ADAPTATIONS: tuple[tuple[str, str], ...] = (
    # Which backend: Skiplock's, run at once, wherever the tests name Django's immediate backend.
    ('"django.tasks.backends.immediate.ImmediateBackend"', '"tests.django_conformance.SkiplockRunNowBackend"'),
    ("from django.tasks.backends.immediate import ImmediateBackend",
     "from tests.django_conformance import SkiplockRunNowBackend as ImmediateBackend"),
    # How the queue runs: jobs are database rows, so the tests may use the database.
    ("from django.test import SimpleTestCase, TransactionTestCase, override_settings",
     "from django.test import TransactionTestCase, override_settings\nSimpleTestCase = TransactionTestCase"),
    ("from django.test import SimpleTestCase, override_settings",
     "from django.test import TransactionTestCase, override_settings\nSimpleTestCase = TransactionTestCase"),
)

# Tests left out, with the reason (docs/jobs.md lists them too).
EXCLUDED: dict[str, str] = {
    "ImmediateBackendTestCase.test_cannot_get_result":
        "asserts that results cannot be read back; Skiplock's backend supports get_result",
    "ImmediateBackendTestCase.test_cannot_refresh_result":
        "asserts that results cannot be refreshed; Skiplock's backend supports refresh",
    "ImmediateBackendTestCase.test_cannot_pass_run_after":
        "asserts that run_after is refused; Skiplock's backend supports run_after",
    "ImmediateBackendTestCase.test_throws_keyboard_interrupt":
        "a KeyboardInterrupt raised by a task is that job's failure in Skiplock, never the worker's",
    "ImmediateBackendTransactionTestCase.test_doesnt_wait_until_transaction_commit_by_default":
        "Skiplock enqueues in the caller's transaction: the job runs once it commits, on purpose",
}


class SkiplockRunNowBackend(SkiplockTaskBackend):
    """Skiplock's backend with the queue run right after each enqueue (by the real worker, in process)."""

    def enqueue(self, task: Task, args: Any, kwargs: Any) -> TaskResult:
        from jobs.testing import run_jobs

        result = super().enqueue(task, args, kwargs)
        if connection.in_atomic_block:
            return result  # the job exists for a worker only once the caller commits
        run_jobs(queues=[task.queue_name])
        return self.get_result(result.id)


def django_task_tests() -> Path:
    """The directory holding the adapted `tasks` test package (downloaded and adapted once)."""
    if not (ADAPTED / "tasks" / "test_tasks.py").is_file():
        if not (PRISTINE / "test_tasks.py").is_file():
            _download()
        _adapt()
    return ADAPTED


def _download() -> None:
    uv = BASE_DIR / ".skiplock" / "uv" / "bin" / "uv"
    with tempfile.TemporaryDirectory() as folder:
        command = [
            str(uv) if uv.exists() else "uv", "run", "--no-project", "--python", sys.executable,
            "--with", "pip", "--with", "setuptools", "python", "-m", "pip", "download", f"django=={VERSION}",
            "--no-binary", ":all:", "--no-deps", "--no-build-isolation", "--quiet", "-d", folder,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        archives = list(Path(folder).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise RuntimeError(f"could not download the Django {VERSION} sdist for its tests/tasks: {done.stderr}")
        prefix = f"{archives[0].name.removesuffix('.tar.gz')}/tests/tasks/"
        PRISTINE.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                if member.isfile() and member.name.startswith(prefix) and "/" not in member.name[len(prefix):]:
                    source = archive.extractfile(member)
                    assert source is not None
                    (PRISTINE / member.name[len(prefix):]).write_bytes(io.BytesIO(source.read()).getvalue())


def _adapt() -> None:
    target = ADAPTED / "tasks"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    (target / "__init__.py").write_text("")
    for name in MODULES:
        text = (PRISTINE / f"{name}.py").read_text()
        for old, new in ADAPTATIONS:
            text = text.replace(old, new)
        (target / f"{name}.py").write_text(text)
