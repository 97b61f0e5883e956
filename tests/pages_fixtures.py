"""Fixtures and builders for the job pages' tests: users, signed-in clients, jobs they own."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from jobs import services
from jobs.models import JobRecord
from jobs.testing import WorkerThread as _WorkerThread

PASSWORD = "correct horse battery staple"
# deploy_stack in well under a second (see jobs/tasks.py).
FAST_DEPLOY: dict[str, Any] = {"check_interval": 0, "build_megabytes": 1, "health_checks": 1}


@pytest.fixture(autouse=True)
def fast_passwords(settings: Any) -> None:
    """Hash test passwords cheaply: the default PBKDF2 costs most of a second per user."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def make_user(username: str, *, staff: bool = False) -> User:
    return User.objects.create_user(username=username, password=PASSWORD, is_staff=staff)


def signed_in(user: User, *, enforce_csrf_checks: bool = False) -> Client:
    client = Client(enforce_csrf_checks=enforce_csrf_checks)
    client.force_login(user)
    return client


def start_job(owner: User | None, task: str = "deploy_stack", **args: Any) -> JobRecord:
    """A job started the way the launcher starts one: through the service, owned by `owner`."""
    if task == "deploy_stack":
        args = {**FAST_DEPLOY, **args}
    job = services.job_defer(task_name=task, args=args, owner_id=owner.pk if owner else None)
    return JobRecord.objects.get(pk=job.job_id)


@pytest.fixture
def alice(db: None) -> User:
    return make_user("alice")


@pytest.fixture
def bob(db: None) -> User:
    return make_user("bob")


@pytest.fixture
def staff(db: None) -> User:
    return make_user("operator", staff=True)


class WorkerThread(_WorkerThread):
    """jobs.testing.WorkerThread, named for these tests."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**{"name": "pages-test-worker", **options})
