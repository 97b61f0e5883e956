"""manage.py worker: run jobs from the queue in this process."""

from __future__ import annotations

import asyncio
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from jobs.worker import run_worker


class Command(BaseCommand):
    help = "Run a Skiplock worker: fetch jobs from PostgreSQL and run them until stopped (SIGTERM/SIGINT)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--queues", default="", help="comma-separated queues (default: all)")
        parser.add_argument("--concurrency", type=int, default=settings.SKIPLOCK_WORKER_CONCURRENCY)
        parser.add_argument("--name", default=None, help="worker name shown in the console")

    def handle(self, *args: Any, queues: str, concurrency: int, name: str | None, **options: Any) -> None:
        queue_list = [q.strip() for q in queues.split(",") if q.strip()]
        asyncio.run(run_worker(queues=queue_list, concurrency=concurrency, name=name, wait=True))
