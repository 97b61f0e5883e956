"""The REST API over real HTTP (uvicorn serving the ASGI app) against real PostgreSQL."""
# ruff: noqa: F811  (pytest fixtures imported from tests/api_fixtures.py are redefined as arguments)

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import httpx
import pytest
from django.db import connection

from jobs.apikeys import apikey_revoke
from jobs.models import ApiKey, JobRecord
from jobs.states import DisplayState, State
from jobs.testing import run_jobs
from tests.api_fixtures import (  # noqa: F401  (fixtures)
    FAST_DEPLOY,
    api_key,
    bearer,
    clean_queue,
    client,
    login,
    make_key,
)
from tests.plans import plans_at_scale

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("clean_queue")]


def start(client: httpx.Client, task: str = "deploy_stack", **body: object) -> httpx.Response:
    args = body.pop("args", FAST_DEPLOY if task == "deploy_stack" else {})
    return client.post("/api/jobs", json={"task": task, "args": args, **body})


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code, body
    assert "Traceback" not in response.text
    return body["error"]


# --- starting ---------------------------------------------------------------------------------------


def test_starting_a_job_answers_202_with_its_urls_and_commits_it(client: httpx.Client) -> None:
    response = start(client, args={**FAST_DEPLOY, "stack": "shop"})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["state"] == "todo"
    assert body["created"] is True
    assert body["status_url"] == f"/api/jobs/{body['id']}"
    assert body["events_url"] == f"/api/jobs/{body['id']}/events"
    assert response.headers["Location"] == body["status_url"]
    # Committed before the answer: another connection sees it at once.
    record = JobRecord.objects.get(pk=body["id"])
    assert record.args["stack"] == "shop"
    assert record.owner_id is None


def test_a_start_takes_one_statement_after_authentication(api_key: str, django_assert_num_queries: Any) -> None:
    """The lean start path: the key lookup, then one INSERT of the queue row and its side row (its
    own transaction); an idempotency key adds one read of the keys."""
    from django.test import Client

    http = Client(HTTP_AUTHORIZATION=f"Bearer {api_key}")
    body = {"task": "deploy_stack", "args": FAST_DEPLOY}
    http.post("/api/jobs", body, content_type="application/json")  # records the key's last use (once a minute)
    with django_assert_num_queries(2) as captured:
        response = http.post("/api/jobs", body, content_type="application/json")
    assert response.status_code == 202, response.content
    assert "INSERT INTO procrastinate_jobs" in captured.captured_queries[-1]["sql"]
    with django_assert_num_queries(3):
        response = http.post("/api/jobs", {**body, "idempotency_key": "lean-1"}, content_type="application/json")
    assert response.status_code == 202, response.content
    with django_assert_num_queries(2):  # the same key again: answered from the read, nothing inserted
        again = http.post("/api/jobs", {**body, "idempotency_key": "lean-1"}, content_type="application/json")
    assert again.json()["id"] == response.json()["id"]
    assert JobRecord.objects.count() == 3


def test_start_options_place_the_job(client: httpx.Client) -> None:
    run_at = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    body = start(client, queue="reports", priority=7, run_at=run_at).json()
    job = client.get(body["status_url"]).json()
    assert (job["queue"], job["priority"], job["display_state"]) == ("reports", 7, "scheduled")
    delayed = start(client, delay_seconds=30).json()
    assert client.get(delayed["status_url"]).json()["display_state"] == "scheduled"


def test_an_unknown_task_is_404_and_starts_nothing(client: httpx.Client) -> None:
    error = assert_error(start(client, task="no_such_task"), 404, "task_not_found")
    assert "no_such_task" in str(error["message"])
    assert JobRecord.objects.count() == 0


def test_invalid_arguments_are_422_naming_each_field(client: httpx.Client) -> None:
    response = start(client, args={"build_megabytes": "lots", "colour": "red"})
    error = assert_error(response, 422, "invalid_arguments")
    fields = {detail["field"] for detail in error["details"]}
    assert fields == {"build_megabytes", "colour"}
    assert "expected:" in str(error["message"])
    assert JobRecord.objects.count() == 0


def test_invalid_request_fields_are_422_too(client: httpx.Client) -> None:
    error = assert_error(client.post("/api/jobs", json={"task": "deploy_stack", "priority": "high", "extra": 1}),
                         422, "invalid_request")
    assert {d["field"] for d in error["details"]} == {"priority", "extra"}
    error = assert_error(start(client, run_at="2030-01-01T00:00:00"), 422, "invalid_arguments")
    assert error["details"][0]["field"] == "run_at"
    error = assert_error(start(client, run_at="2030-01-01T00:00:00Z", delay_seconds=3), 422, "invalid_arguments")


def test_malformed_json_is_400(client: httpx.Client) -> None:
    for body in (b'{"task": "deploy_stack",', b'{"task": NaN}', b'{"task": "a\\u0000b"}', b'{"x": 1e999}'):
        response = client.post("/api/jobs", content=body, headers={"Content-Type": "application/json"})
        assert_error(response, 400, "malformed_json")
    assert JobRecord.objects.count() == 0


def test_a_body_over_the_limit_is_413(client: httpx.Client, settings: object) -> None:
    from django.conf import settings as django_settings

    big = {"task": "index_document", "args": {"title": "big", "text": "x" * (django_settings.SKIPLOCK_MAX_BODY_BYTES + 10)}}
    assert_error(client.post("/api/jobs", json=big), 413, "body_too_large")

    def chunks():  # no Content-Length: the size is checked on what arrived
        data = json.dumps(big).encode()
        for i in range(0, len(data), 65536):
            yield data[i:i + 65536]

    assert_error(client.post("/api/jobs", content=chunks(), headers={"Content-Type": "application/json"}),
                 413, "body_too_large")


def test_an_idempotency_key_returns_the_first_job_and_conflicts_on_other_arguments(client: httpx.Client) -> None:
    first = start(client, idempotency_key="order-42")
    again = start(client, idempotency_key="order-42")
    assert first.status_code == 202  # accepted: a job was created
    assert again.status_code == 200  # the existing job: nothing new was accepted
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["created"] is False
    error = assert_error(start(client, idempotency_key="order-42", args={**FAST_DEPLOY, "stack": "other"}),
                         409, "idempotency_conflict")
    assert error["details"]["job_id"] == first.json()["id"]
    assert JobRecord.objects.count() == 1


def test_a_batch_starts_all_jobs_or_none(client: httpx.Client) -> None:
    jobs = [{"task": "deploy_stack", "args": {**FAST_DEPLOY, "stack": f"s{i}"}} for i in range(5)]
    response = client.post("/api/jobs/batch", json={"jobs": jobs})
    assert response.status_code == 202, response.text
    ids = [job["id"] for job in response.json()["jobs"]]
    assert len(set(ids)) == 5
    assert JobRecord.objects.filter(pk__in=ids).count() == 5

    bad = [*jobs, {"task": "deploy_stack", "args": {"health_checks": "many"}}]
    error = assert_error(client.post("/api/jobs/batch", json={"jobs": bad}), 422, "invalid_arguments")
    assert error["details"][0]["field"] == "jobs.5.health_checks"
    assert_error(client.post("/api/jobs/batch", json={"jobs": [*jobs, {"task": "nope"}]}), 404, "task_not_found")
    assert_error(client.post("/api/jobs/batch", json={"jobs": []}), 422, "invalid_request")
    assert JobRecord.objects.count() == 5


def test_a_batch_is_inserted_in_one_transaction(client: httpx.Client) -> None:
    jobs = [{"task": "optimize_route", "args": {"points": 5, "seed": i}} for i in range(50)]
    ids = [job["id"] for job in client.post("/api/jobs/batch", json={"jobs": jobs}).json()["jobs"]]
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(DISTINCT xmin::text), count(*) FROM procrastinate_jobs WHERE id = ANY(%s)", [ids])
        assert cursor.fetchone() == (1, 50)


# --- reading -----------------------------------------------------------------------------------------


def test_a_job_reads_back_with_its_result_after_a_worker_ran_it(client: httpx.Client) -> None:
    job_id = start(client).json()["id"]
    waiting = client.get(f"/api/jobs/{job_id}").json()
    assert waiting["state"] == "todo"
    assert waiting["result"] is None
    assert waiting["started_at"] is None
    run_jobs()
    job = client.get(f"/api/jobs/{job_id}").json()
    expected = {"id", "task", "queue", "priority", "state", "display_state", "progress", "step", "attempts",
                "max_attempts", "args", "result", "error", "created_at", "scheduled_at", "started_at",
                "finished_at", "expires_at", "duration_ms", "worker", "idempotency_key", "status_url", "events_url"}
    assert expected <= set(job)
    assert job["state"] == "succeeded"
    assert job["progress"] == 100
    assert job["result"]["release"]
    assert job["error"] is None
    assert job["attempts"] == 1
    assert job["max_attempts"] == 4
    assert job["duration_ms"] >= 0
    assert job["worker"]


def test_a_failed_job_shows_its_error_and_can_be_retried(client: httpx.Client) -> None:
    job_id = start(client, args={**FAST_DEPLOY, "fail_at_step": 2, "fail_times": 9}).json()["id"]
    run_jobs(include_scheduled=True)
    job = client.get(f"/api/jobs/{job_id}").json()
    assert job["state"] == "failed"
    assert job["error"]["type"] == "DeployStepFailed"
    assert "injected" in job["error"]["message"]
    assert "Traceback" in job["error"]["traceback"]
    attempts = client.get(f"/api/jobs/{job_id}/attempts").json()["attempts"]
    assert [a["outcome"] for a in attempts] == ["retried"] * 3 + ["failed"]
    assert [a["number"] for a in attempts] == [1, 2, 3, 4]
    assert attempts[-1]["error"]["type"] == "DeployStepFailed"
    assert attempts[-1]["worker"]
    retried = client.post(f"/api/jobs/{job_id}/retry")
    assert retried.status_code == 200, retried.text
    assert retried.json()["state"] == "todo"
    assert retried.json()["display_state"] == "retrying"
    assert_error(client.post(f"/api/jobs/{job_id}/retry"), 409, "invalid_transition")


def test_an_unknown_job_is_404(client: httpx.Client) -> None:
    assert_error(client.get("/api/jobs/999999"), 404, "job_not_found")
    assert_error(client.post("/api/jobs/999999/cancel"), 404, "job_not_found")
    assert_error(client.get("/api/jobs/999999/events"), 404, "job_not_found")
    assert_error(client.get("/api/nothing/here"), 404, "not_found")


def test_listing_filters_and_pages_by_cursor(client: httpx.Client) -> None:
    deploys = [start(client).json()["id"] for _ in range(5)]
    routes = [start(client, task="optimize_route", args={"points": 5}, queue="cpu").json()["id"] for _ in range(3)]
    later = start(client, delay_seconds=600).json()["id"]

    page = client.get("/api/jobs", params={"limit": 4}).json()
    assert [job["id"] for job in page["jobs"]] == sorted([*deploys, *routes, later], reverse=True)[:4]
    seen = [job["id"] for job in page["jobs"]]
    while page["next_cursor"]:
        page = client.get("/api/jobs", params={"limit": 4, "cursor": page["next_cursor"]}).json()
        seen += [job["id"] for job in page["jobs"]]
    assert seen == sorted([*deploys, *routes, later], reverse=True)

    by_task = client.get("/api/jobs", params={"task": "optimize_route"}).json()
    assert {job["id"] for job in by_task["jobs"]} == set(routes)
    by_queue = client.get("/api/jobs", params={"queue": "cpu"}).json()
    assert {job["id"] for job in by_queue["jobs"]} == set(routes)
    scheduled = client.get("/api/jobs", params={"display_state": "scheduled"}).json()
    assert [job["id"] for job in scheduled["jobs"]] == [later]
    todo = client.get("/api/jobs", params=[("state", "todo"), ("state", "doing")]).json()
    assert len(todo["jobs"]) == 9  # the stored state: the scheduled job is `todo` too
    runnable = client.get("/api/jobs", params=[("display_state", "todo"), ("display_state", "doing")]).json()
    assert len(runnable["jobs"]) == 8
    client.post(f"/api/jobs/{deploys[0]}/cancel")
    cancelled = client.get("/api/jobs", params={"state": "cancelled"}).json()
    assert [job["id"] for job in cancelled["jobs"]] == [deploys[0]]

    now = dt.datetime.now(dt.UTC)
    assert len(client.get("/api/jobs", params={"created_after": (now - dt.timedelta(minutes=5)).isoformat()}).json()["jobs"]) == 9
    assert client.get("/api/jobs", params={"created_before": (now - dt.timedelta(minutes=5)).isoformat()}).json()["jobs"] == []

    assert_error(client.get("/api/jobs", params={"cursor": "bm9wZQ"}), 422, "invalid_arguments")
    assert_error(client.get("/api/jobs", params={"state": "sleeping"}), 422, "invalid_request")
    assert_error(client.get("/api/jobs", params={"limit": 0}), 422, "invalid_request")


def test_the_job_list_query_uses_its_index() -> None:
    from jobs.api import JobFilters, jobs_page

    with plans_at_scale() as explain:
        for filters in (JobFilters(task="deploy_stack"), JobFilters(queue="cpu"),
                        JobFilters(state=[State.FAILED]), JobFilters(display_state=[DisplayState.FAILED])):
            plan = explain(_list_sql(filters))
            assert "Index" in plan, plan
            assert "Sort" not in plan, plan
    assert jobs_page(JobFilters(), owner_id=None) == ([], None)


def _list_sql(filters: Any) -> str:
    from django.test.utils import CaptureQueriesContext

    from jobs.api import jobs_page

    with CaptureQueriesContext(connection) as queries:
        jobs_page(filters, owner_id=None)
    return str(queries.captured_queries[-1]["sql"])


def test_tasks_list_their_schemas_and_policies(client: httpx.Client) -> None:
    tasks = {task["name"]: task for task in client.get("/api/tasks").json()["tasks"]}
    assert {"deploy_stack", "index_document", "optimize_route"} <= set(tasks)
    deploy = tasks["deploy_stack"]
    assert deploy["args_schema"]["properties"]["build_megabytes"]["type"] == "integer"
    assert deploy["retry"]["max_attempts"] == 4
    assert deploy["soft_time_limit_seconds"] == 600
    assert tasks["optimize_route"]["queue"] == "cpu"


def test_every_task_schema_is_in_the_openapi_document(asgi_server: str) -> None:
    document = httpx.get(f"{asgi_server}/api/openapi.json").json()
    schemas = document["components"]["schemas"]
    for name in ("DeployStackArgs", "IndexDocumentArgs", "OptimizeRouteArgs"):
        assert name in schemas
    body = document["paths"]["/api/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["discriminator"]["mapping"]["deploy_stack"] == "#/components/schemas/DeployStackJobStart"
    assert {"$ref": "#/components/schemas/OptimizeRouteJobStart"} in body["oneOf"]
    assert schemas["OptimizeRouteArgs"]["properties"]["points"]["type"] == "integer"
    assert httpx.get(f"{asgi_server}/api/docs").status_code == 200


# --- transitions ---------------------------------------------------------------------------------------


def test_cancel_a_waiting_job_then_409_with_its_state(client: httpx.Client) -> None:
    job_id = start(client).json()["id"]
    response = client.post(f"/api/jobs/{job_id}/cancel")
    assert response.status_code == 200
    assert response.json() == {"id": job_id, "state": "cancelled", "display_state": "cancelled",
                               "status_url": f"/api/jobs/{job_id}"}
    error = assert_error(client.post(f"/api/jobs/{job_id}/cancel"), 409, "invalid_transition")
    assert error["details"]["state"] == "cancelled"
    assert_error(client.post(f"/api/jobs/{job_id}/abort"), 409, "invalid_transition")


def test_abort_a_waiting_job_cancels_it(client: httpx.Client) -> None:
    job_id = start(client).json()["id"]
    assert client.post(f"/api/jobs/{job_id}/abort").json()["state"] == "cancelled"


# --- authentication and scopes ------------------------------------------------------------------------


def test_no_key_or_a_bad_key_is_401(asgi_server: str, api_key: str) -> None:
    for headers in ({}, bearer("sk_nope_nope"), {"Authorization": "Basic dXNlcjpwdw=="}, {"Authorization": "Bearer"}):
        response = httpx.post(f"{asgi_server}/api/jobs", json={"task": "deploy_stack"}, headers=headers)
        assert_error(response, 401, "unauthenticated")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    key = ApiKey.objects.get()
    assert apikey_revoke(key_id=key.pk)
    assert_error(httpx.get(f"{asgi_server}/api/jobs", headers=bearer(api_key)), 401, "unauthenticated")
    assert JobRecord.objects.count() == 0


def test_an_expired_key_is_401(asgi_server: str) -> None:
    raw = make_key("read")
    ApiKey.objects.update(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    assert_error(httpx.get(f"{asgi_server}/api/jobs", headers=bearer(raw)), 401, "unauthenticated")


def test_scopes_limit_what_a_key_may_do(asgi_server: str, client: httpx.Client) -> None:
    job_id = start(client).json()["id"]
    reader = bearer(make_key("read", name="reader"))
    starter = bearer(make_key("start", name="starter"))
    assert httpx.get(f"{asgi_server}/api/jobs/{job_id}", headers=reader).status_code == 200
    error = assert_error(httpx.post(f"{asgi_server}/api/jobs", json={"task": "deploy_stack"}, headers=reader),
                         403, "forbidden")
    assert "'start' scope" in str(error["message"])
    assert_error(httpx.post(f"{asgi_server}/api/jobs/{job_id}/cancel", headers=reader), 403, "forbidden")
    assert_error(httpx.get(f"{asgi_server}/api/jobs", headers=starter), 403, "forbidden")
    assert_error(httpx.get(f"{asgi_server}/api/jobs/{job_id}/events", headers=starter), 403, "forbidden")
    assert httpx.post(f"{asgi_server}/api/jobs", json={"task": "deploy_stack", "args": FAST_DEPLOY},
                      headers=starter).status_code == 202


def test_keys_never_reach_the_logs(asgi_server: str, caplog: pytest.LogCaptureFixture) -> None:
    secret = "sk_deadbeef_" + "s" * 40
    with caplog.at_level("DEBUG"):
        httpx.get(f"{asgi_server}/api/jobs", headers=bearer(secret))
        httpx.get(f"{asgi_server}/api/jobs", headers={"Authorization": f"Token {secret}"})
    assert secret not in caplog.text


def test_session_users_own_their_jobs_and_staff_see_all(asgi_server: str, client: httpx.Client) -> None:
    alice = login(asgi_server, "alice")
    bob = login(asgi_server, "bob")
    staff = login(asgi_server, "operator", staff=True)
    by_key = start(client).json()["id"]

    # Unsafe methods over a session need the CSRF token.
    assert_error(alice.http.post("/api/jobs", json={"task": "deploy_stack"}), 403, "csrf_failed")
    # Django sets the csrftoken cookie on any page that renders a form.
    alice.http.get("/admin/login/")
    response = alice.http.post("/api/jobs", json={"task": "deploy_stack", "args": FAST_DEPLOY},
                               headers=alice.unsafe_headers())
    assert response.status_code == 202, response.text
    mine = response.json()["id"]
    assert JobRecord.objects.get(pk=mine).owner_id == alice.user_id

    assert alice.http.get(f"/api/jobs/{mine}").status_code == 200
    assert [job["id"] for job in alice.http.get("/api/jobs").json()["jobs"]] == [mine]
    assert_error(alice.http.get(f"/api/jobs/{by_key}"), 404, "job_not_found")
    assert_error(bob.http.get(f"/api/jobs/{mine}"), 404, "job_not_found")
    assert_error(bob.http.get(f"/api/jobs/{mine}/events"), 404, "job_not_found")
    bob.http.get("/admin/login/")
    assert_error(bob.http.post(f"/api/jobs/{mine}/cancel", headers=bob.unsafe_headers()), 404, "job_not_found")
    assert bob.http.get("/api/jobs").json()["jobs"] == []
    assert_error(alice.http.post(f"/api/jobs/{mine}/retry", headers=alice.unsafe_headers()), 403, "forbidden")
    assert alice.http.post(f"/api/jobs/{mine}/cancel", headers=alice.unsafe_headers()).json()["state"] == "cancelled"
    # The browser follows its own job over the session (EventSource sends no CSRF token: GET needs none).
    stream = alice.http.get(f"/api/jobs/{mine}/events")
    assert stream.status_code == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert "event: end" in stream.text

    # Staff status alone gives nothing more (issue 13 item 9); the admin's permissions do.
    assert [job["id"] for job in staff.http.get("/api/jobs").json()["jobs"]] == []
    from django.contrib.auth.models import Permission, User

    User.objects.get(pk=staff.user_id).user_permissions.add(Permission.objects.get(codename="change_jobrecord"))
    assert {job["id"] for job in staff.http.get("/api/jobs").json()["jobs"]} == {mine, by_key}
    assert staff.http.get(f"/api/jobs/{by_key}").status_code == 200
    staff.http.get("/admin/login/")
    assert staff.http.post(f"/api/jobs/{by_key}/cancel", headers=staff.unsafe_headers()).status_code == 200
    for session in (alice, bob, staff):
        session.http.close()


# --- the database goes away ------------------------------------------------------------------------


def test_an_unreachable_database_is_503_never_500(client: httpx.Client, api_key: str) -> None:
    from django.db import connections

    job_id = start(client).json()["id"]
    connection.close()
    params = connections.settings["default"]  # the dict every new connection of the server is built from
    saved = {name: params[name] for name in ("HOST", "PORT")}
    params.update(HOST="127.0.0.1", PORT="1")  # nothing listens there: connection refused
    try:
        for response in (
            start(client),
            client.get(f"/api/jobs/{job_id}"),
            client.get("/api/jobs"),
            client.post(f"/api/jobs/{job_id}/cancel"),
        ):
            error = assert_error(response, 503, "database_unavailable")
            assert response.headers["Retry-After"] == "5"
            assert "retry" in str(error["message"])
        ready = client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["reason"] == "database unreachable"
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert "skiplock_database_up 0.0" in metrics.text
    finally:
        params.update(saved)
        connection.close()
    assert client.get(f"/api/jobs/{job_id}").status_code == 200
