"""Jobs claimed ahead of a free slot (prefetch): started as slots free, released untouched at shutdown."""

from __future__ import annotations

import itertools
import time

import pytest
from django.db import connection

from jobs import services
from jobs.models import JobRecord
from jobs.testing import WorkerThread
from tests import core_fixtures
from tests.core_fixtures import wait_for_state

pytestmark = pytest.mark.django_db(transaction=True)
clean_queue = core_fixtures.clean_queue


def test_jobs_claimed_ahead_run_as_slots_free_and_are_released_untouched_at_shutdown() -> None:
    ids = [services.job_defer(task_name="tests.core.locked", args={"resource": f"r{n}", "hold": 2}).job_id
           for n in range(3)]
    with WorkerThread(queues=["core-tests"], concurrency=1, prefetch=2, shutdown_grace=0.2):
        wait_for_state(ids[0], "doing")
        time.sleep(0.5)
        # The slot's job runs; the two claimed ahead are `doing` for this worker but not started.
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM procrastinate_jobs WHERE id = ANY(%s) AND status = 'doing'", [ids])
            assert cursor.fetchone()[0] == 3
    # Stopped: the running one was requeued (its attempt recorded), the two never started went back
    # to the queue with no attempt row and no attempt counted.
    for job_id in ids:
        record = JobRecord.objects.get(pk=job_id)
        assert (record.state, record.attempts) == ("todo", 0)
    with connection.cursor() as cursor:
        cursor.execute("SELECT job_id, outcome FROM skiplock_job_attempt WHERE job_id = ANY(%s)", [ids])
        assert cursor.fetchall() == [(ids[0], "requeued")]
    time.sleep(2)  # the interrupted sync task ends its 2 s sleep and closes its connection


def test_a_job_claimed_ahead_starts_the_moment_a_slot_frees() -> None:
    ids = [services.job_defer(task_name="tests.core.locked", args={"resource": f"r{n}", "hold": 0.2}).job_id
           for n in range(4)]
    with WorkerThread(queues=["core-tests"], concurrency=1, prefetch=3):
        for job_id in ids:
            wait_for_state(job_id, "succeeded", timeout=30)
    results = [JobRecord.objects.get(pk=job_id).result or {} for job_id in ids]
    # One slot: each started after the one before it finished.
    for before, after in itertools.pairwise(results):
        assert after["started"] >= before["finished"]
