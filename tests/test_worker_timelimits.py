# ruff: noqa: F811  (pytest fixtures imported from tests/worker_fixtures.py are redefined as arguments)
"""Soft time limits in-process (the real worker path through jobs.testing.run_jobs)."""

from __future__ import annotations

import pytest

from jobs import services
from jobs.testing import run_jobs
from tests.worker_fixtures import (
    QUEUE,
    query,
    scalar,
    worker_tables,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_sync_task_past_its_soft_limit_gets_an_exception_it_can_catch(worker_tables: None) -> None:
    job_id = services.job_defer(task_name="soft_limited", args={"seconds": 10}, queue=QUEUE).job_id
    run_jobs(queues=[QUEUE])
    record = query("SELECT state, error_type FROM skiplock_job_view WHERE job_id = %s", [job_id])[0]
    assert record == ("failed", "SoftTimeLimitExceeded")
    # The task caught the exception (and cleaned up) before re-raising it.
    assert scalar("SELECT count(*) FROM wtest_started WHERE job_id = %s AND attempt = -1", [job_id]) == 1
    assert query("SELECT outcome FROM skiplock_job_attempt WHERE job_id = %s", [job_id]) == [("timed_out",)]


def test_an_async_task_past_its_soft_limit_is_cancelled_and_recorded(worker_tables: None) -> None:
    job_id = services.job_defer(task_name="soft_limited_async", args={"seconds": 10}, queue=QUEUE).job_id
    run_jobs(queues=[QUEUE])
    record = query("SELECT state, error_type, error_message FROM skiplock_job_view WHERE job_id = %s", [job_id])[0]
    assert record[:2] == ("failed", "SoftTimeLimitExceeded")
    assert "soft time limit exceeded (0.3 s)" in record[2]
    assert query("SELECT outcome FROM skiplock_job_attempt WHERE job_id = %s", [job_id]) == [("timed_out",)]
