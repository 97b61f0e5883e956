"""Issue 13, API side: what probing Skiplock as an attacker broke, over real HTTP on real PostgreSQL.

Items 1 (lock squatting: run_at, priority, queue), 2 (internal tasks), 3 (every process has the
same tasks), 4 (idempotency keys per principal), 5 (queue names), 7 (query parameters), 19 (the
`job` command with the database down) and 21 (state filters, strict times and numbers).
"""
# ruff: noqa: F811  (pytest fixtures imported from tests/api_fixtures.py are redefined as arguments)

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.contrib.auth.models import Permission, User

from jobs.models import JobRecord
from jobs.registry import (
    INTERNAL_PRIORITY,
    MAX_PRIORITY,
    MAX_QUEUE_LENGTH,
    get_task,
    startable_tasks,
    task,
)
from tests.api_fixtures import (  # noqa: F401  (fixtures)
    FAST_DEPLOY,
    api_key,
    bearer,
    clean_queue,
    client,
    login,
    make_key,
)
from tests.conftest import free_port
from tests.core_fixtures import manage, subprocess_env

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("clean_queue")]


def post(http: httpx.Client, base: str = "", headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    body.setdefault("task", "deploy_stack")
    body.setdefault("args", FAST_DEPLOY if body["task"] == "deploy_stack" else {})
    return http.post(f"{base}/api/jobs", json=body, headers=headers or {})


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert "Traceback" not in response.text
    return dict(body["error"])


@pytest.fixture
def starter(asgi_server: str) -> Iterator[httpx.Client]:
    """A key with the `start` and `read` scopes only: no `manage`."""
    with httpx.Client(base_url=asgi_server, headers=bearer(make_key("start", "read", name="starter")),
                      timeout=30) as http:
        yield http


# --- item 1: lock squatting ------------------------------------------------------------------------


def test_a_run_at_beyond_366_days_is_refused_like_delay_seconds(client: httpx.Client) -> None:
    far = (dt.datetime.now(dt.UTC) + dt.timedelta(days=367)).isoformat()
    for run_at in ("9999-12-31T00:00:00Z", far):
        error = error_of(post(client, run_at=run_at), 422, "invalid_arguments")
        assert error["details"][0]["field"] == "run_at"
        assert "366 days" in error["message"]
    batch = client.post("/api/jobs/batch", json={"jobs": [
        {"task": "deploy_stack", "args": FAST_DEPLOY},
        {"task": "deploy_stack", "args": FAST_DEPLOY, "run_at": "9999-12-31T00:00:00Z"},
    ]})
    assert error_of(batch, 422, "invalid_arguments")["details"][0]["field"] == "jobs.1.run_at"
    assert JobRecord.objects.count() == 0
    near = (dt.datetime.now(dt.UTC) + dt.timedelta(days=365)).isoformat()
    assert post(client, run_at=near).status_code == 202


def test_choosing_a_priority_needs_the_manage_scope(client: httpx.Client, starter: httpx.Client,
                                                    asgi_server: str) -> None:
    error = error_of(post(starter, priority=2147483647), 422, "invalid_request")
    assert error["details"][0]["field"] == "priority"
    error = error_of(post(starter, priority=5), 403, "forbidden")
    assert "priority" in error["message"]
    assert "'manage' scope" in error["message"]
    batch = starter.post("/api/jobs/batch", json={"jobs": [{"task": "deploy_stack", "args": FAST_DEPLOY},
                                                           {"task": "deploy_stack", "priority": 9}]})
    assert "jobs.1.priority" in error_of(batch, 403, "forbidden")["message"]
    assert JobRecord.objects.count() == 0
    # The task's own priority is no override; a manager may choose any up to MAX_PRIORITY.
    assert post(starter, priority=get_task("deploy_stack").priority).status_code == 202
    assert post(client, priority=MAX_PRIORITY).status_code == 202
    error_of(post(client, priority=MAX_PRIORITY + 1), 422, "invalid_request")

    user = login(asgi_server, "plain")
    user.http.get("/admin/login/")
    error_of(post(user.http, headers=user.unsafe_headers(), priority=5), 403, "forbidden")
    operator = login(asgi_server, "operator", staff=True)
    User.objects.get(pk=operator.user_id).user_permissions.add(Permission.objects.get(codename="change_jobrecord"))
    operator.http.get("/admin/login/")
    assert post(operator.http, headers=operator.unsafe_headers(), priority=5).status_code == 202
    for session in (user, operator):
        session.http.close()


def test_internal_tasks_run_above_every_priority_a_task_or_caller_may_have() -> None:
    assert get_task("skiplock.maintenance").priority == INTERNAL_PRIORITY > MAX_PRIORITY
    assert all(spec.priority <= MAX_PRIORITY for spec in startable_tasks())
    with pytest.raises(ValueError, match="priority must be from"):
        task(name="tests.hardening.pushy", priority=MAX_PRIORITY + 1)(lambda: None)


# --- item 2: internal tasks ------------------------------------------------------------------------


def test_no_principal_can_start_or_see_skiplock_tasks(client: httpx.Client, starter: httpx.Client) -> None:
    for http in (client, starter):
        error = error_of(post(http, task="skiplock.maintenance", args={}), 404, "task_not_found")
        assert "internal" in error["message"]
        batch = http.post("/api/jobs/batch", json={"jobs": [{"task": "skiplock.maintenance"}]})
        error_of(batch, 404, "task_not_found")
        names = {spec["name"] for spec in http.get("/api/tasks").json()["tasks"]}
        assert "deploy_stack" in names
        assert not any(name.startswith("skiplock.") for name in names)
    openapi = client.get("/api/openapi.json").json()
    assert "SkiplockMaintenanceJobStart" not in openapi["components"]["schemas"]
    assert JobRecord.objects.count() == 0

    started = manage("job", "start", "skiplock.maintenance")
    assert started.returncode != 0
    assert "internal to Skiplock" in started.stderr
    assert "Traceback" not in started.stderr
    listed = manage("job", "tasks", "--json")
    assert listed.returncode == 0, listed.stderr
    assert "skiplock.maintenance" not in {spec["name"] for spec in json.loads(listed.stdout)}
    assert JobRecord.objects.count() == 0


def test_only_skiplock_itself_may_declare_skiplock_tasks() -> None:
    with pytest.raises(ValueError, match="Skiplock's own"):
        task(name="skiplock.maintenance_too")(lambda: None)


# --- item 3: every process registers the same tasks --------------------------------------------------


@pytest.fixture
def fresh_web_process(transactional_db: None) -> Iterator[str]:
    """A web process of its own (uvicorn), with a task module named only by SKIPLOCK_IMPORT_PATHS."""
    port = free_port()
    env = {**subprocess_env(), "SKIPLOCK_IMPORT_PATHS": "tests.import_path_tasks"}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "project.asgi:application", "--host", "127.0.0.1", "--port", str(port),
         "--lifespan", "off", "--log-level", "warning"],
        cwd=settings.BASE_DIR, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/health/live", timeout=2)
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    output = server.stderr.read() if server.stderr else ""
                    raise RuntimeError(f"the web process did not start: {output}") from None
                time.sleep(0.2)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_a_task_module_named_in_skiplock_import_paths_is_served_by_every_process(fresh_web_process: str) -> None:
    assert "tests.import_path_tasks" not in sys.modules  # this process never imported it
    key = bearer(make_key("start", "read", name="fresh"))
    names = {spec["name"] for spec in httpx.get(f"{fresh_web_process}/api/tasks", headers=key).json()["tasks"]}
    assert "tests.import_path.greet" in names
    started = post(httpx.Client(), fresh_web_process, headers=key, task="tests.import_path.greet", args={"name": "x"})
    assert started.status_code == 202, started.text

    env = {**subprocess_env(), "SKIPLOCK_IMPORT_PATHS": "tests.import_path_tasks"}
    listed = subprocess.run([sys.executable, str(settings.BASE_DIR / "manage.py"), "job", "tasks", "--json"],
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    assert listed.returncode == 0, listed.stderr
    assert "tests.import_path.greet" in {spec["name"] for spec in json.loads(listed.stdout)}
    # Skiplock's own tasks are registered everywhere too, whether or not the process runs a worker.
    shell = manage("shell", "--no-imports", "-c", "from jobs.registry import find_task; print(find_task('skiplock.maintenance').name)")
    assert shell.stdout.strip() == "skiplock.maintenance", shell.stderr


def test_a_missing_module_in_skiplock_import_paths_is_one_clear_error() -> None:
    env = {**subprocess_env(), "SKIPLOCK_IMPORT_PATHS": "tests.no_such_module"}
    listed = subprocess.run([sys.executable, str(settings.BASE_DIR / "manage.py"), "job", "tasks"],
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    assert listed.returncode != 0
    assert "SKIPLOCK_IMPORT_PATHS names the module 'tests.no_such_module'" in listed.stderr


# --- item 4: idempotency keys per principal ----------------------------------------------------------


def test_an_idempotency_key_belongs_to_the_principal_that_used_it(client: httpx.Client, asgi_server: str) -> None:
    first = post(client, idempotency_key="order-42")
    assert first.status_code == 202
    owner_job = first.json()["id"]
    other = httpx.Client(base_url=asgi_server, headers=bearer(make_key("start", name="other")), timeout=30)
    # Other arguments under the owner's key: a job of its own, not a 409 naming the owner's.
    theirs = post(other, idempotency_key="order-42", args={**FAST_DEPLOY, "stack": "other"})
    assert theirs.status_code == 202, theirs.text
    assert theirs.json()["created"] is True
    assert theirs.json()["id"] != owner_job
    assert str(owner_job) not in theirs.text
    again = post(other, idempotency_key="order-42", args={**FAST_DEPLOY, "stack": "other"})
    assert (again.json()["id"], again.json()["created"]) == (theirs.json()["id"], False)  # its own, not the owner's
    user = login(asgi_server, "alice")
    user.http.get("/admin/login/")
    mine = post(user.http, headers=user.unsafe_headers(), idempotency_key="order-42",
                args={**FAST_DEPLOY, "stack": "alice"})
    assert mine.status_code == 202
    assert mine.json()["created"] is True
    assert str(owner_job) not in mine.text
    # The owner still gets its own job back, and its own conflict.
    assert post(client, idempotency_key="order-42").json()["id"] == owner_job
    conflict = error_of(post(client, idempotency_key="order-42", args={**FAST_DEPLOY, "stack": "x"}),
                        409, "idempotency_conflict")
    assert conflict["details"]["job_id"] == owner_job
    assert JobRecord.objects.filter(idempotency_key="order-42").count() == 3  # one per principal
    other.close()
    user.http.close()


# --- item 5: queue names -------------------------------------------------------------------------------


def test_queue_names_fit_the_notify_channel_and_new_ones_need_manage(client: httpx.Client,
                                                                     starter: httpx.Client) -> None:
    assert MAX_QUEUE_LENGTH == 63 - len("procrastinate_queue_v1#") == 40
    longest = "q" * MAX_QUEUE_LENGTH
    assert post(client, queue=longest).status_code == 202  # the insert's NOTIFY takes it
    for bad in ("q" * (MAX_QUEUE_LENGTH + 1), "two words", "ünïcode", "-dash-first", ""):
        for http in (client, starter):
            error = error_of(post(http, queue=bad), 422, "invalid_request")
            assert error["details"][0]["field"] == "queue"
    # A starter may name the task's own queue; any other queue (known or new) needs `manage`.
    spec_queue = get_task("optimize_route").queue
    assert post(starter, task="optimize_route", args={"points": 5}, queue=spec_queue).status_code == 202
    error = error_of(post(starter, task="optimize_route", args={"points": 5}, queue="skiplock"), 403, "forbidden")
    assert "choosing a job's queue" in error["message"]
    error = error_of(post(starter, queue="brand-new"), 403, "forbidden")
    assert "choosing a job's queue" in error["message"]
    assert "leave it out" in error["message"]
    assert post(client, queue="brand-new").status_code == 202
    assert JobRecord.objects.filter(queue_name="brand-new").count() == 1


# --- item 7: query parameters ---------------------------------------------------------------------------


def test_more_than_a_thousand_query_parameters_is_a_clean_400(client: httpx.Client,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    query = "&".join(f"task=t{i}" for i in range(1001))
    with caplog.at_level("ERROR"):
        response = client.get(f"/api/jobs?{query}")
    error = error_of(response, 400, "too_many_parameters")
    assert "1000" in error["message"]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_an_unknown_filter_is_422_naming_it(client: httpx.Client) -> None:
    post(client)
    error = error_of(client.get("/api/jobs", params={"stat": "failed", "task": "deploy_stack", "colour": "red"}),
                     422, "invalid_arguments")
    assert {d["field"] for d in error["details"]} == {"colour", "stat"}
    assert "stat" in error["message"]
    assert "display_state" in error["message"]
    error_of(client.get("/api/events", params={"ids": "1", "job": "2"}), 422, "invalid_arguments")


# --- item 19: the job command with the database down ------------------------------------------------------


@pytest.mark.parametrize("action", [["list"], ["show", "1"], ["start", "deploy_stack"], ["cancel", "1"]])
def test_the_job_command_says_in_one_line_that_the_database_is_unreachable(action: list[str]) -> None:
    env = {**subprocess_env(), "DATABASE_URL": "postgresql://skiplock@127.0.0.1:1/skiplock"}
    run = subprocess.run([sys.executable, str(settings.BASE_DIR / "manage.py"), "job", *action],
                         env=env, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "cannot reach the database" in lines[0]
    assert "DATABASE_URL" in lines[0]


# --- item 21: filters on stored and display state, strict types ---------------------------------------------


def test_state_filters_the_stored_state_and_display_state_the_display_state(client: httpx.Client) -> None:
    now_job = post(client).json()["id"]
    later_job = post(client, delay_seconds=600).json()["id"]

    def ids(**params: Any) -> list[int]:
        response = client.get("/api/jobs", params=params)
        assert response.status_code == 200, response.text
        return [job["id"] for job in response.json()["jobs"]]

    assert ids(state="todo") == [later_job, now_job]  # both read `"state": "todo"`
    assert ids(display_state="scheduled") == [later_job]
    assert ids(display_state="todo") == [now_job]
    assert ids(state="todo", display_state="scheduled") == [later_job]
    error = error_of(client.get("/api/jobs", params={"state": "scheduled"}), 422, "invalid_request")
    assert "display_state=scheduled" in error["message"]


def test_times_must_be_iso_8601_and_numbers_not_booleans(client: httpx.Client) -> None:
    for value in ("0.5", "1700000000", "tomorrow"):
        error = error_of(client.get("/api/jobs", params={"created_before": value}), 422, "invalid_request")
        assert error["details"][0]["field"] == "created_before"
    error_of(client.get("/api/jobs", params={"created_after": "0"}), 422, "invalid_request")
    for body in ({"delay_seconds": False}, {"delay_seconds": "60"}, {"run_at": 0}, {"run_at": "1700000000"},
                 {"priority": True}, {"priority": "5"}):
        field = next(iter(body))
        error = error_of(post(client, **body), 422, "invalid_request")
        assert [d["field"] for d in error["details"]] == [field], error
    assert JobRecord.objects.count() == 0
    assert post(client, delay_seconds=60).status_code == 202  # an integer is a number
