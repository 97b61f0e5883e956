"""Property-based fuzzing of the whole OpenAPI document (schemathesis), bounded in examples and time.

Every operation gets valid and invalid requests generated from its schema (each task's own
argument schema included); no answer may be a 5xx, use an undocumented status or content type,
or break its documented response schema. The SSE streams are left out: a valid request to one
stays open until its job ends (tests/test_api_events.py covers them).
"""

from __future__ import annotations

import time
from typing import Any, cast

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api_fixtures import api_key, bearer, clean_queue  # noqa: F401

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("clean_queue")]

EXAMPLES = 10  # per operation and generation mode
TIME_BUDGET = 30.0  # seconds for the whole run; operations left over are still run with few examples
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_fuzzing_the_openapi_document_finds_no_5xx_and_no_schema_violation(asgi_server: str, api_key: str) -> None:  # noqa: F811
    schema = schemathesis.openapi.from_url(f"{asgi_server}/api/openapi.json")
    operations: list[Any] = [cast(Any, result).ok() for result in schema.get_all_operations()]
    operations = [op for op in operations if not op.path.endswith("events")]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "GET /api/tasks", "POST /api/jobs", "POST /api/jobs/batch", "GET /api/jobs", "GET /api/jobs/{job_id}",
        "POST /api/jobs/{job_id}/cancel", "POST /api/jobs/{job_id}/abort", "POST /api/jobs/{job_id}/retry",
    }
    deadline = time.monotonic() + TIME_BUDGET
    calls: dict[str, int] = {}
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            examples = EXAMPLES if time.monotonic() < deadline else 3
            name = f"{operation.method.upper()} {operation.path} ({mode.value})"

            fuzz(operation.as_strategy(generation_mode=mode), examples, name, calls, asgi_server, api_key)
    assert sum(calls.values()) >= len(operations) * 2 * 3


def fuzz(strategy: Any, examples: int, name: str, calls: dict[str, int], base_url: str, key: str) -> None:
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def call(case: Any) -> None:
        calls[name] = calls.get(name, 0) + 1
        case.call_and_validate(base_url=base_url, headers=bearer(key), checks=CHECKS, timeout=30)

    call()
