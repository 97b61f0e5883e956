"""manage.py worker: run jobs from the queue, in N supervised processes, until SIGTERM/SIGINT.

    manage.py worker                              # 1 process × SKIPLOCK_WORKER_CONCURRENCY jobs
    manage.py worker --queues reports,default --concurrency 8 --processes 4 --name reports

The command is a supervisor (jobs/supervisor.py): it restarts a worker process that dies,
kills one that runs a job past its hard time limit, and forwards SIGTERM/SIGINT. On a stop
signal each process stops fetching, lets its jobs finish within SKIPLOCK_SHUTDOWN_GRACE
seconds, requeues the rest, and the command exits 0. A second signal requeues at once.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser


class Command(BaseCommand):
    help = (
        "Run Skiplock workers: N supervised processes fetch jobs from PostgreSQL and run them "
        "until SIGTERM/SIGINT (graceful: running jobs get SKIPLOCK_SHUTDOWN_GRACE seconds, then are requeued)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--queues", default="", help="comma-separated queues (default: all)")
        parser.add_argument("--concurrency", type=int, default=settings.SKIPLOCK_WORKER_CONCURRENCY,
                            help="jobs run at once by each process (default: SKIPLOCK_WORKER_CONCURRENCY)")
        parser.add_argument("--processes", type=int, default=settings.SKIPLOCK_WORKER_PROCESSES,
                            help="worker processes, for CPU-bound work (default: SKIPLOCK_WORKER_PROCESSES)")
        parser.add_argument("--name", default=None, help="worker name shown in the console (default: host-pid)")
        parser.add_argument("--shutdown-grace", type=float, default=None,
                            help="seconds running jobs get on SIGTERM (default: SKIPLOCK_SHUTDOWN_GRACE)")
        parser.add_argument("--child", action="store_true", help="run one worker process, without a supervisor")

    def handle(
        self, *args: Any, queues: str, concurrency: int, processes: int, name: str | None,
        shutdown_grace: float | None, child: bool, **options: Any,
    ) -> None:
        if concurrency < 1 or processes < 1:
            raise CommandError("--concurrency and --processes must be at least 1")
        queue_list = [q.strip() for q in queues.split(",") if q.strip()]
        if child:
            self._run_child(queue_list, concurrency, processes, name, shutdown_grace)
            return
        from jobs.supervisor import Supervisor
        from jobs.worker import default_worker_name

        supervisor = Supervisor(
            processes=processes, queues=queue_list, concurrency=concurrency,
            name=name or default_worker_name(), shutdown_grace=shutdown_grace,
        )
        code = supervisor.run()
        if code:
            sys.exit(code)

    def _run_child(
        self, queues: list[str], concurrency: int, processes: int, name: str | None, shutdown_grace: float | None
    ) -> None:
        from jobs.supervisor import run_child

        fd = os.environ.pop("SKIPLOCK_SUPERVISOR_FD", None)
        code = run_child(queues=queues, concurrency=concurrency, processes=processes, name=name,
                         shutdown_grace=shutdown_grace, report_fd=int(fd) if fd else None)
        if code:
            sys.exit(code)
