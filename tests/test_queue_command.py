"""manage.py queue: list, show, pause, resume and limit queues; human and --json output; bad input
is one line on stderr, a non-zero exit, and no change."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from jobs import queues, services
from tests import core_fixtures
from tests.core_fixtures import manage

pytestmark = pytest.mark.django_db(transaction=True)
clean_queue = core_fixtures.clean_queue


@pytest.fixture(autouse=True)
def clean_controls(clean_queue: None) -> Iterator[None]:
    def empty() -> None:
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM skiplock_queue")

    empty()
    yield
    empty()


def queue(*args: str) -> str:
    out = io.StringIO()
    call_command("queue", *args, stdout=out)
    return out.getvalue()


def queue_json(*args: str) -> Any:
    return json.loads(queue(*args, "--json"))


def state_of(name: str) -> tuple[Any, ...]:
    info = queues.get_queue(name)
    return info.paused, info.concurrency, info.rate_limit, info.rate_period


def test_pause_and_resume_a_queue_and_see_it_in_the_list() -> None:
    services.job_defer(task_name="optimize_route", args={"points": 10})
    services.job_defer(task_name="optimize_route", args={"points": 11}, delay_seconds=3600)
    assert "queue cpu paused: no worker starts its jobs until `manage.py queue resume cpu`" in queue("pause", "cpu")
    assert queue("pause", "cpu").strip() == "queue cpu was already paused"
    listed = {entry["name"]: entry for entry in queue_json("list")}
    assert listed["cpu"]["paused"] is True
    assert listed["cpu"]["depth"] == {"todo": 1, "scheduled": 1, "doing": 0, "aborting": 0}
    assert listed["default"]["paused"] is False  # a task's queue, listed while empty
    table = queue("list").splitlines()
    assert table[0].split() == ["QUEUE", "STATUS", "WAITING", "SCHEDULED", "RUNNING", "OLDEST", "WAIT", "LIMITS"]
    assert next(line for line in table if line.startswith("cpu")).split()[:5] == ["cpu", "paused", "1", "1", "0"]
    assert queue("resume", "cpu").strip() == "queue cpu resumed"
    assert queue("resume", "cpu").strip() == "queue cpu was not paused"
    assert state_of("cpu")[0] is False


def test_limit_sets_and_clears_concurrency_and_rate_separately() -> None:
    assert queue("limit", "cpu", "--concurrency", "3").strip() == "queue cpu: at most 3 running"
    assert queue("limit", "cpu", "--rate", "100", "--per", "60").strip() == (
        "queue cpu: at most 3 running, at most 100 starts per 60 s"
    )
    assert state_of("cpu") == (False, 3, 100, 60.0)
    shown = queue_json("show", "cpu")
    assert shown["limits"] == {"concurrency": 3, "rate_limit": 100, "rate_period": 60.0}
    assert shown["starts_in_window"] == 0
    human = queue("show", "cpu")
    assert human.startswith("queue cpu  running")
    assert "limits      at most 3 running, at most 100 starts per 60 s" in human
    assert "started     0 in the last 60 s" in human
    assert queue("limit", "cpu", "--no-concurrency").strip() == "queue cpu: at most 100 starts per 60 s"
    assert queue("limit", "cpu", "--no-rate").strip() == "queue cpu: no limits"
    assert state_of("cpu") == (False, None, None, None)


@pytest.mark.parametrize(("args", "message"), [
    (("limit", "cpu"), "give --concurrency N, --no-concurrency, --rate N --per SECONDS or --no-rate"),
    (("limit", "cpu", "--rate", "10"), "give --rate N and --per SECONDS together"),
    (("limit", "cpu", "--per", "60"), "give --rate N and --per SECONDS together"),
    (("limit", "cpu", "--no-rate", "--per", "60"), "--per goes with --rate, not with --no-rate"),
    (("limit", "cpu", "--concurrency", "0"), "a concurrency limit must be an integer from 1"),
    (("limit", "cpu", "--rate", "10", "--per", "-1"), "a rate limit's period must be from 0"),
    (("limit", "cpu", "--rate", "0", "--per", "60"), "a rate limit must be an integer from 1"),
    (("pause", "no spaces"), "queue may hold only ASCII letters"),
    (("show", "x" * 41), "queue must be 1 to 40 characters"),
])
def test_bad_input_is_an_error_and_changes_nothing(args: tuple[str, ...], message: str) -> None:
    queue("limit", "cpu", "--concurrency", "5")
    with pytest.raises(CommandError, match=message.replace("(", r"\(")) as excinfo:
        queue(*args)
    assert "(nothing was changed)" in str(excinfo.value) or args[1] == "cpu"
    assert state_of("cpu") == (False, 5, None, None)
    assert queues.list_queues(["no spaces"]) == []


def test_the_command_line_exits_non_zero_with_one_line_on_stderr() -> None:
    done = manage("queue", "limit", "cpu", "--concurrency", "many")
    assert done.returncode != 0
    assert "argument --concurrency: invalid int value: 'many'" in done.stderr
    done = manage("queue", "limit", "cpu", "--concurrency", "2", "--no-concurrency")
    assert done.returncode != 0
    assert "not allowed with argument" in done.stderr
    done = manage("queue", "pause", "bad name")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "CommandError: queue may hold only ASCII letters, digits, '_', '-' and '.', and must start with a letter "
        "or digit (nothing was changed)"
    ]
    assert manage("queue", "pause", "cpu").returncode == 0
    assert state_of("cpu")[0] is True


def test_the_operations_doc_queue_commands_run_in_order() -> None:
    import re
    import shlex

    from django.conf import settings

    doc = (settings.BASE_DIR / "docs" / "operations.md").read_text()
    lines = [
        shlex.split(line.removeprefix("$ "), comments=True)
        for block in re.findall(r"```console\n(.*?)```", doc, flags=re.DOTALL)
        for line in block.splitlines()
        if line.startswith("$ python manage.py queue ")
    ]
    assert len(lines) == 7
    outputs = [queue(*words[3:]) for words in lines]
    assert outputs[0].startswith("queue cpu paused")
    assert outputs[1].startswith("queue cpu  paused since")
    assert outputs[3].strip() == "queue cpu: at most 2 running, at most 100 starts per 60 s"
    assert any(entry["name"] == "cpu" for entry in json.loads(outputs[5]))
    assert state_of("cpu") == (False, None, None, None)
