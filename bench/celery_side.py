"""The Celery side of each benchmark, run with bench/.venv's Python by the main runner:

    bench/.venv/bin/python -m bench.celery_side '{"op": "processing", ...}' OUT.json

Starts its own Celery workers (prefork, as users run them) against the bench's Redis, measures,
stops them, and writes the figures as JSON. Same definitions as the PostgreSQL systems: a
pre-filled queue becomes visible at once (RENAME of a filled list), pickup = enqueue call → task start.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / "bench" / "results" / "logs"


class Done:
    """Sums the per-process running counts of finished tasks that the workers send."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stamp_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.stamp_sock.bind(("127.0.0.1", 0))
        self.stamp_port = self.stamp_sock.getsockname()[1]
        self.counts: dict[str, int] = {}
        self.stamps: dict[int, float] = {}
        threading.Thread(target=self._receive, daemon=True).start()
        threading.Thread(target=self._receive_stamps, daemon=True).start()

    def _receive(self) -> None:
        while True:
            try:
                key, value = self.sock.recv(128).decode().split()
            except OSError:
                return
            self.counts[key] = max(self.counts.get(key, 0), int(value))

    def _receive_stamps(self) -> None:
        while True:
            try:
                marker, stamp = self.stamp_sock.recv(128).decode().split()
            except OSError:
                return
            self.stamps[int(marker)] = float(stamp)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def wait_total(self, n: int, timeout: float, workers: Workers | None = None) -> float:
        deadline = time.monotonic() + timeout
        while self.total < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Celery finished {self.total} of {n} tasks within {timeout:.0f} s")
            if workers:
                workers.check_alive()
            time.sleep(0.005)
        return time.monotonic()


class Workers:
    def __init__(self, spec: dict[str, Any], done: Done, concurrency: int, processes: int) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        LOGS.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_REDIS_URL": spec["redis_url"],
               "BENCH_CELERY_BACKEND": "1" if spec["backend"] else "0", "BENCH_DONE_PORT": str(done.port)}
        celery = str(Path(sys.executable).parent / "celery")
        for i in range(processes):
            log = LOGS / f"celery-{spec['op']}-c{concurrency}-p{processes}-{i}.log"
            with log.open("wb") as out:
                self.procs.append(subprocess.Popen(
                    [celery, "-A", "bench.celery_app", "worker", "-P", "prefork", "-c", str(concurrency),
                     "-Q", "bench", "-n", f"bench{i}@%h", "--loglevel", "WARNING"],
                    env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                ))
            self.logs.append(log)

    def check_alive(self) -> None:
        for proc, log in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"a Celery worker exited: {log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def summary(values: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "runs": [round(v, 3) for v in values]}


def percentiles(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    out: dict[str, Any] = {}
    for p in (50, 95, 99):
        rank = max(1, -(-p * len(ordered) // 100))
        out[f"p{p}"] = round(ordered[rank - 1], 3)
    out["n"] = len(ordered)
    out["max"] = round(ordered[-1], 3)
    return out


class Side:
    def __init__(self, spec: dict[str, Any]) -> None:
        os.environ["BENCH_REDIS_URL"] = spec["redis_url"]
        os.environ["BENCH_CELERY_BACKEND"] = "1" if spec["backend"] else "0"
        sys.path.insert(0, str(ROOT))
        import redis

        from bench import celery_app

        self.spec = spec
        self.module = celery_app
        self.app = celery_app.app
        self.redis = redis.Redis.from_url(spec["redis_url"])
        self.done = Done()
        self.app.connection_for_write().ensure_connection(max_retries=3)

    def task(self, name: str) -> Any:
        return self.app.tasks[name]

    def purge(self) -> None:
        self.redis.delete("bench", "bench_fill")

    def start(self, concurrency: int, processes: int) -> Workers:
        workers = Workers(self.spec, self.done, concurrency, processes)
        try:
            warm = max(4, 2 * concurrency * processes)
            before = self.done.total
            self.fill("bench_noop", warm)
            self.done.wait_total(before + warm, 120, workers)
            time.sleep(0.2)
        except BaseException:
            workers.stop()
            raise
        return workers

    def fill(self, task: str, n: int) -> float:
        """Publish n messages to a list nobody reads, then rename it to the workers' queue: all visible at once."""
        sig = self.task(task)
        with self.app.producer_or_acquire() as producer:
            for _ in range(n):
                sig.apply_async(queue="bench_fill", producer=producer)
        self.redis.rename("bench_fill", "bench")
        return time.monotonic()

    # -- operations ---------------------------------------------------------------------------
    def enqueue(self) -> dict[str, Any]:
        spec = self.spec
        noop = self.task("bench_noop")
        single, batch = [], []
        noop.delay()  # connect (and, with a backend, start the result consumer) before timing
        for _ in range(spec["runs"]):
            self.purge()
            start = time.perf_counter()
            deadline = start + spec["seconds"]
            done = 0
            while done < spec["single"] and (done < 10 or time.perf_counter() < deadline):
                noop.delay()
                done += 1
            single.append(done / (time.perf_counter() - start))
            self.purge()
            start = time.perf_counter()
            deadline = start + spec["seconds"]
            batches = 0
            while batches < spec["batches"] and (batches == 0 or time.perf_counter() < deadline):
                # Celery has no bulk publish: 1,000 messages through one producer is its fastest way.
                with self.app.producer_or_acquire() as producer:
                    for _ in range(1000):
                        noop.apply_async(producer=producer)
                batches += 1
            batch.append(batches * 1000 / (time.perf_counter() - start))
            self.purge()
        return {"single": summary(single), "batch": summary(batch)}

    def processing(self) -> dict[str, Any]:
        """Both task bodies on one set of warm workers: {"by_task": {task: {"rate": summary}}}."""
        spec = self.spec
        concurrency, processes = spec["concurrency"], spec["processes"]
        self.purge()
        workers = self.start(concurrency, processes)
        out: dict[str, Any] = {}
        try:
            for key, task, guess in spec["tasks"]:
                rates: list[float] = []
                for _ in range(spec["runs"]):
                    n = int(min(spec["max_jobs"], max(spec["min_jobs"], guess * spec["drain_seconds"])))
                    before = self.done.total
                    t0 = self.fill(task, n)
                    t1 = self.done.wait_total(before + n, max(60.0, n / 10), workers)
                    rates.append(n / (t1 - t0))
                    guess = rates[-1]
                    time.sleep(0.1)
                out[key] = {"rate": summary(rates), "jobs_per_run": n}
        finally:
            workers.stop()
            self.purge()
        return {"by_task": out}

    def pickup(self) -> dict[str, Any]:
        spec = self.spec
        workers = self.start(spec["concurrency"], 1)
        stamp = self.task("bench_stamp")
        latencies: list[float] = []
        enqueue_ms: list[float] = []
        try:
            for marker in range(spec["samples"]):
                time.sleep(random.uniform(0.02, 0.04))
                start = time.time()
                stamp.delay(self.done.stamp_port, marker)
                enqueue_ms.append((time.time() - start) * 1000)
                deadline = time.monotonic() + 10
                while marker not in self.done.stamps:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"Celery did not start the stamp task {marker}")
                    time.sleep(0.0002)
                latencies.append((self.done.stamps.pop(marker) - start) * 1000)
        finally:
            workers.stop()
            self.purge()
        after = [max(0.0, lat - enq) for lat, enq in zip(latencies, enqueue_ms, strict=True)]
        return {"latency_ms": percentiles(latencies), "enqueue_ms": percentiles(enqueue_ms),
                "after_enqueue_ms": percentiles(after)}

    def e2e(self) -> dict[str, Any]:
        spec = self.spec
        workers = self.start(spec["concurrency"], 1)
        noop = self.task("bench_noop")
        rates: list[float] = []
        lags: list[float] = []
        began = time.monotonic()
        try:
            for _ in range(spec["runs"]):
                if rates and time.monotonic() - began > spec["budget"]:
                    break
                before = self.done.total
                t0 = time.monotonic()
                for _ in range(spec["jobs"]):
                    noop.delay()
                t_enq = time.monotonic()
                t1 = self.done.wait_total(before + spec["jobs"], 300, workers)
                rates.append(spec["jobs"] / (t1 - t0))
                lags.append((t1 - t_enq) * 1000)
                time.sleep(0.1)
        finally:
            workers.stop()
            self.purge()
        return {"rate": summary(rates), "drain_after_last_enqueue_ms": summary(lags)}


def main() -> None:
    spec = json.loads(sys.argv[1])
    side = Side(spec)
    result = getattr(side, spec["op"])()
    versions = {}
    for name in ("celery", "kombu", "redis", "billiard"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:
            versions[name] = "?"
    result["versions"] = versions
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
