"""manage.py up: the whole service in the foreground — database, migrations, web and a worker.

Ctrl-C or SIGTERM stops the web server, the worker and the embedded database it started, and
leaves no process behind (children also get SIGTERM from the kernel if this process dies).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import OperationalError

from project.embedded_postgres import (
    STATE_DIR,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    port_is_free,
)

COLOURS = {"web": "\033[36m", "worker": "\033[35m", "up": "\033[32m"}
RESET = "\033[0m"
PR_SET_PDEATHSIG = 1


class Command(BaseCommand):
    help = "Start Skiplock: embedded PostgreSQL (unless DATABASE_URL), migrations, web server and worker."
    requires_system_checks: list[str] = []  # run in handle(), once the web server is booting

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--no-worker", action="store_true", help="run the web server only")
        parser.add_argument("--concurrency", type=int, default=settings.SKIPLOCK_WORKER_CONCURRENCY)

    def handle(self, *args: Any, no_worker: bool, concurrency: int, **options: Any) -> None:
        self.colour = sys.stdout.isatty()
        _die_with_parent()  # if `make` is killed, stop cleanly too
        instance = os.environ.get("SKIPLOCK_PG_INSTANCE") or "dev"
        cluster = EmbeddedPostgres(instance) if settings.EMBEDDED_DATABASE else None
        self.instance = instance if cluster is not None else "external"
        # One `up` per embedded database; several may share an external one (DATABASE_URL).
        lock = self._single_instance_lock() if cluster is not None else None
        host = os.environ.get("HOST", "127.0.0.1")
        try:
            port = int(os.environ.get("PORT", "8000"))
        except ValueError:
            raise CommandError(f"PORT={os.environ['PORT']!r} is not a TCP port") from None
        if not port_is_free(port, host):
            if lock is not None:
                lock.close()
            raise CommandError(
                f"port {port} on {host} is in use (another Skiplock, or another program); "
                "stop it or run with PORT=<another port>"
            )
        started_db = False
        children: dict[str, subprocess.Popen[bytes]] = {}
        stopping = threading.Event()

        def on_signal(signum: int, frame: Any) -> None:
            stopping.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            # The web server boots (imports the app, forks its workers) while the database starts,
            # the checks and the migrations run: on a second start that overlap is most of the
            # wait. It answers once it is up; the worker needs the tables, so it starts last.
            children["web"] = self._spawn(
                "web", [sys.executable, "-m", "gunicorn", "-c", "project/gunicorn.conf.py", "project.asgi:application"]
            )
            if cluster is not None:
                self.say("up", f"starting the embedded PostgreSQL (port {cluster.port}, data in .skiplock/{cluster.instance}/)")
                started_db = self._start_cluster(cluster)
            self.check(display_num_errors=False)  # system checks (skipped at start: see requires_system_checks)
            self.say("up", "applying migrations")
            call_command("migrate", interactive=False, verbosity=0)
            self._ensure_admin()
            if not no_worker:
                children["worker"] = self._spawn(
                    "worker", [sys.executable, "manage.py", "worker", "--concurrency", str(concurrency)]
                )
            base = f"http://{host}:{port}"
            self.say("up", f"Skiplock is up: job pages {base}/  ·  admin {base}/admin/  ·  API docs {base}/api/docs  ·  health {base}/health/ready")
            self.say("up", "press Ctrl-C to stop")
            while not stopping.is_set():
                for name, child in children.items():
                    if child.poll() is not None:
                        self.say("up", f"{name} exited with code {child.returncode}; stopping")
                        stopping.set()
                stopping.wait(0.5)
        except EmbeddedPostgresError as exc:
            raise CommandError(str(exc)) from None
        except OperationalError as exc:
            where = "the embedded PostgreSQL" if cluster is not None else "DATABASE_URL"
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CommandError(f"cannot use the database ({where}): {reason}") from None
        finally:
            self._stop(children)
            if cluster is not None and started_db:
                cluster.stop()
                _started_marker(cluster).unlink(missing_ok=True)
                self.say("up", "embedded PostgreSQL stopped")
            if lock is not None:
                lock.close()

    # -- helpers -------------------------------------------------------------------------------
    def _single_instance_lock(self) -> IO[str]:
        """One `up` per database: a second copy stops here with a clear message."""
        STATE_DIR.mkdir(exist_ok=True)
        name = "up.lock" if self.instance == "dev" else f"up-{self.instance}.lock"
        handle = (STATE_DIR / name).open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            pid = handle.read().strip() or "?"
            handle.close()
            raise CommandError(
                f"Skiplock is already running from this checkout (pid {pid}); its database "
                f"({self.instance}) and port are in use. Stop it with Ctrl-C first, or open the "
                "running one."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        return handle

    def _ensure_admin(self) -> None:
        user_model = get_user_model()
        password_file = STATE_DIR / ("admin-password" if self.instance == "dev" else f"admin-password-{self.instance}")
        if user_model.objects.filter(is_superuser=True).exists():
            hint = f" (password in {password_file})" if password_file.exists() else ""
            self.say("up", f"log in to the admin as an existing superuser{hint}")
            return
        password = secrets.token_urlsafe(12)
        user_model.objects.create_superuser("admin", "admin@localhost", password)
        password_file.write_text(password + "\n")
        password_file.chmod(0o600)
        self.say("up", f"created the admin account — user: admin  password: {password}  (also in {password_file})")

    def _start_cluster(self, cluster: EmbeddedPostgres) -> bool:
        """Start the embedded database; True when this run owns it and must stop it at exit.

        A cluster left running by an `up` that was killed (kill -9: no clean-up ran) is adopted,
        so this run stops it; one started by hand (`manage.py db start`) is left running.
        """
        marker = _started_marker(cluster)
        started = cluster.start()
        if started or marker.exists():
            if not started:
                self.say("up", "adopting the database left running by a previous run that was killed")
            marker.write_text(str(os.getpid()))
            return True
        self.say("up", "the embedded PostgreSQL was already running (manage.py db start); leaving it running")
        return False

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent, cwd=str(Path(settings.BASE_DIR)),
        )
        threading.Thread(target=self._relay, args=(name, child), daemon=True).start()
        return child

    def _relay(self, name: str, child: subprocess.Popen[bytes]) -> None:
        assert child.stdout is not None
        for raw in iter(child.stdout.readline, b""):
            self.say(name, raw.decode(errors="replace").rstrip())

    def _stop(self, children: dict[str, subprocess.Popen[bytes]]) -> None:
        running = {n: c for n, c in children.items() if c.poll() is None}
        if not running:
            return
        self.say("up", "stopping " + ", ".join(running))
        for child in running.values():
            child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + settings.SKIPLOCK_SHUTDOWN_GRACE + 15
        for name, child in running.items():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say("up", f"{name} did not stop in time; killing it")
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()

    def say(self, name: str, line: str) -> None:
        prefix = f"{name:<6} |"
        if self.colour:
            prefix = f"{COLOURS.get(name, '')}{prefix}{RESET}"
        sys.stdout.write(f"{prefix} {line}\n")
        sys.stdout.flush()


def _started_marker(cluster: EmbeddedPostgres) -> Path:
    return STATE_DIR / f"up-{cluster.instance}.started-db"


def _die_with_parent() -> None:
    """Children get SIGTERM when `up` dies, even by kill -9 (Linux)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
