"""The lean start path (issue 12 item 4): what one `POST /api/jobs` and one `job_defer` cost, and
that the middleware run on the event loop under ASGI without changing what a response carries."""

# ruff: noqa: F811  (pytest fixtures imported from tests/api_fixtures.py are redefined as arguments)

from __future__ import annotations

import datetime as dt
import json

import httpx
import pytest
from django.conf import settings
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django.utils.module_loading import import_string

from jobs.apikeys import apikey_create, apikey_verify
from jobs.models import ApiKey, JobRecord
from jobs.services import job_defer
from project.middleware import InlineHooks, inline_paths
from tests.api_fixtures import FAST_DEPLOY, api_key, bearer, client  # noqa: F401  (fixtures)


def _statements(queries: CaptureQueriesContext) -> list[str]:
    return [q["sql"] for q in queries.captured_queries if not q["sql"].startswith(("SAVEPOINT", "RELEASE"))]


# --- statements per start ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_deferring_one_job_is_one_statement_and_a_keyed_one_two() -> None:
    with CaptureQueriesContext(connection) as plain:
        job_defer(task_name="deploy_stack", args=FAST_DEPLOY)
    with CaptureQueriesContext(connection) as keyed:
        job_defer(task_name="deploy_stack", args=FAST_DEPLOY, idempotency_key="k-1")

    assert len(_statements(plain)) == 1
    assert len(_statements(keyed)) == 2  # the key's lookup, then the insert


@pytest.mark.django_db
def test_post_api_jobs_runs_two_statements_the_key_check_and_the_insert() -> None:
    _, raw = apikey_create(name="starter", scopes=["start"])
    http = Client()
    body = json.dumps({"task": "deploy_stack", "args": FAST_DEPLOY})
    http.post("/api/jobs", body, content_type="application/json", headers=bearer(raw))  # records the key's use

    with CaptureQueriesContext(connection) as queries:
        response = http.post("/api/jobs", body, content_type="application/json", headers=bearer(raw))

    assert response.status_code == 202
    statements = _statements(queries)
    assert len(statements) == 2, statements
    assert "skiplock_api_key" in statements[0]
    assert "procrastinate_jobs" in statements[1]
    record = JobRecord.objects.get(job_id=response.json()["id"])
    assert (record.task_name, record.started_by) == ("deploy_stack", f"key:{ApiKey.objects.get().pk}")
    assert record.args["build_megabytes"] == FAST_DEPLOY["build_megabytes"]  # validated, defaults filled in


# --- API keys ---------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_key_records_its_last_use_at_most_once_a_minute() -> None:
    key, raw = apikey_create(name="k", scopes=["read"])
    two_minutes_ago = timezone.now() - dt.timedelta(minutes=2)
    ApiKey.objects.filter(pk=key.pk).update(last_used_at=two_minutes_ago)

    verified = apikey_verify(raw)
    recorded = ApiKey.objects.get(pk=key.pk).last_used_at
    again = apikey_verify(raw)

    assert verified == key
    assert verified.scopes == ["read"]
    assert recorded is not None
    assert recorded > two_minutes_ago
    assert verified.last_used_at == recorded
    assert again is not None
    assert ApiKey.objects.get(pk=key.pk).last_used_at == recorded


@pytest.mark.django_db
def test_a_revoked_or_expired_key_verifies_as_nothing_and_records_no_use() -> None:
    revoked, raw_revoked = apikey_create(name="r", scopes=["read"])
    ApiKey.objects.filter(pk=revoked.pk).update(revoked_at=timezone.now())
    expired, raw_expired = apikey_create(name="e", scopes=["read"], expires_at=timezone.now() + dt.timedelta(hours=1))
    ApiKey.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - dt.timedelta(seconds=1))

    assert apikey_verify(raw_revoked) is None
    assert apikey_verify(raw_expired) is None
    assert apikey_verify("sk_unknown") is None
    assert list(ApiKey.objects.values_list("last_used_at", flat=True)) == [None, None]


# --- middleware under ASGI -------------------------------------------------------------------------------


def test_under_asgi_no_middleware_hook_takes_a_thread_hop_while_settings_keep_the_stock_names() -> None:
    from django.utils.deprecation import MiddlewareMixin

    assert "django.middleware.security.SecurityMiddleware" in settings.MIDDLEWARE  # what the deploy checks read
    for path in inline_paths(list(settings.MIDDLEWARE)):
        cls = import_string(path)
        runs_on_loop = issubclass(cls, InlineHooks) or (
            getattr(cls, "async_capable", False) and getattr(cls, "__acall__", None) is not MiddlewareMixin.__acall__
        )
        assert runs_on_loop, f"{path} would run each hook in a thread under ASGI"


@pytest.mark.django_db(transaction=True)
def test_an_api_answer_over_asgi_carries_the_stock_middleware_headers(client: httpx.Client) -> None:
    response = client.post("/api/jobs", json={"task": "deploy_stack", "args": FAST_DEPLOY})

    assert response.status_code == 202
    assert response.headers["Location"] == f"/api/jobs/{response.json()['id']}"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Referrer-Policy"] == "same-origin"
    assert response.headers["Cross-Origin-Opener-Policy"] == "same-origin"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


@pytest.mark.django_db(transaction=True)
def test_a_signed_in_session_is_saved_and_csrf_is_checked_over_asgi(asgi_server: str) -> None:
    from tests.api_fixtures import login

    alice = login(asgi_server, "alice")  # the login saves the session: its hook runs in a thread
    refused = alice.http.post("/api/jobs", json={"task": "deploy_stack", "args": FAST_DEPLOY})
    started = alice.http.post("/api/jobs", json={"task": "deploy_stack", "args": FAST_DEPLOY},
                              headers=alice.unsafe_headers())

    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "csrf_failed"
    assert started.status_code == 202
    assert JobRecord.objects.get(job_id=started.json()["id"]).owner_id == alice.user_id
