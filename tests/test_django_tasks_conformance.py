"""Django's own tasks tests (its sdist's tests/tasks) pass against Skiplock's backend.

tests/django_conformance.py fetches and adapts them (which backend, how the queue runs); the
test cases are collected here, each test under its own name, the exclusions skipped with their
reason (listed in docs/jobs.md).
"""

from __future__ import annotations

import importlib
import sys
import unittest

from tests.django_conformance import EXCLUDED, django_task_tests

sys.path.insert(0, str(django_task_tests()))
_immediate = importlib.import_module("tasks.test_immediate_backend")
_tasks = importlib.import_module("tasks.test_tasks")


def _skip_excluded() -> None:
    for path, reason in EXCLUDED.items():
        class_name, method = path.split(".")
        case = getattr(_immediate, class_name, None) or getattr(_tasks, class_name)
        setattr(case, method, unittest.skip(reason)(getattr(case, method)))


_skip_excluded()
ImmediateBackendTestCase = _immediate.ImmediateBackendTestCase
ImmediateBackendTransactionTestCase = _immediate.ImmediateBackendTransactionTestCase
TaskTestCase = _tasks.TaskTestCase
