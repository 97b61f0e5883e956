"""Live job events over Server-Sent Events: pushed from LISTEN/NOTIFY, one listener per process."""
# ruff: noqa: F811  (pytest fixtures imported from tests/api_fixtures.py are redefined as arguments)

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from django.db import connection

from jobs.models import JobRecord
from tests.api_fixtures import (  # noqa: F401  (fixtures)
    FAST_DEPLOY,
    WorkerThread,
    api_key,
    bearer,
    clean_queue,
    client,
    login,
    make_key,
    wait_for,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("clean_queue")]


@dataclass
class Event:
    event: str
    data: dict[str, Any]
    id: str | None
    at: float  # time.time() when it arrived


@dataclass
class Stream:
    """Reads an SSE response on a thread, collecting events and comments as they arrive."""

    response: httpx.Response
    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retries: list[str] = field(default_factory=list)  # `retry:` hints, in order
    closed: threading.Event = field(default_factory=threading.Event)

    def read(self) -> None:
        fields: dict[str, str] = {}
        try:
            for line in self.response.iter_lines():
                if line.startswith(":"):
                    self.comments.append(line)
                elif line == "":
                    if "data" in fields:
                        self.events.append(Event(fields.get("event", "message"), json.loads(fields["data"]),
                                                 fields.get("id"), time.time()))
                    fields = {}
                else:
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")
                    if name == "retry":
                        self.retries.append(fields[name])
        except httpx.HTTPError:
            pass
        finally:
            self.closed.set()

    def kinds(self) -> list[str]:
        return [event.event for event in self.events]


def open_stream(client: httpx.Client, path: str, **headers: str) -> Iterator[Stream]:
    with client.stream("GET", path, headers=headers, timeout=httpx.Timeout(30, read=60)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = Stream(response)
        reader = threading.Thread(target=stream.read, daemon=True)
        reader.start()
        yield stream
        response.close()
        reader.join(timeout=5)


def follow(client: httpx.Client, path: str, **headers: str) -> Any:
    return _Follow(client, path, headers)


class _Follow:
    def __init__(self, client: httpx.Client, path: str, headers: dict[str, str]) -> None:
        self.gen = open_stream(client, path, **headers)

    def __enter__(self) -> Stream:
        return next(self.gen)

    def __exit__(self, *exc: object) -> None:
        for _ in self.gen:
            pass


def listen_connections() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'skiplock-events-listen'")
        return int(cursor.fetchone()[0])


def test_progress_events_arrive_while_a_real_worker_runs_the_job(client: httpx.Client) -> None:
    slow_verify = {**FAST_DEPLOY, "health_checks": 6, "check_interval": 0.15}
    job_id = client.post("/api/jobs", json={"task": "deploy_stack", "args": slow_verify}).json()["id"]
    with follow(client, f"/api/jobs/{job_id}/events") as stream:
        wait_for(lambda: stream.events)  # the snapshot comes first
        first = stream.events[0]
        assert (first.event, first.data["state"], first.data["progress"]) == ("state", "todo", 0)
        assert first.id == f"{job_id}:0:todo:0"
        with WorkerThread(concurrency=1):
            assert stream.closed.wait(30), stream.kinds()
    kinds = stream.kinds()
    assert kinds[-1] == "end"
    assert kinds.count("end") == 1
    progress = [event for event in stream.events if event.event == "progress"]
    assert len(progress) >= 3, kinds
    values = [event.data["progress"] for event in progress]
    assert values == sorted(values)
    assert values[-1] <= 100
    assert "doing" in [event.data["state"] for event in stream.events if event.event == "state"]
    finished = JobRecord.objects.get(pk=job_id).finished_at
    assert finished is not None
    # Pushed while the job ran, not replayed after it ended.
    assert sum(1 for event in progress if event.at < finished.timestamp()) >= 2
    assert {"id", "state", "display_state", "progress", "step", "attempts"} <= set(progress[0].data)
    end = stream.events[-1]
    assert end.data["state"] == "succeeded"
    assert end.data["result"]["release"]
    assert end.id == f"{job_id}:end"


def test_a_finished_job_streams_its_snapshot_and_end_then_204_on_resume(client: httpx.Client) -> None:
    job_id = client.post("/api/jobs", json={"task": "deploy_stack", "args": FAST_DEPLOY}).json()["id"]
    client.post(f"/api/jobs/{job_id}/cancel")
    with follow(client, f"/api/jobs/{job_id}/events") as stream:
        assert stream.closed.wait(10)
    assert stream.kinds() == ["state", "end"]
    assert stream.events[1].data["state"] == "cancelled"
    resumed = client.get(f"/api/jobs/{job_id}/events", headers={"Last-Event-ID": f"{job_id}:end"})
    assert resumed.status_code == 204


def test_last_event_id_skips_a_snapshot_the_client_already_has(client: httpx.Client) -> None:
    job_id = client.post("/api/jobs", json={"task": "deploy_stack", "args": FAST_DEPLOY}).json()["id"]
    with follow(client, f"/api/jobs/{job_id}/events", **{"Last-Event-ID": f"{job_id}:0:todo:0"}) as stream:
        time.sleep(0.3)
        assert stream.events == []
        client.post(f"/api/jobs/{job_id}/cancel")
        assert stream.closed.wait(10)
    assert stream.kinds() == ["state", "end"]
    with follow(client, f"/api/jobs/{job_id}/events", **{"Last-Event-ID": f"{job_id}:0:todo:0"}) as stream:
        assert stream.closed.wait(10)
    assert stream.kinds() == ["state", "end"]  # the client was behind: it gets the current state


def test_one_stream_follows_several_jobs_and_one_listen_connection_serves_all(client: httpx.Client) -> None:
    ids = [client.post("/api/jobs", json={"task": "deploy_stack", "args": {**FAST_DEPLOY, "stack": f"s{i}"}}).json()["id"]
           for i in range(3)]
    path = "/api/events?ids=" + ",".join(map(str, ids))
    with follow(client, path) as many, follow(client, f"/api/jobs/{ids[0]}/events") as one, \
            follow(client, f"/api/jobs/{ids[1]}/events") as two:
        wait_for(lambda: len(many.events) == 3 and one.events and two.events)
        assert listen_connections() == 1
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'skiplock-events'")
            assert cursor.fetchone()[0] <= 2  # the shared snapshot pool, not one per client
        # Other requests are served while streams are open.
        started = time.monotonic()
        assert client.get("/api/jobs").status_code == 200
        assert time.monotonic() - started < 2
        for job_id in ids:
            client.post(f"/api/jobs/{job_id}/cancel")
        assert many.closed.wait(10)
        assert one.closed.wait(10)
        assert two.closed.wait(10)
    ends = [event.data["id"] for event in many.events if event.event == "end"]
    assert sorted(ends) == sorted(ids)
    assert_error_404 = client.get("/api/events?ids=" + f"{ids[0]},999999")
    assert assert_error_404.status_code == 404
    assert assert_error_404.json()["error"]["details"] == {"missing": [999999]}
    assert client.get("/api/events?ids=abc").status_code == 422


def test_the_listener_reconnects_and_resyncs_after_its_connection_drops(client: httpx.Client, settings: Any) -> None:
    job_id = client.post("/api/jobs", json={"task": "deploy_stack", "args": FAST_DEPLOY}).json()["id"]
    with follow(client, f"/api/jobs/{job_id}/events") as stream:
        wait_for(lambda: stream.events)
        wait_for(lambda: listen_connections() == 1)
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE application_name = 'skiplock-events-listen'")
        wait_for(lambda: listen_connections() == 0, timeout=5)
        # A change while the listener is away is not lost: the stream re-reads the job after reconnecting.
        client.post(f"/api/jobs/{job_id}/cancel")
        assert stream.closed.wait(15), stream.kinds()
        wait_for(lambda: listen_connections() == 1, timeout=10)
    assert stream.kinds()[-1] == "end"
    assert stream.events[-1].data["state"] == "cancelled"


def test_idle_streams_send_heartbeats(client: httpx.Client, settings: Any) -> None:
    settings.SKIPLOCK_SSE_HEARTBEAT = 0.5
    job_id = client.post("/api/jobs", json={"task": "deploy_stack", "args": FAST_DEPLOY}).json()["id"]
    with follow(client, f"/api/jobs/{job_id}/events") as stream:
        wait_for(lambda: ": heartbeat" in stream.comments, timeout=5)
        client.post(f"/api/jobs/{job_id}/cancel")
        assert stream.closed.wait(10)


def test_job_event_stream_is_reusable_from_python(client: httpx.Client) -> None:
    import asyncio

    from jobs.events import get_hub, job_event_stream

    job_id = client.post("/api/jobs", json={"task": "deploy_stack", "args": FAST_DEPLOY}).json()["id"]
    client.post(f"/api/jobs/{job_id}/cancel")

    async def collect() -> list[str]:
        try:
            return [chunk async for chunk in job_event_stream([job_id])]
        finally:
            await get_hub().close()  # a loop that ends closes its hub (LISTEN task, snapshot pool)

    chunks = asyncio.run(collect())
    assert chunks[0].startswith("retry:")
    assert chunks[1].startswith(f"id: {job_id}:0:cancelled:0\nevent: state\ndata: ")
    assert chunks[-1].startswith(f"id: {job_id}:end\nevent: end\n")


# -- limits: credentials re-checked, a maximum lifetime, a cap per caller (issue 13, item 11) ----------


def start_job(client: httpx.Client) -> int:
    return int(client.post("/api/jobs", json={"task": "deploy_stack", "args": FAST_DEPLOY}).json()["id"])


def test_a_revoked_key_ends_its_open_stream_within_the_recheck_interval(
    client: httpx.Client, asgi_server: str, settings: Any,
) -> None:
    from jobs.apikeys import apikey_revoke
    from jobs.models import ApiKey

    settings.SKIPLOCK_SSE_AUTH_RECHECK = 1.0
    job_id = start_job(client)
    reader_key = make_key("read", name="dashboard")
    with httpx.Client(base_url=asgi_server, headers=bearer(reader_key), timeout=30) as reader, \
            follow(reader, f"/api/jobs/{job_id}/events") as stream:
        wait_for(lambda: stream.events)
        assert not stream.closed.wait(2.5)  # re-checked, still valid: the stream stays
        assert apikey_revoke(key_id=ApiKey.objects.get(name="dashboard").pk)
        assert stream.closed.wait(10), "the stream outlived its key"
        assert reader.get(f"/api/jobs/{job_id}/events").status_code == 401  # and no way back in
    assert stream.kinds() == ["state"]  # the job never ended: the revocation closed the stream


def test_logging_out_ends_the_sessions_open_stream(asgi_server: str, settings: Any) -> None:
    from django.contrib.sessions.models import Session

    settings.SKIPLOCK_SSE_AUTH_RECHECK = 1.0
    user = login(asgi_server, "stream-user")
    started = user.http.post("/api/jobs", json={"task": "deploy_stack", "args": FAST_DEPLOY},
                             headers=user.unsafe_headers())
    assert started.status_code == 202, started.text
    with follow(user.http, f"/api/jobs/{started.json()['id']}/events") as stream:
        wait_for(lambda: stream.events)
        assert not stream.closed.wait(2.5)
        Session.objects.all().delete()  # what logging out does to the session (flush)
        assert stream.closed.wait(10), "the stream outlived its session"
    user.http.close()


def test_a_stream_ends_at_its_maximum_duration_with_a_retry_hint_and_resumes_from_last_event_id(
    client: httpx.Client, settings: Any,
) -> None:
    settings.SKIPLOCK_SSE_MAX_DURATION = 1.5
    job_id = start_job(client)
    with follow(client, f"/api/jobs/{job_id}/events") as stream:
        assert stream.closed.wait(10), "the stream outlived SKIPLOCK_SSE_MAX_DURATION"
    assert stream.kinds() == ["state"]
    assert stream.retries[-1] == "1000"  # the last word: come back in a second
    last_id = stream.events[-1].id
    assert last_id is not None

    settings.SKIPLOCK_SSE_MAX_DURATION = 60
    with follow(client, f"/api/jobs/{job_id}/events", **{"Last-Event-ID": last_id}) as resumed:
        time.sleep(0.5)
        assert resumed.events == []  # the client is current: no snapshot again
        client.post(f"/api/jobs/{job_id}/cancel")
        assert resumed.closed.wait(10)
    assert resumed.kinds() == ["state", "end"]


def test_a_caller_over_the_stream_cap_gets_a_429_and_a_closed_stream_frees_its_place(
    client: httpx.Client, asgi_server: str, settings: Any,
) -> None:
    settings.SKIPLOCK_SSE_MAX_STREAMS = 2
    job_id = start_job(client)
    path = f"/api/jobs/{job_id}/events"
    with follow(client, path) as first, follow(client, path) as second:
        wait_for(lambda: first.events and second.events)
        with client.stream("GET", path) as refused:
            assert refused.status_code == 429
            error = json.loads(refused.read())["error"]
        assert error["code"] == "too_many_streams"
        assert error["details"] == {"limit": 2}
        assert "close one" in error["message"]
        # The cap is per caller: another key is not affected.
        with httpx.Client(base_url=asgi_server, headers=bearer(make_key("read", name="other")), timeout=30) as other, \
                follow(other, path) as elsewhere:
            wait_for(lambda: elsewhere.events)
    # Both closed: their places are free again.
    wait_for(lambda: _stream_status(client, path) == 200, timeout=10)


def _stream_status(client: httpx.Client, path: str) -> int:
    with client.stream("GET", path) as response:
        return response.status_code
