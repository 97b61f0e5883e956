"""Issue 13 on the job console: garbage filters never 500 (item 7), the dashboard's refresh is a
clamped integer (item 8), the workers page names queues (item 18), waiting jobs say why (item 23)."""

from __future__ import annotations

import pytest
from django.contrib import messages
from django.db import connection
from django.test import Client

from tests.admin_fixtures import console_urlconf, insert_jobs, make_user

LIST = "/admin/jobs/jobrecord/"


@pytest.fixture(autouse=True)
def _urls(settings: object) -> None:
    settings.ROOT_URLCONF = console_urlconf()  # type: ignore[attr-defined]


@pytest.fixture
def admin_client(db: None) -> Client:
    client = Client()
    client.force_login(make_user("root", superuser=True))
    return client


def shown_ids(html: str) -> set[int]:
    import re

    return {int(found) for found in re.findall(r'name="_selected_action" value="(\d+)"', html)}


def notices(response: object) -> list[str]:
    return [str(message) for message in messages.get_messages(response.wsgi_request)]  # type: ignore[attr-defined]


# --- item 7: filters -----------------------------------------------------------------------------------


@pytest.mark.parametrize("query", [
    "state=xx", "state=%00", "task=deploy%00stack", "queue=de%00fault", "created=forever", "finished=%00",
    "q=%00", "q=points%3D1e999", "q=points%3DNaN", "q=points%3D-1e999", "q=%23999999999999999999",
    "q=args.x%3D%7B%22a%22%3A1e999%7D", "q=x%3D%00", "p=-1", "p=abc", "o=99",
    "task_name__regex=(", "job_id__gt=1e999", "foo=bar", "_to_field=x", "state=todo&state=xx",
])
def test_garbage_filters_give_a_list_never_a_500(admin_client: Client, query: str) -> None:
    insert_jobs(2)
    response = admin_client.get(f"{LIST}?{query}", follow=True)
    assert response.status_code == 200, response.content[:300]


def test_an_unknown_state_lists_nothing_and_says_why(admin_client: Client) -> None:
    insert_jobs(2)
    response = admin_client.get(f"{LIST}?state=xx")
    assert response.status_code == 200
    assert shown_ids(response.content.decode()) == set()
    assert any("state" in text and "xx" in text for text in notices(response)), notices(response)


def test_a_nul_byte_in_a_filter_lists_nothing_and_says_why(admin_client: Client) -> None:
    insert_jobs(2)
    response = admin_client.get(f"{LIST}?task=deploy%00stack")
    assert response.status_code == 200
    assert shown_ids(response.content.decode()) == set()
    assert any("NUL" in text for text in notices(response)), notices(response)


def test_a_parameter_the_list_has_no_filter_for_is_dropped_with_a_message(admin_client: Client) -> None:
    ids = insert_jobs(2)
    response = admin_client.get(f"{LIST}?state=todo&task_name__regex=(", follow=True)
    assert response.redirect_chain == [(f"{LIST}?state=todo", 302)]
    assert shown_ids(response.content.decode()) == set(ids)
    assert any("task_name__regex" in text for text in notices(response)), notices(response)


def test_an_out_of_range_number_in_the_argument_search_lists_nothing_and_says_why(admin_client: Client) -> None:
    insert_jobs(2, args={"points": 5})
    response = admin_client.get(f"{LIST}?q=points%3D1e999")
    assert response.status_code == 200
    assert shown_ids(response.content.decode()) == set()
    assert any("1e999" in text for text in notices(response)), notices(response)
    found = admin_client.get(f"{LIST}?q=points%3D5")
    assert len(shown_ids(found.content.decode())) == 2


# --- item 8: the dashboard's refresh --------------------------------------------------------------------


def meta_refresh(html: str) -> str | None:
    import re

    found = re.search(r'<meta http-equiv="refresh" content="([^"]*)"', html)
    return found.group(1) if found else None


@pytest.mark.parametrize(("given", "used"), [
    ("0;url=https://evil.example", "15"), ("0.01", "15"), ("1", "2"), ("-5", "2"), ("999999999", "3600"),
    ("60", "60"), ("%00", "15"), ("", "15"),
])
def test_the_dashboard_refresh_is_an_integer_in_a_sane_range(admin_client: Client, given: str, used: str) -> None:
    html = admin_client.get(f"/admin/jobs/dashboard/?refresh={given}").content.decode()
    assert meta_refresh(html) == used
    assert "evil.example" not in html


def test_refresh_zero_turns_the_reload_off(admin_client: Client) -> None:
    html = admin_client.get("/admin/jobs/dashboard/?refresh=0").content.decode()
    assert meta_refresh(html) is None
    assert "auto-refresh off" in html


# --- item 18: the workers page ------------------------------------------------------------------------


def test_the_workers_page_shows_queue_names_not_characters(admin_client: Client) -> None:
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO procrastinate_workers (last_heartbeat) VALUES (now()) RETURNING id")
        worker_id = cursor.fetchone()[0]
        cursor.execute(
            "INSERT INTO skiplock_worker (worker_id, name, hostname, pid, queues, concurrency, processes, started_at,"
            " last_seen_at) VALUES (%s, 'cpu-1', 'host-a', 42, '[\"cpu\", \"reports\"]', 4, 1, now(), now())",
            [worker_id],
        )
    html = admin_client.get("/admin/jobs/workerinfo/").content.decode()
    assert "<td>cpu, reports</td>" in html
    assert "[, " not in html


# --- item 23: the detail says what a waiting job waits for ------------------------------------------------


def test_the_detail_of_a_job_behind_a_lock_names_the_lock_and_its_holder(admin_client: Client) -> None:
    from jobs import services

    args = {"stack": "shop", "environment": "production", "check_interval": 0, "build_megabytes": 1,
            "health_checks": 1}
    holder = services.job_defer(task_name="deploy_stack", args=args).job_id
    with connection.cursor() as cursor:
        cursor.execute("UPDATE procrastinate_jobs SET status = 'doing' WHERE id = %s", [holder])
    waiting = services.job_defer(task_name="deploy_stack", args=args).job_id
    html = admin_client.get(f"{LIST}{waiting}/change/").content.decode()
    assert f"lock deploy-shop-production held by job {holder}" in html
    assert "Waiting for" not in admin_client.get(f"{LIST}{holder}/change/").content.decode()
