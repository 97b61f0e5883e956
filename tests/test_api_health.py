"""Health, readiness, Prometheus metrics and the apikey command, over real HTTP."""

from __future__ import annotations

import io
import json
from typing import Any

import httpx
import pytest
import yaml
from django.conf import settings as django_settings
from django.core.management import call_command
from django.db import connection
from prometheus_client.parser import text_string_to_metric_families

from jobs.apikeys import apikey_verify
from jobs.models import ApiKey
from jobs.testing import run_jobs
from tests.api_fixtures import FAST_DEPLOY, WorkerThread, bearer, clean_queue, make_key, wait_for  # noqa: F401
from tests.plans import assert_no_seq_scan_of_job_tables

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("clean_queue")]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_liveness_never_needs_the_database(asgi_server: str, settings: Any) -> None:
    settings.SKIPLOCK_OPEN_HEALTH = False
    assert httpx.get(f"{asgi_server}/health/live").json() == {"status": "ok"}


def test_not_ready_without_a_live_worker_then_ready_with_one(asgi_server: str) -> None:
    response = httpx.get(f"{asgi_server}/health/ready")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert "no live worker" in body["reason"]
    assert body["checks"]["database"]["ok"]
    assert body["checks"]["migrations"]["ok"]
    with WorkerThread():
        ready = wait_for(lambda: (r := httpx.get(f"{asgi_server}/health/ready")).status_code == 200 and r)
        assert ready.json()["status"] == "ok"
        assert ready.json()["checks"]["workers"]["live"] >= 1


def test_a_deep_queue_is_reported_as_degraded(asgi_server: str, settings: Any) -> None:
    from jobs.services import DeferRequest, job_defer_batch

    settings.SKIPLOCK_ALERT_QUEUE_DEPTH = 3
    job_defer_batch(requests=[DeferRequest("optimize_route", {"seed": i}) for i in range(5)])
    with connection.cursor() as cursor:  # a worker that heartbeats but fetches nothing
        cursor.execute("INSERT INTO procrastinate_workers DEFAULT VALUES")
    body = httpx.get(f"{asgi_server}/health/ready").json()
    assert body["status"] == "degraded"
    assert body["checks"]["queue_depth"] == {"ok": False, "waiting": ">3", "threshold": 3}


def test_readiness_is_503_when_the_database_is_unreachable(asgi_server: str) -> None:
    from jobs.health import ready

    broken = dict(django_settings.DATABASES["default"])
    from django.db import connections

    wrapper = connections["default"]
    original = wrapper.settings_dict
    wrapper.close()
    wrapper.settings_dict = {**broken, "PORT": "1", "HOST": "127.0.0.1"}
    try:
        from django.test import RequestFactory

        response = ready(RequestFactory().get("/health/ready"))
    finally:
        wrapper.close()
        wrapper.settings_dict = original
    assert response.status_code == 503
    body = json.loads(response.content)
    assert body["reason"] == "database unreachable"


def test_health_and_metrics_can_require_a_read_key(asgi_server: str, settings: Any) -> None:
    settings.SKIPLOCK_OPEN_HEALTH = False
    settings.SKIPLOCK_OPEN_METRICS = False
    starter, reader = make_key("start"), make_key("read")
    for path in ("/health/ready", "/metrics"):
        assert httpx.get(f"{asgi_server}{path}").status_code == 401
        assert httpx.get(f"{asgi_server}{path}", headers=bearer(starter)).status_code == 401
        assert httpx.get(f"{asgi_server}{path}", headers=bearer(reader)).status_code in (200, 503)
    assert httpx.get(f"{asgi_server}/metrics", headers=bearer(reader)).status_code == 200


def test_metrics_read_the_database_at_scrape_time(asgi_server: str) -> None:
    from jobs.services import DeferRequest, job_defer_batch

    jobs = job_defer_batch(requests=[
        DeferRequest("deploy_stack", FAST_DEPLOY),
        DeferRequest("deploy_stack", {**FAST_DEPLOY, "stack": "bad", "fail_at_step": 1, "fail_times": 9}),
        DeferRequest("optimize_route", {"points": 10}, queue="cpu"),
        DeferRequest("optimize_route", {"points": 12}),
        DeferRequest("deploy_stack", {**FAST_DEPLOY, "stack": "later"}, delay_seconds=3600),
    ])
    assert len(jobs) == 5
    response = httpx.get(f"{asgi_server}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    before = samples(response.text)
    assert before[("skiplock_database_up", ())] == 1
    assert before[("skiplock_jobs", (("queue", "default"), ("state", "todo")))] == 3
    assert before[("skiplock_jobs", (("queue", "cpu"), ("state", "todo")))] == 2
    assert before[("skiplock_queue_depth", (("queue", "default"),))] == 2  # the delayed one is not waiting yet
    assert before[("skiplock_oldest_waiting_job_age_seconds", (("queue", "cpu"),))] >= 0
    assert before[("skiplock_workers_live", ())] == 0
    assert before[("skiplock_stalled_jobs", ())] == 0
    assert before[("skiplock_task_soft_time_limit_seconds", (("task", "deploy_stack"),))] == 600

    run_jobs(queues=["default", "cpu"])
    after = samples(httpx.get(f"{asgi_server}/metrics").text)
    assert after[("skiplock_jobs", (("queue", "default"), ("state", "succeeded")))] == 1
    assert after[("skiplock_jobs", (("queue", "default"), ("state", "todo")))] == 2  # a retry waits, and the delayed one
    assert after[("skiplock_jobs_processed_total", (("outcome", "succeeded"), ("task", "deploy_stack")))] == 1
    assert after[("skiplock_jobs_processed_total", (("outcome", "retried"), ("task", "deploy_stack")))] == 1
    assert after[("skiplock_job_duration_seconds_count", (("outcome", "succeeded"), ("task", "optimize_route")))] == 2
    assert after[("skiplock_job_duration_seconds_bucket", (("le", "+Inf"), ("outcome", "succeeded"),
                                                           ("task", "deploy_stack")))] == 1
    assert after[("skiplock_queue_depth", (("queue", "cpu"),))] == 0


def test_metrics_show_stalled_and_overdue_running_jobs(asgi_server: str) -> None:
    from jobs.services import job_defer

    job_id = job_defer(task_name="deploy_stack", args=FAST_DEPLOY).job_id
    with connection.cursor() as cursor:
        # A job claimed by a worker that stopped heartbeating long ago, running for two hours.
        cursor.execute("INSERT INTO procrastinate_workers (last_heartbeat) VALUES (now() - interval '1 hour') RETURNING id")
        worker_id = cursor.fetchone()[0]
        cursor.execute("UPDATE procrastinate_jobs SET status = 'doing', worker_id = %s WHERE id = %s", [worker_id, job_id])
        # The running attempt started when procrastinate recorded its `started` event.
        cursor.execute("UPDATE procrastinate_events SET at = now() - interval '2 hours' "
                       "WHERE job_id = %s AND type = 'started'", [job_id])
    found = samples(httpx.get(f"{asgi_server}/metrics").text)
    assert found[("skiplock_stalled_jobs", ())] == 1
    assert found[("skiplock_jobs_running", (("task", "deploy_stack"),))] == 1
    assert found[("skiplock_jobs_past_soft_limit", (("task", "deploy_stack"),))] == 1
    assert found[("skiplock_running_job_max_age_seconds", (("task", "deploy_stack"),))] >= 7200
    assert found[("skiplock_workers_registered", ())] == 1


def test_metrics_counters_survive_pruning_and_label_sets_stay_bounded(asgi_server: str) -> None:
    from jobs.maintenance import prune_finished_jobs
    from jobs.metrics import MAX_LABELS
    from jobs.services import DeferRequest, job_defer_batch

    job_defer_batch(requests=[DeferRequest("optimize_route", {"points": 10})])
    run_jobs(queues=["cpu"])
    job_defer_batch(requests=[
        DeferRequest("optimize_route", {"points": 10}, queue=f"q{i:04d}", delay_seconds=3600) for i in range(1000)
    ])
    before = samples(httpx.get(f"{asgi_server}/metrics").text)
    assert before[("skiplock_jobs_processed_total", (("outcome", "succeeded"), ("task", "optimize_route")))] == 1
    queues = {dict(labels)["queue"] for (name, labels) in before if name == "skiplock_jobs"}
    assert len(queues) <= MAX_LABELS + 1
    assert "other" in queues
    assert before[("skiplock_jobs", (("queue", "other"), ("state", "todo")))] > 900

    with connection.cursor() as cursor:
        cursor.execute("UPDATE skiplock_job SET finished_at = now() - interval '30 days' WHERE finished_at IS NOT NULL")
    assert prune_finished_jobs(older_than=3600).deleted == 1
    after = samples(httpx.get(f"{asgi_server}/metrics").text)
    assert after[("skiplock_jobs_processed_total", (("outcome", "succeeded"), ("task", "optimize_route")))] == 1
    assert after[("skiplock_jobs", (("queue", "cpu"), ("state", "succeeded")))] == 1


def test_the_alert_rules_use_metrics_that_exist(asgi_server: str) -> None:
    import re
    from pathlib import Path

    rules = yaml.safe_load((Path(django_settings.BASE_DIR) / "docs" / "prometheus-alerts.yml").read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert {"SkiplockNoLiveWorker", "SkiplockHighFailureRate", "SkiplockQueueDepthHigh",
            "SkiplockJobPastSoftLimit"} <= set(alerts)
    exposed = {family.name for family in text_string_to_metric_families(httpx.get(f"{asgi_server}/metrics").text)}
    exposed |= {f"{name}{suffix}" for name in exposed for suffix in ("_total", "_bucket", "_sum", "_count")}
    for rule in alerts.values():
        assert rule["annotations"]["summary"]
        for name in re.findall(r"\bskiplock_[a-z_]+", rule["expr"]):
            assert name in exposed, (rule["alert"], name)


# --- manage.py apikey ------------------------------------------------------------------------------------


def test_apikey_command_creates_lists_and_revokes() -> None:
    out, err = io.StringIO(), io.StringIO()
    call_command("apikey", "create", "--name", "billing", "--scopes", "start,read", "--expires-in-days", "30",
                 stdout=out, stderr=err)
    raw = out.getvalue().strip()
    assert raw.startswith("sk_")
    assert "not shown again" in err.getvalue()
    key = apikey_verify(raw)
    assert key is not None
    assert key.scopes == ["read", "start"]
    assert key.expires_at is not None
    assert ApiKey.objects.get().key_hash != raw  # only the hash is stored

    listing = io.StringIO()
    call_command("apikey", "list", stdout=listing)
    assert "billing" in listing.getvalue()
    assert raw not in listing.getvalue()

    as_json = io.StringIO()
    call_command("apikey", "create", "--name", "ops", "--scopes", "manage", "--json", stdout=as_json)
    assert json.loads(as_json.getvalue())["scopes"] == ["manage"]

    call_command("apikey", "revoke", raw.split("_")[1], stdout=io.StringIO())
    assert apikey_verify(raw) is None
    listing = io.StringIO()
    call_command("apikey", "list", "--all", "--json", stdout=listing)
    assert {row["name"]: row["status"] for row in json.loads(listing.getvalue())} == {"billing": "revoked", "ops": "active"}

    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="scopes must be"):
        call_command("apikey", "create", "--name", "x", "--scopes", "admin", stdout=io.StringIO())


def test_a_metrics_scrape_walks_indexes_never_a_whole_job_table() -> None:
    from django.test.utils import CaptureQueriesContext

    from jobs.metrics import DatabaseCollector
    from jobs.services import job_defer

    job_defer(task_name="optimize_route", args={"points": 10})
    with CaptureQueriesContext(connection) as queries:
        names = {family.name for family in DatabaseCollector().collect()}
    assert "skiplock_jobs" in names
    reads = [q["sql"] for q in queries if q["sql"].lstrip().upper().startswith(("SELECT", "WITH"))]
    assert reads
    assert_no_seq_scan_of_job_tables(reads)


def test_the_oldest_waiting_age_is_how_long_the_head_of_the_queue_has_waited() -> None:
    from jobs.metrics import DatabaseCollector
    from jobs.services import job_defer

    def oldest(queue: str) -> float:
        families = {family.name: family for family in DatabaseCollector().collect()}
        return next(s.value for s in families["skiplock_oldest_waiting_job_age_seconds"].samples
                    if s.labels["queue"] == queue)

    first = job_defer(task_name="optimize_route", args={"points": 10}, queue="cpu").job_id
    job_defer(task_name="optimize_route", args={"points": 11}, queue="cpu")
    with connection.cursor() as cursor:
        cursor.execute("UPDATE skiplock_job SET created_at = now() - interval '1 hour' WHERE job_id = %s", [first])
    assert 3600 <= oldest("cpu") < 3700
    # A retry (created three hours ago) runnable again since two hours ago has waited two hours.
    retry = job_defer(task_name="optimize_route", args={"points": 12}, queue="cpu").job_id
    with connection.cursor() as cursor:
        cursor.execute("UPDATE skiplock_job SET created_at = now() - interval '3 hours' WHERE job_id = %s", [retry])
        cursor.execute("UPDATE procrastinate_jobs SET attempts = 1, scheduled_at = now() - interval '2 hours' "
                       "WHERE id = %s", [retry])
    assert 7200 <= oldest("cpu") < 7300
