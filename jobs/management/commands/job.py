"""manage.py job: start, list, show, cancel, abort, retry, delete and run jobs now from the shell.

Human output by default, `--json` for scripts. Every problem (unknown task, malformed JSON,
invalid arguments, a job in the wrong state) is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Any

import psycopg
import psycopg_pool
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.serializers.json import DjangoJSONEncoder
from django.db import DatabaseError, InterfaceError, OperationalError
from procrastinate.exceptions import ConnectorException

from jobs import selectors, services
from jobs.exceptions import SkiplockError
from jobs.models import JobRecord
from jobs.registry import startable_tasks
from jobs.states import DisplayState, State, colour, label

ANSI = {"grey": "90", "blue": "34", "orange": "33", "cyan": "36", "green": "32", "red": "31", "purple": "35"}
STATE_CHOICES = sorted({*State, *DisplayState})


def state_text(state: str, *, styled: bool = False) -> str:
    """How the command shows a (display) state: its label, coloured on a terminal."""
    text = label(state)
    return f"\033[{ANSI[colour(state)]}m{text}\033[0m" if styled else text


def job_document(record: JobRecord, *, with_attempts: bool) -> dict[str, Any]:
    """Everything the command prints about a job, as JSON values."""
    document: dict[str, Any] = {
        "id": record.job_id,
        "task": record.task_name,
        "queue": record.queue_name,
        "priority": record.priority,
        "state": record.state,
        "display_state": record.display_state,
        "label": label(record.display_state),
        "args": record.args,
        "progress": record.progress,
        "step": record.step,
        "result": record.result,
        "error": record.error,
        "attempts": record.attempts,
        "max_attempts": selectors.job_max_attempts(record),
        "worker": record.worker_name or None,
        "created_at": record.created_at,
        "scheduled_at": record.scheduled_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "duration_seconds": record.duration.total_seconds() if record.duration is not None else None,
        "idempotency_key": record.idempotency_key,
        "lock": record.lock,
        "queueing_lock": record.queueing_lock,
    }
    if with_attempts:
        document["attempts_history"] = [
            {
                "number": attempt.number,
                "worker": attempt.worker_name or None,
                "started_at": attempt.started_at,
                "finished_at": attempt.finished_at,
                "outcome": attempt.outcome,
                "error": (
                    {"type": attempt.error_type, "message": attempt.error_message,
                     "traceback": attempt.error_traceback}
                    if attempt.error_type else None
                ),
            }
            for attempt in selectors.job_attempts(job_id=record.job_id)
        ]
        document["events"] = selectors.job_events(job_id=record.job_id)
    return document


_UNREACHABLE = (OperationalError, InterfaceError, psycopg.OperationalError, psycopg.InterfaceError,
                psycopg_pool.PoolTimeout)


def _unreachable_cause(exc: BaseException) -> BaseException | None:
    """The connection failure behind `exc` (through wrappers such as procrastinate's), if that is what it is."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, _UNREACHABLE):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def unreachable_database_message(exc: BaseException) -> str:
    """One line for a database that cannot be reached: what failed, and what to check."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    where = ("start the embedded one with `manage.py db start`" if settings.EMBEDDED_DATABASE
             else "check that PostgreSQL runs and DATABASE_URL points at it")
    return f"cannot reach the database ({reason}); {where}"


class Command(BaseCommand):
    help = "Start, list, show, cancel, abort, retry, delete or run now Skiplock jobs."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION",
                                        parser_class=CommandParser)

        def action(name: str, help_text: str) -> CommandParser:
            sub: CommandParser = actions.add_parser(name, help=help_text, description=help_text,
                                                    called_from_command_line=parser.called_from_command_line)
            sub.add_argument("--json", action="store_true", help="print JSON for scripts")
            return sub

        start = action("start", "start a job of TASK with JSON arguments")
        start.add_argument("task", metavar="TASK")
        start.add_argument("--args", dest="arguments", default="{}", metavar="JSON", help='arguments, e.g. \'{"points": 50}\'')
        start.add_argument("--queue", default=None)
        start.add_argument("--priority", type=int, default=None, help="higher runs first")
        when = start.add_mutually_exclusive_group()
        when.add_argument("--run-at", default=None, metavar="ISO", help="e.g. 2030-01-01T09:00:00+00:00")
        when.add_argument("--delay", type=float, default=None, metavar="SECONDS", help="run in N seconds")
        start.add_argument("--idempotency-key", default=None, metavar="KEY",
                           help="the same key and arguments give back the same job")

        listing = action("list", "list jobs, newest first")
        listing.add_argument("--task", default=None)
        listing.add_argument("--state", default=None, choices=STATE_CHOICES)
        listing.add_argument("--queue", default=None)
        listing.add_argument("--limit", type=int, default=20)

        action("tasks", "list the tasks you can start, with their arguments")
        for name, help_text in (
            ("show", "show a job: state, progress, result, error and every attempt"),
            ("cancel", "cancel a waiting job"),
            ("abort", "ask a running job to stop"),
            ("retry", "run a failed job again (its history is kept)"),
            ("delete", "delete a finished or waiting job"),
            ("run-now", "make a scheduled job runnable now"),
        ):
            action(name, help_text).add_argument("job_id", type=int, metavar="ID")

    def handle(self, *args: Any, **options: Any) -> None:
        self.as_json = bool(options["json"])
        self.styled = not self.as_json and sys.stdout.isatty()
        handler = getattr(self, "do_" + options["action"].replace("-", "_"))
        try:
            handler(**options)
        except SkiplockError as exc:
            raise CommandError(exc.message) from None
        except (DatabaseError, psycopg.Error, psycopg_pool.PoolTimeout, ConnectorException) as exc:
            unreachable = _unreachable_cause(exc)
            if unreachable is None:
                raise
            raise CommandError(unreachable_database_message(unreachable)) from None

    # --- actions ---------------------------------------------------------------------------------

    def do_start(self, *, task: str, arguments: str, queue: str | None, priority: int | None,
                 run_at: str | None, delay: float | None, idempotency_key: str | None, **_: Any) -> None:
        try:
            values = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise CommandError(f"--args is not valid JSON: {exc}") from None
        if not isinstance(values, dict):
            raise CommandError('--args must be a JSON object, e.g. \'{"points": 50}\'')
        when = None
        if run_at is not None:
            try:
                when = dt.datetime.fromisoformat(run_at)
            except ValueError:
                raise CommandError(f"--run-at is not an ISO 8601 time: {run_at!r}") from None
        job = services.job_defer(task_name=task, args=values, queue=queue, priority=priority,
                                 run_at=when, delay_seconds=delay, idempotency_key=idempotency_key)
        scheduled_at = job.scheduled_at.astimezone(dt.UTC) if job.scheduled_at else None
        if self.as_json:
            self.emit({"id": job.job_id, "task": job.task_name, "queue": job.queue, "state": job.state,
                       "scheduled_at": scheduled_at, "created": job.created})
            return
        verb = "started" if job.created else "already started (same idempotency key)"
        when_text = f", runs at {scheduled_at:%Y-%m-%d %H:%M:%S} UTC" if scheduled_at else ""
        self.stdout.write(f"job {job.job_id} {verb}: {job.task_name} on queue {job.queue}{when_text}")

    def do_list(self, *, task: str | None, state: str | None, queue: str | None, limit: int, **_: Any) -> None:
        if not 1 <= limit <= 10_000:
            raise CommandError("--limit must be from 1 to 10000")
        rows = selectors.job_list(task=task, state=state, queue=queue, limit=limit)
        if self.as_json:
            self.emit([job_document(r, with_attempts=False) for r in rows])
            return
        if not rows:
            self.stdout.write("no jobs")
            return
        table = [("ID", "TASK", "STATE", "QUEUE", "PROGRESS", "ATTEMPTS", "CREATED")]
        for r in rows:
            table.append((str(r.job_id), r.task_name, label(r.display_state), r.queue_name,
                          f"{r.progress}%", str(r.attempts), f"{r.created_at:%Y-%m-%d %H:%M:%S}" if r.created_at else "—"))
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for number, row in enumerate(table):
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
            if number and self.styled:
                cells[2] = state_text(rows[number - 1].display_state, styled=True) + " " * (widths[2] - len(row[2]))
            self.stdout.write("  ".join(cells).rstrip())

    def do_tasks(self, **_: Any) -> None:
        specs = startable_tasks()
        if self.as_json:
            self.emit([spec.describe() for spec in specs])
            return
        for spec in specs:
            retry = spec.retry.describe()
            self.stdout.write(f"{spec.name}  (queue {spec.queue}, priority {spec.priority}, "
                              f"{retry['max_attempts']} attempts)")
            self.stdout.write(f"    arguments: {spec.signature()}")
            if spec.description:
                self.stdout.write(f"    {spec.description.splitlines()[0]}")

    def do_show(self, *, job_id: int, **_: Any) -> None:
        record = selectors.job_get(job_id=job_id)
        document = job_document(record, with_attempts=True)
        if self.as_json:
            self.emit(document)
            return
        write = self.stdout.write
        write(f"job {record.job_id}  {record.task_name}  "
              f"{state_text(record.display_state, styled=self.styled)}")
        write(f"  queue       {record.queue_name} (priority {record.priority})")
        write(f"  arguments   {json.dumps(record.args)}")
        write(f"  progress    {record.progress}%" + (f"  {record.step}" if record.step else ""))
        max_attempts = document["max_attempts"]
        write(f"  attempts    {record.attempts}" + (f" of {max_attempts}" if max_attempts else ""))
        for name in ("created_at", "scheduled_at", "started_at", "finished_at"):
            if document[name] is not None:
                write(f"  {name.replace('_at', ''):<11} {document[name]:%Y-%m-%d %H:%M:%S.%f}"[:-3] + " UTC")
        if document["duration_seconds"] is not None:
            write(f"  duration    {document['duration_seconds']:.3f} s")
        if record.worker_name:
            write(f"  worker      {record.worker_name}")
        if record.result is not None:
            write(f"  result      {json.dumps(record.result)[:2000]}")
        if record.error:
            write(f"  error       {record.error_type}: {record.error_message}")
        for attempt in document["attempts_history"]:
            ended = f"{attempt['finished_at']:%H:%M:%S}" if attempt["finished_at"] else "…"
            line = f"  attempt {attempt['number']}   {attempt['outcome']:<9} {attempt['started_at']:%H:%M:%S}–{ended}"
            if attempt["error"]:
                line += f"  {attempt['error']['type']}: {attempt['error']['message']}"
            write(line)

    def do_cancel(self, *, job_id: int, **_: Any) -> None:
        self.transition(job_id, services.job_cancel(job_id=job_id), "cancelled")

    def do_abort(self, *, job_id: int, **_: Any) -> None:
        state = services.job_abort(job_id=job_id)
        self.transition(job_id, state, "asked to abort" if state == State.ABORTING else "cancelled")

    def do_retry(self, *, job_id: int, **_: Any) -> None:
        self.transition(job_id, services.job_retry(job_id=job_id), "queued for another attempt")

    def do_delete(self, *, job_id: int, **_: Any) -> None:
        services.job_delete(job_id=job_id)
        self.transition(job_id, None, "deleted")

    def do_run_now(self, *, job_id: int, **_: Any) -> None:
        self.transition(job_id, services.job_run_now(job_id=job_id), "runnable now")

    # --- output ----------------------------------------------------------------------------------

    def transition(self, job_id: int, state: str | None, text: str) -> None:
        if self.as_json:
            self.emit({"id": job_id, "state": state})
        else:
            self.stdout.write(f"job {job_id} {text}")

    def emit(self, value: Any) -> None:
        self.stdout.write(json.dumps(value, cls=DjangoJSONEncoder, indent=2))
