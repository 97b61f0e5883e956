"""Issue 4's user path: a running worker process, deploy_stack started and inspected with manage.py job."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from django.conf import settings
from django.core.management import call_command

from jobs.models import JobRecord
from tests import core_fixtures
from tests.core_fixtures import FAST_DEPLOY, manage, subprocess_env

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
clean_queue = core_fixtures.clean_queue


def show(job_id: int) -> dict[str, Any]:
    out = io.StringIO()
    call_command("job", "show", str(job_id), "--json", stdout=out)
    document: dict[str, Any] = json.loads(out.getvalue())
    return document


def start(**args: Any) -> int:
    out = io.StringIO()
    call_command("job", "start", "deploy_stack", "--args", json.dumps({**FAST_DEPLOY, **args}), "--json", stdout=out)
    return int(json.loads(out.getvalue())["id"])


def test_deploy_stack_with_a_worker_process_succeeds_retries_and_fails_as_told() -> None:
    env = {**subprocess_env(), "SKIPLOCK_FETCH_POLL_INTERVAL": "0.2"}
    worker = subprocess.Popen(
        [sys.executable, str(settings.BASE_DIR / "manage.py"), "worker", "--concurrency", "3",
         "--name", "acceptance"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        started = manage("job", "start", "deploy_stack", "--args",
                         json.dumps({**FAST_DEPLOY, "stack": "shop"}), "--json")
        assert started.returncode == 0, started.stderr
        ok = int(json.loads(started.stdout)["id"])
        twice = start(stack="twice", fail_at_step=2, fail_times=2)
        always = start(stack="always", fail_at_step=2, fail_times=99)

        def wait_until_finished(*job_ids: int) -> None:
            deadline = time.monotonic() + 120
            while JobRecord.objects.filter(pk__in=job_ids, finished_at__isnull=True).exists():
                assert worker.poll() is None, worker.communicate()[0]
                assert time.monotonic() < deadline, list(JobRecord.objects.values("job_id", "state", "attempts"))
                time.sleep(0.2)

        wait_until_finished(ok)
        shown = manage("job", "show", str(ok), "--json")  # while the others wait out their backoff
        assert shown.returncode == 0, shown.stderr
        done = json.loads(shown.stdout)
        assert (done["state"], done["progress"], done["step"], done["attempts"]) == ("succeeded", 100, "done", 1)
        assert done["result"]["manifest"]["stack"] == "shop"
        assert all(service["healthy"] for service in done["result"]["services"])
        assert "acceptance" in done["worker"]
        assert done["attempts_history"][0]["outcome"] == "succeeded"

        wait_until_finished(twice, always)
        retried = show(twice)
        assert (retried["state"], retried["progress"], retried["attempts"]) == ("succeeded", 100, 3)
        history = retried["attempts_history"]
        assert [a["outcome"] for a in history] == ["retried", "retried", "succeeded"]
        assert [a["error"]["message"] for a in history[:2]] == [
            "step 2 (build) failed on attempt 1 (injected)",
            "step 2 (build) failed on attempt 2 (injected)",
        ]
        assert history[2]["error"] is None
        assert retried["error"] is None

        failed = show(always)
        assert (failed["state"], failed["attempts"]) == ("failed", 4)
        assert failed["error"]["type"] == "DeployStepFailed"
        history = failed["attempts_history"]
        assert [a["outcome"] for a in history] == ["retried", "retried", "retried", "failed"]
        for number, attempt in enumerate(history, start=1):
            assert attempt["error"]["message"] == f"step 2 (build) failed on attempt {number} (injected)"
            assert attempt["error"]["traceback"].startswith("Traceback (most recent call last):")
            assert "DeployStepFailed" in attempt["error"]["traceback"]
        # The backoff of deploy_stack is seconds: 2, 4 then 8 (± 10 %) between the attempts.
        gaps = [
            _seconds(history[i + 1]["started_at"]) - _seconds(history[i]["finished_at"]) for i in range(3)
        ]
        for gap, backoff in zip(gaps, (2, 4, 8), strict=True):
            assert backoff * 0.9 <= gap <= backoff * 1.1 + 1.5, gaps  # + the worker's polling
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _seconds(iso: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
