"""Run Skiplock's benchmarks: `python -m bench [--size small|full] [--only NAME ...]` (or `make bench`).

Starts its own embedded PostgreSQL ("bench" instance) and its own Redis, runs each benchmark,
prints a table of figures and ratios, writes raw JSON under bench/results/ and, for a full run,
regenerates docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, ROOT, SIZES, Bench, Target, log, python_env

# Name → module; each module has run(bench) -> dict. api and admin are other engineers' modules
# exposing run(size) -> dict, run in their own process.
BENCHMARKS = {
    "enqueue": "bench.enqueue",
    "processing": "bench.processing",
    "pickup": "bench.pickup",
    "endtoend": "bench.endtoend",
    "growth": "bench.growth",
    "flow": "bench.flow",
    "profile": "bench.profiling",
    "api": "bench.api",
    "admin": "bench.admin",
}
EXTERNAL = {"api", "admin"}
NEEDS_CELERY = {"enqueue", "processing", "pickup", "endtoend"}
DOC = ROOT / "docs" / "benchmarks.md"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help=f"run only these benchmarks (repeat or comma-separate): {', '.join(BENCHMARKS)}")
    parser.add_argument("--no-celery", action="store_true", help="skip the Celery + Redis side")
    parser.add_argument("--docs", action="store_true", help="regenerate docs/benchmarks.md (default for a full run)")
    parser.add_argument("--report-only", metavar="JSON", help="regenerate the table and docs from a results file")
    return parser.parse_args(argv)


def selected(args: argparse.Namespace) -> list[str]:
    names = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    return names or list(BENCHMARKS)


def prepare_django(database_url: str) -> None:
    os.environ["DATABASE_URL"] = database_url
    os.environ["DEBUG"] = "false"
    os.environ.setdefault("SECRET_KEY", "bench-" + secrets.token_hex(16))
    os.environ["DJANGO_SETTINGS_MODULE"] = "project.settings"
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def run_external(name: str, size: str, bench: Bench) -> dict[str, Any]:
    """bench/api.py and bench/admin.py: run(size) -> dict, in their own process."""
    if importlib.util.find_spec(BENCHMARKS[name]) is None:
        bench.note(f"{name}: bench/{name}.py is not there; skipped")
        return {"skipped": f"bench/{name}.py is missing"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        code = (
            "import json, sys; from importlib import import_module; "
            f"json.dump(import_module({BENCHMARKS[name]!r}).run({size!r}), open(sys.argv[1], 'w'), default=str)"
        )
        env = {k: v for k, v in python_env().items() if k not in ("DATABASE_URL", "SECRET_KEY", "DEBUG", "LOG_LEVEL")}
        proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"bench/{name}.py failed:\n{proc.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def run_benchmarks(bench: Bench, names: list[str]) -> dict[str, Any]:
    from bench import environment

    results: dict[str, Any] = {}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name in EXTERNAL:
            continue
        log(f"== {name} ({bench.size.name})")
        started = time.monotonic()
        load_before = environment.load()
        try:
            module = importlib.import_module(BENCHMARKS[name])
            result = module.run(bench)
        except Exception as exc:
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"}
            bench.note(f"{name} failed: {type(exc).__name__}: {str(exc)[:300]}")
        result["seconds"] = round(time.monotonic() - started, 1)
        result["load_before"] = load_before
        result["load_after"] = environment.load()
        results[name] = result
        log(f"== {name} done in {result['seconds']} s")
        # Keep what is done so far: an interrupted suite still leaves its figures behind.
        (RESULTS_DIR / f"partial-{bench.size.name}.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from bench import report

    if args.report_only:
        data = json.loads(Path(args.report_only).read_text())
        print(report.table(data))
        DOC.write_text(report.markdown(data))
        print(f"wrote {DOC.relative_to(ROOT)}")
        return 0

    names = selected(args)
    size = SIZES[args.size]
    from project.embedded_postgres import EmbeddedPostgres

    cluster = EmbeddedPostgres("bench")
    log(f"starting the bench PostgreSQL (instance 'bench', port {cluster.port})")
    started_cluster = cluster.start()
    redis = None
    began = time.monotonic()
    try:
        admin = Target(host=str(cluster.socket_dir), port=str(cluster.port), user="postgres", password="",
                       skiplock_db="bench_skiplock")
        admin.recreate_database(admin.skiplock_db)
        prepare_django(cluster.url(admin.skiplock_db))
        target = Target.from_django()
        bench = Bench(size=size, target=target)
        wants_celery = not args.no_celery and any(n in NEEDS_CELERY for n in names)
        if wants_celery:
            from bench import setup_celery

            for line in setup_celery.install(quiet=True):
                bench.note(line)
            if setup_celery.celery_ready():
                redis = setup_celery.RedisServer().start()
                bench.redis_url = redis.url
                bench.celery_python = str(setup_celery.venv_python())
                log(f"Redis {redis.version()} on {redis.url}")
            else:
                bench.note("the Celery side could not be installed; Celery figures are missing")
        from bench import environment

        env = environment.collect(bench)
        if redis is not None:
            env["redis"] = redis.version()
        results = run_benchmarks(bench, names)
        for name in names:
            if name in EXTERNAL:
                log(f"== {name} (external module)")
                t = time.monotonic()
                try:
                    results[name] = run_external(name, size.name, bench)
                except Exception as exc:
                    results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                    bench.note(f"{name} failed: {str(exc)[:300]}")
                results[name]["seconds"] = round(time.monotonic() - t, 1)
        env["load_at_end"] = environment.load()
        data = {
            "size": size.name,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "total_seconds": round(time.monotonic() - began, 1),
            "environment": env,
            "benchmarks": results,
            "notes": bench.notes,
        }
        if bench.celery_versions:
            env["celery_packages"] = bench.celery_versions
        path = save(data)
        print(report.table(data))
        print(f"\nraw results: {path.relative_to(ROOT)}")
        if args.docs or (size.name == "full" and not args.only):
            DOC.parent.mkdir(exist_ok=True)
            DOC.write_text(report.markdown(load_latest(size.name)))
            print(f"wrote {DOC.relative_to(ROOT)}")
        return 0
    finally:
        if redis is not None:
            redis.stop()
        with contextlib.suppress(Exception):
            from django.db import connections

            connections.close_all()
        if started_cluster:
            log("stopping the bench PostgreSQL")
            cluster.stop()


def save(data: dict[str, Any]) -> Path:
    """Write this run, and merge its benchmarks into latest-<size>.json (so --only runs add up)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS_DIR / f"{data['size']}-{stamp}.json"
    path.write_text(json.dumps(data, indent=1, default=str))
    latest = RESULTS_DIR / f"latest-{data['size']}.json"
    merged = json.loads(latest.read_text()) if latest.exists() else {}
    benchmarks = {**merged.get("benchmarks", {}), **data["benchmarks"]}
    latest.write_text(json.dumps({**data, "benchmarks": benchmarks}, indent=1, default=str))
    return path


def load_latest(size: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((RESULTS_DIR / f"latest-{size}.json").read_text())
    return data


if __name__ == "__main__":
    sys.exit(main())
