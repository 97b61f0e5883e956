# ruff: noqa: F811  (pytest fixtures imported from tests/worker_fixtures.py are redefined as arguments)
"""Single-process mode: SKIPLOCK_RUN_WORKER_IN_WEB=true runs a worker inside the web process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from typing import Any

import httpx
import pytest
from django.conf import settings

from jobs import services
from project.asgi import LifespanWorker
from tests.conftest import free_port
from tests.worker_fixtures import (  # noqa: F401
    FAST_ENV,
    LOG_DIR,
    QUEUE,
    database_url,
    scalar,
    wait_for,
    worker_tables,
)

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_lifespan_wrapper_starts_no_worker_by_default() -> None:
    async def scenario() -> list[str]:
        sent: list[str] = []
        inbox = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

        async def receive() -> dict[str, Any]:
            return next(inbox)

        async def send(message: Any) -> None:
            sent.append(message["type"])

        wrapper = LifespanWorker(app=lambda scope, receive, send: asyncio.sleep(0))
        await wrapper({"type": "lifespan"}, receive, send)
        assert wrapper.task is None
        return sent

    assert not settings.SKIPLOCK_RUN_WORKER_IN_WEB
    assert asyncio.run(scenario()) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


@pytest.mark.slow
def test_with_the_setting_on_the_web_process_runs_jobs_and_stops_cleanly(worker_tables: None) -> None:
    port = free_port()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = (LOG_DIR / "in-web.log").open("wb")
    env = {**os.environ, **FAST_ENV, "DATABASE_URL": database_url(), "DEBUG": "true",
           "SKIPLOCK_RUN_WORKER_IN_WEB": "true", "SKIPLOCK_IMPORT_PATHS": "tests.worker_tasks"}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "project.asgi:application", "--host", "127.0.0.1", "--port", str(port),
         "--lifespan", "on"],
        cwd=settings.BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: _answers(port), timeout=90, interval=0.3, what="the web server")
        job_id = services.job_defer(task_name="record_run", args={}, queue=QUEUE).job_id
        wait_for(lambda: scalar("SELECT state FROM skiplock_job_view WHERE job_id = %s", [job_id]) == "succeeded",
                 timeout=60, what="the in-web worker to run the job")
        worker_name = scalar("SELECT worker_name FROM skiplock_job_view WHERE job_id = %s", [job_id])
        assert worker_name.startswith("web-")
        server.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal it handled once its shutdown is complete.
        assert server.wait(60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in (LOG_DIR / "in-web.log").read_text()
        assert scalar("SELECT stopped_at IS NOT NULL FROM skiplock_worker WHERE name = %s", [worker_name])
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
        log.close()


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=2).status_code < 500
    except httpx.HTTPError:
        return False
