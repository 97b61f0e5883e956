"""The console in a real browser (Debian's chromium through Playwright) against the real ASGI app."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from jobs import services
from jobs.testing import WorkerThread
from tests.admin_fixtures import PASSWORD, failed_deploy_job, make_user

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(settings.BASE_DIR) / "test-artifacts"




@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    if not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None:
        pytest.skip("Debian's chromium is not installed (make browser)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    # Playwright's sync API runs an event loop on this thread; the test's own ORM calls are still
    # plain sequential code, so Django's guard against sync calls from async code does not apply.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        browser.close()


def log_in(page: Any, base: str) -> None:
    page.goto(f"{base}/admin/login/?next=/admin/jobs/jobrecord/")
    page.fill("#id_username", "root")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(re.compile(r".*/admin/jobs/jobrecord/$"))


def test_an_operator_finds_a_failed_job_retries_it_and_watches_a_job_run(asgi_server: str, browser: Any) -> None:
    make_user("root", superuser=True)
    failed_id = failed_deploy_job()
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    page = context.new_page()
    log_in(page, asgi_server)

    # Filter to failed jobs with the sidebar, open the one there, see its traceback.
    page.click("#changelist-filter a[href*='state=failed']")
    page.wait_for_url(re.compile(r".*state=failed"))
    rows = page.locator("#result_list tbody tr")
    assert rows.count() == 1
    assert "Failed" in rows.first.inner_text()
    page.screenshot(path=str(ARTIFACTS / "admin-list.png"), full_page=True)
    page.click(f"a[href='/admin/jobs/jobrecord/{failed_id}/change/']")
    traceback = page.locator(".sl-traceback").first
    traceback.wait_for()
    assert "DeployStepFailed" in traceback.inner_text()
    assert "Traceback (most recent call last)" in traceback.inner_text()
    page.screenshot(path=str(ARTIFACTS / "admin-detail.png"), full_page=True)

    # Bulk retry from the list: select all, pick the action, confirm.
    page.go_back()
    page.check("#action-toggle")
    page.select_option("select[name=action]", "retry_jobs")
    page.click("button[name=index]")
    page.get_by_role("button", name=re.compile(r"Yes, retry 1 job")).click()
    page.wait_for_selector(".messagelist")
    assert f"Retried 1 job(s): #{failed_id}" in page.locator(".messagelist").inner_text()

    # A running job: its progress bar moves on the open page, without a reload.
    job = services.job_defer(task_name="deploy_stack", args={
        "check_interval": 0.3, "build_megabytes": 4, "health_checks": 7, "stack": "live"})
    page.goto(f"{asgi_server}/admin/jobs/jobrecord/{job.job_id}/change/")
    page.evaluate("window.__sameDocument = true")
    seen: list[int] = []
    sample = """() => [document.getElementById('sl-progress-text').textContent,
                       document.querySelector('#sl-progress-bar .sl-progress > span').style.width,
                       window.__sameDocument === true]"""
    with WorkerThread(name="browser-test-worker"):
        for _ in range(100):
            text, width, same_document = page.evaluate(sample)
            value = int(text.rstrip("%"))
            assert same_document, "the page reloaded while the job ran"
            assert width == f"{value}%", (text, width)  # the bar and the number move together
            if not seen or value != seen[-1]:
                seen.append(value)
            if value >= 100 or (len(seen) >= 3 and 0 < seen[-1] < 100):
                break
            page.wait_for_timeout(200)
        assert len(seen) >= 3, seen
        assert seen == sorted(seen), seen
        assert seen[-1] > 0, seen
        assert page.locator("#sl-live-mode").inner_text().startswith(("live", "finished"))
        # When it finishes the page refreshes itself to show the result.
        page.wait_for_selector("#sl-state [data-state=succeeded]", timeout=20_000)

    # The dashboard and its charts, in light and dark, wide and narrow.
    page.goto(f"{asgi_server}/admin/jobs/dashboard/?refresh=0")
    charts = page.locator("svg.sl-chart")
    assert charts.count() == 2
    assert charts.first.is_visible()
    assert page.locator("svg.sl-chart rect.sl-ok").count() >= 1  # the finished deploy is in the last hour
    page.screenshot(path=str(ARTIFACTS / "admin-dashboard.png"), full_page=True)
    context.close()

    dark = browser.new_context(viewport={"width": 390, "height": 844}, color_scheme="dark")
    page = dark.new_page()
    log_in(page, asgi_server)
    for url in ("/admin/jobs/dashboard/?refresh=0", f"/admin/jobs/jobrecord/{job.job_id}/change/",
                "/admin/jobs/workerinfo/"):
        page.goto(asgi_server + url)
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"{url} is {overflow}px wider than a phone screen"
    page.goto(f"{asgi_server}/admin/jobs/dashboard/?refresh=0")
    page.screenshot(path=str(ARTIFACTS / "admin-dashboard-dark-narrow.png"), full_page=True)
    # Keyboard: "g" then "j" jumps to the job list, "/" focuses its search box.
    page.keyboard.press("g")
    page.keyboard.press("j")
    page.wait_for_url(re.compile(r".*/admin/jobs/jobrecord/$"))
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "searchbar"
    dark.close()
