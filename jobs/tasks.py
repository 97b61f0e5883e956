"""The example tasks: the workloads users move off Celery. Thin adapters over jobs/examples/."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from django.conf import settings
from django.db import transaction
from pydantic import Field

from jobs.context import JobContext
from jobs.examples import deploy, documents, routes
from jobs.models import Document, DocumentChunk
from jobs.registry import RetryPolicy, task


@task(
    queue="default",
    retry=RetryPolicy(max_retries=3, backoff=2, factor=2, max_backoff=10),
    soft_time_limit=600,
    hard_time_limit=900,
    lock="deploy-{stack}-{environment}",
)
def deploy_stack(
    ctx: JobContext,
    *,
    stack: Annotated[str, Field(min_length=1, max_length=63)] = "shop",
    environment: Annotated[str, Field(min_length=1, max_length=63)] = "staging",
    services: Annotated[list[str] | None, Field(min_length=1, max_length=20)] = None,
    build_megabytes: Annotated[int, Field(ge=0, le=1024)] = 32,
    health_checks: Annotated[int, Field(ge=1, le=100)] = 3,
    check_interval: Annotated[float, Field(ge=0, le=60)] = 0.5,
    fail_at_step: Annotated[int | None, Field(ge=1, le=4)] = None,
    fail_times: Annotated[int, Field(ge=0)] = 1,
) -> dict[str, object]:
    """Deploy a stack: validate → build → run → verify, with named steps and progress.

    `fail_at_step` (1-4) makes that step fail on the first `fail_times` attempts, to watch retries.
    """
    deployment = deploy.Deployment(stack, environment, services or ["api", "web", "worker"])

    def maybe_fail(step: int) -> None:
        if fail_at_step == step and ctx.attempt <= fail_times:
            raise deploy.DeployStepFailed(
                f"step {step} ({deploy.STEPS[step - 1]}) failed on attempt {ctx.attempt} (injected)"
            )

    try:
        ctx.report_progress(0, "validate")
        manifest = deploy.validate(deployment)
        maybe_fail(1)
        ctx.report_progress(10, "build")
        digest = deploy.build(
            deployment, build_megabytes, lambda f: ctx.report_progress(10 + 40 * f, "build")
        )
        maybe_fail(2)
        ctx.report_progress(50, "run")
        deploy.run(deployment, digest)
        maybe_fail(3)
        ctx.report_progress(75, "verify")
        report = deploy.verify(
            deployment, digest, health_checks, check_interval,
            lambda f: ctx.report_progress(75 + 25 * f, "verify"),
        )
        maybe_fail(4)
    finally:
        deploy.tear_down(deployment)
    ctx.report_progress(100, "done")
    return {"manifest": manifest, "release": digest[:12], "services": report, "attempt": ctx.attempt}


def _check_document(args: dict[str, object]) -> None:
    if (args["text"] is None) == (args["path"] is None):
        raise ValueError("give either 'text' or 'path'")
    if args["path"] is not None:
        _document_path(str(args["path"]))


@task(queue="default", soft_time_limit=1800, hard_time_limit=3600, check=_check_document)
def index_document(
    ctx: JobContext,
    *,
    title: Annotated[str, Field(min_length=1, max_length=255)],
    text: str | None = None,
    path: Annotated[str | None, Field(min_length=1, max_length=1024)] = None,
) -> dict[str, object]:
    """Index a document: normalise → chunk (1,000 chars, 200 overlap) → embed → store for search.

    Give the text itself, or `path`, a file under SKIPLOCK_DOCUMENTS_DIR.
    """
    document, _ = Document.objects.update_or_create(
        job_id=ctx.job_id, defaults={"title": title, "status": Document.Status.PROCESSING, "error": ""}
    )
    try:
        ctx.report_progress(5, "read")
        raw = text if text is not None else _read_document(path or "")
        document.source_path = path or ""
        ctx.report_progress(10, "normalise")
        clean = documents.normalise(raw)
        if not clean:
            raise ValueError("the document holds no text")
        ctx.report_progress(20, "chunk")
        pieces = documents.chunk(clean)
        vectors = []
        for number, piece in enumerate(pieces, start=1):
            vectors.append(documents.embed(piece))
            ctx.report_progress(20 + 60 * number / len(pieces), f"embed {number}/{len(pieces)}")
        ctx.report_progress(85, "store")
        with transaction.atomic():
            DocumentChunk.objects.filter(document=document).delete()
            DocumentChunk.objects.bulk_create(
                DocumentChunk(document=document, position=i, text=piece, embedding=vector)
                for i, (piece, vector) in enumerate(zip(pieces, vectors, strict=True))
            )
            document.status = Document.Status.INDEXED
            document.char_count = len(clean)
            document.chunk_count = len(pieces)
            document.save()
    except BaseException as exc:
        Document.objects.filter(pk=document.pk).update(status=Document.Status.FAILED, error=str(exc)[:2000])
        raise
    return {"document_id": document.pk, "title": title, "characters": len(clean), "chunks": len(pieces)}


def _document_path(path: str) -> Path:
    root = Path(str(settings.SKIPLOCK_DOCUMENTS_DIR)).resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root):
        raise ValueError(f"path must stay inside {root}")
    return target


def _read_document(path: str) -> str:
    return _document_path(path).read_text(encoding="utf-8", errors="replace")


@task(queue="cpu", soft_time_limit=600, hard_time_limit=900)
def optimize_route(
    ctx: JobContext,
    *,
    points: Annotated[int, Field(ge=3, le=5000)] = 200,
    seed: int = 1,
    max_rounds: Annotated[int, Field(ge=1, le=10_000)] = 100,
    restarts: Annotated[int, Field(ge=1, le=100)] = 40,
) -> dict[str, object]:
    """Optimise a round trip over `points` seeded random points.

    Multi-start local search: 2-opt from `restarts` nearest-neighbour tours, the best one wins.
    """
    coordinates = routes.random_points(points, seed)
    ctx.report_progress(0, "nearest neighbour")
    initial = routes.route_length(coordinates, routes.nearest_neighbour(coordinates))

    def on_progress(fraction: float, step: str) -> None:
        ctx.report_progress(min(99.0, 100 * fraction), step)

    route, rounds = routes.optimise(coordinates, max_rounds, restarts, on_progress)
    length = routes.route_length(coordinates, route)
    return {
        "points": points,
        "seed": seed,
        "rounds": rounds,
        "restarts": restarts,
        "initial_length": round(initial, 3),
        "length": round(length, 3),
        "improvement": round(1 - length / initial, 4) if initial else 0.0,
        "route": route,
    }
