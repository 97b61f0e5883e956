"""docs/migrating-from-celery.md: the Celery module runs on Skiplock with only its imports changed."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import pytest

from jobs.models import JobAttempt, JobRecord
from tests import core_fixtures
from tests.foundation_fixtures import BASE_DIR

GUIDE = (BASE_DIR / "docs" / "migrating-from-celery.md").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
BLOCKS = FENCE.findall(GUIDE)
IMPORT_LINE = re.compile(r"^from (celery|celery\.result|jobs\.celery) import .*\n", re.MULTILINE)

pytestmark = pytest.mark.django_db(transaction=True)
clean_queue = core_fixtures.clean_queue


def python_blocks() -> list[str]:
    return [body for lang, body in BLOCKS if lang == "python"]


def celery_module_before() -> str:
    return next(body for lang, body in BLOCKS if lang == "text" and "@shared_task" in body)


@pytest.fixture
def guide_namespace() -> Iterator[dict[str, Any]]:
    from procrastinate.contrib.django import app

    from jobs import registry

    namespace: dict[str, Any] = {"__name__": "shop.tasks"}
    yield namespace
    for name in [n for n in registry._REGISTRY if n.startswith("shop.tasks.") or n == "build_report"]:
        registry._REGISTRY.pop(name, None)  # the guide's tasks must not outlive this test
        with contextlib.suppress(Exception):
            app.tasks.pop(name, None)


def test_the_celery_module_before_and_after_differ_only_in_their_imports() -> None:
    before, after = celery_module_before(), python_blocks()[0]
    assert IMPORT_LINE.findall(before) == ["celery", "celery.result"]
    assert IMPORT_LINE.findall(after) == ["jobs.celery"]
    assert IMPORT_LINE.sub("", before) == IMPORT_LINE.sub("", after)


def test_the_guide_examples_run_on_the_real_worker(guide_namespace: dict[str, Any]) -> None:
    for number, block in enumerate(python_blocks()):
        exec(compile(block, f"docs/migrating-from-celery.md#python{number}", "exec"), guide_namespace)  # noqa: S102
    ns = guide_namespace
    build = JobRecord.objects.get(pk=int(ns["started"]["task_id"]))
    assert build.task_name == "shop.tasks.build_project"
    assert build.args == {"__args__": [13]}
    # The custom states drove the progress; the meta of the last one is kept with the job.
    assert build.meta == {"project_id": 13, "current": 3, "total": 3}
    assert [a.outcome for a in JobAttempt.objects.filter(job_id=build.job_id)] == ["retried", "succeeded"]
    summary = JobRecord.objects.get(pk=int(ns["summary"].id))
    assert (summary.queue_name, summary.attempts) == ("llm", 3)
    assert summary.args == {"__args__": ["PostgreSQL is the only moving part here"], "model": "large",
                            "max_words": 3, "fail_first": 2}
    squares = JobRecord.objects.get(pk=int(ns["squares"].id))
    assert squares.meta == {"current": 1000, "total": 1000}
    # The native next step.
    report = JobRecord.objects.get(pk=ns["job_id"])
    total = sum((42 * 31 + day * 17) % 100 for day in range(30))
    assert (report.state, report.result) == ("succeeded", {"account_id": 42, "days": 30, "total": total})
    assert JobRecord.objects.get(pk=ns["later"]).display_state == "scheduled"
    with pytest.raises(Exception, match="days"):
        ns["build_report"].defer(account_id=42, days="thirty")


def test_the_reference_lists_every_celery_option_the_module_knows() -> None:
    from jobs import celery

    reference = GUIDE[GUIDE.index("## Reference"):]
    for option in [*celery.NO_OP_OPTIONS, *celery.UNSUPPORTED_OPTIONS, *celery.NO_OP_SEND_OPTIONS]:
        assert f"`{option}`" in reference, option
    members = [name for name in vars(celery.AsyncResult) if not name.startswith("_")]
    for member in members:
        assert f".{member}" in reference, member
