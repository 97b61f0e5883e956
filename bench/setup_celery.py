"""The Celery side's own environment: Celery 5 + redis client in bench/.venv, Debian's redis-server.

Celery never becomes a Skiplock dependency: it lives only in the git-ignored bench/.venv.
`python -m bench.setup_celery` installs both (idempotent); `RedisServer` runs a private Redis
on 127.0.0.1 with a free port, without persistence, and stops it after.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
VENV = BENCH_DIR / ".venv"
CELERY_REQUIREMENT = "celery[redis]>=5.4,<6"


def venv_python() -> Path:
    return VENV / "bin" / "python"


def celery_ready() -> bool:
    """True when bench/.venv has Celery 5 and redis-server is on the PATH."""
    return redis_server_binary() is not None and _venv_has_celery()


def _venv_has_celery() -> bool:
    if not venv_python().exists():
        return False
    probe = subprocess.run(
        [str(venv_python()), "-c", "import celery, redis; assert celery.VERSION[0] == 5"],
        capture_output=True,
    )
    return probe.returncode == 0


def redis_server_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )


def install(*, quiet: bool = False) -> list[str]:
    """Install what is missing; return what was done (or why it could not be)."""
    done: list[str] = []
    if redis_server_binary() is None:
        done.append(_install_redis())
    if not _venv_has_celery():
        done.append(_install_celery())
    if not quiet:
        for line in done:
            print(line)
    return done


def _install_redis() -> str:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "redis-server is missing and cannot be installed here (needs root and apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    before = _redis_pids()
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "redis-server"],
        check=True, env=env, capture_output=True,
    )
    # Debian's package may start its own service on 6379: the bench runs its own instance only.
    for pid in _redis_pids() - before:
        subprocess.run(["service", "redis-server", "stop"], capture_output=True)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 15)
    return "installed Debian's redis-server"


def _redis_pids() -> set[int]:
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "comm").read_text().strip() == "redis-server":
                    pids.add(int(proc.name))
            except OSError:
                continue
    return pids


def _install_celery() -> str:
    uv = ROOT / ".skiplock" / "uv" / "bin" / "uv"
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    env.pop("VIRTUAL_ENV", None)
    base = getattr(sys, "_base_executable", sys.executable)
    if uv.exists():
        subprocess.run([str(uv), "venv", "--quiet", "--python", base, str(VENV)], check=True, env=env)
        subprocess.run(
            [str(uv), "pip", "install", "--quiet", "--python", str(venv_python()), CELERY_REQUIREMENT],
            check=True, env=env,
        )
    else:
        subprocess.run([base, "-m", "venv", str(VENV)], check=True)
        subprocess.run(
            [str(venv_python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", CELERY_REQUIREMENT],
            check=True,
        )
    return f"installed {CELERY_REQUIREMENT} into {VENV.relative_to(ROOT)}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A private redis-server on 127.0.0.1 (no persistence), started and stopped by the bench."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="skiplock-bench-redis-"))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def version(self) -> str:
        binary = redis_server_binary() or "redis-server"
        out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
        return out.split("v=")[1].split()[0] if "v=" in out else out.strip()

    def start(self) -> RedisServer:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `python -m bench.setup_celery`")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--protected-mode", "yes", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    for message in install(quiet=True) or ["Celery environment already installed"]:
        print(message)
    print("ready" if celery_ready() else "NOT ready")
