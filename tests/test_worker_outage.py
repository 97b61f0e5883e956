"""During a database outage the worker logs one line per change of the outage, not a traceback each retry."""

from __future__ import annotations

import logging

import psycopg
import pytest

from jobs import reconnect
from jobs.reconnect import Outage


def test_an_outage_is_one_line_when_lost_one_a_minute_while_down_and_one_when_back(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(reconnect.time, "monotonic", lambda: now[0])
    log = logging.getLogger("jobs.worker")
    outage = Outage(log)
    refused = psycopg.OperationalError("connection refused\nIs the server running?")
    with caplog.at_level(logging.INFO, logger="jobs.worker"):
        for _ in range(200):  # claims, heartbeats, LISTEN… every 0.5 s for 100 s
            outage.failed(refused, "claiming jobs")
            now[0] += 0.5
        outage.recovered()
        outage.recovered()  # healthy again: nothing more to say
    messages = [(r.levelname, r.getMessage(), r.exc_info) for r in caplog.records]
    assert [m[0] for m in messages] == ["WARNING"] * 3
    assert all(m[2] is None for m in messages)  # no traceback
    assert messages[0][1] == ("database unreachable while claiming jobs (OperationalError: connection refused); "
                              "jobs wait until it is back, retrying")
    assert messages[1][1] == "database still unreachable after 60 s (OperationalError: connection refused)"
    assert messages[2][1] == "database reachable again after 100.0 s"


@pytest.mark.django_db(transaction=True)
def test_a_job_that_fails_because_the_database_is_unreachable_logs_one_line_not_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from jobs.registry import NO_RETRY, task
    from jobs.services import job_defer
    from jobs.testing import run_jobs

    @task(name="tests.outage.lost_connection", queue="outage-tests", retry=NO_RETRY)
    def lost_connection() -> None:
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    @task(name="tests.outage.broken", queue="outage-tests", retry=NO_RETRY)
    def broken() -> None:
        raise ValueError("a bug")

    job_defer(task_name="tests.outage.lost_connection", args={})
    job_defer(task_name="tests.outage.broken", args={})
    with caplog.at_level(logging.INFO, logger="jobs"):
        assert run_jobs(queues=["outage-tests"]) == 2
    finals = {r.getMessage().split(" (")[1].split(")")[0]: r for r in caplog.records if "(final" in r.getMessage()}
    outage = finals["tests.outage.lost_connection"]
    assert outage.exc_info is None  # the worker tells the outage once; each job does not add a traceback
    assert "the database was unreachable" in outage.getMessage()
    assert finals["tests.outage.broken"].exc_info is not None  # a bug in a task keeps its traceback
