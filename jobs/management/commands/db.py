"""manage.py db {start,stop,status,url,psql}: the embedded PostgreSQL of this checkout."""

from __future__ import annotations

import os
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from project.embedded_postgres import EmbeddedPostgres, EmbeddedPostgresError


class Command(BaseCommand):
    help = "Manage the embedded PostgreSQL (used when DATABASE_URL is unset)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", choices=["start", "stop", "status", "url", "psql"])
        parser.add_argument(
            "--instance", default=os.environ.get("SKIPLOCK_PG_INSTANCE", "dev"),
            help="which cluster: dev (default) or test",
        )

    def handle(self, *args: Any, action: str, instance: str, **options: Any) -> None:
        if not settings.EMBEDDED_DATABASE and action != "url":
            raise CommandError("DATABASE_URL is set: Skiplock uses that server, not the embedded one")
        cluster = EmbeddedPostgres(instance)
        try:
            if action == "start":
                started = cluster.start()
                self.stdout.write(f"PostgreSQL ({instance}) {'started' if started else 'already running'} on port {cluster.port}")
            elif action == "stop":
                stopped = cluster.stop()
                self.stdout.write(f"PostgreSQL ({instance}) {'stopped' if stopped else 'was not running'}")
            elif action == "status":
                if cluster.is_running():
                    self.stdout.write(f"PostgreSQL ({instance}) running, pid {cluster.pid()}, port {cluster.port}, data {cluster.data_dir.resolve()}")
                else:
                    self.stdout.write(f"PostgreSQL ({instance}) not running")
                    raise SystemExit(3)
            elif action == "url":
                self.stdout.write(settings.DATABASE_URL if not settings.EMBEDDED_DATABASE else cluster.url())
            elif action == "psql":
                if not cluster.is_running():
                    raise CommandError(f"PostgreSQL ({instance}) is not running; start it with: manage.py db start")
                command = cluster.psql_command()
                os.execv(command[0], command)
        except EmbeddedPostgresError as exc:
            raise CommandError(str(exc)) from None
