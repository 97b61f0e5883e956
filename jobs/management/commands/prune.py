"""manage.py prune: delete finished jobs past the retention, in short batches (with progress).

    manage.py prune                         # finished more than SKIPLOCK_RESULT_RETENTION ago
    manage.py prune --older-than 86400      # finished more than a day ago
    manage.py prune --dry-run               # only count them
    manage.py prune --stalled               # also take back jobs of dead workers first

The maintenance task does the same on its schedule; this is for a one-off clean-up.
"""

from __future__ import annotations

import sys
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection

from jobs import maintenance


class Command(BaseCommand):
    help = "Delete finished jobs (and their records) older than the retention, in batches; --stalled also sweeps."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--older-than", type=float, default=None,
                            help="seconds since the job finished (default: SKIPLOCK_RESULT_RETENTION)")
        parser.add_argument("--batch", type=int, default=None, help="rows per transaction (default: SKIPLOCK_PRUNE_BATCH)")
        parser.add_argument("--dry-run", action="store_true", help="count what would be deleted, delete nothing")
        parser.add_argument("--stalled", action="store_true", help="first retry the jobs of dead workers")

    def handle(
        self, *args: Any, older_than: float | None, batch: int | None, dry_run: bool, stalled: bool, **options: Any
    ) -> None:
        age = float(settings.SKIPLOCK_RESULT_RETENTION if older_than is None else older_than)
        if age < 0 or (batch is not None and batch < 1):
            raise CommandError("--older-than must be ≥ 0 and --batch ≥ 1")
        if stalled:
            report = maintenance.recover_stalled_jobs()
            self.stdout.write(
                f"stalled jobs: {len(report.retried)} retried, {len(report.failed)} failed; "
                f"{report.workers_pruned} dead worker(s) forgotten"
            )
        if dry_run:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM skiplock_job r JOIN procrastinate_jobs j ON j.id = r.job_id "
                    "WHERE r.finished_at < now() - make_interval(secs => %s) "
                    "AND j.status IN ('succeeded', 'failed', 'cancelled', 'aborted')",
                    [age],
                )
                count = cursor.fetchone()[0]
            self.stdout.write(f"{count} finished job(s) older than {age:g} s would be deleted")
            return
        tty = sys.stdout.isatty()

        def progress(deleted: int) -> None:
            if tty:
                self.stdout.write(f"\rdeleted {deleted} job(s)…", ending="")
                self.stdout.flush()

        result = maintenance.prune_finished_jobs(older_than=age, batch=batch, time_budget=float("inf"),
                                                 progress=progress)
        if tty:
            self.stdout.write("")
        self.stdout.write(
            f"deleted {result.deleted} finished job(s) older than {age:g} s "
            f"in {result.batches} batch(es), {result.seconds:.1f} s"
        )
