"""The embedded PostgreSQL: first use, idempotent start, crash recovery, clean stop, `manage.py db`.

Everything runs on a throwaway cluster (`<session instance>_fdn_pg`) on a free port, wiped before and after;
the dev cluster and the shared test cluster are never touched.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError

from project.embedded_postgres import (
    SERVER_USER,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    port_variable,
)
from tests.foundation_fixtures import (
    BASE_DIR,
    free_port,
    processes_in,
    throwaway_instance,
    wait_for,
    wipe_instance,
)

INSTANCE = throwaway_instance("fdn_pg")

needs_embedded = pytest.mark.skipif(
    not settings.EMBEDDED_DATABASE, reason="DATABASE_URL is set: the db command manages no embedded cluster"
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedPostgres]:
    """A throwaway cluster on a free port, wiped before and after this module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(port_variable(INSTANCE), str(free_port()))
        throwaway = EmbeddedPostgres(INSTANCE)
        wipe_instance(throwaway)
        yield throwaway
        wipe_instance(throwaway)


def query(url: str, sql: str) -> object:
    with psycopg.connect(url, connect_timeout=5) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def manage(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBUG": "true", "SKIPLOCK_PG_INSTANCE": INSTANCE}
    env.pop("DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=BASE_DIR, env=env, input=stdin,
        capture_output=True, text=True, timeout=60,
    )


def test_first_start_runs_initdb_and_creates_the_skiplock_database(cluster: EmbeddedPostgres) -> None:
    assert not (cluster.data_dir / "PG_VERSION").exists()

    assert cluster.start() is True

    assert (cluster.data_dir / "PG_VERSION").read_text().strip() == "18"
    assert cluster.is_running()
    assert query(cluster.url(), "SELECT current_database()") == "skiplock"
    assert query(cluster.url(), "SELECT current_setting('server_encoding')") == "UTF8"


def test_a_second_start_is_a_no_op(cluster: EmbeddedPostgres) -> None:
    cluster.start()
    pid = cluster.pid()

    assert cluster.start() is False

    assert cluster.pid() == pid
    assert cluster.is_running()


def test_it_listens_on_a_unix_socket_and_on_loopback_tcp_only(cluster: EmbeddedPostgres) -> None:
    cluster.start()

    assert (cluster.socket_dir / f".s.PGSQL.{cluster.port}").is_socket()
    assert query(cluster.url(), "SELECT inet_server_addr() IS NULL") is True  # came in by the socket
    assert query(cluster.tcp_url(), "SELECT host(inet_server_addr())") == "127.0.0.1"
    assert query(cluster.url(), "SHOW listen_addresses") == "127.0.0.1"
    assert query(cluster.url(), "SHOW port") == str(cluster.port)


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root process hands the server to another user")
def test_as_root_the_server_runs_as_the_unprivileged_skiplock_user(cluster: EmbeddedPostgres) -> None:
    cluster.start()
    server_user = pwd.getpwnam(SERVER_USER)

    status = Path(f"/proc/{cluster.pid()}/status").read_text()
    real_uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))

    assert int(real_uid) == server_user.pw_uid != 0
    assert cluster.data_dir.resolve().stat().st_uid == server_user.pw_uid
    assert (cluster.data_dir / "postgresql.conf").stat().st_uid == server_user.pw_uid
    assert query(cluster.url(), "SELECT current_setting('data_directory')") == str(cluster.data_dir.resolve())


def test_start_recovers_the_stale_pid_file_a_kill_9_leaves(cluster: EmbeddedPostgres) -> None:
    cluster.start()
    old_pid = cluster.pid()

    cluster.kill()
    wait_for(lambda: not cluster.is_running(), timeout=10, what="the killed postmaster to die")
    assert (cluster.data_dir / "postmaster.pid").exists(), "kill -9 leaves the pid file behind"

    assert cluster.start() is True

    assert cluster.pid() != old_pid
    assert query(cluster.url(), "SELECT 1") == 1


def test_stop_is_clean_and_leaves_no_process(cluster: EmbeddedPostgres) -> None:
    cluster.start()
    assert processes_in(cluster.data_dir)

    assert cluster.stop() is True

    assert not cluster.is_running()
    assert processes_in(cluster.data_dir) == []
    assert not (cluster.data_dir / "postmaster.pid").exists()
    assert not (cluster.socket_dir / f".s.PGSQL.{cluster.port}").exists()
    assert "database system is shut down" in cluster.log_file.read_text()
    assert cluster.stop() is False  # stopping a stopped cluster is a no-op


def test_a_port_taken_by_another_program_is_a_clear_error(
    cluster: EmbeddedPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.stop()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        monkeypatch.setenv(port_variable(INSTANCE), str(squatter.getsockname()[1]))

        with pytest.raises(EmbeddedPostgresError, match=f"in use by another program; set {port_variable(INSTANCE)}"):
            cluster.start()

    assert not cluster.is_running()


def test_instance_names_and_ports_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EmbeddedPostgresError, match="must be letters, digits and _"):
        _ = EmbeddedPostgres("../dev").port
    monkeypatch.setenv("SKIPLOCK_PG_TEST_FDN_BAD_PORT", "99999")
    with pytest.raises(EmbeddedPostgresError, match=r"SKIPLOCK_PG_TEST_FDN_BAD_PORT='99999' is not a TCP port"):
        _ = EmbeddedPostgres("test_fdn_bad").port
    assert port_variable("dev") == "SKIPLOCK_PG_PORT"
    assert port_variable("test_api") == "SKIPLOCK_PG_TEST_API_PORT"


# -- manage.py db ------------------------------------------------------------------------------


@needs_embedded
def test_db_command_starts_reports_and_stops_the_cluster(
    cluster: EmbeddedPostgres, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.stop()

    call_command("db", "--instance", INSTANCE, "start")
    call_command("db", "--instance", INSTANCE, "start")
    call_command("db", "--instance", INSTANCE, "status")
    call_command("db", "--instance", INSTANCE, "url")
    out = capsys.readouterr().out.splitlines()

    assert out[0] == f"PostgreSQL ({INSTANCE}) started on port {cluster.port}"
    assert out[1] == f"PostgreSQL ({INSTANCE}) already running on port {cluster.port}"
    assert out[2].startswith(f"PostgreSQL ({INSTANCE}) running, pid {cluster.pid()}, port {cluster.port}")
    assert out[3] == cluster.url()
    assert query(out[3], "SELECT 1") == 1  # the printed URL works as it is

    call_command("db", "--instance", INSTANCE, "stop")
    call_command("db", "--instance", INSTANCE, "stop")
    with pytest.raises(SystemExit) as status:
        call_command("db", "--instance", INSTANCE, "status")
    out = capsys.readouterr().out.splitlines()

    assert out == [f"PostgreSQL ({INSTANCE}) stopped", f"PostgreSQL ({INSTANCE}) was not running",
                   f"PostgreSQL ({INSTANCE}) not running"]
    assert status.value.code == 3  # like pg_ctl status: scripts can test it
    assert not cluster.is_running()


@needs_embedded
@pytest.mark.slow
def test_db_psql_runs_psql_on_the_cluster(cluster: EmbeddedPostgres) -> None:
    cluster.start()

    with_command = manage("db", "psql", "-tA", "-c", "SELECT 41 + 1")
    with_stdin = manage("db", "psql", "-tA", stdin="SELECT current_database();\n")  # instance from the env

    assert with_command.returncode == 0, with_command.stderr
    assert with_command.stdout.strip() == "42"
    assert with_stdin.stdout.strip() == "skiplock"


@needs_embedded
@pytest.mark.slow
def test_db_psql_on_a_stopped_cluster_says_how_to_start_it(cluster: EmbeddedPostgres) -> None:
    cluster.stop()

    result = manage("db", "psql", "-c", "SELECT 1")

    assert result.returncode == 1
    assert f"PostgreSQL ({INSTANCE}) is not running; start it with: manage.py db start" in result.stderr
    assert "Traceback" not in result.stderr


@needs_embedded
def test_db_command_refuses_stray_arguments() -> None:
    with pytest.raises(CommandError, match="unexpected arguments after 'status'"):
        call_command("db", "--instance", INSTANCE, "status", "extra")


# -- isolation from development data -------------------------------------------------------------


@needs_embedded
def test_the_test_session_uses_its_own_cluster_not_the_dev_one() -> None:
    database = settings.DATABASES["default"]
    instance = os.environ["SKIPLOCK_PG_INSTANCE"]
    dev = EmbeddedPostgres("dev")

    assert instance.startswith("test")
    assert int(str(database["PORT"])) == EmbeddedPostgres(instance).port != dev.port
    assert database["HOST"] == str(EmbeddedPostgres(instance).socket_dir) != str(dev.socket_dir)


@needs_embedded
@pytest.mark.slow
def test_pytest_refuses_to_run_on_the_dev_cluster() -> None:
    env = {**os.environ, "DEBUG": "true", "SKIPLOCK_PG_INSTANCE": "dev"}
    env.pop("DATABASE_URL", None)

    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_settings.py"],
        cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 4
    assert "tests use their own PostgreSQL cluster" in result.stdout + result.stderr
