"""Helpers for the foundation tests: throwaway embedded clusters and /proc process scans."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from project.embedded_postgres import EmbeddedPostgres

BASE_DIR = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def throwaway_instance(suffix: str) -> str:
    """A cluster name of this test session's own (`<session instance>_<suffix>`): two sessions
    running the same tests side by side (each on its SKIPLOCK_PG_INSTANCE) never share one."""
    session = os.environ.get("SKIPLOCK_PG_INSTANCE") or "test"
    return f"{session}_{suffix}" if session.startswith("test") else f"test_{suffix}"


def wipe_instance(cluster: EmbeddedPostgres) -> None:
    """Stop a throwaway cluster and delete its files (never the dev or the shared test one)."""
    assert cluster.instance not in ("dev", "test"), "refusing to wipe a shared cluster"
    assert cluster.instance.startswith("test_"), "throwaway clusters are named test_*"
    if cluster.is_running():
        cluster.stop()
    kill_all(processes_in(cluster.data_dir))
    wait_for(lambda: not processes_in(cluster.data_dir), timeout=10, what="old backends to exit")
    home = cluster.home
    if home.is_symlink():
        shutil.rmtree(home.resolve(), ignore_errors=True)
        home.unlink()
    elif home.exists():
        shutil.rmtree(home, ignore_errors=True)


def kill_all(pids: list[int]) -> None:
    """SIGKILL each process; one that already exited is fine."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _live_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):  # a zombie has stopped running; only its exit status remains
            pids.append(int(entry))
    return pids


def processes_in(folder: Path) -> list[int]:
    """Live processes working in `folder` (PostgreSQL's postmaster and backends run in its data dir)."""
    target = str(folder.resolve()) if folder.exists() else str(folder)
    found = []
    for pid in _live_pids():
        try:
            if os.readlink(f"/proc/{pid}/cwd") == target:
                found.append(pid)
        except OSError:
            continue
    return found


def processes_with_env(marker: str) -> list[int]:
    """Live processes whose environment carries `marker` (set on a command and inherited below it)."""
    needle = marker.encode()
    found = []
    for pid in _live_pids():
        if pid == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(pid)
    return found


def describe(pids: list[int]) -> str:
    lines = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmd = "?"
        lines.append(f"{pid}: {cmd}")
    return "\n".join(lines)


def wait_for(condition: Callable[[], object], *, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
