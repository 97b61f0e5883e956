"""The Queues page in a real browser (Debian's chromium through Playwright) against the real ASGI app."""

from __future__ import annotations

from typing import Any

import pytest

from jobs.models import QueueControl
from tests.admin_fixtures import insert_jobs, make_user
from tests.test_admin_browser import ARTIFACTS, browser, log_in

__all__ = ["browser"]  # the fixture, re-exported for pytest

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_an_operator_pauses_a_queue_with_its_button_and_sees_it_paused(asgi_server: str, browser: Any) -> None:
    make_user("root", superuser=True)
    insert_jobs(2, queue="reports")
    page = browser.new_context(viewport={"width": 1366, "height": 900}).new_page()
    log_in(page, asgi_server)
    page.click(".sl-nav a[data-key='q']")
    row = page.locator("tr[data-queue='reports']")
    row.wait_for()
    assert "Running" in row.inner_text()
    row.get_by_role("button", name="Pause").click()
    page.locator("[data-paused='reports']").wait_for()
    assert "Paused queue “reports”" in page.locator(".messagelist").inner_text()
    assert page.locator("tr[data-queue='reports']").get_by_role("button", name="Resume").is_visible()
    page.screenshot(path=str(ARTIFACTS / "admin-queues.png"), full_page=True)
    assert QueueControl.objects.get(name="reports").paused
