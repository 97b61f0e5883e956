"""The PostgreSQL systems under test, behind one interface: Skiplock and bare procrastinate.

Each can start P worker processes of concurrency C (warmed up before any measurement), fill its
queue in one commit, enqueue one job or a batch, and count the jobs still waiting or running.
"""

from __future__ import annotations

import secrets
import sys
import time
from typing import Any, Protocol

from bench.common import Processes, Target, python_env, wait_until

FINISHED_BAD = "status NOT IN ('todo', 'doing', 'succeeded')"
TRUNCATE_QUEUE = "TRUNCATE procrastinate_jobs, procrastinate_events, procrastinate_periodic_defers{} CASCADE"


class System(Protocol):
    name: str
    label: str
    database: str
    target: Target
    polls: int

    def start_workers(self, concurrency: int, processes: int) -> Processes: ...
    def fill(self, task: str, n: int) -> float: ...
    def defer_one(self, task: str, args: dict[str, Any] | None = None) -> None: ...
    def defer_batch(self, task: str, n: int) -> None: ...
    def reset(self) -> None: ...
    def remaining(self) -> int: ...
    def failures(self) -> int: ...
    def wait_drained(self, procs: Processes | None, *, timeout: float, interval: float = 0.01) -> float: ...
    def close(self) -> None: ...


class _PostgresSystem:
    name = ""
    label = ""
    database = ""
    target: Target
    _monitor: Any = None

    def monitor(self) -> Any:
        if self._monitor is None or self._monitor.closed:
            self._monitor = self.target.connect(self.database)
        return self._monitor

    polls = 0  # remaining() queries made: the profile subtracts them from the commit count

    def remaining(self) -> int:
        self.polls += 1
        row = self.monitor().execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
        ).fetchone()
        return int(row[0])

    def failures(self) -> int:
        row = self.monitor().execute(f"SELECT count(*) FROM procrastinate_jobs WHERE {FINISHED_BAD}").fetchone()
        return int(row[0])

    def wait_drained(self, procs: Processes | None, *, timeout: float, interval: float = 0.01) -> float:
        return wait_until(
            lambda: self.remaining() == 0, timeout=timeout, interval=interval,
            what=f"{self.label} to drain its queue", check=procs.check_alive if procs else None,
        )

    def warm_up(self, procs: Processes, jobs: int) -> None:
        """Run some jobs through every worker: they are up, listening and past their first-query costs."""
        wait_until(lambda: self._workers_registered() >= len(procs.procs), timeout=60,
                   what=f"{self.label} workers to register", check=procs.check_alive, interval=0.05)
        self.fill("bench_noop", jobs)
        self.wait_drained(procs, timeout=60)
        time.sleep(0.2)

    def _workers_registered(self) -> int:
        row = self.monitor().execute("SELECT count(*) FROM procrastinate_workers").fetchone()
        return int(row[0])

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None

    def fill(self, task: str, n: int) -> float:
        raise NotImplementedError


class SkiplockSystem(_PostgresSystem):
    """Skiplock as users run it: transitions.job_defer*, jobs.worker.run_worker (batched claim and finish)."""

    name = "skiplock"
    label = "Skiplock"

    def __init__(self, target: Target) -> None:
        self.target = target
        self.database = target.skiplock_db
        from bench.tasks_skiplock import register

        register()  # the bench tasks, in this process too

    def worker_env(self) -> dict[str, str]:
        return python_env(
            DATABASE_URL=self.target.url(self.database), DEBUG="false",
            SECRET_KEY="bench-" + secrets.token_hex(16), DJANGO_SETTINGS_MODULE="project.settings",
            LOG_LEVEL="WARNING",
        )

    def start_workers(self, concurrency: int, processes: int, queues: list[str] | None = None) -> Processes:
        procs = Processes(f"skiplock-c{concurrency}-p{processes}")
        env = self.worker_env()
        for i in range(processes):
            argv = [sys.executable, "-m", "bench.worker_skiplock", "--concurrency", str(concurrency),
                    "--name", f"bench-{i}", *(["--queues", ",".join(queues)] if queues else [])]
            procs.spawn(argv, env)
        try:
            self.warm_up(procs, max(4, 2 * concurrency * processes))
        except BaseException:
            procs.stop()
            raise
        return procs

    def fill(self, task: str, n: int) -> float:
        from django.db import transaction

        from jobs.services import DeferRequest, job_defer_batch

        with transaction.atomic():
            for start in range(0, n, 1000):
                job_defer_batch(requests=[DeferRequest(task_name=task) for _ in range(min(1000, n - start))])
        return time.monotonic()

    def defer_one(self, task: str, args: dict[str, Any] | None = None) -> None:
        from jobs.services import job_defer

        job_defer(task_name=task, args=args or {})

    def defer_batch(self, task: str, n: int) -> None:
        from jobs.services import DeferRequest, job_defer_batch

        job_defer_batch(requests=[DeferRequest(task_name=task) for _ in range(n)])

    def reset(self) -> None:
        self.monitor().execute(TRUNCATE_QUEUE.format(", skiplock_job, skiplock_job_attempt"))


class ProcrastinateSystem(_PostgresSystem):
    """Bare procrastinate 3.x on its own database: a plain App, PsycopgConnector, no Skiplock triggers."""

    name = "procrastinate"
    label = "bare procrastinate"

    def __init__(self, target: Target) -> None:
        self.target = target
        self.database = target.procrastinate_db
        self._app: Any = None

    def setup(self) -> None:
        """A fresh database with procrastinate's schema and nothing else."""
        from bench.procrastinate_app import make_app

        self.close()
        self.target.recreate_database(self.database)
        app = make_app(self.target.conninfo(self.database))
        with app.open():
            app.schema_manager.apply_schema()

    @property
    def app(self) -> Any:
        if self._app is None:
            from bench.procrastinate_app import make_app

            self._app = make_app(self.target.conninfo(self.database))
            self._app.open()
        return self._app

    def start_workers(self, concurrency: int, processes: int) -> Processes:
        procs = Processes(f"procrastinate-c{concurrency}-p{processes}")
        env = python_env()
        for i in range(processes):
            argv = [sys.executable, "-m", "bench.worker_procrastinate", self.target.conninfo(self.database),
                    "--concurrency", str(concurrency), "--name", f"bench-{i}"]
            procs.spawn(argv, env)
        try:
            self.warm_up(procs, max(4, 2 * concurrency * processes))
        except BaseException:
            procs.stop()
            raise
        return procs

    def fill(self, task: str, n: int) -> float:
        self.app.tasks[task].batch_defer(*({} for _ in range(n)))
        return time.monotonic()

    def defer_one(self, task: str, args: dict[str, Any] | None = None) -> None:
        self.app.tasks[task].defer(**(args or {}))

    def defer_batch(self, task: str, n: int) -> None:
        self.app.tasks[task].batch_defer(*({} for _ in range(n)))

    def reset(self) -> None:
        self.monitor().execute(TRUNCATE_QUEUE.format(""))

    def close(self) -> None:
        super().close()
        if self._app is not None:
            self._app.close()
            self._app = None
