"""Fixtures for the REST API tests: API keys, users, an httpx client on the real server, a worker."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from django.contrib.auth import get_user_model

from jobs.apikeys import apikey_create
from jobs.testing import WorkerThread as _WorkerThread

FAST_DEPLOY = {"check_interval": 0, "build_megabytes": 1, "health_checks": 1}


def make_key(*scopes: str, name: str = "test key") -> str:
    _, raw = apikey_create(name=name, scopes=scopes or ("start", "read", "manage"))
    return raw


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def api_key(transactional_db: None) -> str:
    """A key with every scope."""
    return make_key("start", "read", "manage", name="all scopes")


@pytest.fixture
def client(asgi_server: str, api_key: str) -> Iterator[httpx.Client]:
    """httpx on the real ASGI server, authenticated with an all-scopes key."""
    with httpx.Client(base_url=asgi_server, headers=bearer(api_key), timeout=30) as http:
        yield http


@dataclass
class SessionClient:
    """A browser-like session: signed in through the login form, with its CSRF token."""

    http: httpx.Client
    user_id: int

    def unsafe_headers(self) -> dict[str, str]:
        return {"X-CSRFToken": self.http.cookies.get("csrftoken") or "", "Referer": str(self.http.base_url)}


def login(asgi_server: str, username: str, *, staff: bool = False) -> SessionClient:
    user = get_user_model().objects.create_user(username=username, password="pw-" + username, is_staff=staff)
    http = httpx.Client(base_url=asgi_server, timeout=30, follow_redirects=False)
    page = http.get("/admin/login/")
    token = http.cookies.get("csrftoken") or ""
    assert page.status_code == 200
    if staff:
        answer = http.post("/admin/login/", data={"username": username, "password": "pw-" + username,
                                                  "csrfmiddlewaretoken": token, "next": "/admin/"},
                           headers={"Referer": f"{asgi_server}/admin/login/"})
    else:
        # Non-staff users cannot use the admin form: sign in through Django's session machinery.
        from django.conf import settings
        from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
        from django.contrib.sessions.backends.db import SessionStore

        session = SessionStore()
        session[SESSION_KEY] = str(user.pk)
        session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
        session[HASH_SESSION_KEY] = user.get_session_auth_hash()
        session.create()
        http.cookies.set(settings.SESSION_COOKIE_NAME, session.session_key or "")
        answer = httpx.Response(302)
    assert answer.status_code == 302, answer.text[:500]
    return SessionClient(http=http, user_id=user.pk)


def wait_for(condition: Callable[[], Any], *, timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


class WorkerThread(_WorkerThread):
    """jobs.testing.WorkerThread, named for these tests."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**{"name": "api-test-worker", "shutdown_grace": 5.0, **options})


@pytest.fixture
def worker(transactional_db: None) -> Iterator[WorkerThread]:
    with WorkerThread() as running:
        yield running


@pytest.fixture
def clean_queue(transactional_db: None, settings: Any) -> Iterator[None]:
    """Transactional flushes skip procrastinate's unmanaged tables: empty the queue around each test."""
    from django.db import connection

    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

    def empty() -> None:
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM procrastinate_jobs")
            cursor.execute("DELETE FROM procrastinate_workers")

    empty()
    yield
    empty()
