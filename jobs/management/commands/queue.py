"""manage.py queue: list, show, pause, resume and limit queues at run time.

A paused queue keeps accepting jobs; no worker starts one until it is resumed (running jobs
finish). Limits hold across every worker: `--concurrency N` running at once, `--rate N --per
SECONDS` starts per window. Human output by default, `--json` for list and show. Every problem is
one line on stderr and a non-zero exit; nothing is changed then.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import psycopg_pool
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.serializers.json import DjangoJSONEncoder
from django.db import DatabaseError
from procrastinate.exceptions import ConnectorException

from jobs import services
from jobs.management.commands.job import _unreachable_cause, unreachable_database_message
from jobs.queues import UNSET, QueueInfo

CHANGED_BY = "manage.py queue"


def limits_text(info: QueueInfo) -> str:
    parts = []
    if info.concurrency is not None:
        parts.append(f"at most {info.concurrency} running")
    if info.rate_limit is not None:
        parts.append(f"at most {info.rate_limit} starts per {info.rate_period:g} s")
    return ", ".join(parts) or "no limits"


class Command(BaseCommand):
    help = "List, show, pause, resume or limit Skiplock queues."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION",
                                        parser_class=CommandParser)

        def action(name: str, help_text: str) -> CommandParser:
            sub: CommandParser = actions.add_parser(name, help=help_text, description=help_text,
                                                    called_from_command_line=parser.called_from_command_line)
            return sub

        action("list", "every queue: paused or not, limits, jobs waiting and running").add_argument(
            "--json", dest="as_json", action="store_true", help="print JSON for scripts")
        show = action("show", "one queue: paused or not, limits, jobs by state, oldest wait")
        show.add_argument("name", metavar="NAME")
        show.add_argument("--json", dest="as_json", action="store_true", help="print JSON for scripts")
        action("pause", "stop every worker starting jobs of the queue (it keeps accepting jobs)").add_argument(
            "name", metavar="NAME")
        action("resume", "let workers start the queue's jobs again").add_argument("name", metavar="NAME")
        limit = action("limit", "set or clear the queue's concurrency and rate limits (what is not given stays)")
        limit.add_argument("name", metavar="NAME")
        concurrency = limit.add_mutually_exclusive_group()
        concurrency.add_argument("--concurrency", type=int, default=None, metavar="N",
                                 help="at most N jobs of the queue run at once, across every worker")
        concurrency.add_argument("--no-concurrency", action="store_true", help="clear the concurrency limit")
        rate = limit.add_mutually_exclusive_group()
        rate.add_argument("--rate", type=int, default=None, metavar="N", help="at most N starts per --per seconds")
        rate.add_argument("--no-rate", action="store_true", help="clear the rate limit")
        limit.add_argument("--per", type=float, default=None, metavar="SECONDS", help="the rate limit's window")

    def handle(self, *args: Any, **options: Any) -> None:
        handler = getattr(self, "do_" + options["action"])
        try:
            handler(**options)
        except services.QueueProblem as exc:
            raise CommandError(f"{exc} (nothing was changed)") from None
        except (DatabaseError, psycopg.Error, psycopg_pool.PoolTimeout, ConnectorException) as exc:
            unreachable = _unreachable_cause(exc)
            if unreachable is None:
                raise
            raise CommandError(unreachable_database_message(unreachable)) from None

    # --- actions ---------------------------------------------------------------------------------

    def do_list(self, *, as_json: bool, **_: Any) -> None:
        queues = services.every_queue()
        if as_json:
            self.emit([info.as_dict() for info in queues])
            return
        if not queues:
            self.stdout.write("no queues")
            return
        table = [("QUEUE", "STATUS", "WAITING", "SCHEDULED", "RUNNING", "OLDEST WAIT", "LIMITS")]
        for info in queues:
            table.append((info.name, "paused" if info.paused else "running", str(info.depth["todo"]),
                          str(info.depth["scheduled"]), str(info.running), f"{info.oldest_waiting_seconds:.1f} s",
                          limits_text(info)))
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            self.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())

    def do_show(self, *, name: str, as_json: bool, **_: Any) -> None:
        info = services.get_queue(name)
        if as_json:
            self.emit(info.as_dict())
            return
        write = self.stdout.write
        status = f"paused since {info.paused_at:%Y-%m-%d %H:%M:%S} UTC" if info.paused and info.paused_at else (
            "paused" if info.paused else "running")
        write(f"queue {info.name}  {status}")
        write(f"  limits      {limits_text(info)}")
        if info.starts_in_window is not None:
            write(f"  started     {info.starts_in_window} in the last {info.rate_period:g} s")
        write(f"  waiting     {info.depth['todo']} (oldest {info.oldest_waiting_seconds:.1f} s)")
        write(f"  scheduled   {info.depth['scheduled']}")
        write(f"  running     {info.depth['doing']}" + (f" (+{info.depth['aborting']} aborting)"
                                                         if info.depth["aborting"] else ""))

    def do_pause(self, *, name: str, **_: Any) -> None:
        changed = services.pause_queue(name, by=CHANGED_BY)
        self.stdout.write(f"queue {name} paused: no worker starts its jobs until `manage.py queue resume {name}`"
                          if changed else f"queue {name} was already paused")

    def do_resume(self, *, name: str, **_: Any) -> None:
        changed = services.resume_queue(name, by=CHANGED_BY)
        self.stdout.write(f"queue {name} resumed" if changed else f"queue {name} was not paused")

    def do_limit(self, *, name: str, concurrency: int | None, no_concurrency: bool, rate: int | None,
                 no_rate: bool, per: float | None, **_: Any) -> None:
        changes: dict[str, Any] = {}
        if concurrency is not None or no_concurrency:
            changes["concurrency"] = None if no_concurrency else concurrency
        if (rate is None) != (per is None) and not no_rate:
            raise CommandError("give --rate N and --per SECONDS together (or --no-rate to clear the rate limit)")
        if no_rate and per is not None:
            raise CommandError("--per goes with --rate, not with --no-rate")
        if rate is not None or no_rate:
            changes["rate_limit"] = None if no_rate else rate
            changes["rate_period"] = None if no_rate else per
        if not changes:
            raise CommandError("give --concurrency N, --no-concurrency, --rate N --per SECONDS or --no-rate")
        limits = services.set_queue_limits(
            name, by=CHANGED_BY, concurrency=changes.get("concurrency", UNSET),
            rate_limit=changes.get("rate_limit", UNSET), rate_period=changes.get("rate_period", UNSET),
        )
        self.stdout.write(f"queue {name}: {limits_text(QueueInfo(name, **limits))}")

    # --- output ----------------------------------------------------------------------------------

    def emit(self, value: Any) -> None:
        self.stdout.write(json.dumps(value, cls=DjangoJSONEncoder, indent=2))
