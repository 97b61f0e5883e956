"""Fixtures of the worker and reliability tests: real `manage.py worker` subprocesses on the test database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from django.conf import settings
from django.db import connection

from tests import worker_tasks

QUEUE = "wtest"
LOG_DIR = Path(settings.BASE_DIR) / "test-artifacts" / "workers"

# Timeouts shortened so the suite stays fast; each test may override.
FAST_ENV = {
    "SKIPLOCK_HEARTBEAT_INTERVAL": "0.5",
    "SKIPLOCK_STALLED_AFTER": "4",
    "SKIPLOCK_MAINTENANCE_CRON": "* * * * * */1",
    "SKIPLOCK_SHUTDOWN_GRACE": "3",
    "SKIPLOCK_FETCH_POLL_INTERVAL": "0.5",
    "SKIPLOCK_PROGRESS_INTERVAL": "0.2",
}


def database_url() -> str:
    """The test database (the one pytest-django created) as a DATABASE_URL for subprocesses."""
    db = connection.settings_dict
    auth = quote(db["USER"] or "")
    if db.get("PASSWORD"):
        auth += ":" + quote(db["PASSWORD"])
    host, port, name = db.get("HOST") or "", db.get("PORT") or "", db["NAME"]
    if host.startswith("/"):
        return f"postgresql://{auth}@/{name}?host={quote(host)}" + (f"&port={port}" if port else "")
    return f"postgresql://{auth}@{host}" + (f":{port}" if port else "") + f"/{name}"


def wait_for(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    ends = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > ends:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def query(sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params or [])
        return list(cursor.fetchall()) if cursor.description else []


def scalar(sql: str, params: list[Any] | None = None) -> Any:
    rows = query(sql, params)
    return rows[0][0] if rows else None


class WorkerProcess:
    """`manage.py worker` as a real subprocess (a supervisor and its worker processes)."""

    def __init__(self, name: str, *, processes: int = 1, concurrency: int = 1, env: dict[str, str] | None = None,
                 queues: str = QUEUE) -> None:
        self.name = name
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{name}.log"
        self.log = self.log_path.open("wb")
        full_env = {
            **os.environ, **FAST_ENV, "DATABASE_URL": database_url(), "DEBUG": "true",
            "SKIPLOCK_IMPORT_PATHS": "tests.worker_tasks", "PYTHONUNBUFFERED": "1", **(env or {}),
        }
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "worker", "--queues", queues, "--processes", str(processes),
             "--concurrency", str(concurrency), "--name", name],
            cwd=settings.BASE_DIR, env=full_env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.processes = processes

    def wait_ready(self, timeout: float = 90.0) -> list[int]:
        """Wait until every worker process registered; returns their pids."""
        def ready() -> list[int] | None:
            if self.process.poll() is not None:
                raise AssertionError(f"worker {self.name} exited early:\n{self.output()}")
            pids = [row[0] for row in query(
                "SELECT pid FROM skiplock_worker WHERE (name = %s OR name LIKE %s) AND stopped_at IS NULL",
                [self.name, self.name + "-%"],
            )]
            return pids if len(pids) >= self.processes else None

        return wait_for(ready, timeout=timeout, interval=0.2, what=f"worker {self.name} to register")

    def child_pids(self) -> list[int]:
        return [row[0] for row in query(
            "SELECT pid FROM skiplock_worker WHERE (name = %s OR name LIKE %s) AND stopped_at IS NULL",
            [self.name, self.name + "-%"],
        )]

    def terminate(self, timeout: float = 60.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill_all(self) -> None:
        """SIGKILL the supervisor and every worker process (a machine or container dying)."""
        pids = self.child_pids()
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGSTOP)  # so it cannot react to its children dying
        for pid in pids:
            with _suppress():
                os.kill(pid, signal.SIGKILL)
        with _suppress():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def close(self) -> None:
        if self.process.poll() is None:
            with _suppress():
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        for pid in self.child_pids():
            with _suppress():
                os.kill(pid, signal.SIGKILL)
        self.log.close()


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return exc[0] is not None and issubclass(exc[0], ProcessLookupError | PermissionError)


@pytest.fixture
def worker_tables(transactional_db: None) -> None:
    """The test tasks' tables, empty, and no job of the test queue left from another test."""
    with connection.cursor() as cursor:
        cursor.execute(worker_tasks.TABLES)
        cursor.execute("TRUNCATE wtest_running, wtest_overlaps, wtest_runs, wtest_started")
        cursor.execute("DELETE FROM procrastinate_jobs WHERE queue_name IN (%s, 'skiplock')", [QUEUE])
        cursor.execute("DELETE FROM procrastinate_periodic_defers")
        cursor.execute("DELETE FROM procrastinate_workers")
    return


@pytest.fixture
def start_worker(worker_tables: None) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(name: str, **kwargs: Any) -> WorkerProcess:
        worker = WorkerProcess(name, **kwargs)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()
