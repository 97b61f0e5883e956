"""manage.py job: start, list, show, cancel, abort, retry, delete, run-now; human and --json output."""

from __future__ import annotations

import datetime as dt
import io
import json
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from jobs import services
from jobs.models import JobRecord
from jobs.testing import run_jobs
from tests import core_fixtures
from tests.core_fixtures import FAST_DEPLOY, manage

pytestmark = pytest.mark.django_db(transaction=True)
clean_queue = core_fixtures.clean_queue


def job(*args: str) -> str:
    out = io.StringIO()
    call_command("job", *args, stdout=out)
    return out.getvalue()


def job_json(*args: str) -> Any:
    return json.loads(job(*args, "--json"))


def test_start_then_show_a_deploy_that_succeeds() -> None:
    started = job_json("start", "deploy_stack", "--args", json.dumps(FAST_DEPLOY))
    assert (started["task"], started["state"], started["created"]) == ("deploy_stack", "todo", True)
    run_jobs()
    shown = job_json("show", str(started["id"]))
    assert (shown["state"], shown["display_state"], shown["progress"], shown["step"]) == (
        "succeeded", "succeeded", 100, "done",
    )
    assert shown["result"]["release"]
    assert [s["name"] for s in shown["result"]["services"]] == ["api", "web", "worker"]
    assert shown["error"] is None
    assert (shown["attempts"], shown["max_attempts"]) == (1, 4)
    assert shown["attempts_history"][0]["outcome"] == "succeeded"
    assert shown["duration_seconds"] > 0
    assert [e["type"] for e in shown["events"]] == ["deferred", "started", "succeeded"]
    human = job("show", str(started["id"]))
    assert f"job {started['id']}  deploy_stack  Succeeded" in human
    assert "progress    100%  done" in human
    assert "attempt 1   succeeded" in human


def test_start_human_output_and_options() -> None:
    out = job("start", "optimize_route", "--args", '{"points": 20}', "--queue", "cpu", "--priority", "5",
              "--delay", "3600", "--idempotency-key", "route-20")
    record = JobRecord.objects.get()
    assert out.startswith(f"job {record.job_id} started: optimize_route on queue cpu, runs at ")
    assert (record.priority, record.display_state, record.idempotency_key) == (5, "scheduled", "route-20")
    again = job("start", "optimize_route", "--args", '{"points": 20}', "--idempotency-key", "route-20")
    assert again.startswith(f"job {record.job_id} already started (same idempotency key)")
    year = dt.datetime.now(dt.UTC).year + 1  # within the 366 days a job may be scheduled ahead
    at = job_json("start", "optimize_route", "--run-at", f"{year}-01-01T09:00:00+02:00")
    assert at["scheduled_at"] == f"{year}-01-01T07:00:00Z"


def test_list_filters_by_task_state_and_queue() -> None:
    waiting = services.job_defer(task_name="optimize_route", args={"points": 10})
    later = services.job_defer(task_name="optimize_route", args={"points": 11}, delay_seconds=600)
    other = services.job_defer(task_name="deploy_stack", args=FAST_DEPLOY)
    services.job_cancel(job_id=other.job_id)
    assert [j["id"] for j in job_json("list")] == [other.job_id, later.job_id, waiting.job_id]
    assert [j["id"] for j in job_json("list", "--task", "optimize_route")] == [later.job_id, waiting.job_id]
    assert [j["id"] for j in job_json("list", "--state", "todo")] == [waiting.job_id]
    assert [j["id"] for j in job_json("list", "--state", "scheduled")] == [later.job_id]
    assert [j["id"] for j in job_json("list", "--state", "cancelled")] == [other.job_id]
    assert [j["id"] for j in job_json("list", "--queue", "cpu", "--limit", "1")] == [later.job_id]
    table = job("list").splitlines()
    assert table[0].split() == ["ID", "TASK", "STATE", "QUEUE", "PROGRESS", "ATTEMPTS", "CREATED"]
    assert table[1].split()[:3] == [str(other.job_id), "deploy_stack", "Cancelled"]
    assert table[2].split()[:3] == [str(later.job_id), "optimize_route", "Scheduled"]
    assert job("list", "--state", "failed") == "no jobs\n"


def test_cancel_abort_retry_delete_and_run_now() -> None:
    first = job_json("start", "optimize_route", "--args", '{"points": 10}')["id"]
    assert job("cancel", str(first)) == f"job {first} cancelled\n"
    with pytest.raises(CommandError, match=f"cannot cancel job {first}: it is cancelled"):
        job("cancel", str(first))
    second = job_json("start", "optimize_route", "--args", '{"points": 10}')["id"]
    assert job_json("abort", str(second)) == {"id": second, "state": "cancelled"}
    failing = job_json("start", "index_document", "--args", '{"title": "empty", "text": " "}')["id"]
    run_jobs(include_scheduled=True)
    assert job("retry", str(failing)) == f"job {failing} queued for another attempt\n"
    assert JobRecord.objects.get(pk=failing).display_state == "retrying"
    later = job_json("start", "optimize_route", "--delay", "600")["id"]
    assert job("run-now", str(later)) == f"job {later} runnable now\n"
    assert job("delete", str(first)) == f"job {first} deleted\n"
    with pytest.raises(CommandError, match=f"no job has id {first}"):
        job("show", str(first))


def test_tasks_lists_what_can_be_started() -> None:
    out = job("tasks")
    assert "deploy_stack  (queue default, priority 0, 4 attempts)" in out
    assert "arguments: points (int, optional), seed (int, optional), max_rounds (int, optional), restarts (int, optional)" in out
    described = {t["name"]: t for t in job_json("tasks")}
    assert described["optimize_route"]["queue"] == "cpu"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["start", "nope"], "unknown task 'nope'; known tasks: "),
        (["start", "optimize_route", "--args", "{points: 5}"],
         "--args is not valid JSON: Expecting property name enclosed in double quotes"),
        (["start", "optimize_route", "--args", "[1]"], "--args must be a JSON object"),
        (["start", "optimize_route", "--args", '{"points": "many", "colour": 1}'],
         "invalid arguments for task 'optimize_route': 'points': Input should be a valid integer"),
        (["start", "optimize_route", "--run-at", "tomorrow"], "--run-at is not an ISO 8601 time"),
        (["start", "optimize_route", "--run-at", "2030-01-01T00:00:00"], "run_at: must include a time zone"),
        (["show", "123456789"], "no job has id 123456789"),
    ],
)
def test_problems_are_one_line_errors(args: list[str], message: str) -> None:
    with pytest.raises(CommandError) as excinfo:
        job(*args)
    assert message in str(excinfo.value)
    assert "\n" not in str(excinfo.value)
    assert JobRecord.objects.count() == 0


@pytest.mark.slow
def test_from_the_shell_an_error_is_one_line_on_stderr_with_a_non_zero_exit() -> None:
    done = manage("job", "start", "optimize_route", "--args", '{"colour": 1}')
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "CommandError: invalid arguments for task 'optimize_route': no argument 'colour'; "
        "expected: points (int, optional), seed (int, optional), max_rounds (int, optional), restarts (int, optional)"
    ]
    assert JobRecord.objects.count() == 0
