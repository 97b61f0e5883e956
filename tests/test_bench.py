"""The benchmark suite's code runs correctly at a tiny size (no figure is asserted: benchmarks are commands).

Real workers, real PostgreSQL (the test cluster), real pgbench and Celery + Redis when installed;
the pgbench and Celery parts are skipped when their tools are absent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection

from bench import endtoend, enqueue, growth, pickup, processing, profiling, report, setup_celery
from bench.common import SIZES, Bench, Target, percentiles, summary
from bench.systems import SkiplockSystem

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def bench() -> Iterator[Bench]:
    """A tiny bench on the test database; drops the extra databases and the bench tasks after."""
    from procrastinate.contrib.django import app

    from jobs import registry

    tasks_before = set(registry._REGISTRY)
    app_tasks_before = set(app.tasks)
    settings = connection.settings_dict
    target = Target(host=str(settings["HOST"]), port=str(settings["PORT"]), user=str(settings["USER"]),
                    password=str(settings["PASSWORD"] or ""), skiplock_db=str(settings["NAME"]))
    yield Bench(size=SIZES["tiny"], target=target)
    for name in set(registry._REGISTRY) - tasks_before:
        del registry._REGISTRY[name]
    for name in set(app.tasks) - app_tasks_before:
        del app.tasks[name]
    target.drop_database(target.procrastinate_db)
    target.drop_database(target.sql_db)


@pytest.fixture
def celery_bench(bench: Bench) -> Iterator[Bench]:
    if not setup_celery.celery_ready():
        pytest.skip("the Celery side is not installed (python -m bench.setup_celery)")
    with setup_celery.RedisServer() as redis:
        bench.redis_url = redis.url
        bench.celery_python = str(setup_celery.venv_python())
        yield bench


def positive(figure: dict[str, Any]) -> bool:
    return figure["median"] is not None and figure["median"] > 0 and figure["min"] <= figure["median"] <= figure["max"]


def test_statistics_are_median_min_max_and_nearest_rank_percentiles() -> None:
    assert summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "runs": [3.0, 1.0, 2.0]}
    latencies = percentiles([float(v) for v in range(1, 101)])
    assert (latencies["p50"], latencies["p95"], latencies["p99"], latencies["n"]) == (50.0, 95.0, 99.0, 100)


def test_processing_drains_skiplock_and_bare_procrastinate_and_the_sql_loop(bench: Bench) -> None:
    result = processing.run(bench, systems=["skiplock", "procrastinate", "sql"])
    for key in ("noop/c2/p1", "io10/c2/p1"):
        row = result["rows"][key]
        assert positive(row["skiplock"]["rate"])
        assert positive(row["procrastinate"]["rate"])
        if bench.has_pgbench:
            assert positive(row["sql"]["rate"])
    # The Skiplock drains went through the real recording path: records and attempts exist and succeeded.
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FILTER (WHERE state <> 'succeeded'), count(*) FROM skiplock_job_view")
        not_succeeded, total = cursor.fetchone()
    assert total >= bench.size.min_jobs
    assert not_succeeded == 0


def test_enqueue_pickup_end_to_end_and_growth_measure_skiplock(bench: Bench) -> None:
    figures = enqueue.run(bench, systems=["skiplock", "procrastinate", "sql"])
    assert positive(figures["skiplock"]["single"])
    assert positive(figures["skiplock"]["batch"])
    assert positive(figures["procrastinate"]["batch"])
    if bench.has_pgbench:
        assert figures["sql"]["batch"]["median"] > figures["sql"]["single"]["median"]
    system = SkiplockSystem(bench.target)
    procs = system.start_workers(2, 1)  # one set of workers for the three (each starts its own in the suite)
    try:
        latency = pickup.sample_running(system, bench.size.pickup_samples)["latency_ms"]
        assert latency["n"] == bench.size.pickup_samples
        assert 0 < latency["p50"] <= latency["p99"]
        assert positive(endtoend.measure(bench, system, procs)["rate"])
        points = growth.run(bench, procs)["points"]
    finally:
        procs.stop()
        system.close()
    assert [p["finished_jobs"] for p in points] == list(bench.size.growth_points)
    assert all(positive(p["rate"]) for p in points)
    assert points[-1]["table_mb"] > points[0]["table_mb"]


def test_profile_attributes_the_time_of_a_drain(bench: Bench) -> None:
    result = profiling.run(bench, systems=["skiplock"])
    for key in ("skiplock",):
        prof = result[key]
        assert prof["jobs"] == bench.size.profile_jobs
        assert prof["worker_cpu_ms_per_job"] > 0
        assert any("candidate AS MATERIALIZED" in s["query"] for s in prof["top_statements"])
        assert prof["round_trips_per_job"] > 0
    data = {"size": "tiny", "environment": {"fsync_ms": 1.0}, "benchmarks": {"profile": result}}
    costs = report.biggest_costs(data)
    assert len(costs) == 3
    assert all(c["ms"] > 0 and c["remedy"] for c in costs)
    doc = report.markdown(data)
    assert "## The three biggest costs per Skiplock job" in doc
    assert "## Reproduce" in doc


def test_celery_side_drains_and_enqueues(celery_bench: Bench) -> None:
    result = processing.run(celery_bench, systems=["celery"])
    assert positive(result["rows"]["noop/c2/p1"]["celery"]["rate"])
    table = report.table({"size": "tiny", "benchmarks": {"processing": result}})
    assert "Celery+Redis" in table
