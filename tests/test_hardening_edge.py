"""Hardening at the edge: request bodies, configuration errors, documented commands, error codes."""
# ruff: noqa: F811  (the browser fixture imported from tests/test_admin_browser.py is redefined as an argument)

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.signals import request_started

from tests.foundation_fixtures import BASE_DIR
from tests.test_admin_browser import browser  # noqa: F401  (the chromium fixture)

GIB = 1 << 30


# -- request bodies: refused before anything reads them (issue 13, item 6) --------------------------


def _address(asgi_server: str) -> tuple[str, int]:
    host, port = asgi_server.removeprefix("http://").split(":")
    return host, int(port)


def _read_response(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 response (the body up to Content-Length or close)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


@pytest.fixture
def requests_seen() -> Iterator[list[str]]:
    """Paths of the requests Django started handling (it sends request_started after reading the body)."""
    seen: list[str] = []

    def record(sender: Any, scope: Any = None, **kwargs: Any) -> None:
        seen.append(scope["path"] if scope else "?")

    request_started.connect(record, dispatch_uid="hardening-edge-requests-seen")
    yield seen
    request_started.disconnect(dispatch_uid="hardening-edge-requests-seen")


@pytest.fixture
def spooled_to_disk(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many request bodies Django's ASGI handler rolled over to a temporary file on disk."""
    import django.core.handlers.asgi as django_asgi

    rolled: list[int] = []

    class Watched(tempfile.SpooledTemporaryFile):
        def rollover(self) -> None:
            rolled.append(1)
            super().rollover()

    monkeypatch.setattr(django_asgi.tempfile, "SpooledTemporaryFile", Watched)  # type: ignore[attr-defined]
    return rolled


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", ["/api/jobs", "/admin/login/"])
def test_a_declared_gigabyte_body_is_refused_at_once_without_reading_it(
    asgi_server: str, requests_seen: list[str], spooled_to_disk: list[int], path: str,
) -> None:
    with socket.create_connection(_address(asgi_server), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {GIB}\r\n\r\n".encode() + b"x" * 65536
        )
        # Today the server waits for the gigabyte; the guard answers before the body arrives.
        status, headers, body = _read_response(sock, timeout=10)

    assert status == 413
    assert headers["connection"] == "close"
    if path.startswith("/api/"):
        error = json.loads(body)["error"]
        assert error["code"] == "body_too_large"
        assert error["details"] == {"max_bytes": 1_000_000}
    else:
        assert headers["content-type"].startswith("text/plain")
        assert b"over 1000000 bytes" in body
    assert requests_seen == []  # Django never saw the request
    assert spooled_to_disk == []


@pytest.mark.django_db(transaction=True)
def test_a_chunked_body_is_cut_off_the_moment_it_passes_the_limit(
    asgi_server: str, requests_seen: list[str], spooled_to_disk: list[int],
) -> None:
    chunk = b"x" * 65536
    total = 64 * 1024 * 1024  # 64 MiB offered, the limit is 1 MB
    sent = 0

    with socket.create_connection(_address(asgi_server), timeout=10) as sock:
        sock.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")

        def send_body() -> None:
            nonlocal sent
            try:
                while sent < total:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent += len(chunk)
                sock.sendall(b"0\r\n\r\n")
            except OSError:
                pass  # the server closed the connection: what we want

        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        status, _headers, body = _read_response(sock, timeout=30)
        with contextlib.suppress(OSError):  # already closed by the server
            sock.shutdown(socket.SHUT_RDWR)
        sender.join(timeout=30)

    assert status == 413
    assert json.loads(body)["error"]["code"] == "body_too_large"
    assert sent < total // 4, f"the server kept reading: {sent} bytes accepted"
    assert requests_seen == []
    assert spooled_to_disk == []


@pytest.mark.django_db(transaction=True)
def test_bodies_within_the_limit_still_reach_django(asgi_server: str, requests_seen: list[str]) -> None:
    import httpx

    response = httpx.post(f"{asgi_server}/api/jobs", content=b"{" + b" " * 500_000 + b"}",
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 401  # read, then refused for want of a key: the guard let it through
    assert requests_seen == ["/api/jobs"]


# -- documented commands work as written; a configuration error is one line (item 22) -------------


def _checkout_env(**env: str) -> dict[str, str]:
    """The environment of a shell in a checkout beside `make run`: no DEBUG, no SECRET_KEY, no DATABASE_URL."""
    cleared = {"DEBUG", "SECRET_KEY", "SECRET_KEY_FILE", "DATABASE_URL", "DJANGO_SETTINGS_MODULE"}
    return {**{k: v for k, v in os.environ.items() if k not in cleared}, **env}


def _docs_apikey_command() -> str:
    text = (BASE_DIR / "docs" / "api.md").read_text()
    found = re.search(r"\$\((\.venv/bin/python manage\.py apikey create [^)]*)\)", text)
    assert found is not None, "docs/api.md shows how to create a key"
    return found.group(1)


@pytest.mark.slow
@pytest.mark.django_db
def test_the_documented_apikey_command_works_without_debug_on_the_embedded_database(
    embedded_postgres: Any,
) -> None:
    if embedded_postgres is None:
        pytest.skip("needs the embedded PostgreSQL (DATABASE_URL is set)")
    env = _checkout_env(SKIPLOCK_PG_INSTANCE=embedded_postgres.instance)
    migrate = subprocess.run([sys.executable, "manage.py", "migrate", "--no-input"], cwd=BASE_DIR, env=env,
                             capture_output=True, text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stderr  # what `make run` does first

    result = subprocess.run(["bash", "-c", _docs_apikey_command()], cwd=BASE_DIR, env=env,
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("sk_")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [
    ["manage.py", "apikey", "list"],
    ["-m", "gunicorn", "-c", "project/gunicorn.conf.py", "project.asgi:application"],
], ids=["manage.py", "gunicorn"])
def test_a_missing_secret_key_in_production_is_one_line_that_says_what_to_set(command: list[str]) -> None:
    from tests.conftest import free_port

    env = _checkout_env(DATABASE_URL="postgresql://skiplock@db.internal/skiplock", PORT=str(free_port()))
    result = subprocess.run([sys.executable, *command], cwd=BASE_DIR, env=env,
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "configuration error: SECRET_KEY is not set and DEBUG is off; set SECRET_KEY (or SECRET_KEY_FILE), "
        "or DEBUG=true for local development"
    ]


# -- the error-code table says what the API answers (item 20) ----------------------------------------

# SkiplockError subclasses that never leave through the API, and why.
NOT_API_ERRORS = {
    "error": "the base class: raised by API key creation (command and admin), never by the API",
    "result_not_serializable": "recorded on the job by the worker, never an HTTP answer",
}


def _documented_codes() -> dict[str, str]:
    """code → status, from docs/api.md's error table."""
    text = (BASE_DIR / "docs" / "api.md").read_text()
    table = text[text.index("| Status | `code` | When |"):]
    table = table[: table.index("\n\n")]
    codes: dict[str, str] = {}
    for row in table.splitlines()[2:]:
        status, code_cell = (cell.strip() for cell in row.strip("|").split("|")[:2])
        for code in re.findall(r"`([^`]+)`", code_cell):
            codes[code] = status
    return codes


def _emitted_codes() -> dict[str, str | None]:
    """code → status (None when the source does not say) of every error body the code can answer."""
    import jobs.api  # defines and imports every error the API raises
    import jobs.events  # noqa: F401
    from jobs.exceptions import SkiplockError

    codes: dict[str, str | None] = {}
    pending = [SkiplockError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.code not in NOT_API_ERRORS:
            codes[cls.code] = str(cls.status)
    for path in [*(BASE_DIR / "jobs").rglob("*.py"), *(BASE_DIR / "project").glob("*.py")]:
        source = path.read_text()
        for status, code in re.findall(r'return (\d{3}), "([a-z_]+)"', source):
            codes[code] = status
        for code in re.findall(r'"code": "([a-z_]+)"', source):
            codes.setdefault(code, None)
    return codes


def test_the_error_code_table_lists_every_code_the_api_emits_and_no_other() -> None:
    documented = _documented_codes()
    emitted = _emitted_codes()

    assert sorted(set(emitted) - set(documented)) == [], "codes missing from docs/api.md's error table"
    assert sorted(set(documented) - set(emitted) - {"http_<status>"}) == [], "documented codes nothing emits"
    wrong_status = {code: (status, documented[code]) for code, status in emitted.items()
                    if status is not None and documented[code] != status}
    assert wrong_status == {}
    for required in ("conflict", "invalid_value", "database_error", "internal_error", "body_too_large"):
        assert required in documented


def test_the_django_tasks_docstring_names_skiplocks_import_paths_setting() -> None:
    import jobs.django_tasks

    doc = jobs.django_tasks.__doc__ or ""
    assert "SKIPLOCK_IMPORT_PATHS" in doc
    assert "PROCRASTINATE_IMPORT_PATHS" not in doc


# -- /api/docs without a CDN, a Content-Security-Policy, login throttling (item 12) -----------------

SCRIPT = re.compile(r"<script\b([^>]*)>", re.IGNORECASE)
HANDLER = re.compile(r"<[^>]+\son[a-z]+\s*=", re.IGNORECASE)


def _csp(response: Any) -> dict[str, list[str]]:
    header = response.headers["content-security-policy"]
    return {part.split()[0]: part.split()[1:] for part in header.split(";") if part.strip()}


def _assert_runs_under_its_policy(response: Any) -> None:
    """Every script of the page is a file of this site or carries the answer's nonce; no inline handlers."""
    assert response.status_code == 200, response.text[:300]
    policy = _csp(response)
    assert "'unsafe-inline'" not in policy["script-src"]
    nonces = {value for value in policy["script-src"] if value.startswith("'nonce-")}
    for attributes in SCRIPT.findall(response.text):
        src = re.search(r'\bsrc="([^"]+)"', attributes)
        nonce = re.search(r'\bnonce="([^"]+)"', attributes)
        if src:
            assert src.group(1).startswith("/"), f"a script from another site: {src.group(1)}"
        elif 'type="application/json"' in attributes:
            continue  # data, never run
        else:
            assert nonce, f"an inline script without a nonce: {attributes}"
            assert f"'nonce-{nonce.group(1)}'" in nonces
    assert HANDLER.search(response.text) is None, HANDLER.search(response.text)


@pytest.mark.django_db(transaction=True)
def test_api_docs_serve_django_ninjas_swagger_copy_from_this_site(asgi_server: str) -> None:
    import httpx

    with httpx.Client(base_url=asgi_server, timeout=30) as http:
        docs = http.get("/api/docs")
        _assert_runs_under_its_policy(docs)
        assert "cdn.jsdelivr.net" not in docs.text
        assert "unpkg.com" not in docs.text
        assets = re.findall(r'(?:src|href)="(/static/ninja/[^"]+)"', docs.text)
        assert {"/static/ninja/swagger-ui-bundle.js", "/static/ninja/swagger-ui.css"} <= set(assets)
        for asset in assets:
            assert http.get(asset).status_code == 200, asset


@pytest.mark.django_db(transaction=True)
def test_the_admin_and_the_pages_run_under_the_content_security_policy(asgi_server: str, settings: Any) -> None:
    from jobs.apikeys import apikey_create
    from tests.api_fixtures import login

    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    key, _ = apikey_create(name="csp", scopes=["read"])
    admin = login(asgi_server, "csp-admin", staff=True)
    from django.contrib.auth import get_user_model

    get_user_model().objects.filter(pk=admin.user_id).update(is_superuser=True)
    import httpx

    anonymous = httpx.Client(base_url=asgi_server, timeout=30)
    for page in ("/admin/login/", "/login/"):
        _assert_runs_under_its_policy(anonymous.get(page))
    for page in ("/admin/", "/admin/jobs/jobrecord/", f"/admin/jobs/apikey/{key.pk}/change/", "/"):
        _assert_runs_under_its_policy(admin.http.get(page))
    api = anonymous.get("/api/jobs")
    assert "default-src 'self'" in api.headers["content-security-policy"]
    anonymous.close()
    admin.http.close()


def _failed_sign_ins(asgi_server: str, path: str, username: str, attempts: int) -> list[int]:
    import httpx

    statuses = []
    with httpx.Client(base_url=asgi_server, timeout=30) as http:
        http.get(path)
        for password in [f"wrong-{n}" for n in range(attempts)] + [f"pw-{username}"]:
            answer = http.post(path, data={"username": username, "password": password,
                                           "csrfmiddlewaretoken": http.cookies.get("csrftoken") or ""},
                               headers={"Referer": f"{asgi_server}{path}"})
            statuses.append(answer.status_code)
    return statuses


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", ["/admin/login/", "/login/"])
def test_repeated_failed_sign_ins_are_locked_out_with_429_and_logged(
    asgi_server: str, settings: Any, caplog: pytest.LogCaptureFixture, path: str,
) -> None:
    from django.contrib.auth import get_user_model

    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    username = "target" + path.replace("/", "-")
    get_user_model().objects.create_user(username=username, password=f"pw-{username}", is_staff=True)

    statuses = _failed_sign_ins(asgi_server, path, username, attempts=settings.AXES_FAILURE_LIMIT)

    # Each wrong password is the form's error (200); past the limit, even the right one is refused.
    assert statuses[: settings.AXES_FAILURE_LIMIT - 1] == [200] * (settings.AXES_FAILURE_LIMIT - 1)
    assert statuses[-1] == 429
    assert any("Locking out" in record.getMessage() and record.levelname == "WARNING" for record in caplog.records)
    # Another account from the same address is not affected.
    other = "bystander" + path.replace("/", "-")
    get_user_model().objects.create_user(username=other, password=f"pw-{other}", is_staff=True)
    assert _failed_sign_ins(asgi_server, path, other, attempts=0) == [302]


# -- gunicorn stops quietly (item 24) ---------------------------------------------------------------


@pytest.mark.slow
def test_stopping_gunicorn_logs_no_socket_error() -> None:
    import signal
    import urllib.request

    from tests.conftest import free_port

    port = free_port()
    env = {**os.environ, "DEBUG": "true", "PORT": str(port), "WEB_CONCURRENCY": "2"}
    with tempfile.TemporaryFile(mode="w+") as log:
        web = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "project/gunicorn.conf.py", "project.asgi:application"],
            cwd=BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/live", timeout=2) as answer:
                        assert answer.status == 200
                    break
                except OSError:
                    assert time.monotonic() < deadline, "gunicorn did not start"
                    assert web.poll() is None, "gunicorn exited"
                    time.sleep(0.2)
            web.send_signal(signal.SIGTERM)
            assert web.wait(timeout=60) == 0
        finally:
            if web.poll() is None:
                web.kill()
                web.wait()
        log.seek(0)
        output = log.read()

    assert output.count("Booting worker") == 2
    assert "Shutting down: Master" in output
    assert "Error while closing socket" not in output
    assert "Traceback" not in output


# -- the Security section of docs/operations.md ------------------------------------------------------


def test_the_security_section_names_every_limit_and_the_proxys_body_limit_matches_ours() -> None:
    from django.conf import settings

    text = (BASE_DIR / "docs" / "operations.md").read_text()
    security = text[text.index("## Security"): text.index("\n## ", text.index("## Security") + 3)]
    for name in ("SKIPLOCK_MAX_BODY_BYTES", "SKIPLOCK_SSE_MAX_STREAMS", "SKIPLOCK_SSE_AUTH_RECHECK",
                 "SKIPLOCK_SSE_MAX_DURATION", "SKIPLOCK_LOGIN_FAILURE_LIMIT", "SKIPLOCK_LOGIN_LOCKOUT",
                 "start", "read", "manage", "jobs.view_jobrecord", "jobs.change_jobrecord", "traceback"):
        assert name in security, name
    proxy = re.search(r"client_max_body_size (\d+)m;", security)
    assert proxy is not None
    assert int(proxy.group(1)) * 1_000_000 == settings.SKIPLOCK_MAX_BODY_BYTES


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_swagger_ui_renders_in_a_browser_under_the_content_security_policy(asgi_server: str, browser: Any) -> None:
    page = browser.new_page()
    refused: list[str] = []
    page.on("console", lambda message: refused.append(message.text) if "Content Security Policy" in message.text else None)
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))

    page.goto(f"{asgi_server}/api/docs")
    title = page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)

    assert title is not None
    assert "Skiplock API" in title.inner_text()
    page.wait_for_selector(".swagger-ui .opblock", timeout=30_000)  # the operations, from /api/openapi.json
    assert refused == []
    assert [url for url in requests if not url.startswith(asgi_server) and not url.startswith("data:")] == []
    page.close()
