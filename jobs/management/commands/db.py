"""manage.py db {start,stop,status,url,psql}: the embedded PostgreSQL of this checkout.

    manage.py db start                  start it (a no-op when it already runs)
    manage.py db stop                   stop it (fast shutdown: open sessions are closed)
    manage.py db status                 exit status 0 when running, 3 when not (like pg_ctl)
    manage.py db url                    the DATABASE_URL Skiplock uses
    manage.py db psql [-c "SELECT 1"]   psql on it; further arguments go to psql

`--instance NAME` (before the action) or SKIPLOCK_PG_INSTANCE picks the cluster: dev by default.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from project.embedded_postgres import EmbeddedPostgres, EmbeddedPostgresError


class Command(BaseCommand):
    help = "Manage the embedded PostgreSQL (used when DATABASE_URL is unset)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--instance", default=None, help="which cluster (default: $SKIPLOCK_PG_INSTANCE or dev)")
        parser.add_argument("action", choices=["start", "stop", "status", "url", "psql"])
        parser.add_argument("psql_args", nargs=argparse.REMAINDER, help="psql only: arguments passed to psql")

    def handle(self, *args: Any, action: str, instance: str | None, psql_args: list[str], **options: Any) -> None:
        instance = instance or os.environ.get("SKIPLOCK_PG_INSTANCE") or "dev"
        if not settings.EMBEDDED_DATABASE and action != "url":
            raise CommandError("DATABASE_URL is set: Skiplock uses that server, not the embedded one")
        if psql_args and action != "psql":
            raise CommandError(f"unexpected arguments after {action!r}: {' '.join(psql_args)}")
        try:
            cluster = EmbeddedPostgres(instance)
            if action == "start":
                started = cluster.start()
                state = "started" if started else "already running"
                self.stdout.write(f"PostgreSQL ({instance}) {state} on port {cluster.port}")
            elif action == "stop":
                stopped = cluster.stop()
                self.stdout.write(f"PostgreSQL ({instance}) {'stopped' if stopped else 'was not running'}")
            elif action == "status":
                if not cluster.is_running():
                    self.stdout.write(f"PostgreSQL ({instance}) not running")
                    raise SystemExit(3)
                self.stdout.write(
                    f"PostgreSQL ({instance}) running, pid {cluster.pid()}, port {cluster.port}, "
                    f"data {cluster.data_dir.resolve()}"
                )
            elif action == "url":
                self.stdout.write(cluster.url() if settings.EMBEDDED_DATABASE else settings.DATABASE_URL)
            elif action == "psql":
                if not cluster.is_running():
                    raise CommandError(f"PostgreSQL ({instance}) is not running; start it with: manage.py db start")
                extra = psql_args[1:] if psql_args[:1] == ["--"] else psql_args
                command = [*cluster.psql_command(), *extra]
                self.stdout.flush()
                os.execv(command[0], command)
        except EmbeddedPostgresError as exc:
            raise CommandError(str(exc)) from None
