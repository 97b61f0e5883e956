# ruff: noqa: F811  (pytest fixtures imported from tests/worker_fixtures.py are redefined as arguments)
"""The one writer's statements on their own: the fence, batched announcements, no triggers of ours."""

from __future__ import annotations

import psycopg
import pytest
from procrastinate.contrib.django.utils import connector_params

from jobs import maintenance, services, transitions
from tests.worker_fixtures import QUEUE, query, scalar, worker_tables  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)


def defer() -> int:
    return services.job_defer(task_name="record_run", args={}, queue=QUEUE).job_id


def claim(worker_id: int) -> int:
    return int(scalar("SELECT id FROM procrastinate_fetch_job_v2(ARRAY[%s]::varchar[], %s)", [QUEUE, worker_id]))


def new_worker(heartbeat_age: float = 0.0) -> int:
    return int(scalar(
        "INSERT INTO procrastinate_workers (last_heartbeat) VALUES (now() - make_interval(secs => %s)) RETURNING id",
        [heartbeat_age],
    ))


def test_a_written_off_attempt_changes_nothing(worker_tables: None) -> None:
    job_id = defer()
    frozen = new_worker(heartbeat_age=3600)
    assert claim(frozen) == job_id
    assert maintenance.recover_stalled_jobs(stalled_after=60).retried == [job_id]
    rescuer = new_worker()
    assert claim(rescuer) == job_id  # the next attempt runs: same procrastinate attempt count

    # The frozen worker wakes up and reports its old attempt: the fence (its worker id is gone) refuses it.
    late = transitions.AttemptEnd(job_id=job_id, worker_id=frozen, attempts=0, status="failed", outcome="failed",
                                  error_type="JobAborted", error_message="late", error_traceback="")
    assert transitions.end_attempts([late]) == {}
    assert scalar("SELECT status FROM procrastinate_jobs WHERE id = %s", [job_id]) == "doing"
    assert scalar("SELECT worker_id FROM procrastinate_jobs WHERE id = %s", [job_id]) == rescuer
    assert query("SELECT outcome, error_type FROM skiplock_job_attempt WHERE job_id = %s", [job_id]) == [
        ("lost", "WorkerLost")
    ]

    # The attempt that owns the job ends it: one more attempt row, the error of the lost one cleared.
    ok = transitions.AttemptEnd(job_id=job_id, worker_id=rescuer, attempts=0, status="succeeded", outcome="succeeded")
    assert transitions.end_attempts([ok]) == {job_id: "succeeded"}
    assert query("SELECT number, outcome FROM skiplock_job_attempt WHERE job_id = %s ORDER BY number", [job_id]) == [
        (1, "lost"), (2, "succeeded")
    ]
    assert query("SELECT state, attempts, error_type, worker_id FROM skiplock_job_view WHERE job_id = %s",
                 [job_id]) == [("succeeded", 1, "", None)]


def test_ending_many_attempts_sends_one_notification_and_none_without_a_listener(worker_tables: None) -> None:
    ids = [defer() for _ in range(3)]
    worker = new_worker()
    for _ in ids:
        claim(worker)
    with psycopg.connect(**connector_params("default"), autocommit=True) as conn:
        conn.execute("DELETE FROM skiplock_listener")  # event hubs of earlier tests in this process
        conn.execute("LISTEN skiplock_job")
        ends = [transitions.AttemptEnd(job_id=i, worker_id=worker, attempts=0, status="succeeded",
                                       outcome="succeeded") for i in ids[:2]]
        assert len(transitions.end_attempts(ends)) == 2
        assert list(conn.notifies(timeout=0.3)) == []  # nobody registered: no NOTIFY at all
        conn.execute("INSERT INTO skiplock_listener (name, expires_at) VALUES ('t', now() + interval '1 minute')")
        try:
            more = [transitions.AttemptEnd(job_id=ids[2], worker_id=worker, attempts=0, status="requeue",
                                           outcome="requeued")]
            assert transitions.end_attempts(more) == {ids[2]: "todo"}
            services.job_cancel(job_id=ids[2])
            received = [transitions_events(n.payload) for n in conn.notifies(timeout=0.5)]
        finally:
            conn.execute("DELETE FROM skiplock_listener WHERE name = 't'")
    assert received == [[(ids[2], "state", "todo", 0)], [(ids[2], "state", "cancelled", 0)]]


def transitions_events(payload: str) -> list[tuple[int, str, str, int]]:
    from jobs.events import parse_payload

    return [(e["id"], e["event"], e["state"], e["attempts"]) for e in parse_payload(payload)]


def test_no_trigger_of_skiplock_remains_on_the_queue(worker_tables: None) -> None:
    triggers = [row[0] for row in query(
        "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal AND tgrelid IN "
        "('procrastinate_jobs'::regclass, 'skiplock_job'::regclass)"
    )]
    assert triggers
    assert all(name.startswith("procrastinate_") for name in triggers), triggers
