"""The three example tasks do real work, through the real worker on real PostgreSQL."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from django.conf import settings

from jobs import services
from jobs.examples import documents, routes
from jobs.exceptions import InvalidArguments
from jobs.models import Document, DocumentChunk, JobRecord
from jobs.testing import run_jobs
from tests import core_fixtures
from tests.core_fixtures import FAST_DEPLOY, drain

pytestmark = pytest.mark.django_db(transaction=True)
clean_queue = core_fixtures.clean_queue
listener = core_fixtures.listener


def test_index_document_reads_a_sample_file_and_search_finds_it() -> None:
    for name in ("postgresql-queues.md", "task-design-guide.txt", "route-optimisation.txt"):
        services.job_defer(task_name="index_document", args={"title": name, "path": name})
    run_jobs()
    assert set(JobRecord.objects.values_list("state", flat=True)) == {"succeeded"}
    doc = Document.objects.get(title="postgresql-queues.md")
    text = (settings.BASE_DIR / "samples" / "postgresql-queues.md").read_text()
    clean = documents.normalise(text)
    assert (doc.status, doc.source_path, doc.char_count) == ("indexed", "postgresql-queues.md", len(clean))
    chunks = list(DocumentChunk.objects.filter(document=doc).order_by("position"))
    assert doc.chunk_count == len(chunks) == 4
    assert all(len(c.text) <= 1000 for c in chunks)
    assert chunks[0].text[800:] == chunks[1].text[:200]  # 200 characters of overlap
    assert len(chunks[0].embedding) == 256
    hits = documents.search("skip locked workers")
    assert hits[0]["title"] == "postgresql-queues.md"
    assert documents.search("idempotent outbox")[0]["title"] == "task-design-guide.txt"
    assert documents.search("two-opt")[0]["title"] == "route-optimisation.txt"
    assert documents.search("kubernetes helm chart") == []
    assert doc.job_id is not None
    record = JobRecord.objects.get(pk=doc.job_id)
    assert record.result == {"document_id": doc.pk, "title": doc.title, "characters": len(clean), "chunks": 4}
    assert record.step == "store"


def test_index_document_with_inline_text_and_the_failures_it_reports() -> None:
    ok = services.job_defer(task_name="index_document", args={"title": "inline", "text": "Hello  world\x07!"})
    empty = services.job_defer(task_name="index_document", args={"title": "empty", "text": "  \n "})
    missing = services.job_defer(task_name="index_document", args={"title": "x", "path": "no-such-file.txt"})
    with pytest.raises(InvalidArguments, match=r"'text': text cannot hold NUL characters"):
        services.job_defer(task_name="index_document", args={"title": "nul", "text": "a\x00b"})
    run_jobs(include_scheduled=True)
    assert Document.objects.get(job_id=ok.job_id).status == "indexed"
    assert DocumentChunk.objects.get(document__job_id=ok.job_id).text == "Hello world!"
    failed = Document.objects.get(job_id=empty.job_id)
    assert (failed.status, failed.error) == ("failed", "the document holds no text")
    record = JobRecord.objects.get(pk=missing.job_id)
    assert (record.state, record.error_type) == ("failed", "FileNotFoundError")
    assert Document.objects.get(job_id=missing.job_id).status == "failed"
    with pytest.raises(InvalidArguments, match="path must stay inside"):
        services.job_defer(task_name="index_document", args={"title": "x", "path": "../pyproject.toml"})


def test_deploy_stack_runs_its_steps_with_progress_and_returns_a_report(
    listener: psycopg.Connection[Any],
) -> None:
    job = services.job_defer(task_name="deploy_stack", args={**FAST_DEPLOY, "services": ["api", "db"]})
    run_jobs()
    record = JobRecord.objects.get(pk=job.job_id)
    assert (record.state, record.progress, record.step) == ("succeeded", 100, "done")
    assert record.result is not None
    assert record.result["manifest"] == {"stack": "shop", "environment": "staging", "services": ["api", "db"]}
    assert [s["name"] for s in record.result["services"]] == ["api", "db"]
    assert all(s["healthy"] for s in record.result["services"])
    steps = [n["step"] for n in drain(listener) if n["id"] == job.job_id and n["event"] == "progress"]
    # Coalescing may skip fast steps; those announced come in order, and "done" comes last.
    order = ["validate", "build", "run", "verify", "done"]
    seen = [s for i, s in enumerate(steps) if i == 0 or steps[i - 1] != s]
    assert seen == sorted(seen, key=order.index)
    assert seen[-1] == "done"


def test_optimize_route_reports_progress_within_rounds_and_shortens_the_route(
    listener: psycopg.Connection[Any],
) -> None:
    job = services.job_defer(task_name="optimize_route", args={"points": 150, "seed": 3, "restarts": 3})
    run_jobs(queues=["cpu"])
    record = JobRecord.objects.get(pk=job.job_id)
    assert record.state == "succeeded"
    result = record.result
    assert result is not None
    assert sorted(result["route"]) == list(range(150))
    assert result["length"] < result["initial_length"]
    coordinates = routes.random_points(150, 3)
    assert result["length"] == round(routes.route_length(coordinates, result["route"]), 3)
    progress = [n for n in drain(listener) if n["id"] == job.job_id and n["event"] == "progress"]
    values = [n["progress"] for n in progress]
    assert values == sorted(values), values
    assert record.step.startswith("restart 3/3: best")


def test_route_search_reports_progress_inside_each_round() -> None:
    reports: list[tuple[float, str]] = []
    routes.optimise(routes.random_points(120, 5), max_rounds=50, restarts=2, on_progress=lambda f, s: reports.append((f, s)))
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    first_round = [f for f, s in reports if s == "restart 1/2, 2-opt round 1"]
    # Many reports inside the first round, long before the search converges: a bar that moves.
    assert len(first_round) >= 10
    assert 0 < first_round[0] < first_round[-1] < 0.5
