"""Fixtures and builders for the job pages' tests: users, signed-in clients, jobs they own."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from jobs import services
from jobs.models import JobRecord

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


class WorkerThread:
    """A real worker (jobs.worker.run_worker) on its own event loop in a thread, stopped on exit."""

    def __init__(self, **options: Any) -> None:
        self.options = {
            "queues": None, "concurrency": 2, "name": "pages-test-worker", "wait": True,
            "listen_notify": True, "install_signal_handlers": False, "shutdown_grace": 2.0, **options,
        }
        self.loop = asyncio.new_event_loop()
        self.task: asyncio.Task[Any] | None = None
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="pages-test-worker", daemon=True)

    def _run(self) -> None:
        from django.db import connections

        from jobs.worker import run_worker

        async def main() -> None:
            self.task = asyncio.current_task()
            self.started.set()
            await run_worker(**self.options)

        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass
        except BaseException as exc:
            self.error = exc
        finally:
            connections.close_all()
            self.loop.close()

    def __enter__(self) -> WorkerThread:
        self.thread.start()
        if not self.started.wait(10):
            raise RuntimeError("the test worker did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(timeout=20)
        if self.error is not None:
            raise self.error
