"""The job pages in a real browser (Debian's chromium, Playwright) against the real ASGI app,
the real API's Server-Sent Events and a real worker. Screenshots go to test-artifacts/."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client

from jobs.models import JobRecord
from tests.pages_fixtures import PASSWORD, WorkerThread, fast_passwords, make_user, start_job

__all__ = ["fast_passwords"]

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(settings.BASE_DIR) / "test-artifacts"
# Long enough to watch (about 3 s of health checks), short enough for the suite.
WATCHABLE_DEPLOY = {"build_megabytes": "2", "health_checks": "5", "check_interval": "0.2"}

# Records every value the progress bar shows, across the component's re-renders.
WATCH_PROGRESS = """
() => {
  window.__seen = [];
  window.__sameDocument = true;
  const root = document.querySelector('[data-skiplock-job]');
  const record = () => {
    const bar = root.querySelector('[role=progressbar]');
    if (bar) window.__seen.push(Number(bar.getAttribute('aria-valuenow')));
  };
  record();
  new MutationObserver(record).observe(root, {subtree: true, childList: true, attributes: true,
                                              attributeFilter: ['aria-valuenow']});
}
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (make browser)")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop in this thread; the ORM calls in these tests are
    # plain blocking calls between browser steps, so Django's async guard does not apply.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with sync_playwright() as playwright:
            launched = playwright.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"],
            )
            yield launched
            launched.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


def session_for(browser: Any, server: str, user: User, **options: Any) -> Any:
    """A browser context signed in as `user` (a session cookie made by Django's test client)."""
    client = Client()
    client.force_login(user)
    context = browser.new_context(base_url=server, **options)
    context.add_cookies([{"name": settings.SESSION_COOKIE_NAME, "value": client.cookies[settings.SESSION_COOKIE_NAME].value,
                          "url": server}])
    return context


def progress_of(page: Any) -> int:
    return int(page.get_attribute("[data-skiplock-job] [role=progressbar]", "aria-valuenow"))


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"pages-{name}.png"), full_page=True)


def test_a_deploy_started_from_the_launcher_shows_live_progress_survives_a_reload_and_ends_with_its_result(
    browser: Any, asgi_server: str
) -> None:
    make_user("alice")
    context = browser.new_context(base_url=asgi_server, viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.goto("/")
    assert page.url.endswith("/login/?next=/")
    page.fill("#id_username", "alice")
    page.fill("#id_password", PASSWORD)
    page.click("button:has-text('Sign in')")
    page.wait_for_url(f"{asgi_server}/")
    # Other test modules register tasks that sort first: open deploy_stack's form by name.
    page.goto("/?task=deploy_stack")

    form = page.locator("form[data-sk-form=deploy_stack]")
    for name, value in WATCHABLE_DEPLOY.items():
        form.locator(f"[name=arg-{name}]").fill(value)
    shot(page, "launcher")
    with WorkerThread():
        form.locator("button[type=submit]").click()
        page.wait_for_url(re.compile(r"/jobs/\d+/$"))
        job_id = int(page.url.rstrip("/").rsplit("/", 1)[1])
        page.evaluate(WATCH_PROGRESS)

        # Live: the bar moves while the page stays the same document.
        page.wait_for_function("() => window.__seen.some(v => v > 0 && v < 100)", timeout=20_000)
        page.wait_for_function("() => Math.max(...window.__seen) >= 80", timeout=20_000)
        before_reload = progress_of(page)
        assert page.locator("[data-sk=badge]").inner_text() == "Running"
        assert 0 < before_reload < 100
        shot(page, "status-running")

        # Reload mid-way: the server renders where the job is at once, then it keeps following.
        page.reload(wait_until="commit")
        page.wait_for_selector("[data-skiplock-job]", state="attached")
        assert progress_of(page) >= before_reload
        page.evaluate(WATCH_PROGRESS)
        page.wait_for_selector(".sk-outcome--ok", timeout=30_000)
        shot(page, "status-succeeded")

        assert page.evaluate("window.__sameDocument") is True  # no reload got us here
        seen = page.evaluate("window.__seen")
        assert seen[-1] == 100
        assert seen == sorted(seen), f"progress went backwards: {seen}"
        assert page.locator("[data-sk=badge]").inner_text() == "Succeeded"
        assert page.title() == f"Deploy stack #{job_id} — Succeeded · Skiplock"  # the tab title follows
        assert page.locator(".sk-result__row[data-key=release] dd").inner_text().strip()
        assert "1 of 4" in page.locator("[data-sk=attempts]").inner_text()
        assert page.locator("[data-sk=elapsed-label]").inner_text() == "Took"
        assert page.locator("form[data-sk-action]").count() == 0
    record = JobRecord.objects.get(pk=job_id)
    assert record.state == "succeeded"
    assert record.args["health_checks"] == 5

    # Phone width: nothing overflows sideways.
    page.set_viewport_size({"width": 375, "height": 740})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    shot(page, "status-phone")
    page.goto("/")
    assert page.locator(f"[data-skiplock-job='{job_id}'] [data-sk=badge]").inner_text() == "Succeeded"
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    shot(page, "launcher-phone")
    context.close()


def test_a_bad_argument_is_shown_at_its_field_and_nothing_starts(browser: Any, asgi_server: str) -> None:
    alice = make_user("alice")
    context = session_for(browser, asgi_server, alice)
    page = context.new_page()
    page.goto("/")
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
                 .filter(el => !el.labels || el.labels.length === 0).map(el => el.name)"""
    )
    assert unlabelled == []
    page.goto("/?task=deploy_stack")  # open deploy_stack's form whatever other tasks are registered
    form = page.locator("form[data-sk-form=deploy_stack]")
    form.locator("[name=arg-build_megabytes]").fill("2.5")
    form.locator("button[type=submit]").click()
    page.wait_for_selector("[data-sk=form-errors]")
    field = page.locator("form[data-sk-form=deploy_stack] [data-field=build_megabytes]")
    assert field.locator("input").get_attribute("aria-invalid") == "true"
    assert "Input should be a valid integer" in field.locator(".sk-field-errors").inner_text()
    assert field.locator("input").input_value() == "2.5"
    # The summary is focused (and announced), with a visible focus ring.
    assert page.evaluate("document.activeElement.dataset.sk") == "form-errors"
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"
    shot(page, "launcher-bad-argument")
    page.click("[data-sk=form-errors] a")  # the summary links to the field
    assert page.evaluate("document.activeElement.name") == "arg-build_megabytes"
    assert not JobRecord.objects.exists()
    context.close()


def test_another_user_gets_a_404_on_the_first_users_job_page(browser: Any, asgi_server: str) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    job = start_job(alice)
    owner = session_for(browser, asgi_server, alice)
    assert owner.new_page().goto(f"/jobs/{job.pk}/").status == 200
    intruder = session_for(browser, asgi_server, bob)
    page = intruder.new_page()
    response = page.goto(f"/jobs/{job.pk}/")
    assert response.status == 404
    assert page.locator("[data-skiplock-job]").count() == 0
    assert page.request.get(f"/api/jobs/{job.pk}").status == 404
    shot(page, "other-user-404")
    owner.close()
    intruder.close()


def test_the_owner_cancels_a_waiting_job_with_the_button(browser: Any, asgi_server: str) -> None:
    alice = make_user("alice")
    job = start_job(alice)
    context = session_for(browser, asgi_server, alice)
    page = context.new_page()
    page.goto(f"/jobs/{job.pk}/")
    page.evaluate(WATCH_PROGRESS)
    page.keyboard.press("Tab")  # focus is visible on whatever the keyboard reaches
    page.click("button:has-text('Cancel job')")
    page.wait_for_selector("[data-sk=outcome] >> text=cancelled before it ran")
    assert page.evaluate("window.__sameDocument") is True  # through the API, not a form post
    assert page.locator("[data-sk=badge]").inner_text() == "Cancelled"
    assert page.locator("form[data-sk-action]").count() == 0
    assert JobRecord.objects.get(pk=job.pk).state == "cancelled"
    shot(page, "status-cancelled")
    context.close()


def test_when_the_event_stream_fails_the_page_polls_and_still_sees_the_end(browser: Any, asgi_server: str) -> None:
    alice = make_user("alice")
    job = start_job(alice, health_checks=2, check_interval=0.1)
    context = session_for(browser, asgi_server, alice)
    context.route("**/api/jobs/*/events", lambda route: route.abort())
    polled: list[str] = []
    context.on("request", lambda request: polled.append(request.url) if request.url.endswith(f"/api/jobs/{job.pk}") else None)
    page = context.new_page()
    page.goto(f"/jobs/{job.pk}/")
    page.evaluate(WATCH_PROGRESS)
    with WorkerThread():
        page.wait_for_selector(".sk-outcome--ok", timeout=30_000)
    assert page.evaluate("window.__sameDocument") is True
    assert polled  # the status came from GET /api/jobs/{id}, the stream never opened
    assert page.evaluate("window.__seen").pop() == 100
    context.close()


def test_the_launchers_recent_jobs_follow_their_state_live(browser: Any, asgi_server: str) -> None:
    alice = make_user("alice")
    job = start_job(alice, "optimize_route", points=60, max_rounds=20)
    context = session_for(browser, asgi_server, alice)
    page = context.new_page()
    page.goto("/")
    row = page.locator(f"[data-skiplock-job='{job.pk}']")
    assert row.locator("[data-sk=badge]").inner_text() == "Waiting"
    page.evaluate("window.__sameDocument = true")
    with WorkerThread():
        page.wait_for_function(
            f"""() => {{
              const row = document.querySelector("[data-skiplock-job='{job.pk}']");
              return row.dataset.final === '1'  // the server's rendering of the finished job is in
                && row.querySelector('[data-sk=badge]').textContent === 'Succeeded'
                && row.querySelector('[role=progressbar]').getAttribute('aria-valuenow') === '100';
            }}""",
            timeout=30_000,
        )
    assert page.evaluate("window.__sameDocument") is True
    assert row.locator("[data-sk=elapsed-label]").inner_text() == "Took"
    context.close()


def test_without_javascript_the_status_page_reloads_itself_until_the_job_ends(
    browser: Any, asgi_server: str
) -> None:
    alice = make_user("alice")
    job = start_job(alice)
    context = session_for(browser, asgi_server, alice, java_script_enabled=False)
    page = context.new_page()
    page.goto(f"/jobs/{job.pk}/")
    assert page.locator("[data-sk=badge]").inner_text() == "Waiting"
    with WorkerThread():
        deadline = time.monotonic() + 30
        while JobRecord.objects.get(pk=job.pk).state != "succeeded":
            assert time.monotonic() < deadline, "the job did not finish"
            time.sleep(0.1)
    page.wait_for_selector(".sk-outcome--ok", timeout=15_000)  # the meta refresh brought it
    assert page.locator("[data-sk=badge]").inner_text() == "Succeeded"
    shot(page, "status-no-javascript")
    # Cancel works as a plain form too.
    waiting = start_job(alice)
    page.goto(f"/jobs/{waiting.pk}/")
    page.click("button:has-text('Cancel job')")
    page.wait_for_selector("text=was cancelled")
    assert JobRecord.objects.get(pk=waiting.pk).state == "cancelled"
    context.close()


def test_the_owner_stops_a_running_job_and_sees_it_end_aborted(browser: Any, asgi_server: str) -> None:
    alice = make_user("alice")
    job = start_job(alice, health_checks=100, check_interval=0.2)  # about a minute, unless stopped
    context = session_for(browser, asgi_server, alice)
    page = context.new_page()
    page.goto(f"/jobs/{job.pk}/")
    page.evaluate("window.__sameDocument = true")
    with WorkerThread():
        page.wait_for_selector("button:has-text('Stop job')", timeout=20_000)  # it runs: stop is offered
        page.click("button:has-text('Stop job')")
        page.wait_for_selector("[data-sk=outcome] >> text=Stopped", timeout=20_000)
    assert page.evaluate("window.__sameDocument") is True
    assert page.locator("[data-sk=badge]").inner_text() == "Aborted"
    assert page.locator("form[data-sk-action]").count() == 0
    record = JobRecord.objects.get(pk=job.pk)
    assert record.state == "aborted"
    assert 0 < record.progress < 100
    shot(page, "status-aborted")
    context.close()
