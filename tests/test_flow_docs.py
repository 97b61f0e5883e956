"""Every example in docs/flow-control.md runs, against real PostgreSQL and the real worker."""

from __future__ import annotations

import pytest

from jobs import services
from jobs.models import JobAttempt, JobRecord, QueueControl
from jobs.testing import run_jobs
from tests import core_fixtures
from tests.test_jobs_docs import blocks, run_as_module

pytestmark = pytest.mark.django_db(transaction=True)
clean_queue = core_fixtures.clean_queue


def test_the_python_examples_of_flow_control_md_run_and_do_what_they_say() -> None:
    sources = blocks("flow-control.md", "python")
    assert len(sources) >= 7
    module = run_as_module("docs_flow_control_md", sources)
    # The queue limits and the pause as the examples left them.
    partners = QueueControl.objects.get(name="partners")
    assert (partners.concurrency, partners.rate_limit, partners.rate_period) == (None, 600, 60.0)
    assert QueueControl.objects.get(name="reports").paused is False
    # The unique start returned the first job; the changed job is runnable now at priority 50.
    assert JobRecord.objects.filter(task_name="sync_account", args__account_id=42).count() == 1
    changed = JobRecord.objects.get(pk=module.late.job_id)
    assert (changed.priority, changed.display_state) == (50, "todo")
    assert JobRecord.objects.get(pk=module.by_noon.job_id).expires_at is not None
    # The snooze and discard recipes, run by a real worker.
    waiting = services.job_defer(task_name="poll_export", args={"export_id": "pending-1"})
    ready = services.job_defer(task_name="poll_export", args={"export_id": "ready-1"})
    dropped = services.job_defer(task_name="remind_customer", args={"order_id": 5, "cancelled": True})
    run_jobs(queues=["default"])
    assert JobRecord.objects.get(pk=ready.job_id).result == "rows of ready-1"
    snoozed = JobRecord.objects.get(pk=waiting.job_id)
    assert (snoozed.display_state, snoozed.attempts) == ("scheduled", 0)
    assert list(JobAttempt.objects.filter(job_id=waiting.job_id).values_list("outcome", flat=True)) == ["snoozed"]
    discarded = JobRecord.objects.get(pk=dropped.job_id)
    assert (discarded.state, discarded.error_message) == ("discarded", "order 5 was cancelled")
