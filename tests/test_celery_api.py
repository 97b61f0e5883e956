"""Custom states, meta and positional arguments as the REST API and its event stream show them."""
# ruff: noqa: F811  (pytest fixtures imported from tests/api_fixtures.py are redefined as arguments)

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests import celery_tasks
from tests.api_fixtures import WorkerThread, api_key, clean_queue, client, wait_for  # noqa: F401  (fixtures)
from tests.test_api_events import follow

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("clean_queue")]


@pytest.fixture(autouse=True)
def released() -> Iterator[None]:
    celery_tasks.release.clear()
    yield
    celery_tasks.release.set()


def test_the_job_document_shows_the_custom_state_and_meta_beside_the_state(client: httpx.Client) -> None:
    result = celery_tasks.build.delay(7)
    with WorkerThread(concurrency=1):
        doc = wait_for(lambda: (d := client.get(f"/api/jobs/{result.id}").json())["custom_state"] and d)
        assert (doc["state"], doc["custom_state"], doc["progress"]) == ("doing", "BUILDING", 25)
        assert doc["meta"] == {"project_id": 7, "current": 1, "total": 4}
        assert doc["args"] == {"__args__": [7]}
        celery_tasks.release.set()
        wait_for(lambda: client.get(f"/api/jobs/{result.id}").json()["state"] == "succeeded")
    doc = client.get(f"/api/jobs/{result.id}").json()
    assert doc["custom_state"] is None  # a label of the run, gone with it
    assert doc["meta"] == {"project_id": 7, "current": 1, "total": 4}  # kept, as written
    assert doc["result"] == {"project_id": 7, "built": True}


def test_the_event_stream_carries_the_custom_state_and_meta(client: httpx.Client) -> None:
    result = celery_tasks.build.delay(8)
    with follow(client, f"/api/jobs/{result.id}/events") as stream:
        wait_for(lambda: stream.events)
        with WorkerThread(concurrency=1):
            labelled = wait_for(lambda: [e for e in stream.events if e.data.get("custom_state") == "BUILDING"])
            celery_tasks.release.set()
            assert stream.closed.wait(30), stream.kinds()
    event = labelled[0]
    assert (event.event, event.data["state"], event.data["progress"]) == ("progress", "doing", 25)
    assert event.data["meta"] == {"project_id": 8, "current": 1, "total": 4}
    assert event.id == f"{result.id}:1:doing:25:BUILDING"
    assert stream.kinds()[-1] == "end"


def test_a_task_taking_positional_arguments_is_started_over_the_api_with_args(client: httpx.Client) -> None:
    started = client.post("/api/jobs", json={"task": "tests.celery.typed",
                                             "args": {"__args__": ["2", "a", "b"], "dry_run": True}})
    assert started.status_code == 202, started.text
    doc = client.get(f"/api/jobs/{started.json()['id']}").json()
    assert doc["args"] == {"__args__": [2, "a", "b"], "dry_run": True}  # validated, stored as given
    refused = client.post("/api/jobs", json={"task": "tests.celery.typed", "args": {"__args__": [1, 2]}})
    assert refused.status_code == 422
    assert "names.0" in refused.text
    described = next(t for t in client.get("/api/tasks").json()["tasks"] if t["name"] == "tests.celery.typed")
    assert described["args_schema"]["properties"]["__args__"]["items"] == {"type": "string"}
    openapi = client.get("/api/openapi.json").json()["components"]["schemas"]
    assert openapi["TestsCeleryTypedArgs"]["properties"]["__args__"]["items"] == {"type": "string"}
