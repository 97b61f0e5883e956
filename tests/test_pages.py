"""The job pages (jobs/pages.py) on the server: who may see what, forms, CSRF, rendering."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.template import Context, RequestContext, Template
from django.template.loader import render_to_string
from django.test import Client, RequestFactory
from django.utils import timezone

from jobs import pages, services
from jobs.exceptions import InvalidArguments
from jobs.models import JobRecord
from jobs.states import DISPLAY, STORED_STATE_OF, DisplayState, State, colour, label
from jobs.testing import run_jobs
from tests.pages_fixtures import PASSWORD, alice, bob, fast_passwords, signed_in, staff, start_job

__all__ = ["alice", "bob", "fast_passwords", "staff"]  # fixtures, re-exported for pytest

DOCS = Path(__file__).resolve().parent.parent / "docs" / "pages.md"


def launcher_post(task: str, **fields: Any) -> dict[str, Any]:
    return {"task": task, **{f"arg-{name}": value for name, value in fields.items()}}


def html_of(response: Any) -> str:
    return response.content.decode()


# --- sign-in -------------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/", "/jobs/1/", "/jobs/1/status"])
def test_anonymous_visitors_are_sent_to_sign_in(client: Client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 302
    assert response["Location"] == f"/login/?next={path}"


@pytest.mark.django_db
def test_anonymous_cancel_changes_nothing(client: Client, alice: User) -> None:
    job = start_job(alice)
    response = client.post(f"/jobs/{job.pk}/cancel")
    assert response.status_code == 302
    assert response["Location"].startswith("/login/")
    assert JobRecord.objects.get(pk=job.pk).state == State.TODO


@pytest.mark.django_db
def test_a_user_who_is_not_staff_signs_in_on_the_login_page_and_lands_on_the_launcher(
    alice: User,
) -> None:
    client = Client(enforce_csrf_checks=True)
    page = client.get("/login/?next=/")
    assert page.status_code == 200
    token = client.cookies["csrftoken"].value
    response = client.post(
        "/login/", {"username": "alice", "password": PASSWORD, "next": "/", "csrfmiddlewaretoken": token}
    )
    assert response.status_code == 302
    assert response["Location"] == "/"
    assert client.get("/").status_code == 200


@pytest.mark.django_db
def test_a_wrong_password_is_refused_with_a_message(alice: User) -> None:
    response = Client().post("/login/", {"username": "alice", "password": "nope"})
    assert response.status_code == 200
    assert "correct username and password" in html_of(response)


# --- the launcher --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_launcher_has_a_form_per_task_with_typed_inputs_and_defaults(alice: User) -> None:
    html = html_of(signed_in(alice).get("/"))
    for name in ("deploy_stack", "index_document", "optimize_route"):
        assert f'<input type="hidden" name="task" value="{name}">' in html
    megabytes = re.search(r'<input id="id-deploy_stack-build_megabytes"[^>]*>', html, re.S)
    assert megabytes is not None
    assert 'type="number"' in megabytes.group(0)
    assert 'step="1"' in megabytes.group(0)
    assert 'value="32"' in megabytes.group(0)
    assert 'min="0"' in megabytes.group(0)
    assert 'max="1024"' in megabytes.group(0)
    assert "Whole number from 0 to 1024; default 32" in html
    stack = re.search(r'<input id="id-deploy_stack-stack"[^>]*>', html, re.S)
    assert stack is not None
    assert 'maxlength="63"' in stack.group(0)
    interval = re.search(r'<input id="id-deploy_stack-check_interval"[^>]*>', html, re.S)
    assert interval is not None
    assert 'step="any"' in interval.group(0)
    assert 'value="0.5"' in interval.group(0)
    assert '<label for="id-deploy_stack-services">Services' in html
    assert 'placeholder="optional"' in html  # fail_at_step: int | None = None
    title = re.search(r'<input id="id-index_document-title"[^>]*>', html, re.S)
    assert title is not None
    assert "required" in title.group(0)
    assert '<textarea id="id-index_document-text"' in html
    assert 'for="id-optimize_route-points"' in html


@pytest.mark.django_db
def test_starting_a_job_from_the_form_converts_the_inputs_and_shows_the_job(alice: User) -> None:
    response = signed_in(alice).post(
        "/",
        launcher_post(
            "deploy_stack", stack="shop", environment="staging", services="api, web",
            build_megabytes="2", health_checks="1", check_interval="0.2", fail_at_step="", fail_times="1",
        ),
    )
    assert response.status_code == 303
    job_id = int(response["Location"].strip("/").split("/")[-1])
    assert response["Location"] == f"/jobs/{job_id}/"
    record = JobRecord.objects.get(pk=job_id)
    assert record.owner_id == alice.pk
    assert record.task_name == "deploy_stack"
    assert record.args["services"] == ["api", "web"]
    assert record.args["build_megabytes"] == 2
    assert record.args["check_interval"] == 0.2
    assert record.args["fail_at_step"] is None


@pytest.mark.django_db
def test_a_delayed_start_is_scheduled(alice: User) -> None:
    response = signed_in(alice).post("/", {**launcher_post("optimize_route", points="10"), "delay_seconds": "600"})
    assert response.status_code == 303
    record = JobRecord.objects.get(owner_id=alice.pk)
    assert record.display_state == DisplayState.SCHEDULED
    page = html_of(signed_in(alice).get(response["Location"]))
    assert ">Scheduled<" in page
    assert "Starts" in page


@pytest.mark.django_db
def test_a_bad_argument_is_shown_beside_its_field_with_the_apis_message_and_starts_nothing(
    alice: User,
) -> None:
    response = signed_in(alice).post(
        "/", launcher_post("deploy_stack", build_megabytes="2.5", check_interval="fast")
    )
    assert response.status_code == 422
    html = html_of(response)
    assert not JobRecord.objects.exists()
    with pytest.raises(InvalidArguments) as raised:
        services.job_defer(task_name="deploy_stack", args={"build_megabytes": 2.5, "check_interval": "fast"})
    api_messages = {d["field"]: d["message"] for d in raised.value.details}
    field = re.search(r'data-field="build_megabytes">.*?</div>', html, re.S)
    assert field is not None
    assert 'aria-invalid="true"' in field.group(0)
    assert api_messages["build_megabytes"] in field.group(0)
    assert 'id="err-deploy_stack-build_megabytes"' in field.group(0)
    assert api_messages["check_interval"] in html
    assert "The job was not started." in html
    assert 'value="2.5"' in html  # what was typed stays in the form
    assert re.search(r'<details class="sk-task sk-card" id="task-deploy_stack" open>', html)


@pytest.mark.django_db
def test_a_value_out_of_the_tasks_range_is_refused_with_the_range(alice: User) -> None:
    response = signed_in(alice).post("/", launcher_post("optimize_route", points="9000"))
    assert response.status_code == 422
    field = re.search(r'data-field="points">.*?</div>', html_of(response), re.S)
    assert field is not None
    assert "Input should be less than or equal to 5000." in field.group(0)


@pytest.mark.django_db
def test_a_missing_required_argument_is_named(alice: User) -> None:
    response = signed_in(alice).post("/", launcher_post("index_document", title="", text="hello"))
    assert response.status_code == 422
    field = re.search(r'data-field="title">.*?</div>', html_of(response), re.S)
    assert field is not None
    assert "This field is required." in field.group(0)


@pytest.mark.django_db
def test_a_bad_delay_is_refused(alice: User) -> None:
    response = signed_in(alice).post("/", {**launcher_post("optimize_route"), "delay_seconds": "-5"})
    assert response.status_code == 422
    assert "Must be from 0 to" in html_of(response)
    assert not JobRecord.objects.exists()


@pytest.mark.django_db
def test_the_launcher_offers_the_product_tasks_not_skiplocks_own(alice: User, settings: Any) -> None:
    from jobs.registry import find_task

    client = signed_in(alice)
    if find_task("skiplock.maintenance") is not None:
        assert 'value="skiplock.maintenance"' not in html_of(client.get("/"))
        assert client.post("/", launcher_post("skiplock.maintenance")).status_code == 404
    settings.SKIPLOCK_PAGES_TASKS = ["optimize_route"]
    html = html_of(client.get("/"))
    assert 'name="task" value="optimize_route"' in html
    assert 'name="task" value="deploy_stack"' not in html
    assert client.post("/", launcher_post("deploy_stack")).status_code == 404
    assert not JobRecord.objects.exists()


@pytest.mark.django_db
def test_an_unknown_task_is_a_404(alice: User) -> None:
    response = signed_in(alice).post("/", launcher_post("rm_rf"))
    assert response.status_code == 404
    assert "There is no task named" in html_of(response)


@pytest.mark.django_db
def test_the_launcher_lists_only_the_visitors_own_recent_jobs(alice: User, bob: User) -> None:
    mine = start_job(alice, "optimize_route", points=10)
    theirs = start_job(bob, "optimize_route", points=11)
    html = html_of(signed_in(alice).get("/"))
    assert f'data-skiplock-job="{mine.pk}"' in html
    assert f'data-skiplock-job="{theirs.pk}"' not in html
    assert f'data-events-url="/api/events?ids={mine.pk}"' in html


def test_every_kind_of_argument_gets_an_input_and_reads_back_as_the_api_would_receive_it() -> None:
    from typing import Annotated, Literal

    import pydantic
    from django.http import QueryDict

    from jobs.registry import RetryPolicy, TaskSpec

    class ExampleArgs(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        size: Literal["s", "m", "l"] = "m"
        level: Literal[1, 2, 3] = 1
        dry_run: bool = True
        ids: list[int] = [1]  # pydantic copies mutable defaults
        options: dict[str, int] = {}
        notes: Annotated[str, pydantic.Field(json_schema_extra={"x-widget": "textarea"})] = ""
        limit: int | None = None

    spec = TaskSpec(
        name="example", func=lambda **kw: kw, args_model=ExampleArgs, queue="default", priority=0,
        retry=RetryPolicy(), soft_time_limit=1, hard_time_limit=2, lock=None, queueing_lock=None,
        takes_context=False, description="An example.\n\nWith `code`.",
    )
    form = pages.task_form(spec)
    kinds = {arg.name: arg.kind for arg in form.fields}
    assert kinds == {
        "size": "select", "level": "select", "dry_run": "boolean", "ids": "list", "options": "json",
        "notes": "textarea", "limit": "integer",
    }
    assert form.description == "With `code`."
    data = QueryDict(mutable=True)
    data.update({"arg-size": "l", "arg-level": "2", "arg-ids": "3, 4\n5", "arg-options": '{"a": 1}',
                 "arg-notes": "  keep  ", "arg-limit": ""})
    args, delay = pages.read_form(form, data)
    assert delay is None
    assert spec.validate(args) == {
        "size": "l", "level": 2, "dry_run": False, "ids": [3, 4, 5], "options": {"a": 1},
        "notes": "  keep  ", "limit": None,
    }
    data["arg-options"] = "{nope"
    pages.read_form(form := pages.task_form(spec), data)
    assert form.has_errors
    assert form.fields[4].errors[0].startswith("Not valid JSON")


# --- CSRF ----------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_starting_without_a_csrf_token_is_refused(alice: User) -> None:
    client = signed_in(alice, enforce_csrf_checks=True)
    response = client.post("/", launcher_post("optimize_route", points="10"))
    assert response.status_code == 403
    assert not JobRecord.objects.exists()
    client.get("/")
    token = client.cookies["csrftoken"].value
    response = client.post("/", {**launcher_post("optimize_route", points="10"), "csrfmiddlewaretoken": token})
    assert response.status_code == 303


@pytest.mark.django_db
def test_cancelling_without_a_csrf_token_is_refused(alice: User) -> None:
    job = start_job(alice)
    response = signed_in(alice, enforce_csrf_checks=True).post(f"/jobs/{job.pk}/cancel")
    assert response.status_code == 403
    assert JobRecord.objects.get(pk=job.pk).state == State.TODO


# --- the status page -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_owner_sees_the_status_at_once_and_a_page_that_reloads_itself_without_javascript(
    alice: User,
) -> None:
    job = start_job(alice)
    response = signed_in(alice).get(f"/jobs/{job.pk}/")
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    html = html_of(response)
    assert '<noscript><meta http-equiv="refresh" content="3"></noscript>' in html
    assert 'role="progressbar"' in html
    assert 'aria-valuenow="0"' in html
    assert f'<span class="sk-badge sk-badge--{colour("todo")}" data-sk="badge" data-state="todo">{label("todo")}</span>' in html
    assert "Waiting for" in html
    assert "0 of 4" in html  # attempts of the task's max
    assert f'data-events-url="/api/jobs/{job.pk}/events"' in html
    assert f'action="/jobs/{job.pk}/cancel"' in html
    assert "skiplock/pages/jobs.js" in html


@pytest.mark.django_db
def test_another_user_gets_a_404_for_the_page_the_component_and_the_buttons(
    alice: User, bob: User
) -> None:
    job = start_job(alice)
    client = signed_in(bob)
    assert client.get(f"/jobs/{job.pk}/").status_code == 404
    assert client.get(f"/jobs/{job.pk}/status").status_code == 404
    assert client.post(f"/jobs/{job.pk}/cancel").status_code == 404
    assert client.post(f"/jobs/{job.pk}/abort").status_code == 404
    assert JobRecord.objects.get(pk=job.pk).state == State.TODO


@pytest.mark.django_db
def test_a_job_nobody_owns_and_a_missing_job_are_404s_for_users(alice: User) -> None:
    orphan = start_job(None)
    client = signed_in(alice)
    assert client.get(f"/jobs/{orphan.pk}/").status_code == 404
    assert client.get("/jobs/999999999/").status_code == 404


@pytest.mark.django_db
def test_staff_with_the_change_permission_see_and_may_cancel_anyones_job(alice: User, staff: User) -> None:
    from django.contrib.auth.models import Permission

    job = start_job(alice)
    client = signed_in(staff)
    assert client.get(f"/jobs/{job.pk}/").status_code == 404  # staff status alone: their own jobs only
    staff.user_permissions.add(Permission.objects.get(codename="change_jobrecord"))
    page = client.get(f"/jobs/{job.pk}/")
    assert page.status_code == 200
    assert "Cancel job" in html_of(page)
    response = client.post(f"/jobs/{job.pk}/cancel")
    assert response.status_code == 303
    assert JobRecord.objects.get(pk=job.pk).state == State.CANCELLED


@pytest.mark.django_db
def test_the_owner_cancels_a_waiting_job_and_the_page_then_stops_reloading(alice: User) -> None:
    job = start_job(alice)
    client = signed_in(alice)
    response = client.post(f"/jobs/{job.pk}/cancel")
    assert response.status_code == 303
    assert response["Location"] == f"/jobs/{job.pk}/"
    html = html_of(client.get(response["Location"]))
    assert f"Job #{job.pk} was cancelled." in html
    assert ">Cancelled<" in html
    assert "http-equiv" not in html
    assert "Cancel job" not in html
    assert "cancelled before it ran" in html
    again = client.post(f"/jobs/{job.pk}/cancel", follow=True)
    assert "could not be canceled" in html_of(again) or "could not be cancelled" in html_of(again)


@pytest.mark.django_db
def test_abort_on_a_waiting_job_cancels_it_and_returns_to_a_safe_next_url(alice: User) -> None:
    job = start_job(alice)
    client = signed_in(alice)
    response = client.post(f"/jobs/{job.pk}/abort", {"next": "https://evil.example/"})
    assert response["Location"] == f"/jobs/{job.pk}/"
    assert JobRecord.objects.get(pk=job.pk).state == State.CANCELLED
    other = start_job(alice)
    response = client.post(f"/jobs/{other.pk}/abort", {"next": "/?from=job"})
    assert response["Location"] == "/?from=job"


@pytest.mark.django_db
def test_the_fragment_is_the_component_alone(alice: User) -> None:
    job = start_job(alice)
    html = html_of(signed_in(alice).get(f"/jobs/{job.pk}/status"))
    assert html.lstrip().startswith("<section")
    assert f'data-skiplock-job="{job.pk}"' in html
    compact = html_of(signed_in(alice).get(f"/jobs/{job.pk}/status?compact=1"))
    assert "sk-job--compact" in compact
    assert "Cancel job" not in compact
    page = html_of(signed_in(alice).get(f"/jobs/{job.pk}/"))
    assert f'data-fragment-url="/jobs/{job.pk}/status?level=1&amp;next=%2Fjobs%2F{job.pk}%2F"' in page
    assert '<h1 id="sk-job-' in page
    kept = html_of(signed_in(alice).get(f"/jobs/{job.pk}/status?level=3&next=/reports/9/"))
    assert '<h3 id="sk-job-' in kept
    assert 'name="next" value="/reports/9/"' in kept
    assert "level=3&amp;next=%2Freports%2F9%2F" in kept  # the next swap keeps the options
    foreign = html_of(signed_in(alice).get(f"/jobs/{job.pk}/status?next=https://evil.example/"))
    assert "evil.example" not in foreign


@pytest.mark.django_db(transaction=True)
def test_a_finished_job_shows_its_result_formatted_and_a_failed_one_its_error() -> None:
    from tests.pages_fixtures import make_user

    owner = make_user("carol")
    done = start_job(owner, "optimize_route", points=40, max_rounds=5)
    failed = start_job(owner, "deploy_stack", fail_at_step=1, fail_times=99)
    run_jobs(include_scheduled=True)
    client = signed_in(owner)

    html = html_of(client.get(f"/jobs/{done.pk}/"))
    record = JobRecord.objects.get(pk=done.pk)
    assert record.state == State.SUCCEEDED
    assert isinstance(record.result, dict)
    assert ">Succeeded<" in html
    assert 'aria-valuenow="100"' in html
    assert "http-equiv" not in html
    assert '<div class="sk-result__row" data-key="length">' in html
    assert f"{record.result['length']:.6g}" in html
    assert "40 items" in html  # the route, folded away
    assert "Took" in html
    assert "Raw JSON" in html

    html = html_of(client.get(f"/jobs/{failed.pk}/"))
    assert ">Failed<" in html
    assert "<strong>DeployStepFailed</strong>" in html
    assert "step 1 (validate) failed" in html
    assert "Traceback" not in html  # the owner sees the error; its traceback is for operators
    assert "4 of 4" in html


# --- one vocabulary: every display state renders ----------------------------------------------------


@pytest.mark.django_db  # a waiting job asks what it waits for (jobs.selectors.job_waiting_for)
@pytest.mark.parametrize("shown", list(DisplayState))
def test_every_display_state_renders_with_its_label_and_colour(shown: DisplayState) -> None:
    now = timezone.now()
    stored = STORED_STATE_OF[shown]
    record = JobRecord(
        job_id=7, task_name="deploy_stack", queue_name="default", state=stored, args={},
        created_at=now - dt.timedelta(seconds=30),
        scheduled_at=now + dt.timedelta(minutes=5) if shown in (DisplayState.SCHEDULED, DisplayState.RETRYING) else None,
        started_at=now - dt.timedelta(seconds=20) if stored not in (State.TODO, State.CANCELLED, State.EXPIRED) else None,
        finished_at=now if stored in (State.SUCCEEDED, State.FAILED, State.ABORTED, State.CANCELLED, State.DISCARDED,
                                      State.EXPIRED) else None,
        attempts=1 if shown == DisplayState.RETRYING or stored != State.TODO else 0,
        progress=40, step="build",
        result={"ok": True} if stored == State.SUCCEEDED else None,
        error_type="Boom" if shown in (DisplayState.RETRYING, DisplayState.FAILED) else "",
        error_message="it broke",
    )
    assert record.display_state == shown
    view = pages.job_view(record, None, now=now)
    html = render_to_string("jobs/components/job_status.html", pages.component_context(view))
    assert f'<span class="sk-badge sk-badge--{colour(shown)}" data-sk="badge" data-state="{shown}">{label(shown)}</span>' in html
    assert f".sk-badge--{colour(shown)} " in (Path(__file__).resolve().parent.parent / "jobs/static/skiplock/pages/pages.css").read_text()
    assert 'aria-valuenow="40"' in html
    expected_clock = {
        DisplayState.TODO: "Waiting for", DisplayState.SCHEDULED: "Waiting for", DisplayState.RETRYING: "Waiting for",
        DisplayState.DOING: "Running for", DisplayState.ABORTING: "Running for", DisplayState.SUCCEEDED: "Took",
        DisplayState.FAILED: "Took", DisplayState.ABORTED: "Took", DisplayState.CANCELLED: "Waited",
        DisplayState.DISCARDED: "Took", DisplayState.EXPIRED: "Waited",
    }[shown]
    assert f'<dt data-sk="elapsed-label">{expected_clock}</dt>' in html


def test_the_script_gets_every_state_from_the_one_vocabulary() -> None:
    import json

    vocabulary = json.loads(pages.states_json())
    assert set(vocabulary["states"]) == {str(s) for s in DISPLAY}
    assert set(vocabulary["final"]) == {"succeeded", "failed", "cancelled", "aborted", "discarded", "expired"}


# --- formatting ----------------------------------------------------------------------------------


def test_results_are_formatted_for_people() -> None:
    items = pages.format_result(
        {"release": "abc123", "length": 1234.56789, "count": 123456, "ok": True, "services": ["api", "web"],
         "route": list(range(300)), "manifest": {"stack": "shop"}, "nothing": None}
    )
    by_key = {item.key: item for item in items}
    assert by_key["release"].text == "abc123"
    assert by_key["length"].text == "1234.57"
    assert by_key["count"].text == "123456"  # ids, ports and years read wrong with separators
    assert by_key["ok"].text == "yes"
    assert by_key["services"].text == "api, web"
    assert by_key["route"].count == 300
    assert by_key["manifest"].pairs == [("Stack", "shop")]
    assert by_key["nothing"].text == "—"
    assert by_key["release"].label == "Release"
    assert [item.key for item in items][-2:] == ["manifest", "route"]  # short values first
    assert pages.format_result([1, 2])[0].text == "1, 2"
    table = pages.format_result({"services": [{"name": "api", "healthy": True}, {"name": "web", "port": 80}]})[0]
    assert table.columns == ["Name", "Healthy", "Port"]
    assert table.rows == [["api", "yes", ""], ["web", "", "80"]]
    nested = pages.format_result({"deep": {"a": {"b": 1}}})[0]
    assert '"b": 1' in nested.block


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.42, "0.4 s"), (12.7, "12 s"), (185, "3 min 05 s"), (7260, "2 h 01 min"), (200_000, "2 d 7 h")],
)
def test_durations_read_like_a_person_would_say_them(seconds: float, text: str) -> None:
    assert pages.format_duration(seconds) == text


# --- the docs' example -----------------------------------------------------------------------------


def docs_example() -> str:
    text = DOCS.read_text()
    match = re.search(r"<!-- example: status-component[^>]*-->\s*```django\n(.*?)```", text, re.S)
    assert match is not None, "docs/pages.md lost its status-component example"
    return match.group(1)


@pytest.mark.django_db
def test_the_docs_example_renders_the_live_component_for_the_owner_only(
    alice: User, bob: User
) -> None:
    job = start_job(alice)
    template = Template(docs_example())
    request = RequestFactory().get("/reports/1/")
    request.user = alice
    html = template.render(RequestContext(request, {"report": {"job_id": job.pk}}))
    assert 'rel="stylesheet" href="/static/skiplock/pages/pages.css"' in html
    assert "data-skiplock-states=" in html
    assert html.count(f'data-skiplock-job="{job.pk}"') == 2
    assert "sk-job--compact" in html
    assert 'role="progressbar"' in html
    assert f'<span class="sk-badge sk-badge--{colour("failed")}" data-sk="badge" data-state="failed">Failed</span>' in html
    assert 'name="next" value="/reports/1/"' in html  # cancel returns to the product's page

    request.user = bob
    html = template.render(RequestContext(request, {"report": {"job_id": job.pk}}))
    assert f'data-skiplock-job="{job.pk}"' not in html
    assert html.count("This job is not available.") == 2


@pytest.mark.django_db
def test_the_docs_start_view_example_starts_a_job_the_visitor_owns_and_sends_them_to_it(alice: User) -> None:
    match = re.search(r"<!-- example: start-view[^>]*-->\s*```python\n(.*?)```", DOCS.read_text(), re.S)
    assert match is not None, "docs/pages.md lost its start-view example"
    namespace: dict[str, Any] = {}
    exec(compile(match.group(1), "docs/pages.md", "exec"), namespace)  # noqa: S102  (our own docs)
    request = RequestFactory().post("/plan/")
    request.user = alice
    response = namespace["plan_route"](request)
    record = JobRecord.objects.get(owner_id=alice.pk)
    assert (record.task_name, record.args["points"]) == ("optimize_route", 300)
    assert response.status_code == 302
    assert response["Location"] == f"/jobs/{record.pk}/"
    assert signed_in(alice).get(response["Location"]).status_code == 200


@pytest.mark.django_db
def test_signing_out_ends_the_session(alice: User) -> None:
    client = signed_in(alice)
    response = client.post("/logout/")
    assert response.status_code == 302
    assert response["Location"] == "/login/"
    assert client.get("/").status_code == 302


def test_the_component_tag_accepts_nonsense_quietly() -> None:
    html = Template("{% load skiplock_pages %}{% skiplock_job_status 'abc' %}").render(Context({}))
    assert "This job is not available." in html
