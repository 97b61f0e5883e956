"""Flow control in the job console (issue 15): the Queues page (pause, resume, limits, task
limits), changing a waiting job's priority and run time, the new final states on every page,
paused queues on the dashboard, and the periodic page's switches."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone

from jobs import periodic, queues, services
from jobs.models import JobAttempt, JobRecord, PeriodicSwitch, QueueControl
from tests.admin_fixtures import console_urlconf, insert_jobs, make_user

QUEUES = "/admin/jobs/queues/"
LIST = "/admin/jobs/jobrecord/"
PERIODIC = "/admin/jobs/periodic/"
SWITCH = "/admin/jobs/periodic/switch/"

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _urls(settings: object) -> None:
    settings.ROOT_URLCONF = console_urlconf()  # type: ignore[attr-defined]


def client_for(user: object, **options: Any) -> Client:
    client = Client(**options)
    client.force_login(user)  # type: ignore[arg-type]
    return client


@pytest.fixture
def operator() -> Client:
    """Staff with the change permission on jobs: who steers jobs in the console."""
    return client_for(make_user("operator", perms=("jobs.change_jobrecord",)))


@pytest.fixture
def viewer() -> Client:
    return client_for(make_user("viewer", perms=("jobs.view_jobrecord",)))


def messages_of(response: Any) -> list[str]:
    return [m.message for m in response.wsgi_request._messages]


def control(name: str) -> QueueControl | None:
    return QueueControl.objects.filter(name=name).first()


def post_action(client: Client, action: str, ids: list[int], **extra: str) -> Any:
    data = {"action": action, "index": "0", "_selected_action": [str(i) for i in ids], "confirm": "yes", **extra}
    return client.post(LIST, data, follow=True)


# --- the Queues page ------------------------------------------------------------------------------


def test_the_queues_page_lists_each_queue_with_its_depth_state_and_limits(operator: Client) -> None:
    insert_jobs(3, queue="reports")
    insert_jobs(2, queue="mail", status="doing")
    queues.pause_queue("reports", by="test")
    queues.set_queue_limits("mail", concurrency=4, rate_limit=100, rate_period=60)
    page = operator.get(QUEUES)
    assert page.status_code == 200
    html = page.content.decode()
    reports = html.split('data-queue="reports"')[1].split("</tr>")[0]
    assert 'data-paused="reports"' in reports
    assert "Resume" in reports
    assert "<td>3</td>" in reports  # waiting
    mail = html.split('data-queue="mail"')[1].split("</tr>")[0]
    assert "Running" in mail
    assert "Pause" in mail
    assert "<td>4</td>" in mail
    assert "100 per 60 s" in mail
    assert 'id="sl-task-limits"' in html
    assert 'href="/admin/jobs/queues/"' in operator.get("/admin/jobs/dashboard/").content.decode()  # in the nav


def test_an_operator_pauses_and_resumes_a_queue_from_the_queues_page(operator: Client) -> None:
    insert_jobs(1, queue="reports")
    response = operator.post(QUEUES, {"queue": "reports", "action": "pause"}, follow=True)
    assert response.redirect_chain[-1][0] == QUEUES
    assert any(m.startswith("Paused queue “reports”") for m in messages_of(response))
    paused = control("reports")
    assert paused is not None
    assert paused.paused
    assert paused.changed_by == "admin:operator"
    assert 'data-paused="reports"' in response.content.decode()

    again = operator.post(QUEUES, {"queue": "reports", "action": "pause"}, follow=True)
    assert "Queue “reports” was already paused; nothing changed." in messages_of(again)
    resumed = operator.post(QUEUES, {"queue": "reports", "action": "resume"}, follow=True)
    assert any(m.startswith("Resumed queue “reports”") for m in messages_of(resumed))
    assert control("reports").paused is False  # type: ignore[union-attr]


def test_a_queue_without_jobs_can_be_paused_before_they_arrive(operator: Client) -> None:
    operator.post(QUEUES, {"queue": "nightly", "action": "pause"})
    assert control("nightly").paused  # type: ignore[union-attr]
    assert 'data-queue="nightly"' in operator.get(QUEUES).content.decode()  # listed from now on


def test_the_limits_form_sets_and_clears_a_queues_limits(operator: Client) -> None:
    operator.post(QUEUES, {"queue": "mail", "action": "limits", "concurrency": "5", "rate_limit": "20",
                           "rate_period": "2"})
    row = control("mail")
    assert row is not None
    assert (row.concurrency, row.rate_limit, row.rate_period) == (5, 20, 2.0)
    response = operator.post(QUEUES, {"queue": "mail", "action": "limits", "concurrency": "", "rate_limit": "",
                                      "rate_period": ""}, follow=True)
    assert "Queue “mail”: concurrency unlimited, rate unlimited." in messages_of(response)
    row.refresh_from_db()
    assert (row.concurrency, row.rate_limit, row.rate_period) == (None, None, None)


@pytest.mark.parametrize(("form", "says"), [
    ({"concurrency": "abc"}, "concurrency must be a whole number"),
    ({"concurrency": "0"}, "queue “mail” not changed"),
    ({"concurrency": "2.5"}, "concurrency must be a whole number"),
    ({"rate_limit": "10"}, "give a rate limit and its period together"),
    ({"rate_limit": "10", "rate_period": "nan"}, "rate period must be a number of seconds"),
    ({"rate_limit": "10", "rate_period": "-5"}, "queue “mail” not changed"),
    ({"queue": "no way!"}, "not changed"),
    ({"queue": ""}, "not changed"),
])
def test_bad_limits_say_what_is_wrong_and_change_nothing(operator: Client, form: dict[str, str], says: str) -> None:
    queues.set_queue_limits("mail", concurrency=3)
    data = {"queue": "mail", "action": "limits", "concurrency": "3", **form}
    response = operator.post(QUEUES, data, follow=True)
    assert response.status_code == 200
    errors = messages_of(response)
    assert any(says in m.lower() for m in errors), errors
    row = control("mail")
    assert row is not None
    assert (row.concurrency, row.rate_limit, row.rate_period) == (3, None, None)
    assert QueueControl.objects.count() == 1  # no row for a refused name


def test_viewers_see_the_queues_but_cannot_pause_or_limit_them(viewer: Client) -> None:
    insert_jobs(1, queue="reports")
    page = viewer.get(QUEUES).content.decode()
    assert 'data-queue="reports"' in page
    assert 'value="pause"' not in page
    assert "needs the “change” permission" in page
    assert viewer.post(QUEUES, {"queue": "reports", "action": "pause"}).status_code == 403
    assert viewer.post(QUEUES, {"queue": "reports", "action": "limits", "concurrency": "1"}).status_code == 403
    assert not QueueControl.objects.exists()


def test_the_staff_flag_alone_opens_nothing_and_permissions_without_it_neither() -> None:
    bare = client_for(make_user("bare-staff"))
    assert bare.get(QUEUES).status_code == 403
    assert bare.post(QUEUES, {"queue": "reports", "action": "pause"}).status_code == 403
    not_staff = client_for(make_user("not-staff", perms=("jobs.change_jobrecord",), staff=False))
    response = not_staff.post(QUEUES, {"queue": "reports", "action": "pause"})
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")
    assert not QueueControl.objects.exists()


def test_a_pause_without_the_csrf_token_is_refused(db: None) -> None:
    client = client_for(make_user("root", superuser=True), enforce_csrf_checks=True)
    assert client.post(QUEUES, {"queue": "reports", "action": "pause"}).status_code == 403
    assert not QueueControl.objects.exists()


def test_task_limits_are_listed_with_what_runs_and_waits_under_each_key(operator: Client) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO skiplock_limit (key, task_name, concurrency, rate_limit, rate_period, starts) "
            "VALUES ('partner:7', 'sync_partner', 5, 100, 60, '{}')"
        )
    html = operator.get(QUEUES).content.decode()
    table = html.split('id="sl-task-limits"')[1]
    assert "<code>partner:7</code>" in table
    assert "sync_partner" in table
    assert "100 per 60 s" in table


# --- changing a waiting job -------------------------------------------------------------------------


def test_the_change_action_asks_for_a_priority_and_run_time(operator: Client) -> None:
    job_id = insert_jobs(1)[0]
    detail = operator.get(f"{LIST}{job_id}/change/").content.decode()
    assert 'value="change_jobs"' in detail
    form = operator.post(LIST, {"action": "change_jobs", "index": "0", "_selected_action": [str(job_id)]})
    html = form.content.decode()
    assert 'id="sl-change-form"' in html
    assert 'name="priority"' in html
    assert 'name="run_at"' in html


def test_an_operator_changes_the_priority_and_run_time_of_waiting_jobs(operator: Client) -> None:
    ids = insert_jobs(2)
    later = (timezone.now() + dt.timedelta(hours=2)).replace(microsecond=0)
    response = post_action(operator, "change_jobs", ids, priority="42", run_at=later.strftime("%Y-%m-%dT%H:%M:%S"))
    assert any(m.startswith("Changed 2 job(s)") for m in messages_of(response))
    for record in JobRecord.objects.filter(pk__in=ids):
        assert record.priority == 42
        assert record.scheduled_at == later
        assert record.display_state == "scheduled"
    post_action(operator, "change_jobs", ids[:1], run_now="on")
    assert JobRecord.objects.get(pk=ids[0]).scheduled_at is None
    assert JobRecord.objects.get(pk=ids[0]).priority == 42  # an empty priority keeps the job's own


def test_the_change_action_refuses_jobs_that_no_longer_wait(operator: Client) -> None:
    failed = insert_jobs(1, status="failed")[0]
    waiting = insert_jobs(1)[0]
    response = post_action(operator, "change_jobs", [failed, waiting], priority="9")
    texts = messages_of(response)
    assert any(m.startswith("Changed 1 job(s): #" + str(waiting)) for m in texts), texts
    assert any(str(failed) in m and "failed" in m for m in texts), texts
    assert JobRecord.objects.get(pk=failed).priority == 0


@pytest.mark.parametrize(("form", "says"), [
    ({"priority": "5000"}, "priority must be a whole number from -1000 to 1000"),
    ({"priority": "high"}, "priority must be a whole number"),
    ({"run_at": "tomorrow"}, "run time must be a date and time"),
    ({"run_at": "2999-01-01T00:00"}, "at most 366 days from now"),
    ({"run_at": "2030-01-01T00:00", "run_now": "on"}, "not both"),
    ({}, "Give a new priority, a run time"),
])
def test_bad_change_input_says_what_is_wrong_and_changes_nothing(operator: Client, form: dict[str, str],
                                                                   says: str) -> None:
    job_id = insert_jobs(1)[0]
    response = post_action(operator, "change_jobs", [job_id], **form)
    texts = messages_of(response)
    assert any(says in m and m.endswith("Nothing was changed.") for m in texts), texts
    assert 'id="sl-change-form"' in response.content.decode()  # the form again, to correct it
    record = JobRecord.objects.get(pk=job_id)
    assert (record.priority, record.scheduled_at) == (0, None)


def test_a_viewer_cannot_change_a_job(viewer: Client) -> None:
    job_id = insert_jobs(1)[0]
    response = viewer.post(LIST, {"action": "change_jobs", "index": "0", "_selected_action": [str(job_id)],
                                  "confirm": "yes", "priority": "9"})
    assert response.status_code == 200  # the list again: the action is not offered to a viewer
    assert 'value="change_jobs"' not in response.content.decode()
    assert JobRecord.objects.get(pk=job_id).priority == 0


# --- the new final states -----------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["discarded", "expired"])
def test_discarded_and_expired_jobs_are_listed_filtered_and_retried(operator: Client, state: str) -> None:
    job_id = insert_jobs(1, status=state)[0]
    listing = operator.get(LIST, {"state": state}).content.decode()
    assert f'data-state="{state}"' in listing
    assert f"#{job_id}" in listing
    detail = operator.get(f"{LIST}{job_id}/change/").content.decode()
    assert f'data-state="{state}"' in detail
    assert 'value="retry_jobs"' in detail
    response = post_action(operator, "retry_jobs", [job_id])
    assert any(m.startswith("Retried 1 job(s)") for m in messages_of(response))
    assert JobRecord.objects.get(pk=job_id).state == "todo"


def test_the_outcomes_snoozed_discarded_and_expired_have_their_badges(operator: Client) -> None:
    job_id = insert_jobs(1, status="discarded")[0]
    now = timezone.now()
    for number, outcome in enumerate(("snoozed", "discarded"), start=1):
        JobAttempt.objects.create(job_id=job_id, number=number, outcome=outcome, started_at=now, finished_at=now)
    html = operator.get(f"{LIST}{job_id}/change/").content.decode()
    assert '<span class="sl-badge sl-blue">Snoozed</span>' in html
    assert '<span class="sl-badge sl-grey">Discarded</span>' in html


def test_a_waiting_job_shows_its_expiry_and_is_shown_expired_once_past_it(operator: Client) -> None:
    job = services.job_defer(task_name="deploy_stack", args={}, expires_in=3600)
    html = operator.get(f"{LIST}{job.job_id}/change/").content.decode()
    assert 'id="sl-expires-at"' in html
    assert 'data-state="todo"' in html
    with connection.cursor() as cursor:
        cursor.execute("UPDATE procrastinate_jobs SET skiplock_expires_at = now() - interval '1 minute' WHERE id = %s",
                       [job.job_id])
    html = operator.get(f"{LIST}{job.job_id}/change/").content.decode()
    assert 'data-state="expired"' in html  # before the sweep stores it
    status = operator.get(f"{LIST}{job.job_id}/status.json").json()
    assert status["display_state"] == "expired"
    assert status["label"] == "Expired"


def test_the_dashboard_shows_paused_queues_and_the_new_final_states(operator: Client) -> None:
    insert_jobs(4, queue="reports")
    insert_jobs(1, status="discarded")
    insert_jobs(2, status="expired")
    queues.pause_queue("reports")
    html = operator.get("/admin/jobs/dashboard/", {"refresh": "0"}).content.decode()
    assert 'data-alert="paused"' in html
    assert "Paused: reports. No worker starts their jobs (4 waiting)" in html
    assert 'data-paused="reports"' in html
    for state in ("discarded", "expired"):
        assert f'href="/admin/jobs/jobrecord/?state={state}&amp;finished=24h"' in html


# --- the periodic page's switches -----------------------------------------------------------------


@pytest.fixture
def schedule() -> Any:
    made = periodic.register_periodic("deploy_stack", cron="0 3 * * *", args={"check_interval": 0},
                                      periodic_id="nightly")
    yield made
    periodic._SCHEDULES.pop(made.key, None)


def test_an_operator_disables_enables_and_runs_a_schedule_from_the_periodic_page(operator: Client,
                                                                                  schedule: Any) -> None:
    page = operator.get(PERIODIC).content.decode()
    row = page.split('data-periodic="deploy_stack:nightly"')[1].split("</tr>")[0]
    assert 'data-enabled="yes"' in row
    assert 'value="disable"' in row
    assert 'value="run"' in row

    response = operator.post(SWITCH, {"key": "deploy_stack:nightly", "action": "disable"}, follow=True)
    assert any("“deploy_stack:nightly” disabled" in m for m in messages_of(response))
    switch = PeriodicSwitch.objects.get(key="deploy_stack:nightly")
    assert switch.enabled is False
    assert switch.changed_by == "admin:operator"
    row = response.content.decode().split('data-periodic="deploy_stack:nightly"')[1].split("</tr>")[0]
    assert 'data-enabled="no"' in row
    assert 'value="enable"' in row

    response = operator.post(SWITCH, {"key": "deploy_stack:nightly", "action": "run"}, follow=True)
    started = [m for m in messages_of(response) if m.startswith("Started job #")]
    assert started, messages_of(response)
    job_id = int(started[0].split("#")[1].split()[0])
    assert JobRecord.objects.get(pk=job_id).args["check_interval"] == 0  # the schedule's arguments

    operator.post(SWITCH, {"key": "deploy_stack:nightly", "action": "enable"})
    assert PeriodicSwitch.objects.get(key="deploy_stack:nightly").enabled is True


def test_the_periodic_switches_need_the_change_permission(viewer: Client, schedule: Any) -> None:
    page = viewer.get(PERIODIC).content.decode()
    assert 'value="disable"' not in page
    assert viewer.post(SWITCH, {"key": "deploy_stack:nightly", "action": "disable"}).status_code == 403
    assert viewer.post(SWITCH, {"key": "deploy_stack:nightly", "action": "run"}).status_code == 403
    assert not PeriodicSwitch.objects.exists()
    assert not JobRecord.objects.exists()


def test_an_unknown_schedule_is_refused_with_a_message(operator: Client, schedule: Any) -> None:
    response = operator.post(SWITCH, {"key": "nope", "action": "disable"}, follow=True)
    assert any(m.startswith("Nothing was changed: no periodic schedule is named 'nope'") for m in messages_of(response))
    assert not PeriodicSwitch.objects.exists()


# --- the job pages (end users) --------------------------------------------------------------------


def test_the_job_page_shows_an_expiry_a_discarded_job_and_an_expired_one() -> None:
    from django.urls import reverse

    alice = make_user("alice", staff=False)
    client = client_for(alice)
    waiting = services.job_defer(task_name="deploy_stack", args={}, owner_id=alice.pk, expires_in=3600)
    page = client.get(reverse("pages-job", args=[waiting.job_id])).content.decode()
    assert 'data-sk="expires-at"' in page

    dropped = services.job_defer(task_name="deploy_stack", args={}, owner_id=alice.pk)
    with connection.cursor() as cursor:
        cursor.execute("UPDATE procrastinate_jobs SET status = 'doing' WHERE id = %s", [dropped.job_id])
        cursor.execute("UPDATE procrastinate_jobs SET status = 'discarded' WHERE id = %s", [dropped.job_id])
        cursor.execute("UPDATE skiplock_job SET finished_at = now(), error_type = 'Discard', "
                       "error_message = 'the partner closed the account' WHERE job_id = %s", [dropped.job_id])
        cursor.execute("UPDATE procrastinate_jobs SET skiplock_expires_at = now() - interval '1 second' "
                       "WHERE id = %s", [waiting.job_id])
    page = client.get(reverse("pages-job", args=[dropped.job_id])).content.decode()
    assert 'data-sk-outcome="discarded"' in page
    assert "the partner closed the account" in page
    assert 'sk-badge--grey' in page
    assert ">Discarded<" in page
    page = client.get(reverse("pages-job", args=[waiting.job_id])).content.decode()
    assert 'data-sk-outcome="expired"' in page
    assert 'data-display-state="expired"' in page


def test_the_queues_and_periodic_pages_cost_the_same_queries_whatever_they_list(operator: Client) -> None:
    from django.test.utils import CaptureQueriesContext

    def queries_of(url: str) -> int:
        with CaptureQueriesContext(connection) as captured:
            assert operator.get(url).status_code == 200
        return len(captured)

    insert_jobs(1, queue="q0")
    operator.get(QUEUES)  # warm the session and content-type caches
    few = queries_of(QUEUES), queries_of(PERIODIC), queries_of("/admin/jobs/dashboard/?refresh=0")
    for n in range(1, 6):
        insert_jobs(2, queue=f"q{n}")
        queues.pause_queue(f"q{n}")
        queues.set_queue_limits(f"q{n}", concurrency=n)
    many = queries_of(QUEUES), queries_of(PERIODIC), queries_of("/admin/jobs/dashboard/?refresh=0")
    assert few == many, (few, many)
    # session, user, the user's and their groups' permissions, then: depth by state, the oldest
    # waits, the control rows, the task limits (Queues); the last defers and the switches
    # (periodic). Nothing per queue or per schedule.
    assert few[:2] == (8, 6), few
