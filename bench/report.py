"""The printed table of figures and ratios, and docs/benchmarks.md, from a results dictionary."""

from __future__ import annotations

import json
from typing import Any

SYSTEMS = [
    ("skiplock", "Skiplock"),
    ("procrastinate", "bare procrastinate"),
    ("celery", "Celery+Redis"),
    ("celery_backend", "Celery+Redis+results"),
    ("sql", "SQL limit"),
]
LABEL = dict(SYSTEMS)


# --- formatting -----------------------------------------------------------------------------------


def num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    if digits == 0 and abs(value) >= 10:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.{max(digits, 1)}f}" if abs(value) >= 10 else f"{value:,.{max(digits, 2)}f}"


def fig(figure: dict[str, Any] | None, digits: int = 0) -> str:
    """median (min–max)"""
    if not figure or figure.get("median") is None:
        return "–"
    if len(figure.get("runs", [])) <= 1:
        return num(figure["median"], digits)
    return f"{num(figure['median'], digits)} ({num(figure['min'], digits)}–{num(figure['max'], digits)})"


def median(figure: dict[str, Any] | None) -> float | None:
    return None if not figure else figure.get("median")


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=False))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) for row in rows]
    return "\n".join(out)


def present(bench: dict[str, Any], keys: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, label) for k, label in keys if k in bench]


# --- sections: (title, header, rows, note) ----------------------------------------------------------

Section = tuple[str, list[str], list[list[str]], str]


def processing_section(data: dict[str, Any]) -> Section | None:
    result = data["benchmarks"].get("processing", {})
    rows_in = result.get("rows")
    if not rows_in:
        return None
    systems = [(k, lab) for k, lab in SYSTEMS if any(k in r for r in rows_in.values())]
    header = ["job", "conc.", "proc."] + [lab for _, lab in systems] + [
        "SL/proc.", "SL/Celery", "SL/Celery+res", "SL/SQL"]
    rows = []
    for row in rows_in.values():
        skiplock = median(row.get("skiplock", {}).get("rate"))
        cells = ["no-op" if row["task"] == "noop" else "10 ms I/O", str(row["concurrency"]), str(row["processes"])]
        cells += [fig(row.get(k, {}).get("rate")) for k, _ in systems]
        cells += [ratio(skiplock, median(row.get(k, {}).get("rate")))
                  for k in ("procrastinate", "celery", "celery_backend", "sql")]
        rows.append(cells)
    note = ("jobs/s, median (min–max) of the runs; SL = Skiplock; the SQL limit runs at "
            "concurrency × processes connections.")
    return "Processing rate (pre-filled queue, drained)", header, rows, note


def enqueue_section(data: dict[str, Any]) -> Section | None:
    result = data["benchmarks"].get("enqueue")
    if not result or ("error" in result and len(result) <= 4):
        return None
    systems = present(result, SYSTEMS)
    header = ["enqueue"] + [lab for _, lab in systems] + ["SL/proc.", "SL/Celery", "SL/Celery+res", "SL/SQL"]
    rows = []
    for kind, label in (("single", "one at a time"), ("batch", "batches of 1,000")):
        skiplock = median(result.get("skiplock", {}).get(kind))
        rows.append([label] + [fig(result[k].get(kind)) for k, _ in systems] + [
            ratio(skiplock, median(result.get(k, {}).get(kind)))
            for k in ("procrastinate", "celery", "celery_backend", "sql")])
    celery_single = median(result.get("celery", {}).get("single"))
    celery_batch = median(result.get("celery", {}).get("batch"))
    for label, value in http_enqueue(data):
        versus = celery_batch if "batch" in label else celery_single
        cells = [label, num(value)] + ["–"] * (len(systems) - 1)
        cells += ["–", ratio(value, versus), "–", "–"]
        rows.append(cells)
    return "Enqueue rate", header, rows, "jobs/s, median (min–max); one commit per job (one at a time) or per batch."


def http_enqueue(data: dict[str, Any]) -> list[tuple[str, float | None]]:
    """Enqueue over HTTP (bench/api.py, one run each): POST /api/jobs at 1 client, and the batch endpoint."""
    api = data["benchmarks"].get("api") or {}
    rows: list[tuple[str, float | None]] = []
    one = (api.get("post_jobs") or {}).get("1")
    if isinstance(one, dict):
        rows.append(("over HTTP, POST /api/jobs, 1 client", one.get("req_per_s")))
    batch = api.get("batch")
    if isinstance(batch, dict):
        rows.append((f"over HTTP, POST /api/jobs/batch ({batch.get('batch_size')} per request)", batch.get("jobs_per_s")))
    return rows


def api_section(data: dict[str, Any]) -> Section | None:
    api = data["benchmarks"].get("api")
    if not api or "post_jobs" not in api:
        return None
    rows = []
    for clients, row in api["post_jobs"].items():
        rows.append([f"POST /api/jobs, {clients} client(s)", num(row.get("req_per_s")), num(row.get("p50_ms"), 1),
                     num(row.get("p95_ms"), 1), num(row.get("p99_ms"), 1), f"{row.get('errors', 0)} errors"])
    batch = api.get("batch") or {}
    if batch:
        rows.append([f"POST /api/jobs/batch ({batch.get('batch_size')} jobs)", f"{num(batch.get('jobs_per_s'))} jobs/s",
                     num(batch.get("p50_ms"), 1), num(batch.get("p95_ms"), 1), num(batch.get("p99_ms"), 1), ""])
    sse = api.get("sse") or {}
    for key, label in (("per_job_stream", "report_progress → SSE, per-job stream"),
                       ("multi_job_stream", "report_progress → SSE, multi-job stream")):
        lat = sse.get(key)
        if isinstance(lat, dict):
            rows.append([label, "", num(lat.get("p50_ms"), 1), num(lat.get("p95_ms"), 1), num(lat.get("p99_ms"), 1),
                         f"{sse.get('delivered')}/{sse.get('reported')} delivered"])
    note = (f"from bench/api.py ({api.get('server')}, one run per figure); requests/s and latency in ms. "
            "SSE: latency from the report_progress call to the event's arrival at the client.")
    return "API latency and progress delivery (over HTTP)", ["endpoint", "req/s", "p50 ms", "p95 ms", "p99 ms", ""], rows, note


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if isinstance(value, dict) and not ("median" in value and "min" in value):
        for key, inner in value.items():
            out += flatten(inner, f"{prefix}.{key}" if prefix else str(key))
    else:
        out.append((prefix, value))
    return out


def pickup_section(data: dict[str, Any]) -> Section | None:
    result = data["benchmarks"].get("pickup")
    if not result:
        return None
    systems = [(k, lab) for k, lab in present(result, SYSTEMS) if isinstance(result[k], dict)]
    header = ["system", "p50 ms", "p95 ms", "p99 ms", "max ms", "enqueue call p50 ms",
              "after the call p50", "p95", "p99"]
    rows = []
    for key, label in systems:
        lat = result[key].get("latency_ms", {})
        enq = result[key].get("enqueue_ms", {})
        after = result[key].get("after_enqueue_ms", {})
        rows.append([label, num(lat.get("p50"), 1), num(lat.get("p95"), 1), num(lat.get("p99"), 1),
                     num(lat.get("max"), 1), num(enq.get("p50"), 1) if enq else "–",
                     num(after.get("p50"), 1), num(after.get("p95"), 1), num(after.get("p99"), 1)])
    note = (f"{result.get('samples')} samples, idle worker at concurrency {result.get('concurrency')}, "
            "from the enqueue call to the task's first line (the enqueue call included); "
            "'after the call' = the same less the enqueue call's own time (the worker's share).")
    return "Pickup latency (idle worker, LISTEN/NOTIFY)", header, rows, note


def endtoend_section(data: dict[str, Any]) -> Section | None:
    result = data["benchmarks"].get("endtoend")
    if not result:
        return None
    systems = [(k, lab) for k, lab in present(result, SYSTEMS) if isinstance(result[k], dict)]
    header = ["system", "jobs/s", "worker still busy after last enqueue (ms)", "runs", "Skiplock / this"]
    sl = median(result.get("skiplock", {}).get("rate"))
    rows = [[label, fig(result[k].get("rate")), fig(result[k].get("drain_after_last_enqueue_ms")),
             str(len(result[k].get("rate", {}).get("runs", []))), ratio(sl, median(result[k].get("rate")))]
            for k, label in systems]
    note = (f"{result.get('jobs'):,} no-op jobs enqueued one by one into a running worker "
            f"(concurrency {result.get('concurrency')}); rate over first enqueue → last job done.")
    return "End to end", header, rows, note


def _paired(point: dict[str, Any], first: dict[str, Any]) -> dict[str, Any]:
    """The empty-database figures a growth point is compared with: those measured beside it
    (paired, alternating drains), else the first point's."""
    return point.get("paired_empty") or first


def growth_section(data: dict[str, Any]) -> Section | None:
    result = data["benchmarks"].get("growth")
    if not result or not result.get("points"):
        return None
    points = result["points"]
    first = points[0]
    header = ["finished jobs", "tables MB", "fill s", "no-op jobs/s", "empty beside it", "vs empty", "pickup p50",
              "p95", "p99", "p50 vs empty"]
    rows = []
    for p in points:
        empty = _paired(p, first)
        rows.append([f"{p['finished_jobs']:,}", num(p.get("table_mb"), 1), num(p.get("fill_seconds"), 1),
                     fig(p["rate"]), fig(empty["rate"]), ratio(median(p["rate"]), median(empty["rate"])),
                     num(p["pickup_ms"].get("p50"), 1), num(p["pickup_ms"].get("p95"), 1),
                     num(p["pickup_ms"].get("p99"), 1), ratio(p["pickup_ms"].get("p50"), empty["pickup_ms"].get("p50"))])
    paired = " Each grown database is measured beside an empty one, drains and pickup samples alternating " \
             "(bench/growth.py), so drift of the machine cancels out." if result.get("paired") else ""
    note = f"Skiplock, concurrency {result.get('concurrency')}, one process; pickup latency in ms.{paired}"
    return "Growth (finished jobs in the tables)", header, rows, note


def flow_section(data: dict[str, Any]) -> Section | None:
    result = data["benchmarks"].get("flow")
    if not result or "ratio" not in result:
        return None
    rows = []
    for label, side in (("workers of `default`", result), ("workers of every queue", result.get("every_queue"))):
        if not side or side.get("ratio") is None:
            continue
        waiting = f"{side['limited_jobs_waiting']:,}"
        rows.append([label, f"{waiting} jobs scheduled later, nothing steered", fig(side["rate_without_flow_control"]),
                     "1.00×"])
        rows.append([label, f"{waiting} jobs due but held by limits and a pause", fig(side["rate_with_limits_elsewhere"]),
                     f"{side['ratio']:.2f}×"])
    return ("Flow control: claim rate with limits on another queue", ["workers", "other queues", "no-op jobs/s", "ratio"],
            rows, f"Skiplock, {result['concurrency']} slots × {result['processes']} process; alternate drains of "
            "the same jobs on `default` (bench/flow.py); the other queues hold the same 2,000 jobs that may not run now "
            "on both sides, so the ratio is what flow control itself costs a claim.")


def profile_section(data: dict[str, Any]) -> Section | None:
    result = data["benchmarks"].get("profile")
    if not result or "skiplock" not in result:
        return None
    keys = [k for k in ("skiplock", "procrastinate") if k in result]
    metrics = [
        ("jobs/s while measured", "rate", 0),
        ("wall ms per job", "wall_ms_per_job", 2),
        ("round trips (top-level statements) per job", "round_trips_per_job", 2),
        ("worker CPU ms per job", "worker_cpu_ms_per_job", 2),
        ("PostgreSQL CPU ms per job", "server_cpu_ms_per_job", 2),
        ("transactions per job", "commits_per_job", 2),
        ("WAL bytes per job", "wal_bytes_per_job", 0),
    ]
    header = ["per job"] + [LABEL[k] for k in keys] + ["SL − proc."]
    rows = []
    for label, key, digits in metrics:
        values = [result[k].get(key) for k in keys]
        diff = values[0] - values[1] if len(values) == 2 and None not in values else None
        rows.append([label] + [num(v, digits) for v in values] + [num(diff, digits)])
    return ("Where the time goes (no-op jobs, concurrency 4, one process)", header, rows,
            f"{result['skiplock'].get('jobs')} jobs drained with pg_stat_statements and no profiler attached "
            "(cProfile would inflate the per-job database figures several-fold).")


def targets_section(data: dict[str, Any]) -> Section | None:
    """Issues 12's and 15's targets, each as measured in this run (ratios between systems of the same run)."""
    b = data["benchmarks"]
    rows: list[list[str]] = []
    proc = b.get("processing", {}).get("rows", {})

    def rate(row: dict[str, Any], key: str) -> float | None:
        return median(row.get(key, {}).get("rate"))

    def add(name: str, value: float | None, goal: float, shown: str, unit: str = "×", higher: bool = True) -> None:
        if value is None:
            rows.append([name, shown, "–", "not measured"])
            return
        met = value >= goal if higher else value <= goal
        rows.append([name, shown, f"{'≥' if higher else '≤'} {goal:g}{unit}", "met" if met else "NOT met"])

    def share(a: float | None, b_: float | None) -> float | None:
        return a / b_ if a and b_ else None

    for shape in ("c4/p1", "c16/p2"):
        row = proc.get(f"noop/{shape}", {})
        for key, goal, label in (("celery", 1.5, "Celery+Redis"), ("procrastinate", 2.0, "bare procrastinate")):
            value = share(rate(row, "skiplock"), rate(row, key))
            add(f"no-op {shape}: Skiplock / {label}", value, goal, f"{value:.2f}×" if value else "–")
    io16 = rate(proc.get("io10/c16/p1", {}), "skiplock")
    add("10 ms jobs c16/p1: share of the ideal 1,600/s", io16 / 16 if io16 else None, 75,
        f"{io16 / 16:.0f} %" if io16 else "–", unit=" %")
    enq = b.get("enqueue", {})
    direct = median(enq.get("skiplock", {}).get("single"))
    for kind, other, goal in (("single", "celery", 1.0), ("batch", "procrastinate", 1.0)):
        value = share(median(enq.get("skiplock", {}).get(kind)), median(enq.get(other, {}).get(kind)))
        add(f"enqueue {kind}: Skiplock / {LABEL.get(other, other)}", value, goal, f"{value:.2f}×" if value else "–")
    pick = b.get("pickup", {}).get("skiplock", {}).get("latency_ms", {})
    add("pickup p50 (enqueue call → start)", pick.get("p50"), 3, f"{num(pick.get('p50'), 1)} ms", unit=" ms", higher=False)
    add("pickup p99 (enqueue call → start)", pick.get("p99"), 10, f"{num(pick.get('p99'), 1)} ms", unit=" ms", higher=False)
    api = b.get("api") or {}
    posts = api.get("post_jobs") or {}
    one = (posts.get("1") or {}).get("req_per_s")
    # bench/api.py measures job_defer() on its own server's database in the same run; else the enqueue section's
    direct = (api.get("direct_defer") or {}).get("jobs_per_s") or direct
    value = share(one, direct)
    add("POST /api/jobs, 1 client / direct defer()", value, 0.5, f"{value:.2f}×" if value else "–")
    five = (posts.get("5") or {}).get("p99_ms")
    add("POST /api/jobs, 5 clients: p99", five, 50, f"{num(five, 1)} ms", unit=" ms", higher=False)
    prof = b.get("profile") or {}
    for key, label in (("commits_per_job", "commits"), ("round_trips_per_job", "round trips"),
                       ("wal_bytes_per_job", "WAL bytes"), ("server_cpu_ms_per_job", "PostgreSQL CPU")):
        value = share((prof.get("skiplock") or {}).get(key), (prof.get("procrastinate") or {}).get(key))
        add(f"{label} per job: Skiplock / bare procrastinate", value, 1.5, f"{value:.2f}×" if value else "–",
            higher=False)
    points = b.get("growth", {}).get("points", [])
    if len(points) >= 2:
        last = points[-1]
        empty = _paired(last, points[0])
        r = (median(last["rate"]) or 0) / (median(empty["rate"]) or 1)
        add(f"rate at {last['finished_jobs']:,} finished / empty", r, 0.9, f"{r:.2f}×")
        p = (last["pickup_ms"].get("p50") or 0) / (empty["pickup_ms"].get("p50") or 1)
        add(f"pickup p50 at {last['finished_jobs']:,} finished / empty", p, 1.1, f"{p:.2f}×", higher=False)
    admin = b.get("admin") or {}
    pages = admin.get("pages") or {}
    if pages:
        name, slowest = max(((n, v.get("median_ms") or 0) for n, v in pages.items()), key=lambda item: item[1])
        add(f"admin pages at {admin.get('rows', 0):,} jobs: slowest median ({name})", slowest, 300,
            f"{slowest:.0f} ms", unit=" ms", higher=False)
    flow = b.get("flow") or {}
    value = flow.get("ratio")
    add("claim rate, limits on another queue / none (issue 15; workers of their queue)", value, 0.9,
        f"{value:.2f}×" if value else "–")
    return "Targets (issues 12 and 15)", ["target", "measured", "goal", "status"], rows, ""


def generic_section(data: dict[str, Any], name: str, title: str) -> Section | None:
    result = data["benchmarks"].get(name)
    if not result:
        return None
    rows = []
    for key, value in flatten({k: v for k, v in result.items() if k not in ("load_before", "load_after")}):
        if isinstance(value, dict):
            shown = fig(value, 1)
        elif isinstance(value, list):
            shown = json.dumps(value)[:120]
        else:
            shown = str(value)[:160]
        if key.endswith(".plan") or key.endswith(".sql"):
            continue
        rows.append([key, shown])
    return title, ["figure", "value"], rows[:60], f"from bench/{name}.py"


def sections(data: dict[str, Any]) -> list[Section]:
    found = [
        processing_section(data), enqueue_section(data), pickup_section(data), endtoend_section(data),
        growth_section(data), flow_section(data), profile_section(data), api_section(data) or generic_section(data, "api", "API (bench/api.py)"),
        generic_section(data, "admin", "Admin console at scale (bench/admin.py)"), targets_section(data),
    ]
    return [s for s in found if s is not None]


def table(data: dict[str, Any]) -> str:
    out = [f"Skiplock benchmarks — size {data.get('size')}, {data.get('total_seconds', '?')} s"]
    for title, header, rows, note in sections(data):
        out += ["", f"== {title}", text_table(header, rows)]
        if note:
            out.append(f"   {note}")
    errors = [f"{name}: {r['error']}" for name, r in data["benchmarks"].items() if isinstance(r, dict) and r.get("error")]
    if errors:
        out += ["", "errors:"] + [f"  {e[:300]}" for e in errors]
    costs = biggest_costs(data)
    if costs:
        out += ["", "== Three biggest per-job costs (Skiplock)"]
        out += [f"  {i}. {c['what']}: {c['ms']:.2f} ms/job — {c['remedy']}" for i, c in enumerate(costs, 1)]
    return "\n".join(out)


# --- the per-job costs ----------------------------------------------------------------------------

REMEDIES = {
    "claim": "claim for more free slots per round trip (a short debounce before claiming, or a prefetch of a "
             "few jobs) and keep the lock probe index-backed",
    "finish": "larger finish batches (a longer flush window or more concurrency), fewer indexes on the side "
              "row, and no side-row update for jobs that report nothing",
    "progress": "report progress less often (SKIPLOCK_PROGRESS_INTERVAL)",
    "commits": "fewer transactions per job: larger claim and finish batches, or synchronous_commit = off for "
               "the worker's own statements (a crash re-runs at most the last fraction of a second of work)",
    "python": "less Python per job: the asyncio task per job, psycopg's parameter adaptation of the finish "
              "arrays and the JSON encoding of results",
}


def biggest_costs(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The three largest measured costs per Skiplock job, each with what would remove it."""
    prof = data["benchmarks"].get("profile", {}).get("skiplock")
    if not prof:
        return []
    fsync = data.get("environment", {}).get("fsync_ms")
    items: list[dict[str, Any]] = []
    for stmt in prof.get("top_statements", []):
        if not stmt["toplevel"]:
            continue
        q = stmt["query"]
        if "candidate AS MATERIALIZED" in q:
            items.append({"key": "claim", "what": "claiming jobs (the batch claim statement)", "ms": stmt["ms_per_job"]})
        elif "WITH input AS" in q and "ended AS" in q:
            items.append({"key": "finish", "what": "finishing jobs (the batch finish statement)",
                          "ms": stmt["ms_per_job"]})
        elif "WITH mine AS" in q:
            items.append({"key": "progress", "what": "progress writes", "ms": stmt["ms_per_job"]})
    if fsync and prof.get("commits_per_job"):
        items.append({"key": "commits", "what": f"waiting for {prof['commits_per_job']:.2f} commits per job to reach "
                      f"the disk (fdatasync ≈ {fsync:.1f} ms here; an upper bound, group commit lets concurrent "
                      "jobs share some flushes)",
                      "ms": prof["commits_per_job"] * fsync})
    if prof.get("worker_cpu_ms_per_job"):
        items.append({"key": "python", "what": "the worker's own Python CPU (psycopg, asyncio, Skiplock's loop)",
                      "ms": prof["worker_cpu_ms_per_job"]})
    items.sort(key=lambda c: c["ms"], reverse=True)
    for item in items:
        item["remedy"] = REMEDIES[item["key"]]
    return items[:3]


# --- docs/benchmarks.md ---------------------------------------------------------------------------


def markdown(data: dict[str, Any]) -> str:
    env = data.get("environment", {})
    pg = env.get("postgresql_settings", {})
    packages = env.get("packages", {})
    celery = env.get("celery_packages", {})
    out = [
        "# Benchmarks",
        "",
        "*This file is regenerated by `make bench` (`python -m bench --size full`); edit `bench/report.py`, "
        "not this file.*",
        "",
        f"Measured {data.get('started_at', '?')}, size `{data.get('size')}`, whole suite "
        f"{data.get('total_seconds', '?')} s. Raw figures: `bench/results/latest-{data.get('size')}.json` "
        "(git-ignored; rerun to get yours).",
        "",
        "## Read this first",
        "",
        _load_paragraph(env),
        f"- **Commits wait for the disk.** PostgreSQL runs with its durable defaults (fsync on, "
        f"synchronous_commit {pg.get('synchronous_commit', '?')}); one 8 kB write + fdatasync took "
        f"**{num(env.get('fsync_ms'), 2)} ms** (median) on this disk, so every round trip that commits costs "
        "at least that much unless group commit shares it. Redis runs without persistence (as a broker "
        "usually does), so Celery pays no such wait: its figures are what a non-durable broker gives.",
        f"- **Duration.** The suite took {num((data.get('total_seconds') or 0) / 60, 1)} min in this run; "
        "its sizes aim at about 25 min on two idle cores (drains adapt their job counts to the measured rate, "
        "enqueue runs have a time cap, end-to-end repeats stop after a budget), so a loaded machine stretches it.",
        "- Everything is measured on one machine in one run: the same PostgreSQL cluster for Skiplock, bare "
        "procrastinate and the SQL limit (three databases), the same task bodies everywhere.",
        "",
        "## Method",
        "",
        "| system | how it runs |",
        "|---|---|",
        "| Skiplock | as users run it: `jobs.services.job_defer` / `job_defer_batch` to enqueue; workers are "
        "`jobs.worker.run_worker` (one statement claims for every free slot, one statement finishes a batch "
        "with the side row, attempt row and counters; no NOTIFY without a listener) in "
        "`python -m bench.worker_skiplock` processes, Django with `DATABASE_URL` on the bench database, DEBUG off |",
        "| bare procrastinate | a plain `procrastinate.App` with `PsycopgConnector` on its own database (no "
        "Skiplock tables or triggers), the same worker settings (pool of concurrency + 3, LISTEN/NOTIFY, "
        "delete_jobs never, heartbeat 10 s) |",
        "| Celery+Redis | Celery 5 with Debian's redis-server (no persistence) as broker, prefork pool, "
        "default settings; installed by the bench into `bench/.venv`, never a Skiplock dependency |",
        "| Celery+Redis+results | the same with Redis as result backend (every task stores its result) |",
        "| SQL limit | `pgbench`: one table, one partial index; claim = `UPDATE … WHERE id = (SELECT … FOR "
        "UPDATE SKIP LOCKED)`, complete = `UPDATE` by id, each its own transaction, prepared; enqueue = one "
        "`INSERT` per transaction or `INSERT … SELECT` of 1,000 rows |",
        "",
        "Task bodies: *no-op* (returns at once) and *10 ms I/O* (`await asyncio.sleep(0.01)` in the "
        "procrastinate-based systems, `time.sleep(0.01)` in Celery's prefork children, `\\sleep 10 ms` in "
        "pgbench); the pickup probe sends its start time over UDP as its first act.",
        "",
        "- **Processing rate**: the workers are started and warmed up (a few jobs through each) and idle; "
        "the queue is filled in one commit (Celery: 1 list renamed into the queue at once); rate = jobs / time "
        "until no job is left. The job count adapts to the previous run so a drain lasts about "
        "a second (0.5 s at --size small); median (min–max) of 3 drains.",
        "- **Enqueue**: no worker running; one job per call (each its own commit) and 1,000 per call; each run "
        "stops at its job count or after a time cap. Celery's batch is 1,000 `apply_async` through one "
        "producer (Celery has no bulk publish).",
        "- **Pickup latency**: idle worker at concurrency 4; per sample: note the time, enqueue one job, the task "
        "sends its start time; pause 20–40 ms; nearest-rank percentiles. The enqueue call is inside the figure.",
        "- **End to end**: jobs enqueued one by one (one commit each) into a running worker at concurrency 4.",
        "- **Growth**: finished jobs cloned in SQL from a really-run job (all its rows: queue row, events, job "
        "record, attempt), indexes rebuilt, `VACUUM ANALYZE`; then the no-op rate and pickup latency.",
        "- **Where the time goes**: the same drain with no profiler attached: CPU seconds of the worker and of "
        "all PostgreSQL processes, and `pg_stat_statements` with `track = all` (round trips = top-level "
        "statements; statements run inside functions show separately), commits and WAL bytes, for Skiplock "
        "and bare procrastinate.",
        "",
        "## Hardware and software",
        "",
        md_table(["", ""], [
            ["CPU", f"{env.get('cpu')} ({env.get('cpus')} cores)"],
            ["memory", f"{env.get('memory_gib')} GiB"],
            ["kernel", str(env.get("kernel"))],
            ["Python", str(env.get("python"))],
            ["PostgreSQL", str(env.get("postgresql", "")).split(" on ")[0]],
            ["PostgreSQL settings", ", ".join(f"{k}={v}" for k, v in pg.items() if k != "server_version")],
            ["fdatasync of 8 kB", f"{num(env.get('fsync_ms'), 2)} ms"],
            ["packages", ", ".join(f"{k} {v}" for k, v in packages.items() if v)],
            ["Celery side", ", ".join(f"{k} {v}" for k, v in celery.items()) + (f", redis-server {env['redis']}" if env.get("redis") else "")],
        ]),
        "",
    ]
    for title, header, rows, note in sections(data):
        out += [f"## {title}", "", md_table(header, rows), ""]
        if note:
            out += [note, ""]
    out += design_notes(data)
    out += profile_details(data)
    costs = biggest_costs(data)
    if costs:
        out += ["## The three biggest costs per Skiplock job, and what would remove them", ""]
        for i, cost in enumerate(costs, 1):
            out.append(f"{i}. **{cost['what']}: {cost['ms']:.2f} ms per job.** {cost['remedy'][0].upper() + cost['remedy'][1:]}.")
        out.append("")
    if data.get("notes"):
        out += ["## Notes from this run", ""] + [f"- {n}" for n in data["notes"]] + [""]
    errors = [f"- `{name}`: {r['error'][:400]}" for name, r in data["benchmarks"].items()
              if isinstance(r, dict) and r.get("error")]
    if errors:
        out += ["## Benchmarks that failed in this run", "", *errors, ""]
    out += [
        "## Reproduce",
        "",
        "```sh",
        "make bench                                   # the whole suite, ~25 min on 2 cores; rewrites this file",
        ".venv/bin/python -m bench --size small --only processing   # one benchmark, small",
        ".venv/bin/python -m bench --size small --only pickup --no-celery",
        ".venv/bin/python -m bench --report-only bench/results/latest-full.json  # redo the table and this file",
        "```",
        "",
        "Benchmarks: " + ", ".join(f"`{n}`" for n in ("enqueue", "processing", "pickup", "endtoend", "growth",
                                                      "profile", "api", "admin")) + ". "
        "The bench starts its own embedded PostgreSQL (instance `bench`) and its own Redis on a free port, "
        "installs Celery into `bench/.venv` and Debian's `redis-server` with apt on first use "
        "(`python -m bench.setup_celery`), and stops what it started. `tests/test_bench.py` runs the same "
        "code at a tiny size in the test suite (no figures are asserted). Per-run timings of each benchmark, "
        "the load average around it and worker logs are under `bench/results/`.",
        "",
    ]
    return "\n".join(out)


def profile_details(data: dict[str, Any]) -> list[str]:
    result = data["benchmarks"].get("profile", {})
    out: list[str] = []
    for key in ("skiplock", "procrastinate"):
        prof = result.get(key)
        if not prof:
            continue
        out += [f"### {LABEL[key]}: top statements by total time (per job)", ""]
        out.append(md_table(
            ["ms/job", "calls/job", "mean ms", "level", "statement"],
            [[num(s["ms_per_job"], 3), num(s["calls_per_job"], 2), num(s["mean_ms"], 3),
              "top" if s["toplevel"] else "in trigger/function", "`" + s["query"][:140].replace("|", "\\|") + "`"]
             for s in prof.get("top_statements", [])[:10]],
        ))
        out.append("")
    return out


DESIGN = {
    "no-op": "**No-op throughput** (against Celery, bare procrastinate and the SQL limit): today every job "
             "costs the worker three round trips and more than one commit of its own (claim, result write, "
             "finish), each firing triggers that update skiplock_job twice and NOTIFY. Claiming up to "
             "`concurrency` jobs in one statement, writing result and final state in the finish statement, and "
             "one trigger UPDATE per transition would cut the round trips and commits per job by more than half; "
             "deleting (or moving) succeeded rows from procrastinate_jobs keeps the hot table small.",
    "10 ms": "**10 ms jobs at concurrency 16**: the ideal is bound by the worker's per-job overhead on 2 shared "
             "cores, not by the 10 ms waits; the same changes as for no-op jobs apply, plus running more than one "
             "process only when a core is free.",
    "enqueue": "**Enqueue one at a time**: each job is its own committed transaction, so the rate is bound by "
               "the disk's fdatasync time here; in real use the enqueue joins the caller's transaction (no "
               "commit of its own), and batches or concurrent callers share commits (group commit).",
    "pickup": "**Pickup latency**: the enqueue call alone includes a commit that waits for the disk; after the "
              "commit, the worker still needs the NOTIFY delivery, one fetch round trip (with its triggers and "
              "commit) and the task start. Claiming without the attempt-row trigger work and skipping the commit "
              "wait for the worker's own claim (synchronous_commit off for that transaction) would bring the "
              "worker's share down to about one round trip.",
    "growth": "**Growth**: fetching uses the partial index on todo jobs, so finished rows cost little; keeping "
              "succeeded rows out of procrastinate_jobs (their history lives in skiplock_job) removes the rest.",
}


def design_notes(data: dict[str, Any]) -> list[str]:
    """For each target not met, the design change that would reach it."""
    section = targets_section(data)
    if section is None:
        return []
    missed = [row[0] for row in section[2] if row[3] == "NOT met"]
    keys = []
    for name in missed:
        for key in DESIGN:
            if key in name and key not in keys:
                keys.append(key)
        if "Skiplock /" in name and "no-op" not in keys and "enqueue" not in name:
            keys.append("no-op")
        if "finished" in name and "growth" not in keys:
            keys.append("growth")
    if not keys:
        return []
    return ["## What would reach the targets not met", ""] + [f"- {DESIGN[k]}" for k in keys] + [""]


def _load_paragraph(env: dict[str, Any]) -> str:
    """What else ran on the machine, judged from the 1-minute load average at the start."""
    start, end = env.get("load_at_start"), env.get("load_at_end")
    loads = f"load average {start} at the start, {end} at the end; each benchmark's own load is in the JSON"
    busy = isinstance(start, list | tuple) and bool(start) and float(start[0]) > 1.5
    if busy:
        return (
            f"- **The machine was shared** while this ran ({loads}): other work ran on the same 2 cores. "
            "Absolute figures are therefore low and noisy; the **ratios** between systems measured in the "
            "same minutes are the figures to read, and even they carry the noise shown by the min–max ranges."
        )
    return (
        f"- **The machine was otherwise idle** ({loads}). The min–max ranges show the run-to-run noise; "
        "the **ratios** between systems measured in the same minutes are the figures to compare."
    )
