"""API benchmark: how fast a job id comes back over HTTP, and how fast progress reaches a client.

    .venv/bin/python -m bench.api --small          # or --tiny / --full; --json for the raw figures

Measures, against the production server (gunicorn + uvicorn workers, `project/gunicorn.conf.py`)
on its own embedded PostgreSQL instance (SKIPLOCK_PG_INSTANCE, default `bench_api`; or
DATABASE_URL):
- `POST /api/jobs` at 1, 5 and 20 concurrent clients (keep-alive, an API key each request):
  p50/p95/p99 latency and requests/s; the seed target is p99 < 100 ms at 5 clients;
- `POST /api/jobs/batch` (batches of 500 or 1,000): latency per batch and jobs/s;
- SSE delivery: a real worker runs a task that calls `report_progress` with its wall-clock time
  in the step text; clients follow the jobs over `GET /api/jobs/{id}/events` and
  `GET /api/events?ids=…`; latency = arrival at the client − the `report_progress` call.

`run(size) -> dict` is what `python -m bench` calls (in its own process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"requests": 60, "batches": 2, "batch_size": 100, "sse_jobs": 2, "sse_steps": 8},
    "small": {"requests": 400, "batches": 5, "batch_size": 500, "sse_jobs": 4, "sse_steps": 20},
    "full": {"requests": 2000, "batches": 10, "batch_size": 1000, "sse_jobs": 8, "sse_steps": 40},
}
CONCURRENCY = (1, 5, 20)
WEB_WORKERS = 2
TASK = "bench_api_progress"
STEP_INTERVAL = 0.15  # above SKIPLOCK_PROGRESS_INTERVAL (0.1 s), so each report is written, not coalesced
FAST_DEPLOY = {"check_interval": 0, "build_megabytes": 1, "health_checks": 1}


def register_task() -> None:
    """The benchmark's task: reports progress with its wall-clock time as the step text."""
    from jobs.registry import find_task, task

    if find_task(TASK) is not None:
        return

    def bench_api_progress(ctx: Any, *, steps: int = 10, interval: float = STEP_INTERVAL) -> dict[str, int]:
        for step in range(1, steps + 1):
            ctx.report_progress(100 * step / (steps + 1), f"t={time.time():.6f}")
            time.sleep(interval)  # a stand-in for work between two reports
        return {"steps": steps}

    task(name=TASK, queue="bench_api", soft_time_limit=300, hard_time_limit=600)(bench_api_progress)


# The worker subprocess imports this module (SKIPLOCK_IMPORT_PATHS) to learn the task.
if os.environ.get("SKIPLOCK_BENCH_API_WORKER") == "1":
    register_task()


# --- environment --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _server_env(database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update({
        "DATABASE_URL": database_url, "DEBUG": "false", "SECRET_KEY": os.environ["SECRET_KEY"],
        "ALLOWED_HOSTS": "127.0.0.1,localhost", "SECURE_SSL_REDIRECT": "false", "SECURE_HSTS_SECONDS": "0",
        "LOG_LEVEL": "WARNING", "ACCESS_LOG": "false", "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "project.settings", "SKIPLOCK_DB_POOL": os.environ.get("SKIPLOCK_DB_POOL", "true"),
    })
    return env


def _setup() -> tuple[str, bool]:
    """Django on the benchmark's database; returns its URL and whether we started an embedded cluster."""
    os.environ.setdefault("SKIPLOCK_PG_INSTANCE", "bench_api")
    os.environ["DEBUG"] = "false"
    os.environ.setdefault("SECRET_KEY", "bench-" + secrets.token_hex(16))
    os.environ.setdefault("ALLOWED_HOSTS", "127.0.0.1,localhost")
    os.environ.setdefault("SECURE_SSL_REDIRECT", "false")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ["DJANGO_SETTINGS_MODULE"] = "project.settings"
    import django

    django.setup()
    from django.conf import settings

    started = False
    if settings.EMBEDDED_DATABASE:
        from project.embedded_postgres import EmbeddedPostgres

        started = EmbeddedPostgres(os.environ["SKIPLOCK_PG_INSTANCE"]).start()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    register_task()
    with _cursor() as cursor:
        cursor.execute("DELETE FROM procrastinate_jobs")
        cursor.execute("DELETE FROM procrastinate_workers")
    return str(settings.DATABASE_URL), started


@contextlib.contextmanager
def _cursor() -> Any:
    from django.db import connection

    with connection.cursor() as cursor:
        yield cursor


@contextlib.contextmanager
def _process(args: list[str], env: dict[str, str]) -> Any:
    """Run a server process; its log goes to a file (a pipe nobody reads would block it once full)
    and a failure inside the block carries the log's tail."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log,
                                start_new_session=True)
        try:
            yield proc
        except Exception as exc:
            log.seek(0)
            tail = log.read()[-3000:].decode(errors="replace")
            raise RuntimeError(f"{type(exc).__name__}: {exc}; the log of `{' '.join(args[-3:])}` ends with:\n{tail}") from exc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def _cpu_seconds(root_pid: int) -> float:
    """User + system CPU seconds of a process and its children (Linux /proc; 0 elsewhere)."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0.0
    pending = [root_pid]
    while pending:
        pid = pending.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            pending += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total


# --- statistics ------------------------------------------------------------------------------------


def _pct(values: list[float], point: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(point / 100 * (len(ordered) - 1))))
    return ordered[index]


def _latency(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {"p50_ms": round(_pct(ms, 50), 2), "p95_ms": round(_pct(ms, 95), 2), "p99_ms": round(_pct(ms, 99), 2),
            "max_ms": round(max(ms), 2) if ms else float("nan"),
            "mean_ms": round(statistics.fmean(ms), 2) if ms else float("nan")}


# --- measurements -----------------------------------------------------------------------------------


def _direct_defer(total: int) -> dict[str, Any]:
    """The same start done in Python (`job_defer`, one commit each) on the same database: the rate
    POST /api/jobs is compared with (issue 12: one client reaches at least half of it)."""
    from jobs.services import job_defer

    args = {**FAST_DEPLOY, "stack": "direct"}
    for _ in range(5):
        job_defer(task_name="deploy_stack", args=args)  # warm up
    started = time.perf_counter()
    for _ in range(total):
        job_defer(task_name="deploy_stack", args=args)
    return {"jobs": total, "jobs_per_s": round(total / (time.perf_counter() - started), 1)}


async def _post_jobs(base: str, key: str, clients: int, total: int) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    latencies: list[float] = []
    errors = 0
    per_client = max(1, total // clients)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=30) as http:

        async def one_client(number: int, count: int, record: bool) -> None:
            nonlocal errors
            for i in range(count):
                body = {"task": "deploy_stack", "args": {**FAST_DEPLOY, "stack": f"c{number}-{i}"}}
                started = time.perf_counter()
                response = await http.post("/api/jobs", json=body)
                elapsed = time.perf_counter() - started
                if response.status_code != 202:
                    errors += 1
                elif record:
                    latencies.append(elapsed)

        await asyncio.gather(*(one_client(n, 5, False) for n in range(clients)))  # warm connections
        wall = time.perf_counter()
        await asyncio.gather(*(one_client(n, per_client, True) for n in range(clients)))
        wall = time.perf_counter() - wall
    return {"clients": clients, "requests": per_client * clients, "errors": errors,
            "req_per_s": round(len(latencies) / wall, 1), **_latency(latencies)}


def _batches(base: str, key: str, batches: int, size: int) -> dict[str, Any]:
    import httpx

    latencies = []
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        for number in range(batches + 1):
            body = {"jobs": [{"task": "deploy_stack", "args": {**FAST_DEPLOY, "stack": f"b{number}-{i}"}}
                             for i in range(size)]}
            started = time.perf_counter()
            response = http.post("/api/jobs/batch", json=body)
            elapsed = time.perf_counter() - started
            if response.status_code != 202:
                raise RuntimeError(f"batch start failed: {response.status_code} {response.text[:300]}")
            if number:  # the first batch warms up
                latencies.append(elapsed)
    total = sum(latencies)
    return {"batch_size": size, "batches": batches, "jobs_per_s": round(size * batches / total, 1),
            **_latency(latencies)}


async def _follow(http: Any, path: str, arrivals: list[tuple[float, float]], ended: set[int]) -> None:
    seen: set[tuple[int, str]] = set()  # the final write repeats the last step: count each report once
    async with http.stream("GET", path) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{path}: {response.status_code}")
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                now = time.time()
                data = json.loads(line[6:])
                step = data.get("step") or ""
                if event == "progress" and step.startswith("t=") and (data["id"], step) not in seen:
                    seen.add((data["id"], step))
                    arrivals.append((float(step[2:]), now))
                elif event == "end":
                    ended.add(int(data["id"]))


async def _sse(base: str, key: str, jobs: int, steps: int) -> dict[str, Any]:
    import datetime as dt

    import httpx
    from asgiref.sync import sync_to_async

    from jobs.services import DeferRequest, job_defer_batch

    # Due in a second: every stream is open before the first report.
    run_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.0)
    deferred = await sync_to_async(job_defer_batch)(requests=[
        DeferRequest(TASK, {"steps": steps, "interval": STEP_INTERVAL}, run_at=run_at) for _ in range(jobs)
    ])
    ids = [job.job_id for job in deferred]
    single: list[tuple[float, float]] = []
    multi: list[tuple[float, float]] = []
    ended_single: set[int] = set()
    ended_multi: set[int] = set()
    timeout = httpx.Timeout(30, read=120)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=timeout,
                                 limits=httpx.Limits(max_connections=jobs + 4)) as http:
        await asyncio.wait_for(asyncio.gather(
            *(_follow(http, f"/api/jobs/{job_id}/events", single, ended_single) for job_id in ids),
            _follow(http, "/api/events?ids=" + ",".join(map(str, ids)), multi, ended_multi),
        ), timeout=120)
    latencies = [arrived - reported for reported, arrived in single]
    multi_latencies = [arrived - reported for reported, arrived in multi]
    return {
        "jobs": jobs, "reports_per_job": steps, "report_interval_s": STEP_INTERVAL,
        "streams": jobs + 1, "delivered": len(single), "reported": jobs * steps,
        "per_job_stream": _latency(latencies),
        "multi_job_stream": _latency(multi_latencies),
        "all_ended": ended_single == set(ids) and ended_multi == set(ids),
    }


def run(size: str = "small") -> dict[str, Any]:
    """Run the API benchmark at `size` (tiny, small or full) and return its figures."""
    params = SIZES[size]
    database_url, started_cluster = _setup()
    from jobs.apikeys import apikey_create

    _, key = apikey_create(name="bench", scopes=["start", "read", "manage"])
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = _server_env(database_url)
    python = sys.executable
    server_env = {**env, "BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": str(WEB_WORKERS)}
    result: dict[str, Any] = {"size": size, "server": f"gunicorn, {WEB_WORKERS} uvicorn workers", "cpus": os.cpu_count(),
                              "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    try:
        with _process([python, "-m", "gunicorn", "-c", "project/gunicorn.conf.py", "project.asgi:application"],
                      server_env) as server:
            _wait_http(f"{base}/health/live", server)
            result["direct_defer"] = _direct_defer(params["requests"])
            result["post_jobs"] = {}
            for clients in CONCURRENCY:
                cpu = _cpu_seconds(server.pid)
                figures = asyncio.run(_post_jobs(base, key, clients, params["requests"]))
                # Load-independent: the web server's CPU per request (the machine may be shared).
                figures["server_cpu_ms_per_request"] = round(
                    (_cpu_seconds(server.pid) - cpu) * 1000 / (figures["requests"] + 5 * clients), 2)
                result["post_jobs"][str(clients)] = figures
            result["batch"] = _batches(base, key, params["batches"], params["batch_size"])
            with _cursor() as cursor:
                cursor.execute("DELETE FROM procrastinate_jobs")  # the SSE run starts on an empty queue
            worker_env = {**env, "SKIPLOCK_IMPORT_PATHS": "bench.api", "SKIPLOCK_BENCH_API_WORKER": "1",
                          "SKIPLOCK_FETCH_POLL_INTERVAL": "0.2"}
            with _process([python, "manage.py", "worker", "--queues", "bench_api", "--concurrency",
                           str(max(4, params["sse_jobs"]))], worker_env):
                result["sse"] = asyncio.run(_sse(base, key, params["sse_jobs"], params["sse_steps"]))
    finally:
        with contextlib.suppress(Exception), _cursor() as cursor:
            cursor.execute("DELETE FROM procrastinate_jobs")
        if started_cluster:
            from django.db import connections

            connections.close_all()
            from project.embedded_postgres import EmbeddedPostgres

            EmbeddedPostgres(os.environ["SKIPLOCK_PG_INSTANCE"]).stop()
    direct = result["direct_defer"]["jobs_per_s"]
    one = result["post_jobs"]["1"]["req_per_s"]
    result["one_client_share_of_direct"] = round(one / direct, 3) if direct else None
    five = result["post_jobs"]["5"]
    result["seed_target"] = {"p99_ms_at_5_clients": five["p99_ms"], "target_ms": 100, "met": five["p99_ms"] < 100}
    return result


def report(result: dict[str, Any]) -> str:
    lines = [f"API benchmark ({result['size']}, {result['server']}, {result['cpus']} CPUs, "
             f"load average before {result['load_average_before'][0]})", "",
             "POST /api/jobs    clients  requests   req/s    p50 ms   p95 ms   p99 ms   server CPU ms/req"]
    for row in result["post_jobs"].values():
        lines.append(f"                  {row['clients']:>7}  {row['requests']:>8}  {row['req_per_s']:>6}  "
                     f"{row['p50_ms']:>8}  {row['p95_ms']:>7}  {row['p99_ms']:>7}   {row['server_cpu_ms_per_request']:>8}")
    if "direct_defer" in result:
        lines += ["", f"direct job_defer() in this run: {result['direct_defer']['jobs_per_s']} jobs/s; "
                      f"one client over HTTP reaches {100 * result['one_client_share_of_direct']:.0f} % of it"]
    batch = result["batch"]
    lines += ["", f"POST /api/jobs/batch  {batch['batches']} × {batch['batch_size']} jobs: {batch['jobs_per_s']} jobs/s, "
                  f"p50 {batch['p50_ms']} ms per batch"]
    sse = result["sse"]
    lines += ["", f"SSE report_progress → client ({sse['jobs']} jobs × {sse['reports_per_job']} reports, "
                  f"{sse['streams']} streams, {sse['delivered']}/{sse['reported']} delivered):",
              f"  per-job stream   p50 {sse['per_job_stream']['p50_ms']} ms  p95 {sse['per_job_stream']['p95_ms']} ms  "
              f"p99 {sse['per_job_stream']['p99_ms']} ms  max {sse['per_job_stream']['max_ms']} ms",
              f"  multi-job stream p50 {sse['multi_job_stream']['p50_ms']} ms  p95 {sse['multi_job_stream']['p95_ms']} ms  "
              f"p99 {sse['multi_job_stream']['p99_ms']} ms",
              "", f"seed target (p99 < 100 ms at 5 clients): {'met' if result['seed_target']['met'] else 'NOT met'} "
                  f"({result['seed_target']['p99_ms_at_5_clients']} ms)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.api", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--size", choices=sorted(SIZES), default="small")
    for name in SIZES:
        group.add_argument(f"--{name}", dest="size", action="store_const", const=name, help=f"--size {name}")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    result = run(args.size)
    print(json.dumps(result, indent=2) if args.json else report(result))


if __name__ == "__main__":
    main()
