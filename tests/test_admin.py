"""The job console: permissions, actions through services, search, pages, and a pinned query count."""

from __future__ import annotations

import re

import pytest
from django.contrib.admin.models import CHANGE, DELETION, LogEntry
from django.test import Client
from django.urls import reverse

from jobs import services
from jobs.models import ApiKey, JobRecord
from jobs.states import DISPLAY, DisplayState
from tests.admin_fixtures import (
    QUICK_DEPLOY,
    console_urlconf,
    failed_deploy_job,
    insert_jobs,
    make_user,
)
from tests.plans import assert_no_seq_scan_of_job_tables

LIST = "/admin/jobs/jobrecord/"
PAGES = [LIST, "/admin/jobs/dashboard/", "/admin/jobs/workerinfo/", "/admin/jobs/periodic/", "/admin/jobs/apikey/"]


@pytest.fixture(autouse=True)
def _urls(settings: object) -> None:
    settings.ROOT_URLCONF = console_urlconf()  # type: ignore[attr-defined]


def client_for(user: object) -> Client:
    client = Client()
    client.force_login(user)  # type: ignore[arg-type]
    return client


@pytest.fixture
def admin_client(db: None) -> Client:
    return client_for(make_user("root", superuser=True))


@pytest.fixture
def viewer_client(db: None) -> Client:
    return client_for(make_user("viewer", perms=("jobs.view_jobrecord", "jobs.view_apikey", "jobs.view_workerinfo")))


def post_action(client: Client, action: str, ids: list[int], *, confirm: bool, url: str = LIST, **extra: str) -> object:
    data = {"action": action, "index": "0", "_selected_action": [str(i) for i in ids], **extra}
    if confirm:
        data["confirm"] = "yes"
    return client.post(url, data)


# --- access ---------------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("url", [*PAGES, "/admin/jobs/jobrecord/1/change/", "/admin/jobs/jobrecord/1/status.json"])
def test_anonymous_users_are_sent_to_the_login_page(client: Client, url: str) -> None:
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")


@pytest.mark.django_db
def test_staff_without_job_permissions_cannot_open_the_console() -> None:
    client = client_for(make_user("nobody"))
    assert client.get(LIST).status_code == 403
    assert client.get("/admin/jobs/dashboard/").status_code == 403


def test_a_viewer_sees_every_page_and_the_detail_without_action_buttons(viewer_client: Client) -> None:
    job_id = insert_jobs(1, status="failed")[0]
    for url in PAGES:
        assert viewer_client.get(url).status_code == 200, url
    detail = viewer_client.get(f"{LIST}{job_id}/change/")
    assert detail.status_code == 200
    assert b'value="retry_jobs"' not in detail.content
    page = viewer_client.get(LIST).content.decode()
    assert "retry_jobs" not in page  # no action choices at all


def test_a_viewer_cannot_retry_even_by_posting_the_action(viewer_client: Client) -> None:
    job_id = insert_jobs(1, status="failed")[0]
    for confirm in (False, True):
        post_action(viewer_client, "retry_jobs", [job_id], confirm=confirm)
    assert JobRecord.objects.get(pk=job_id).state == "failed"
    assert not LogEntry.objects.exists()


# --- actions ----------------------------------------------------------------------------------------


def test_retry_asks_for_confirmation_then_retries_through_the_service_and_logs(admin_client: Client) -> None:
    failed = insert_jobs(2, status="failed")
    succeeded = insert_jobs(1, status="succeeded")
    page = post_action(admin_client, "retry_jobs", failed + succeeded, confirm=False)
    assert page.status_code == 200  # type: ignore[attr-defined]
    text = page.content.decode()  # type: ignore[attr-defined]
    assert "2 of 3 selected job(s)" in text
    assert 'name="confirm" value="yes"' in text
    assert JobRecord.objects.get(pk=failed[0]).state == "failed"  # nothing changed yet

    response = post_action(admin_client, "retry_jobs", failed + succeeded, confirm=True)
    assert response.status_code == 302  # type: ignore[attr-defined]
    assert set(JobRecord.objects.filter(pk__in=failed).values_list("state", flat=True)) == {"todo"}
    assert JobRecord.objects.get(pk=succeeded[0]).state == "succeeded"
    entries = LogEntry.objects.filter(action_flag=CHANGE)
    assert sorted(int(e.object_id or 0) for e in entries) == sorted(failed)
    messages = [m.message for m in response.wsgi_request._messages]  # type: ignore[attr-defined]
    assert any(m.startswith("Retried 2 job(s)") for m in messages)
    assert f"Cannot retry job {succeeded[0]}: it is succeeded." in messages


@pytest.mark.parametrize(
    ("action", "status", "expected"),
    [("cancel_jobs", "todo", "cancelled"), ("abort_jobs", "doing", "aborting"), ("retry_jobs", "failed", "todo")],
)
def test_single_job_actions_from_the_detail_page(admin_client: Client, action: str, status: str, expected: str) -> None:
    job_id = insert_jobs(1, status=status)[0]
    detail = admin_client.get(f"{LIST}{job_id}/change/").content.decode()
    assert f'value="{action}"' in detail
    back = f"{LIST}{job_id}/change/"
    response = post_action(admin_client, action, [job_id], confirm=True, next=back)
    assert response["Location"] == back  # type: ignore[index]
    assert JobRecord.objects.get(pk=job_id).state == expected


def test_run_now_makes_a_scheduled_job_runnable(admin_client: Client) -> None:
    job = services.job_defer(task_name="optimize_route", args={"points": 5}, delay_seconds=3600)
    post_action(admin_client, "run_now_jobs", [job.job_id], confirm=True)
    record = JobRecord.objects.get(pk=job.job_id)
    assert record.display_state == DisplayState.TODO


def test_delete_goes_through_the_service_and_is_logged(admin_client: Client) -> None:
    done, running = insert_jobs(1, status="succeeded")[0], insert_jobs(1, status="doing")[0]
    post_action(admin_client, "delete_jobs", [done, running], confirm=True)
    assert not JobRecord.objects.filter(pk=done).exists()
    assert JobRecord.objects.filter(pk=running).exists()  # a running job cannot be deleted
    assert LogEntry.objects.filter(action_flag=DELETION, object_id=str(done)).exists()


def test_a_change_only_user_cannot_delete(db: None) -> None:
    client = client_for(make_user("operator", perms=("jobs.view_jobrecord", "jobs.change_jobrecord")))
    job_id = insert_jobs(1, status="failed")[0]
    post_action(client, "delete_jobs", [job_id], confirm=True)
    assert JobRecord.objects.filter(pk=job_id).exists()
    post_action(client, "retry_jobs", [job_id], confirm=True)
    assert JobRecord.objects.get(pk=job_id).state == "todo"


def test_django_bulk_delete_and_the_delete_page_are_not_offered(admin_client: Client) -> None:
    job_id = insert_jobs(1, status="succeeded")[0]
    assert "delete_selected" not in admin_client.get(LIST).content.decode()
    admin_client.post(f"{LIST}{job_id}/delete/", {"post": "yes"})
    assert JobRecord.objects.filter(pk=job_id).exists()


# --- list, search, detail ---------------------------------------------------------------------------


def test_every_display_state_has_a_filter_and_a_badge(admin_client: Client) -> None:
    page = admin_client.get(LIST).content.decode()
    for state, (_text, _colour) in DISPLAY.items():
        assert f"?state={state.value}" in page, state
    for status in ("todo", "doing", "succeeded", "failed", "cancelled", "aborted"):
        insert_jobs(1, status=status)
    page = admin_client.get(LIST).content.decode()
    for status in ("Waiting", "Running", "Succeeded", "Failed", "Cancelled", "Aborted"):
        assert f">{status}</span>" in page


def test_filters_by_state_task_and_queue(admin_client: Client) -> None:
    failed = insert_jobs(2, status="failed", task="index_document")
    insert_jobs(3, status="succeeded", task="deploy_stack", queue="deploys")
    page = admin_client.get(LIST, {"state": "failed"}).content.decode()
    assert {int(i) for i in re.findall(r'href="/admin/jobs/jobrecord/(\d+)/change/"', page)} == set(failed)
    page = admin_client.get(LIST, {"queue": "deploys"}).content.decode()
    assert len(set(re.findall(r'href="/admin/jobs/jobrecord/(\d+)/change/"', page))) == 3
    assert "?queue=deploys" in page  # the queue list comes from the table, not only the registry


@pytest.mark.parametrize(
    ("term", "expected"),
    [("{id}", 1), ("#{id}", 1), ("title=alpha", 1), ('title="alpha"', 1), ("alph", 1), ("index_document", 2)],
)
def test_search_by_id_argument_and_task(admin_client: Client, term: str, expected: int) -> None:
    first = insert_jobs(1, task="index_document", args={"title": "alpha"})[0]
    insert_jobs(1, task="index_document", args={"title": "beta"})
    insert_jobs(1, task="deploy_stack", args={"stack": "shop"})
    page = admin_client.get(LIST, {"q": term.format(id=first)}).content.decode()
    found = set(re.findall(r'href="/admin/jobs/jobrecord/(\d+)/change/"', page))
    assert len(found) == expected, (term, found)


def test_the_list_pins_its_query_count_whatever_the_page_size(admin_client: Client, django_assert_num_queries: object) -> None:
    insert_jobs(3, status="failed")
    admin_client.get(LIST)  # warm the content-type and session caches
    counts = []
    for extra in (0, 60):
        insert_jobs(extra, status="succeeded") if extra else None
        for params in ({}, {"state": "failed"}, {"task": "deploy_stack", "q": "shop"}):
            from django.db import connection
            from django.test.utils import CaptureQueriesContext

            with CaptureQueriesContext(connection) as queries:
                assert admin_client.get(LIST, params).status_code == 200
            counts.append(len(queries))
    # session + user + task/queue names + count (reltuples; filtered: the planner's estimate, then
    # a capped count when it is small) + page rows (+ the newest id for a search in the arguments);
    # no query per row, no COUNT(*) of the table
    assert counts == [5, 6, 6] * 2, counts
    with django_assert_num_queries(6):  # type: ignore[operator]
        admin_client.get(LIST, {"state": "succeeded"})


def test_the_unfiltered_list_never_counts_the_table(admin_client: Client) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    insert_jobs(5)
    with CaptureQueriesContext(connection) as queries:
        admin_client.get(LIST)
    counts = [q["sql"].upper() for q in queries if "COUNT(" in q["sql"].upper()]
    assert all("LIMIT" in sql for sql in counts), counts  # at most a capped count of a small table
    assert any("RELTUPLES" in q["sql"].upper() for q in queries)


@pytest.mark.django_db(transaction=True)
def test_the_detail_shows_arguments_attempts_traceback_and_timeline() -> None:
    client = client_for(make_user("root", superuser=True))
    job_id = failed_deploy_job()
    page = client.get(f"{LIST}{job_id}/change/").content.decode()
    assert "DeployStepFailed" in page
    assert "Traceback (most recent call last)" in page
    assert "&quot;fail_at_step&quot;: 1" in page  # pretty JSON arguments
    assert page.count("sl-badge sl-orange") >= 3  # three retried attempts, then the failed one
    assert "deferred for retry" in page
    assert "failed" in page
    assert f'href="/api/jobs/{job_id}"' in page
    status = client.get(f"{LIST}{job_id}/status.json").json()
    assert status["state"] == "failed"
    assert status["final"] is True


# --- pages -------------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_dashboard_shows_counts_charts_and_the_no_worker_alert() -> None:
    client = client_for(make_user("root", superuser=True))
    failed_deploy_job()
    services.job_defer(task_name="optimize_route", args={"points": 5})
    page = client.get("/admin/jobs/dashboard/").content.decode()
    assert page.count('<svg class="sl-chart"') == 2
    assert 'data-alert="no_live_worker"' in page
    assert 'data-alert="failure_rate"' in page  # one job finished in the hour, and it failed
    assert "?queue=default" in page
    assert "?queue=cpu" in page


def test_the_queue_depth_alert_uses_the_setting(admin_client: Client, settings: object) -> None:
    settings.SKIPLOCK_ALERT_QUEUE_DEPTH = 2  # type: ignore[attr-defined]
    insert_jobs(3, queue="reports")
    page = admin_client.get("/admin/jobs/dashboard/").content.decode()
    assert 'data-alert="queue_depth:reports"' in page


def test_the_workers_page_lists_live_and_dead_workers(admin_client: Client) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO procrastinate_workers (last_heartbeat) VALUES (now()) RETURNING id")
        live_id = cursor.fetchone()[0]
        cursor.execute(
            "INSERT INTO skiplock_worker (worker_id, name, hostname, pid, queues, concurrency, processes, started_at, last_seen_at)"
            " VALUES (%s, 'web-1', 'host-a', 42, '[\"default\"]', 4, 1, now(), now()),"
            " (999999, 'old-1', 'host-b', 7, '[]', 2, 1, now() - interval '2 hours', now() - interval '1 hour')",
            [live_id],
        )
    page = admin_client.get("/admin/jobs/workerinfo/").content.decode()
    assert "web-1" in page
    assert "old-1" in page
    assert 'class="sl-worker-live"' in page
    assert 'class="sl-worker-dead"' in page


def test_api_keys_show_the_raw_key_once_and_can_be_revoked(admin_client: Client) -> None:
    from jobs.apikeys import apikey_verify

    response = admin_client.post("/admin/jobs/apikey/add/", {"name": "ci", "scopes": ["start", "read"]})
    assert response.status_code == 200
    raw = re.search(r'id="sl-raw-key"[^>]*>(sk_[^<]+)<', response.content.decode()).group(1)  # type: ignore[union-attr]
    key = ApiKey.objects.get()
    assert apikey_verify(raw) == key
    assert key.scopes == ["read", "start"]
    assert raw not in admin_client.get(f"/admin/jobs/apikey/{key.pk}/change/").content.decode()
    admin_client.post(reverse("admin:jobs_apikey_revoke", args=[key.pk]))
    assert apikey_verify(raw) is None


def test_procrastinates_own_job_admin_is_gone(admin_client: Client) -> None:
    assert admin_client.get("/admin/procrastinate/procrastinatejob/").status_code == 404


def test_quick_deploy_args_are_valid() -> None:
    from jobs.registry import get_task

    assert get_task("deploy_stack").validate(QUICK_DEPLOY)["check_interval"] == 0


def test_the_python_example_in_the_docs_runs(db: None, capsys: pytest.CaptureFixture[str]) -> None:
    from django.conf import settings

    text = (settings.BASE_DIR / "docs" / "admin.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/admin.md", "exec"), {})  # noqa: S102 - our own documentation
    out = capsys.readouterr().out
    assert "'todo': 0" in out
    assert "no_live_worker" in out
    assert "60 24" in out


@pytest.mark.parametrize("term", ["title=alpha", "alpha"])
def test_argument_search_is_bounded_to_the_newest_jobs(admin_client: Client, term: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.console import jobs as console_jobs

    old = insert_jobs(1, task="index_document", args={"title": "alpha"})[0]
    insert_jobs(3)
    monkeypatch.setattr(console_jobs, "ARGS_SEARCH_WINDOW", 2)
    page = admin_client.get(LIST, {"q": term}).content.decode()
    assert f"/admin/jobs/jobrecord/{old}/change/" not in page
    assert f"/admin/jobs/jobrecord/{old}/change/" in admin_client.get(LIST, {"q": str(old)}).content.decode()


def test_starting_a_job_from_the_console(admin_client: Client) -> None:
    form = admin_client.get("/admin/jobs/jobrecord/start/?task=index_document").content.decode()
    assert "&quot;title&quot;: null" in form  # the arguments come prefilled, required ones left to fill
    bad = admin_client.post("/admin/jobs/jobrecord/start/", {"task": "index_document", "args": '{"titel": "x"}'})
    assert "titel: Extra inputs are not permitted" in bad.content.decode()  # the field's own error
    assert not JobRecord.objects.exists()
    response = admin_client.post("/admin/jobs/jobrecord/start/", {
        "task": "index_document", "args": '{"title": "Notes", "text": "hello world"}', "delay_seconds": "60"})
    record = JobRecord.objects.get()
    assert response["Location"] == f"/admin/jobs/jobrecord/{record.pk}/change/"
    assert record.display_state == DisplayState.SCHEDULED
    assert LogEntry.objects.filter(object_id=str(record.pk), action_flag=1).exists()


def test_a_viewer_cannot_start_jobs(viewer_client: Client) -> None:
    assert viewer_client.get("/admin/jobs/jobrecord/start/").status_code == 403
    assert "Start a job" not in viewer_client.get(LIST).content.decode()


def test_the_admin_index_lists_the_console_pages_first(admin_client: Client) -> None:
    page = admin_client.get("/admin/").content.decode()
    assert page.index('href="/admin/jobs/dashboard/"') < page.index('href="/admin/jobs/jobrecord/"')
    assert 'href="/admin/jobs/periodic/"' in page
    assert "Procrastinate" not in page


def test_the_list_status_endpoint_answers_for_many_jobs_in_one_query(admin_client: Client, django_assert_num_queries: object) -> None:
    ids = insert_jobs(3, status="doing")
    admin_client.get(LIST)
    with django_assert_num_queries(3):  # type: ignore[operator]
        data = admin_client.get("/admin/jobs/jobrecord/status.json", {"ids": ",".join(map(str, ids))}).json()
    assert sorted(job["id"] for job in data["jobs"]) == sorted(ids)
    assert {job["label"] for job in data["jobs"]} == {"Running"}


def test_filter_facet_counts_are_never_computed(admin_client: Client) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    insert_jobs(2, status="failed")
    page = admin_client.get(LIST).content.decode()
    assert "Show counts" not in page
    with CaptureQueriesContext(connection) as queries:
        admin_client.get(LIST, {"_facets": "1"})
    assert not [q for q in queries if "COUNT(" in q["sql"].upper() and "LIMIT" not in q["sql"].upper()]


@pytest.mark.django_db(transaction=True)
def test_the_dashboard_counts_what_finished_from_rollup_rows_written_as_jobs_end() -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from jobs import dashboard
    from jobs.testing import run_jobs

    failed_deploy_job()
    services.job_defer(task_name="optimize_route", args={"points": 5})
    run_jobs()
    with CaptureQueriesContext(connection) as queries:
        board = dashboard.dashboard()
    assert board.finished_by_state == {"succeeded": 1, "failed": 1, "cancelled": 0, "aborted": 0,
                                      "discarded": 0, "expired": 0}
    assert sum(b["succeeded"] for b in board.per_minute) == 1
    assert sum(b["failed"] for b in board.per_hour) == 1
    assert board.failure_rate_hour == 0.5
    queues = {row["queue"]: row for row in board.by_queue}
    assert (queues["default"]["failed"], queues["cpu"]["succeeded"]) == (1, 1)
    assert [(p["task"], p["count"]) for p in board.percentiles] == [("optimize_route", 1)]
    assert 0 < board.percentiles[0]["p50"] <= board.percentiles[0]["max"]
    # The time windows never walk the job table: no query reads when jobs finished.
    assert not [q["sql"] for q in queries if "finished_at" in q["sql"]]

    services.job_cancel(job_id=services.job_defer(task_name="optimize_route", args={"points": 3}).job_id)
    assert dashboard.dashboard().finished_by_state["cancelled"] == 1  # fresh on the next view, no cache


@pytest.mark.parametrize(("table", "unit", "slots"), [("skiplock_minute_stats", "minute", 64),
                                                     ("skiplock_hour_stats", "hour", 32)])
def test_a_rollup_slot_starts_over_for_a_newer_period_and_ignores_an_older_one(
    db: None, table: str, unit: str, slots: int
) -> None:
    from django.db import connection

    columns = "slot, state, shard" if unit == "minute" else "slot, task_name, queue_name, state, bin, shard"
    values = "%(slot)s, 'failed', %(shard)s" if unit == "minute" else "%(slot)s, 't', 'q', 'failed', -1, %(shard)s"
    with connection.cursor() as cursor:
        cursor.execute("SELECT (floor(extract(epoch FROM now()) / %s)::bigint %% %s)::int, pg_backend_pid() %% 4",
                       [60 if unit == "minute" else 3600, slots])
        slot, shard = cursor.fetchone()
        count_one = ("SELECT skiplock_count_ends(ARRAY['t'], ARRAY['q'], ARRAY['failed'], ARRAY['failed'], "
                     "ARRAY[1.0::float8])")
        # A row a whole ring ago in the same slot: the new period replaces it.
        cursor.execute(f"INSERT INTO {table} ({columns}, {unit}, count) VALUES ({values}, "
                       f"date_trunc('{unit}', now()) - interval '{slots} {unit}s', 41)", {"slot": slot, "shard": shard})
        cursor.execute(count_one)
        cursor.execute(f"SELECT count, {unit} = date_trunc('{unit}', now()) FROM {table} WHERE slot = %s", [slot])
        assert cursor.fetchall() == [(1, True)]
        # A newer period already in the slot (a transaction that began before the boundary commits
        # after it): the late count leaves it alone.
        cursor.execute(f"UPDATE {table} SET {unit} = {unit} + interval '1 {unit}', count = 7 WHERE slot = %s", [slot])
        cursor.execute(count_one)
        cursor.execute(f"SELECT count FROM {table} WHERE slot = %s", [slot])
        assert cursor.fetchall() == [(7,)]


def test_the_dashboard_queries_walk_indexes_at_scale(db: None) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from jobs import dashboard

    insert_jobs(3, status="succeeded")
    insert_jobs(2)
    insert_jobs(1, status="doing")
    with CaptureQueriesContext(connection) as queries:
        dashboard.dashboard()
    assert_no_seq_scan_of_job_tables(
        q["sql"] for q in queries if "procrastinate_jobs" in q["sql"] or "skiplock_job" in q["sql"]
    )


@pytest.mark.django_db(transaction=True)
def test_the_periodic_page_shows_each_schedule_with_its_last_run() -> None:
    from jobs.periodic import all_schedules

    client = client_for(make_user("root", superuser=True))
    schedule = all_schedules()[0]
    page = client.get("/admin/jobs/periodic/").content.decode()
    assert schedule.task_name in page
    assert f"<code>{schedule.cron}</code>" in page
    assert "never" in page  # nothing has run yet
    job_id = insert_jobs(1, task=schedule.task_name, status="succeeded")[0]
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO procrastinate_periodic_defers (task_name, periodic_id, defer_timestamp, job_id) "
            "VALUES (%s, %s, extract(epoch FROM now())::bigint, %s)",
            [schedule.task_name, schedule.periodic_id, job_id],
        )
    page = client.get("/admin/jobs/periodic/").content.decode()
    assert f'href="/admin/jobs/jobrecord/{job_id}/change/"' in page
    assert ">Succeeded</span>" in page


@pytest.mark.parametrize("query", [
    {}, {"state": "failed"}, {"state": "retrying"}, {"task": "index_document"}, {"queue": "emails", "state": "failed"},
    {"finished": "1h"}, {"finished": "7d", "state": "failed"}, {"created": "24h"}, {"q": "1"}, {"q": "optimize_route"},
    {"p": "2"},
])
def test_every_job_list_filter_walks_an_index_at_scale(admin_client: Client, query: dict[str, str]) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    insert_jobs(3, status="failed", queue="emails", task="index_document")
    insert_jobs(2)
    with CaptureQueriesContext(connection) as queries:
        assert admin_client.get(LIST, query).status_code == 200
    reads = [q["sql"] for q in queries if ("procrastinate_jobs" in q["sql"] or "skiplock_job" in q["sql"])
             and q["sql"].lstrip().upper().startswith(("SELECT", "WITH"))]
    assert reads
    assert_no_seq_scan_of_job_tables(reads)
