"""manage.py periodic: list the periodic (cron) schedules, their next run, and how the last one went.

    manage.py periodic
    manage.py periodic --json
"""

from __future__ import annotations

import json as json_lib
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.core.serializers.json import DjangoJSONEncoder

from jobs.periodic import periodic_schedules


class Command(BaseCommand):
    help = "List periodic schedules: task, cron (UTC), next run, last run and its outcome."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="one JSON document, for scripts")

    def handle(self, *args: Any, json: bool, **options: Any) -> None:
        rows = periodic_schedules()
        if json:
            self.stdout.write(json_lib.dumps(rows, cls=DjangoJSONEncoder, indent=2))
            return
        if not rows:
            self.stdout.write("no periodic schedule is declared")
            return
        header = ("TASK", "CRON (UTC)", "NEXT RUN", "LAST RUN", "LAST OUTCOME")
        lines = [header]
        for row in rows:
            name = row["task_name"] + (f"[{row['periodic_id']}]" if row["periodic_id"] else "")
            last = row["last_run_at"].strftime("%Y-%m-%d %H:%M:%S") if row["last_run_at"] else "never"
            if row["last_job_id"] is None:
                outcome = "-" if row["last_run_at"] is None else "(job pruned)"
            else:
                outcome = f"#{row['last_job_id']} {row['last_state'] or 'pruned'}"
                if row["last_error"]:
                    outcome += f" ({row['last_error'][:60]})"
            lines.append((name, row["cron"], row["next_run_at"].strftime("%Y-%m-%d %H:%M:%S"), last, outcome))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        for line in lines:
            self.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())

