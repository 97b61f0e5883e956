"""Flow control over the REST API (issue 15), over real HTTP against real PostgreSQL: queues paused,
resumed and limited, task limits observed, a waiting job changed, bulk actions by filter, the new
start fields (expiry, unique), and what /metrics tells about all of it."""
# ruff: noqa: F811  (pytest fixtures imported from tests/api_fixtures.py are redefined as arguments)

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from django.db import connection
from prometheus_client.parser import text_string_to_metric_families

from jobs import queues, services
from jobs.models import JobRecord
from tests import flow_tasks  # noqa: F401  (registers tests.flow.* tasks: a task limit to observe)
from tests.api_fixtures import (  # noqa: F401  (fixtures)
    FAST_DEPLOY,
    WorkerThread,
    api_key,
    bearer,
    clean_queue,
    client,
    login,
    make_key,
    wait_for,
)
from tests.test_api import assert_error, start

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("clean_queue", "clean_controls")]


@pytest.fixture
def clean_controls(transactional_db: None) -> Iterator[None]:
    """Queue controls and task limit keys outlive a test's jobs: forget them around each test."""

    def empty() -> None:
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM skiplock_queue")
            cursor.execute("DELETE FROM skiplock_limit")

    empty()
    yield
    empty()


def route(client: httpx.Client, seed: int = 1, **body: Any) -> httpx.Response:
    """Start an optimize_route job (queue cpu)."""
    return start(client, "optimize_route", args={"points": 20, "seed": seed}, **body)


def queue_named(answer: httpx.Response, name: str) -> dict[str, Any]:
    assert answer.status_code == 200, answer.text
    return next(queue for queue in answer.json()["queues"] if queue["name"] == name)


def limits_of(name: str) -> tuple[Any, ...]:
    info = queues.get_queue(name)
    return info.paused, info.concurrency, info.rate_limit, info.rate_period


# --- reading queues -----------------------------------------------------------------------------------


def test_the_queue_list_shows_depth_by_state_paused_limits_and_the_oldest_wait(client: httpx.Client) -> None:
    first = route(client, 1).json()["id"]
    route(client, 2)
    route(client, 3, delay_seconds=3600)
    with connection.cursor() as cursor:
        cursor.execute("UPDATE skiplock_job SET created_at = now() - interval '1 hour' WHERE job_id = %s", [first])
    cpu = queue_named(client.get("/api/queues"), "cpu")
    assert cpu["depth"] == {"todo": 2, "scheduled": 1, "doing": 0, "aborting": 0}
    assert (cpu["paused"], cpu["paused_at"], cpu["running"], cpu["starts_in_window"]) == (False, None, 0, None)
    assert cpu["limits"] == {"concurrency": None, "rate_limit": None, "rate_period": None}
    assert 3600 <= cpu["oldest_waiting_seconds"] < 3700
    # A queue a task declares is listed even while it is empty.
    default = queue_named(client.get("/api/queues"), "default")
    assert default["depth"] == {"todo": 0, "scheduled": 0, "doing": 0, "aborting": 0}
    one = client.get("/api/queues/cpu")
    assert one.status_code == 200
    assert one.json() == {**cpu, "oldest_waiting_seconds": one.json()["oldest_waiting_seconds"]}


def test_a_queue_name_that_cannot_be_one_is_a_422_naming_it(client: httpx.Client) -> None:
    for method, path in (("GET", "/api/queues/no%20spaces"), ("POST", "/api/queues/-dash/pause"),
                         ("PATCH", "/api/queues/" + "x" * 41)):
        error = assert_error(client.request(method, path, json={"concurrency": 2}), 422, "invalid_arguments")
        assert error["details"][0]["field"] == "name"
    assert not queues.list_queues(["-dash"])


# --- pause and resume ------------------------------------------------------------------------------------


def test_pausing_and_resuming_a_queue_is_idempotent_and_answers_its_status(client: httpx.Client) -> None:
    for _ in range(2):
        paused = client.post("/api/queues/cpu/pause")
        assert paused.status_code == 200, paused.text
        assert paused.json()["paused"] is True
        assert paused.json()["paused_at"]
    assert queue_named(client.get("/api/queues"), "cpu")["paused"] is True
    assert limits_of("cpu")[0] is True
    for _ in range(2):
        resumed = client.post("/api/queues/cpu/resume")
        assert resumed.status_code == 200, resumed.text
        assert (resumed.json()["paused"], resumed.json()["paused_at"]) == (False, None)
    assert limits_of("cpu")[0] is False


def test_a_queue_paused_over_the_api_runs_nothing_until_resumed(client: httpx.Client) -> None:
    assert client.post("/api/queues/cpu/pause").status_code == 200
    ids = [route(client, seed).json()["id"] for seed in range(3)]  # a paused queue keeps accepting jobs
    other = start(client).json()["id"]  # deploy_stack, on the default queue
    with WorkerThread(queues=["cpu", "default"], concurrency=2):
        wait_for(lambda: JobRecord.objects.get(pk=other).state == "succeeded", timeout=60)
        time.sleep(1.5)  # several claim rounds after the other queue's job ran
        assert set(JobRecord.objects.filter(pk__in=ids).values_list("state", flat=True)) == {"todo"}
        assert client.get("/api/queues/cpu").json()["depth"]["todo"] == 3
        assert client.post("/api/queues/cpu/resume").status_code == 200
        wait_for(lambda: set(JobRecord.objects.filter(pk__in=ids).values_list("state", flat=True)) == {"succeeded"},
                 timeout=60)


# --- queue limits -----------------------------------------------------------------------------------------


def test_patching_a_queue_changes_only_the_fields_given_and_null_clears(client: httpx.Client) -> None:
    answer = client.patch("/api/queues/cpu", json={"concurrency": 3})
    assert answer.status_code == 200, answer.text
    assert answer.json()["limits"] == {"concurrency": 3, "rate_limit": None, "rate_period": None}
    answer = client.patch("/api/queues/cpu", json={"rate_limit": 100, "rate_period": 60})
    assert answer.json()["limits"] == {"concurrency": 3, "rate_limit": 100, "rate_period": 60.0}
    assert answer.json()["starts_in_window"] == 0
    answer = client.patch("/api/queues/cpu", json={"concurrency": None})
    assert answer.json()["limits"] == {"concurrency": None, "rate_limit": 100, "rate_period": 60.0}
    answer = client.patch("/api/queues/cpu", json={"rate_limit": None, "rate_period": None})
    assert answer.json()["limits"] == {"concurrency": None, "rate_limit": None, "rate_period": None}
    assert answer.json()["paused"] is False  # limiting never pauses


@pytest.mark.parametrize(("body", "field", "code"), [
    ({"concurrency": 0}, "concurrency", "invalid_request"),
    ({"concurrency": "3"}, "concurrency", "invalid_request"),
    ({"concurrency": 2.5}, "concurrency", "invalid_request"),
    ({"rate_limit": 10}, "rate_period", "invalid_arguments"),
    ({"rate_period": 60}, "rate_limit", "invalid_arguments"),
    ({"rate_limit": 10, "rate_period": None}, "rate_period", "invalid_arguments"),
    ({"rate_limit": 10, "rate_period": -1}, "rate_period", "invalid_request"),
    ({"rate_limit": 10_001, "rate_period": 1}, "rate_limit", "invalid_request"),
    ({"concurrency": 2, "paused": True}, "paused", "invalid_request"),
    ({}, "body", "invalid_arguments"),
])
def test_bad_queue_limits_are_a_422_naming_the_field_and_change_nothing(
    client: httpx.Client, body: dict[str, Any], field: str, code: str,
) -> None:
    client.patch("/api/queues/cpu", json={"concurrency": 5})
    error = assert_error(client.patch("/api/queues/cpu", json=body), 422, code)
    assert error["details"][0]["field"] == field, error
    assert limits_of("cpu") == (False, 5, None, None)


# --- task limits --------------------------------------------------------------------------------------------


def test_the_limits_list_shows_each_task_key_with_what_runs_and_waits(client: httpx.Client) -> None:
    for partner in (1, 1, 2):
        services.job_defer(task_name="tests.flow.partner_call", args={"partner_id": partner})
    answer = client.get("/api/limits")
    assert answer.status_code == 200, answer.text
    limits = {limit["key"]: limit for limit in answer.json()["limits"]}
    one = limits["tests.flow.partner_call:partner:1"]
    assert (one["task"], one["running"], one["waiting"]) == ("tests.flow.partner_call", 0, 2)
    assert one["limits"] == {"concurrency": 3, "rate_limit": None, "rate_period": None}
    assert one["oldest_waiting_seconds"] >= 0
    assert one["starts_in_window"] is None
    assert limits["tests.flow.partner_call:partner:2"]["waiting"] == 1


# --- scopes ---------------------------------------------------------------------------------------------------


def test_every_flow_endpoint_needs_the_manage_scope(client: httpx.Client, asgi_server: str) -> None:
    job_id = route(client, delay_seconds=3600).json()["id"]
    reader = httpx.Client(base_url=asgi_server, headers=bearer(make_key("start", "read")), timeout=30)
    for method, path, body in (
        ("GET", "/api/queues", None), ("GET", "/api/queues/cpu", None), ("GET", "/api/limits", None),
        ("POST", "/api/queues/cpu/pause", None), ("POST", "/api/queues/cpu/resume", None),
        ("PATCH", "/api/queues/cpu", {"concurrency": 1}), ("PATCH", f"/api/jobs/{job_id}", {"priority": 9}),
        ("POST", "/api/jobs/bulk", {"action": "cancel", "filter": {}}),
    ):
        error = assert_error(reader.request(method, path, json=body), 403, "forbidden")
        assert "'manage' scope" in error["message"], (path, error)
    assert queues.list_queues(["cpu"])[0].paused is False
    assert limits_of("cpu") == (False, None, None, None)
    assert (JobRecord.objects.get(pk=job_id).state, JobRecord.objects.get(pk=job_id).priority) == ("todo", 0)


def test_a_signed_in_user_without_the_change_permission_cannot_pause_or_change_jobs(asgi_server: str) -> None:
    user = login(asgi_server, "ann")
    error = assert_error(user.http.post("/api/queues/cpu/pause", headers=user.unsafe_headers()), 403, "forbidden")
    assert "'change' permission" in error["message"]
    assert not queues.list_queues(["cpu"])
    mine = user.http.post("/api/jobs", json={"task": "optimize_route", "args": {"points": 20}, "delay_seconds": 600},
                          headers=user.unsafe_headers()).json()["id"]
    changed = user.http.patch(f"/api/jobs/{mine}", json={"priority": 9}, headers=user.unsafe_headers())
    assert "'change' permission" in assert_error(changed, 403, "forbidden")["message"]  # even their own job
    assert JobRecord.objects.get(pk=mine).priority == 0


# --- changing a waiting job -------------------------------------------------------------------------------------


def test_patch_changes_a_waiting_jobs_priority_and_run_time(client: httpx.Client) -> None:
    job_id = route(client, delay_seconds=3600).json()["id"]
    answer = client.patch(f"/api/jobs/{job_id}", json={"priority": 7, "run_at": None})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"id": job_id, "state": "todo", "display_state": "todo", "status_url": f"/api/jobs/{job_id}"}
    job = client.get(f"/api/jobs/{job_id}").json()
    assert job["priority"] == 7
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    answer = client.patch(f"/api/jobs/{job_id}", json={"run_at": later.isoformat()})
    assert answer.json()["display_state"] == "scheduled"
    job = client.get(f"/api/jobs/{job_id}").json()
    assert abs(dt.datetime.fromisoformat(job["scheduled_at"]) - later) < dt.timedelta(seconds=1)
    assert job["priority"] == 7  # not given: unchanged


@pytest.mark.parametrize(("body", "field"), [
    ({"priority": "high"}, "priority"),
    ({"priority": 5000}, "priority"),
    ({"priority": None}, "priority"),
    ({"run_at": "2030-01-01T09:00:00"}, "run_at"),
    ({"run_at": 1893456000}, "run_at"),
    ({"run_at": "2999-01-01T00:00:00Z"}, "run_at"),
    ({"queue": "cpu"}, "queue"),
    ({}, "priority"),
])
def test_a_bad_job_change_is_a_422_naming_the_field_and_changes_nothing(
    client: httpx.Client, body: dict[str, Any], field: str,
) -> None:
    job_id = route(client, delay_seconds=3600).json()["id"]
    before = JobRecord.objects.get(pk=job_id)
    response = client.patch(f"/api/jobs/{job_id}", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["field"] == field
    after = JobRecord.objects.get(pk=job_id)
    assert (after.priority, after.scheduled_at, after.state) == (before.priority, before.scheduled_at, "todo")


def test_changing_a_job_that_is_not_waiting_is_a_409_naming_its_state(client: httpx.Client) -> None:
    job_id = route(client, delay_seconds=3600).json()["id"]
    assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 200
    error = assert_error(client.patch(f"/api/jobs/{job_id}", json={"priority": 3}), 409, "invalid_transition")
    assert error["details"]["state"] == "cancelled"
    assert JobRecord.objects.get(pk=job_id).priority == 0
    assert_error(client.patch("/api/jobs/999999999", json={"priority": 3}), 404, "job_not_found")


# --- bulk actions ---------------------------------------------------------------------------------------------------


def bulk(client: httpx.Client, action: str, dry_run: bool = False, **filters: Any) -> httpx.Response:
    return client.post("/api/jobs/bulk", json={"action": action, "filter": filters, "dry_run": dry_run})


def test_a_bulk_dry_run_counts_and_changes_nothing_then_the_real_run_changes_them(client: httpx.Client) -> None:
    cpu = [route(client, seed, delay_seconds=3600).json()["id"] for seed in range(3)]
    other = start(client, delay_seconds=3600).json()["id"]
    dry = bulk(client, "cancel", dry_run=True, queue="cpu")
    assert dry.status_code == 200, dry.text
    assert dry.json() == {"action": "cancel", "dry_run": True, "matched": 3, "changed": 3, "skipped": 0,
                          "max_jobs": 10_000}
    assert set(JobRecord.objects.filter(pk__in=cpu).values_list("state", flat=True)) == {"todo"}
    real = bulk(client, "cancel", queue="cpu").json()
    assert (real["matched"], real["changed"], real["skipped"], real["dry_run"]) == (3, 3, 0, False)
    assert set(JobRecord.objects.filter(pk__in=cpu).values_list("state", flat=True)) == {"cancelled"}
    assert JobRecord.objects.get(pk=other).state == "todo"
    again = bulk(client, "cancel", queue="cpu").json()  # nothing waits any more: each is skipped
    assert (again["matched"], again["changed"], again["skipped"]) == (3, 0, 3)
    retried = bulk(client, "retry", queue="cpu").json()  # cancelled jobs are not retried (as in the console)
    assert (retried["changed"], retried["skipped"]) == (0, 3)
    deleted = bulk(client, "delete", state=["cancelled"]).json()
    assert (deleted["matched"], deleted["changed"]) == (3, 3)
    assert not JobRecord.objects.filter(pk__in=cpu).exists()
    assert JobRecord.objects.get(pk=other).state == "todo"


def test_bulk_retry_runs_failed_jobs_again(client: httpx.Client) -> None:
    job_id = route(client).json()["id"]
    with connection.cursor() as cursor:
        cursor.execute("UPDATE procrastinate_jobs SET status = 'failed' WHERE id = %s", [job_id])
    assert bulk(client, "retry", dry_run=True, state=["failed"]).json()["changed"] == 1
    assert JobRecord.objects.get(pk=job_id).state == "failed"
    assert bulk(client, "retry", state=["failed"]).json()["changed"] == 1
    assert JobRecord.objects.get(pk=job_id).state == "todo"


def test_bulk_over_its_bound_or_with_bad_input_changes_nothing(client: httpx.Client, monkeypatch: Any) -> None:
    from jobs import api_flow

    ids = [route(client, seed, delay_seconds=3600).json()["id"] for seed in range(3)]
    monkeypatch.setattr(api_flow, "MAX_BULK", 2)  # the server runs in this process
    error = assert_error(bulk(client, "cancel", queue="cpu"), 422, "too_many_jobs")
    assert "narrow the filter" in error["message"]
    for body, field in (
        ({"action": "explode", "filter": {}}, "action"),
        ({"action": "cancel", "filter": {"stat": "todo"}}, "filter.stat"),
        ({"action": "cancel", "filter": {"state": ["scheduled"]}}, "filter.state.0"),
        ({"action": "cancel", "filter": {"queue": "cpu"}, "dry_run": "yes"}, "dry_run"),
        ({"filter": {}}, "action"),
    ):
        error = assert_error(client.post("/api/jobs/bulk", json=body), 422, "invalid_request")
        assert error["details"][0]["field"] == field, error
    assert set(JobRecord.objects.filter(pk__in=ids).values_list("state", flat=True)) == {"todo"}


def test_bulk_actions_stay_within_the_jobs_a_signed_in_user_may_see(client: httpx.Client, asgi_server: str) -> None:
    user = login(asgi_server, "bob")
    answer = user.http.post("/api/jobs", json={"task": "optimize_route", "args": {"points": 20}, "delay_seconds": 600},
                            headers=user.unsafe_headers())
    mine = answer.json()["id"]
    theirs = route(client, delay_seconds=600).json()["id"]
    done = user.http.post("/api/jobs/bulk", json={"action": "cancel", "filter": {}}, headers=user.unsafe_headers())
    assert done.status_code == 200, done.text
    assert (done.json()["matched"], done.json()["changed"]) == (1, 1)
    assert JobRecord.objects.get(pk=mine).state == "cancelled"
    assert JobRecord.objects.get(pk=theirs).state == "todo"
    refused = user.http.post("/api/jobs/bulk", json={"action": "delete", "filter": {}}, headers=user.unsafe_headers())
    assert_error(refused, 403, "forbidden")
    assert JobRecord.objects.filter(pk=mine).exists()


# --- start fields: expiry and unique ----------------------------------------------------------------------------------


def test_a_start_with_an_expiry_shows_it_and_bad_expiries_are_422(client: httpx.Client) -> None:
    job = client.get(route(client, expires_in=600).json()["status_url"]).json()
    expires = dt.datetime.fromisoformat(job["expires_at"])
    assert dt.timedelta(seconds=590) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(seconds=600)
    at = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).replace(microsecond=0)
    job = client.get(route(client, 2, expires_at=at.isoformat()).json()["status_url"]).json()
    assert dt.datetime.fromisoformat(job["expires_at"]) == at
    listed = client.get("/api/jobs", params={"queue": "cpu"}).json()["jobs"]
    assert {row["expires_at"] is not None for row in listed} == {True}
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)).isoformat()
    for body, field in (({"expires_in": 0}, "expires_in"), ({"expires_in": "60"}, "expires_in"),
                        ({"expires_at": past}, "expires_at"), ({"expires_at": "2030-01-01T00:00:00"}, "expires_at"),
                        ({"expires_at": at.isoformat(), "expires_in": 60}, "expires_at")):
        response = route(client, 3, **body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["error"]["details"][0]["field"] == field
    assert JobRecord.objects.count() == 2


def test_a_job_past_its_expiry_reads_as_expired_before_the_sweep(client: httpx.Client) -> None:
    job_id = route(client, expires_in=600).json()["id"]
    with connection.cursor() as cursor:
        cursor.execute("UPDATE procrastinate_jobs SET skiplock_expires_at = now() - interval '1 s' WHERE id = %s",
                       [job_id])
    assert client.get(f"/api/jobs/{job_id}").json()["display_state"] == "expired"
    assert client.get("/api/jobs", params={"display_state": "expired"}).status_code == 200
    listed = client.get("/api/jobs").json()["jobs"]
    assert [row["display_state"] for row in listed if row["id"] == job_id] == ["expired"]


def test_a_unique_duplicate_start_answers_200_with_the_existing_job(client: httpx.Client) -> None:
    first = route(client, unique=True)
    assert first.status_code == 202
    assert first.json()["created"] is True
    again = route(client, unique=True)
    assert again.status_code == 200, again.text
    assert (again.json()["id"], again.json()["created"]) == (first.json()["id"], False)
    assert again.headers["Location"] == first.json()["status_url"]
    # A chosen subset of the arguments: another seed is the same job for this rule.
    by_points = route(client, 8, unique={"fields": ["points"], "period": 3600})
    assert by_points.status_code == 202
    same_points = route(client, 9, unique={"fields": ["points"], "period": 3600})
    assert same_points.status_code == 200
    assert same_points.json()["id"] == by_points.json()["id"]
    # Within a batch: the duplicate comes back as created: false.
    batch = client.post("/api/jobs/batch", json={"jobs": [
        {"task": "optimize_route", "args": {"points": 20, "seed": 1}, "unique": True},
        {"task": "optimize_route", "args": {"points": 20, "seed": 5}, "unique": {"key": "route-{seed}"}},
    ]})
    assert batch.status_code == 202, batch.text
    assert [(job["id"] == first.json()["id"], job["created"]) for job in batch.json()["jobs"]] == [
        (True, False), (False, True),
    ]
    assert JobRecord.objects.count() == 3


@pytest.mark.parametrize(("unique", "field"), [
    ({"period": -1}, "unique.period"),
    ({"states": ["sleeping"]}, "unique.states"),
    ({"colour": "red"}, "unique.colour"),
    (False, "unique"),
    ({"fields": ["points"], "key": "route"}, "unique"),
    ({"states": []}, "unique.states"),
])
def test_a_bad_unique_rule_is_a_422_naming_the_field(client: httpx.Client, unique: Any, field: str) -> None:
    response = route(client, unique=unique)
    assert response.status_code == 422, response.text
    assert field in [detail["field"] for detail in response.json()["error"]["details"]], response.text
    batch = client.post("/api/jobs/batch", json={"jobs": [
        {"task": "optimize_route", "args": {"points": 20}}, {"task": "optimize_route", "args": {}, "unique": unique}]})
    assert batch.status_code == 422
    assert f"jobs.1.{field}" in [detail["field"] for detail in batch.json()["error"]["details"]], batch.text
    assert not JobRecord.objects.exists()


def test_50_concurrent_unique_starts_over_http_create_exactly_one_job(asgi_server: str, api_key: str) -> None:
    barrier = threading.Barrier(50)
    answers: list[tuple[int, int, bool]] = []
    errors: list[BaseException] = []

    def start_one() -> None:
        try:
            with httpx.Client(base_url=asgi_server, headers=bearer(api_key), timeout=60) as http:
                barrier.wait(timeout=30)
                response = http.post("/api/jobs", json={"task": "optimize_route", "args": {"points": 30, "seed": 4},
                                                        "unique": {"period": 3600}})
                answers.append((response.status_code, response.json()["id"], response.json()["created"]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start_one) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors[:3]
    assert len({job_id for _, job_id, _ in answers}) == 1
    assert sorted((status, created) for status, _, created in answers) == [(200, False)] * 49 + [(202, True)]
    assert JobRecord.objects.filter(task_name="optimize_route").count() == 1


# --- metrics -----------------------------------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def test_metrics_show_paused_and_limited_queues_and_task_limit_keys(client: httpx.Client, asgi_server: str) -> None:
    client.post("/api/queues/cpu/pause")
    client.patch("/api/queues/cpu", json={"concurrency": 4, "rate_limit": 30, "rate_period": 60})
    for partner in (1, 1, 2):
        services.job_defer(task_name="tests.flow.partner_call", args={"partner_id": partner})
    with connection.cursor() as cursor:
        cursor.execute("UPDATE skiplock_job SET created_at = now() - interval '10 minutes' "
                       "WHERE job_id = (SELECT min(job_id) FROM skiplock_job)")
    found = samples(httpx.get(f"{asgi_server}/metrics").text)
    assert found[("skiplock_queue_paused", (("queue", "cpu"),))] == 1
    assert found[("skiplock_queue_paused", (("queue", "default"),))] == 0
    assert found[("skiplock_queue_concurrency_limit", (("queue", "cpu"),))] == 4
    assert found[("skiplock_queue_rate_limit", (("queue", "cpu"),))] == 30
    assert found[("skiplock_queue_rate_period_seconds", (("queue", "cpu"),))] == 60
    assert ("skiplock_queue_concurrency_limit", (("queue", "default"),)) not in found
    key = (("key", "tests.flow.partner_call:partner:1"),)
    assert (found[("skiplock_limit_waiting", key)], found[("skiplock_limit_running", key)]) == (2, 0)
    assert 600 <= found[("skiplock_limit_oldest_wait_seconds", key)] < 700
    assert found[("skiplock_limit_waiting", (("key", "tests.flow.partner_call:partner:2"),))] == 1
    client.post("/api/queues/cpu/resume")
    assert samples(httpx.get(f"{asgi_server}/metrics").text)[("skiplock_queue_paused", (("queue", "cpu"),))] == 0


def test_task_limit_key_labels_stay_bounded() -> None:
    from jobs.metrics import MAX_LABELS, DatabaseCollector

    for partner in range(MAX_LABELS + 5):
        services.job_defer(task_name="tests.flow.partner_call", args={"partner_id": partner})
    families = {family.name: family for family in DatabaseCollector().collect()}
    waiting = {s.labels["key"]: s.value for s in families["skiplock_limit_waiting"].samples}
    assert len(waiting) == MAX_LABELS + 1  # the 20 busiest keys, then "other"
    assert waiting["other"] == 5  # the 5 other keys (one job each) summed
    assert sum(waiting.values()) == MAX_LABELS + 5


def test_a_metrics_scrape_runs_a_fixed_number_of_queries_whatever_the_queues_and_keys() -> None:
    from django.test.utils import CaptureQueriesContext

    from jobs.metrics import DatabaseCollector

    def count() -> int:
        with CaptureQueriesContext(connection) as queries:
            list(DatabaseCollector().collect())
        return len(queries)

    empty = count()
    for name in ("cpu", "default", "reports"):
        queues.pause_queue(name)
        queues.set_queue_limits(name, concurrency=2)
    for partner in range(10):
        services.job_defer(task_name="tests.flow.partner_call", args={"partner_id": partner})
    assert count() == empty
