"""Command one (`manage.py up`) as a user runs it: a subprocess on a throwaway cluster and free port.

Every process it starts (gunicorn, worker, PostgreSQL) inherits a marker variable, so a /proc scan
proves that stopping it leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from django.conf import settings

from project.embedded_postgres import EmbeddedPostgres, port_is_free, port_variable
from tests.foundation_fixtures import (
    BASE_DIR,
    describe,
    free_port,
    kill_all,
    processes_in,
    processes_with_env,
    throwaway_instance,
    wait_for,
    wipe_instance,
)

INSTANCE = throwaway_instance("fdn_up")
OTHER_INSTANCE = f"{INSTANCE}_other"
PASSWORD_LINE = re.compile(r"created the admin account — user: admin {2}password: (\S+)")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not settings.EMBEDDED_DATABASE, reason="command one is tested on the embedded database"),
]


@dataclass
class Up:
    """One `manage.py up` process and what it printed."""

    env: dict[str, str]
    process: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.env['PORT']}"

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def start(self, *options: str) -> Up:
        self.lines = []
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "up", "--concurrency", "1", *options], cwd=BASE_DIR, env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()
        return self

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_until_serving(self, timeout: float = 120) -> float:
        """Seconds until /admin/login/ answers 200 and `up` has announced the service (the web
        server boots while migrations run, so it may answer first); fails if `up` exits."""
        begun = time.monotonic()
        answered = False
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"`manage.py up` exited with {self.process.returncode}:\n{self.output}")
            with contextlib.suppress(httpx.TransportError):
                answered = answered or httpx.get(f"{self.base}/admin/login/", timeout=2).status_code == 200
            if answered and any("Skiplock is up:" in line for line in self.lines):
                return time.monotonic() - begun
            if time.monotonic() - begun > timeout:
                raise AssertionError(f"/admin/login/ did not answer within {timeout}s:\n{self.output}")
            time.sleep(0.2)

    def wait_until_ready(self, timeout: float = 60) -> None:
        """/health/ready answers 200 once the worker has registered its first heartbeat."""
        wait_for(
            lambda: httpx.get(f"{self.base}/health/ready", timeout=5).status_code == 200,
            timeout=timeout, what="/health/ready to answer 200", interval=0.5,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def leftovers(self) -> list[int]:
        """Live processes this service started: they inherit its marker variable, except that
        PostgreSQL overwrites its environment with process titles, so its processes are found by
        their working folder, the data folder."""
        marked = processes_with_env(f"FDN_UP_MARKER={self.env['FDN_UP_MARKER']}")
        return sorted({*marked, *processes_in(EmbeddedPostgres(INSTANCE).data_dir)})


@pytest.fixture(scope="module")
def up() -> Iterator[Up]:
    """Environment for `manage.py up` on a throwaway cluster; everything it started is killed after."""
    marker = uuid.uuid4().hex
    env = {
        **os.environ,
        "DEBUG": "true",
        "SKIPLOCK_PG_INSTANCE": INSTANCE,
        port_variable(INSTANCE): str(free_port()),
        "PORT": str(free_port()),
        "WEB_CONCURRENCY": "1",
        "ACCESS_LOG": "false",
        "SKIPLOCK_SHUTDOWN_GRACE": "5",
        "FDN_UP_MARKER": marker,
    }
    env.pop("DATABASE_URL", None)
    env.pop("HOST", None)
    env.pop("BIND", None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(port_variable(INSTANCE), env[port_variable(INSTANCE)])
        cluster = EmbeddedPostgres(INSTANCE)
        wipe_instance(cluster)
        (BASE_DIR / ".skiplock" / f"admin-password-{INSTANCE}").unlink(missing_ok=True)
        service = Up(env=env)
        yield service
        if service.process is not None and service.process.poll() is None:
            service.process.kill()
        kill_all(service.leftovers())
        for other in ("other", "unreachable"):
            kill_all(processes_with_env(f"FDN_UP_MARKER={marker}-{other}"))
        wipe_instance(EmbeddedPostgres(OTHER_INSTANCE))
        wipe_instance(cluster)
        (BASE_DIR / ".skiplock" / f"admin-password-{INSTANCE}").unlink(missing_ok=True)
        for name in (INSTANCE, OTHER_INSTANCE):
            for leftover in (f"up-{name}.started-db", f"up-{name}.lock", f"admin-password-{name}"):
                (BASE_DIR / ".skiplock" / leftover).unlink(missing_ok=True)


def _admin_login(base: str, password: str) -> httpx.Response:
    with httpx.Client(base_url=base, timeout=10) as client:
        form = client.get("/admin/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
        assert token is not None
        return client.post(
            "/admin/login/?next=/admin/",
            data={"username": "admin", "password": password, "csrfmiddlewaretoken": token.group(1)},
        )


def test_up_starts_database_web_and_worker_and_prints_a_generated_admin_password(up: Up) -> None:
    up.start()
    up.wait_until_serving(timeout=180)

    assert httpx.get(f"{up.base}/health/live").status_code == 200
    found = PASSWORD_LINE.search(up.output)
    assert found, up.output
    password = found.group(1)
    assert len(password) >= 12
    assert _admin_login(up.base, password).headers.get("location") == "/admin/"  # the password logs in
    assert _admin_login(up.base, "admin").status_code == 200  # no fixed password: the form comes back
    assert f"admin {up.base}/admin/" in up.output
    assert f"{up.base}/api/docs" in up.output
    assert any(line.startswith("web    | ") for line in up.lines)  # readable, prefixed logs
    assert any(line.startswith("up     | ") for line in up.lines)
    commands = describe(up.leftovers())
    assert "gunicorn -c project/gunicorn.conf.py project.asgi:application" in commands
    assert "manage.py worker --concurrency 1" in commands
    assert "postgres -D" in commands


def test_a_second_copy_says_the_database_is_in_use_without_a_traceback(up: Up) -> None:
    assert up.process is not None
    assert up.process.poll() is None

    second = subprocess.run(
        [sys.executable, "manage.py", "up"], cwd=BASE_DIR, env=up.env, capture_output=True, text=True, timeout=60
    )

    assert second.returncode != 0
    assert f"Skiplock is already running from this checkout (pid {up.process.pid}); its database ({INSTANCE})" in second.stderr
    assert "Traceback" not in second.stderr + second.stdout
    assert httpx.get(f"{up.base}/health/live").status_code == 200  # the first copy is unharmed


def test_a_second_copy_on_another_database_says_the_port_is_in_use(up: Up) -> None:
    env = {**up.env, "SKIPLOCK_PG_INSTANCE": OTHER_INSTANCE, "FDN_UP_MARKER": f"{up.env['FDN_UP_MARKER']}-other"}
    assert not port_is_free(int(up.env["PORT"])), "the first copy holds the port"

    second = subprocess.run(
        [sys.executable, "manage.py", "up"], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60
    )

    assert second.returncode != 0
    assert f"port {up.env['PORT']} on 127.0.0.1 is in use" in second.stderr
    assert "PORT=<another port>" in second.stderr
    assert "Traceback" not in second.stderr + second.stdout
    assert not EmbeddedPostgres(OTHER_INSTANCE).home.exists()  # gave up before touching a database


def test_an_unreachable_database_url_is_one_clear_line_and_nothing_is_left(up: Up) -> None:
    env = {**up.env, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/nothing", "PORT": str(free_port()),
           "FDN_UP_MARKER": f"{up.env['FDN_UP_MARKER']}-unreachable"}

    result = subprocess.run(
        [sys.executable, "manage.py", "up"], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=90
    )

    assert result.returncode == 1
    assert "CommandError: cannot use the database (DATABASE_URL): connection failed" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert processes_with_env(f"FDN_UP_MARKER={env['FDN_UP_MARKER']}") == []  # the web server it had started is gone


def test_sigterm_stops_web_worker_and_database_and_leaves_no_process(up: Up) -> None:
    assert up.leftovers(), "the running service should carry the marker"
    data_dir = EmbeddedPostgres(INSTANCE).data_dir

    assert up.stop(signal.SIGTERM) == 0

    assert "embedded PostgreSQL stopped" in up.output
    wait_for(lambda: not up.leftovers(), timeout=10, what="every process to exit")
    assert processes_in(data_dir) == []


def test_after_kill_9_of_the_whole_tree_a_new_start_works(up: Up) -> None:
    up.start()
    up.wait_until_serving()
    assert "log in to the admin as an existing superuser" in up.output  # no second password
    victims = up.leftovers()
    assert len(victims) >= 4, describe(victims)  # up, gunicorn master + worker, job worker, postgres

    kill_all(victims)
    assert up.process is not None
    up.process.wait(timeout=10)
    wait_for(lambda: not up.leftovers(), timeout=15, what="the killed tree to disappear")

    up.start()
    up.wait_until_serving()
    up.wait_until_ready()  # database, migrations and a live worker


def test_a_database_left_by_a_killed_up_is_adopted_and_stopped_at_exit(up: Up) -> None:
    cluster = EmbeddedPostgres(INSTANCE)
    assert up.process is not None
    assert up.process.poll() is None  # still serving from the previous test

    assert up.stop(signal.SIGKILL) == -signal.SIGKILL  # only `up` dies: its children get SIGTERM
    wait_for(
        lambda: set(up.leftovers()) <= set(processes_in(cluster.data_dir)), timeout=30, what="web and worker to exit"
    )
    assert cluster.is_running()

    up.start("--no-worker")  # the worker plays no part here: spare the machine its start
    up.wait_until_serving()
    assert "adopting the database left running by a previous run" in up.output
    assert up.stop() == 0
    wait_for(lambda: not up.leftovers(), timeout=10, what="every process to exit")
    assert not cluster.is_running()
