"""Issue 13, items 9, 10 and 23 over real HTTP: job rights follow Django permissions (never bare
`is_staff`), tracebacks are for operators, and a job waiting behind a lock says what it waits for."""
# ruff: noqa: F811  (pytest fixtures imported from tests/api_fixtures.py are redefined as arguments)

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection

from jobs import services
from jobs.models import JobRecord
from jobs.states import State
from jobs.testing import run_jobs
from tests.api_fixtures import (  # noqa: F401  (fixtures)
    FAST_DEPLOY,
    SessionClient,
    api_key,
    bearer,
    clean_queue,
    client,
    login,
    make_key,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("clean_queue")]

FAILING_DEPLOY = {**FAST_DEPLOY, "fail_at_step": 1, "fail_times": 99}


def grant(session: SessionClient, *codenames: str) -> None:
    user = User.objects.get(pk=session.user_id)
    for codename in codenames:
        user.user_permissions.add(Permission.objects.get(content_type__app_label="jobs", codename=codename))


def job_of(session: SessionClient | None, **args: Any) -> int:
    """A waiting deploy_stack job owned by `session`'s user (None: started by a key)."""
    owner = session.user_id if session else None
    return services.job_defer(task_name="deploy_stack", args={**FAST_DEPLOY, **args}, owner_id=owner).job_id


def post(session: SessionClient, path: str) -> httpx.Response:
    if not session.http.cookies.get("csrftoken"):
        session.http.get("/admin/login/")  # Django sets the CSRF cookie on a page with a form
    return session.http.post(path, headers=session.unsafe_headers())


def sse_end(http: httpx.Client, job_id: int) -> dict[str, Any]:
    """The `end` event's data of a finished job's stream."""
    text = http.get(f"/api/jobs/{job_id}/events").text
    block = text.split("event: end\n", 1)[1]
    return dict(json.loads(block.split("data: ", 1)[1].split("\n", 1)[0]))


# --- item 9: rights -------------------------------------------------------------------------------


def test_a_staff_user_without_permissions_reads_and_steers_only_their_own_jobs(asgi_server: str) -> None:
    alice = login(asgi_server, "alice")
    bare = login(asgi_server, "bare-staff", staff=True)
    hers, own = job_of(alice), job_of(bare)

    assert [job["id"] for job in bare.http.get("/api/jobs").json()["jobs"]] == [own]
    for path in (f"/api/jobs/{hers}", f"/api/jobs/{hers}/attempts", f"/api/jobs/{hers}/events",
                 f"/api/events?ids={hers}"):
        assert bare.http.get(path).status_code == 404, path
    for action in ("cancel", "abort"):
        assert post(bare, f"/api/jobs/{hers}/{action}").status_code == 404
    assert post(bare, f"/api/jobs/{hers}/retry").status_code == 403  # refused for every job: not an oracle
    assert JobRecord.objects.get(pk=hers).state == State.TODO
    # Their own job: what every user may do (cancel), and no more (retry needs `change`).
    assert bare.http.get(f"/api/jobs/{own}").status_code == 200
    assert post(bare, f"/api/jobs/{own}/retry").status_code == 403
    assert post(bare, f"/api/jobs/{own}/cancel").json()["state"] == "cancelled"
    # The pages agree: someone else's job does not exist for them.
    assert bare.http.get(f"/jobs/{hers}/").status_code == 404
    assert bare.http.post(f"/jobs/{hers}/cancel", data={"csrfmiddlewaretoken": bare.http.cookies["csrftoken"]},
                          headers={"Referer": asgi_server}).status_code == 404
    assert JobRecord.objects.get(pk=hers).state == State.TODO


def test_view_only_staff_read_everyones_jobs_but_steer_none_of_them(asgi_server: str) -> None:
    alice = login(asgi_server, "alice")
    viewer = login(asgi_server, "viewer", staff=True)
    grant(viewer, "view_jobrecord")
    hers, by_key = job_of(alice), job_of(None)

    assert {job["id"] for job in viewer.http.get("/api/jobs").json()["jobs"]} == {hers, by_key}
    assert viewer.http.get(f"/api/jobs/{hers}").json()["args"]["check_interval"] == 0
    assert viewer.http.get(f"/jobs/{hers}/").status_code == 200
    for action in ("cancel", "abort", "retry"):
        answer = post(viewer, f"/api/jobs/{hers}/{action}")
        assert answer.status_code == 403, answer.text
        assert "'change' permission" in answer.json()["error"]["message"]
    refused = viewer.http.post(f"/jobs/{hers}/cancel", data={"csrfmiddlewaretoken": viewer.http.cookies["csrftoken"]},
                               headers={"Referer": asgi_server})
    assert refused.status_code == 403
    assert "Cancel job" not in viewer.http.get(f"/jobs/{hers}/").text
    assert JobRecord.objects.get(pk=hers).state == State.TODO


def test_the_change_permission_lets_staff_steer_everyones_jobs(asgi_server: str) -> None:
    alice = login(asgi_server, "alice")
    operator = login(asgi_server, "operator", staff=True)
    grant(operator, "change_jobrecord")
    hers, other = job_of(alice), job_of(alice)
    assert operator.http.get(f"/api/jobs/{hers}").status_code == 200  # change implies view, as in the admin
    assert post(operator, f"/api/jobs/{hers}/cancel").json()["state"] == "cancelled"
    page = operator.http.post(f"/jobs/{other}/cancel", data={"csrfmiddlewaretoken": operator.http.cookies["csrftoken"]},
                              headers={"Referer": asgi_server})
    assert page.status_code == 303
    assert JobRecord.objects.get(pk=other).state == State.CANCELLED


def test_permissions_without_staff_status_give_nothing_more(asgi_server: str) -> None:
    alice = login(asgi_server, "alice")
    bob = login(asgi_server, "bob")
    grant(bob, "view_jobrecord", "change_jobrecord")  # the admin would refuse bob anyway: not staff
    hers = job_of(alice)
    assert bob.http.get(f"/api/jobs/{hers}").status_code == 404
    assert post(bob, f"/api/jobs/{hers}/cancel").status_code == 404


# --- item 10: tracebacks ----------------------------------------------------------------------------


def test_owners_and_read_keys_see_the_error_but_only_operators_the_traceback(asgi_server: str) -> None:
    alice = login(asgi_server, "alice")
    bare = login(asgi_server, "bare-staff", staff=True)
    viewer = login(asgi_server, "viewer", staff=True)
    grant(viewer, "view_jobrecord")
    job_id = job_of(alice, fail_at_step=1, fail_times=99)
    own_failure = job_of(bare, fail_at_step=1, fail_times=99)
    run_jobs(include_scheduled=True)
    assert JobRecord.objects.get(pk=job_id).state == State.FAILED
    read_key = httpx.Client(base_url=asgi_server, headers=bearer(make_key("read")), timeout=30)
    manage_key = httpx.Client(base_url=asgi_server, headers=bearer(make_key("read", "manage")), timeout=30)

    for http, sees in ((alice.http, False), (read_key, False), (viewer.http, True), (manage_key, True)):
        error = http.get(f"/api/jobs/{job_id}").json()["error"]
        assert error["type"] == "DeployStepFailed"
        assert "step 1 (validate) failed" in error["message"]
        attempt_errors = [a["error"] for a in http.get(f"/api/jobs/{job_id}/attempts").json()["attempts"]]
        end = sse_end(http, job_id)["error"]
        assert end["type"] == "DeployStepFailed"
        if sees:
            assert "Traceback (most recent call last)" in error["traceback"]
            assert all("Traceback" in e["traceback"] for e in attempt_errors)
            assert "Traceback" in end["traceback"]
        else:
            assert error["traceback"] is None
            assert all(e["traceback"] is None for e in attempt_errors)
            assert end["traceback"] is None
            assert ".py" not in http.get(f"/api/jobs/{job_id}").text

    # A staff user without the view permission is an end user here, even for their own job.
    assert bare.http.get(f"/api/jobs/{own_failure}").json()["error"]["traceback"] is None
    owner_page = alice.http.get(f"/jobs/{job_id}/").text
    assert "<strong>DeployStepFailed</strong>" in owner_page
    assert "Traceback" not in owner_page
    assert "Traceback (most recent call last)" in viewer.http.get(f"/jobs/{job_id}/").text
    read_key.close()
    manage_key.close()


# --- item 23: what a waiting job waits for --------------------------------------------------------------


def hold(job_id: int) -> None:
    """Make `job_id` the running holder of its lock, as a worker's claim would."""
    with connection.cursor() as cursor:
        cursor.execute("UPDATE procrastinate_jobs SET status = 'doing' WHERE id = %s", [job_id])


def test_a_job_behind_a_lock_says_which_job_holds_it(asgi_server: str, client: httpx.Client) -> None:
    alice = login(asgi_server, "alice")
    holder = job_of(None, stack="shop", environment="production")
    hold(holder)
    waiting = job_of(alice, stack="shop", environment="production")
    free = job_of(alice, stack="blog", environment="production")

    expected = f"lock deploy-shop-production held by job {holder}"
    assert client.get(f"/api/jobs/{waiting}").json()["waiting_for"] == expected
    assert client.get(f"/api/jobs/{free}").json()["waiting_for"] is None
    assert client.get(f"/api/jobs/{holder}").json()["waiting_for"] is None
    # Its owner learns the lock, not the id of a job they may not see.
    assert alice.http.get(f"/api/jobs/{waiting}").json()["waiting_for"] == (
        "lock deploy-shop-production held by another job"
    )
    page = alice.http.get(f"/jobs/{waiting}/").text
    assert "Waiting for" in page
    assert "lock deploy-shop-production held by another job" in page


def test_the_waiting_for_query_is_one_index_backed_statement() -> None:
    from django.test.utils import CaptureQueriesContext

    from jobs.selectors import _WAITING_FOR_SQL, job_waiting_for

    first = job_of(None, stack="shop", environment="production")
    hold(first)
    second = job_of(None, stack="shop", environment="production")
    with CaptureQueriesContext(connection) as queries:
        assert job_waiting_for(job_id=second) is not None
    assert len(queries) == 1
    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")  # small tables: ask whether an index can serve it
        try:
            cursor.execute("EXPLAIN " + _WAITING_FOR_SQL, {"id": second})
            plan = "\n".join(row[0] for row in cursor.fetchall())
        finally:
            cursor.execute("RESET enable_seqscan")
    # The holder is found through one of procrastinate's lock indexes, never by scanning the queue.
    assert "Seq Scan" not in plan, plan
    assert "Index Scan using procrastinate_jobs_" in plan, plan
    assert "on procrastinate_jobs holder" in plan, plan


def test_closed_metrics_take_the_view_permission_not_bare_staff_status(asgi_server: str, settings: Any) -> None:
    settings.SKIPLOCK_OPEN_METRICS = False
    bare = login(asgi_server, "bare-staff", staff=True)
    viewer = login(asgi_server, "viewer", staff=True)
    grant(viewer, "view_jobrecord")
    assert bare.http.get("/metrics").status_code == 401
    assert viewer.http.get("/metrics").status_code == 200
