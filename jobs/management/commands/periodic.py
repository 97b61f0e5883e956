"""manage.py periodic: list the periodic (cron) schedules, switch them off and on, trigger one now.

    manage.py periodic                      # the list: task, cron, on/off, next run, last run
    manage.py periodic --json
    manage.py periodic disable nightly_report
    manage.py periodic enable sync_region:eu
    manage.py periodic run nightly_report   # one job now, outside the schedule

A schedule is named by its task, or "task:periodic_id" when it has a periodic id (the KEY
column of the list). A switch is stored in the database: every worker obeys it within one pass
of its deferrer, and it survives restarts.
"""

from __future__ import annotations

import getpass
import json as json_lib
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.serializers.json import DjangoJSONEncoder

from jobs.exceptions import SkiplockError
from jobs.periodic import (
    PeriodicProblem,
    periodic_schedules,
    set_periodic_enabled,
    trigger_periodic,
)


class Command(BaseCommand):
    help = "List periodic schedules (task, cron in UTC, on/off, next and last run); enable, disable or run one now."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", nargs="?", choices=("list", "enable", "disable", "run"), default="list",
                            help="list (default), enable KEY, disable KEY, or run KEY now")
        parser.add_argument("key", nargs="?", help='the schedule: its task name, or "task:periodic_id"')
        parser.add_argument("--json", action="store_true", help="one JSON document, for scripts")

    def handle(self, *args: Any, action: str, key: str | None, json: bool, **options: Any) -> None:
        if action == "list":
            if key:
                raise CommandError("`periodic list` takes no schedule name; use enable, disable or run KEY")
            self._list(json=json)
            return
        if not key:
            raise CommandError(f"name the schedule: manage.py periodic {action} KEY (see the KEY column of the list)")
        by = f"cli:{_user()}"
        try:
            if action == "run":
                job = trigger_periodic(key)
                self.stdout.write(f"started job #{job.job_id} for {key} on queue {job.queue}"
                                  + ("" if job.created else " (an equal job was already waiting; it is that one)"))
                return
            changed = set_periodic_enabled(key, action == "enable", by=by)
        except (PeriodicProblem, SkiplockError) as exc:
            raise CommandError(str(exc)) from None
        state = "enabled" if action == "enable" else "disabled"
        self.stdout.write(f"{key} {state}" if changed else f"{key} was already {state}; nothing changed")

    def _list(self, *, json: bool) -> None:
        rows = periodic_schedules()
        if json:
            self.stdout.write(json_lib.dumps(rows, cls=DjangoJSONEncoder, indent=2))
            return
        if not rows:
            self.stdout.write("no periodic schedule is declared")
            return
        header = ("KEY", "CRON (UTC)", "ENABLED", "NEXT RUN", "LAST RUN", "LAST OUTCOME")
        lines = [header]
        for row in rows:
            last = row["last_run_at"].strftime("%Y-%m-%d %H:%M:%S") if row["last_run_at"] else "never"
            if row["last_job_id"] is None:
                outcome = "-" if row["last_run_at"] is None else "(job pruned)"
            else:
                outcome = f"#{row['last_job_id']} {row['last_state'] or 'pruned'}"
                if row["last_error"]:
                    outcome += f" ({row['last_error'][:60]})"
            enabled = "yes" if row["enabled"] else "no"
            nxt = row["next_run_at"].strftime("%Y-%m-%d %H:%M:%S") if row["enabled"] else "(disabled)"
            lines.append((row["key"], row["cron"], enabled, nxt, last, outcome))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        for line in lines:
            self.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
