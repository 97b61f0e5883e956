# ruff: noqa: F811  (pytest fixtures imported from tests/worker_fixtures.py are redefined as arguments)
"""Periodic tasks at run time (issue 15 item 7): switched off and on, triggered now, from the
command and the code, stored in the database so every worker (and the next one) obeys."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from jobs import maintenance, periodic
from jobs.models import PeriodicSwitch
from jobs.worker import worker_pool
from tests.worker_fixtures import QUEUE, scalar, worker_tables  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)

KEY = "record_run:switch"


@pytest.fixture
def every_second(worker_tables: None) -> Iterator[periodic.Schedule]:
    """A schedule ticking every second (cron's sixth field), with its own arguments and priority."""
    schedule = periodic.register_periodic("record_run", cron="* * * * * *", args={"work_ms": 3},
                                          periodic_id="switch", priority=7)
    try:
        yield schedule
    finally:
        periodic._SCHEDULES.pop(schedule.key, None)


def ticks_deferred() -> int:
    return int(scalar("SELECT count(*) FROM procrastinate_periodic_defers WHERE task_name = 'record_run' "
                      "AND periodic_id = 'switch' AND job_id IS NOT NULL"))


def run_a_worker_deferrer(seconds: float) -> None:
    """One worker's periodic deferrer, on its own pool, for a few seconds (a fresh one each call)."""

    async def scenario() -> None:
        class Connector:
            pool = worker_pool(concurrency=1)

        connector = Connector()
        await connector.pool.open(wait=True)
        stop = asyncio.Event()
        try:
            runner = asyncio.create_task(periodic.run_deferrer(connector, stop=stop))
            await asyncio.sleep(seconds)
            stop.set()
            await runner
        finally:
            await connector.pool.close()

    asyncio.run(scenario())


def command(*args: str) -> str:
    out = io.StringIO()
    call_command("periodic", *args, stdout=out)
    return out.getvalue()


def test_a_disabled_schedule_defers_nothing_at_its_ticks_and_an_enabled_one_does(
    every_second: periodic.Schedule,
) -> None:
    assert every_second.switch_key == KEY
    assert periodic.set_periodic_enabled(KEY, False, by="test") is True
    run_a_worker_deferrer(2.5)
    assert ticks_deferred() == 0

    assert periodic.set_periodic_enabled(KEY, True, by="test") is True
    run_a_worker_deferrer(2.5)
    assert ticks_deferred() >= 1  # at least one tick of the 2.5 s (the machine may be slow)


def test_a_switch_survives_a_new_worker_and_holds_for_every_one(every_second: periodic.Schedule) -> None:
    assert "record_run:switch disabled" in command("disable", KEY)
    # Two workers one after the other (a restart), each with its own pool: both read the stored switch.
    run_a_worker_deferrer(1.5)
    run_a_worker_deferrer(1.5)
    assert ticks_deferred() == 0
    switch = PeriodicSwitch.objects.get(key=KEY)
    assert switch.enabled is False
    assert switch.changed_by.startswith("cli:")


def test_run_now_starts_one_job_with_the_schedules_arguments_and_leaves_its_ticks_alone(
    every_second: periodic.Schedule,
) -> None:
    periodic.set_periodic_enabled(KEY, False)
    output = command("run", KEY)  # a switched-off schedule can still be run by hand
    job_id = int(output.split("#")[1].split()[0])
    row = scalar("SELECT json_build_object('task', task_name, 'args', args, 'queue', queue_name, "
                 "'priority', priority, 'status', status) FROM procrastinate_jobs WHERE id = %s", [job_id])
    found = row if isinstance(row, dict) else json.loads(row)
    assert found == {"task": "record_run", "args": {"work_ms": 3}, "queue": QUEUE, "priority": 7, "status": "todo"}
    assert ticks_deferred() == 0  # outside the schedule: no tick recorded


def test_the_list_shows_which_schedules_are_enabled(every_second: periodic.Schedule) -> None:
    listed = command()
    line = next(line for line in listed.splitlines() if line.startswith(KEY))
    assert " yes " in line
    command("disable", KEY)
    line = next(line for line in command().splitlines() if line.startswith(KEY))
    assert " no " in line
    assert "(disabled)" in line
    rows = json.loads(command("--json"))
    mine = next(r for r in rows if r["key"] == KEY)
    assert mine["enabled"] is False
    assert mine["switched_by"].startswith("cli:")
    assert "was already disabled; nothing changed" in command("disable", KEY)
    assert "record_run:switch enabled" in command("enable", KEY)
    assert "was already enabled; nothing changed" in command("enable", KEY)


def test_an_unknown_schedule_is_refused_with_the_known_names(every_second: periodic.Schedule) -> None:
    with pytest.raises(CommandError, match=r"no periodic schedule is named 'nightly'; known schedules: .*record_run:switch"):
        command("disable", "nightly")
    with pytest.raises(CommandError, match="name the schedule"):
        command("run")
    assert not PeriodicSwitch.objects.exists()


def test_skiplocks_own_maintenance_schedule_cannot_be_switched_off_or_run_by_hand(worker_tables: None) -> None:
    maintenance.ensure_schedule()
    with pytest.raises(periodic.PeriodicProblem, match="Skiplock's own schedule"):
        periodic.set_periodic_enabled(maintenance.MAINTENANCE_TASK, False)
    with pytest.raises(CommandError, match="Skiplock's own schedule"):
        command("run", maintenance.MAINTENANCE_TASK)
    assert not PeriodicSwitch.objects.exists()


def test_the_command_lines_in_the_admin_guide_run(every_second: periodic.Schedule) -> None:
    import re
    import shlex

    from django.conf import settings

    doc = (settings.BASE_DIR / "docs" / "admin.md").read_text()
    lines = [shlex.split(line.removeprefix("$ "), comments=True)
             for block in re.findall(r"```console\n(.*?)```", doc, flags=re.DOTALL) for line in block.splitlines()]
    periodic_lines = [words[3:] for words in lines if words[:3] == ["python", "manage.py", "periodic"]]
    assert [args[:1] for args in periodic_lines] == [[], ["disable"], ["enable"], ["run"]]
    for args in periodic_lines:
        # The guide's schedule (sync_region:eu) is declared in docs/operations.md; this one stands in for it.
        assert command(*[KEY if arg == "sync_region:eu" else arg for arg in args]).strip()
    assert PeriodicSwitch.objects.get(key=KEY).enabled is True
