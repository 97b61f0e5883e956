"""Custom states, meta and positional arguments on the job page and in the admin."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from django.test import Client

from jobs.celery import AsyncResult
from tests import celery_tasks, core_fixtures
from tests.admin_fixtures import make_user
from tests.core_fixtures import worker_in_background

pytestmark = pytest.mark.django_db(transaction=True)
clean_queue = core_fixtures.clean_queue


@pytest.fixture
def root_client() -> Client:
    client = Client()
    client.force_login(make_user("root", superuser=True))
    return client


@pytest.fixture(autouse=True)
def released() -> Iterator[None]:
    celery_tasks.release.clear()
    yield
    celery_tasks.release.set()


def wait_until_building(result: AsyncResult) -> None:
    deadline = time.monotonic() + 15
    while result.state != "BUILDING":
        assert time.monotonic() < deadline, result.state
        time.sleep(0.02)


def test_the_admin_and_the_job_page_show_the_custom_state_meta_and_positional_arguments(
    root_client: Client,
) -> None:
    result = celery_tasks.build.delay(5)
    with worker_in_background():
        wait_until_building(result)
        admin = root_client.get(f"/admin/jobs/jobrecord/{result.id}/change/").content.decode()
        page = root_client.get(f"/jobs/{result.id}/").content.decode()
        celery_tasks.release.set()
    assert 'id="sl-custom-state"' in admin
    assert ">BUILDING</span>" in admin
    assert "<h3>Meta (BUILDING)</h3>" in admin
    assert "&quot;project_id&quot;: 5" in admin
    assert "&quot;__args__&quot;" in admin  # the arguments as stored: positional ones in order
    assert 'data-sk="custom-state"' in page
    assert ">BUILDING</span>" in page
    assert "&quot;total&quot;: 4" in page
    assert result.get(timeout=15) == {"project_id": 5, "built": True}
    done = root_client.get(f"/admin/jobs/jobrecord/{result.id}/change/").content.decode()
    assert 'id="sl-custom-state"' not in done  # the label went with the run; the meta stays
    assert "&quot;project_id&quot;: 5" in done
