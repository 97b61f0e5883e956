"""Tasks written the Celery way (jobs.celery), run by the real worker in tests/test_celery_*.py."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from jobs.celery import Celery, SoftTimeLimitExceeded, shared_task

app = Celery("tests")

# Set by the tests to let a waiting task finish (the worker runs in this process).
release = threading.Event()
calls: list[Any] = []


class RateLimited(Exception):
    """The (pretend) LLM provider said: slow down."""


@shared_task
def add(x, y):
    return x + y


@shared_task(bind=True, queue="celery-tests")
def whoami(self, a, b=2, *rest, **options):
    return {"id": self.request.id, "retries": self.request.retries, "args": self.request.args,
            "kwargs": self.request.kwargs, "seen": [a, b, list(rest), options]}


@shared_task(name="tests.celery.typed")
def typed(count: int, *names: str, **flags: bool) -> dict[str, Any]:
    return {"count": count, "names": list(names), "flags": flags}


@shared_task(bind=True)
def build(self, project_id):
    self.update_state(state="BUILDING", meta={"project_id": project_id, "current": 1, "total": 4})
    if not release.wait(timeout=20):
        raise RuntimeError("never released")
    return {"project_id": project_id, "built": True}


@shared_task(bind=True, max_retries=3, default_retry_delay=60)
def flaky(self, fail_times):
    calls.append(self.request.retries)
    try:
        if self.request.retries < fail_times:
            raise RateLimited(f"attempt {self.request.retries + 1}")
    except RateLimited as exc:
        raise self.retry(exc=exc, countdown=60 * 2 ** self.request.retries) from exc
    return {"retries": self.request.retries}


@shared_task(bind=True, max_retries=1)
def give_up(self):
    raise self.retry(countdown=0)


@shared_task(bind=True, default_retry_delay=45)
def retry_default_delay(self):
    if self.request.retries == 0:
        raise self.retry()
    return "second time"


@shared_task(autoretry_for=(RateLimited,), retry_backoff=True, retry_jitter=False, max_retries=2)
def auto(fail_times):
    calls.append(fail_times)
    if len(calls) <= fail_times:
        raise RateLimited("slow down")
    return len(calls)


@shared_task
def broken(message):
    raise KeyError(message)


@shared_task(bind=True)
def swallow_everything(self, seconds):
    """The common Celery pattern: log and return a failure dict whatever happens."""
    try:
        self.update_state(state="WORKING", meta={"progress": 10})
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.01)
        return {"ok": True}
    except Exception as exc:
        return {"ok": False, "error": repr(exc)}


@shared_task(time_limit=0.5)
def runaway():
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.01)
        return {"ok": True}
    except Exception as exc:
        return {"ok": False, "error": repr(exc)}


@app.task(bind=True, queue="celery-tests")
async def async_steps(self, n):
    await self.aupdate_state(state="STEPPING", meta={"current": 1, "total": n})
    await asyncio.sleep(0)
    return n * 2


@shared_task(ignore_result=True, acks_late=True, track_started=True)
def quiet():
    return None


@shared_task(soft_time_limit=0.3, time_limit=10)
def cleans_up():
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.01)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "ran to the end"


def swallow_every_exception(seconds: float = 20) -> str:
    """A loop that swallows every Exception, as such tasks do: the soft limit, and would swallow
    an ordinary hard one."""
    deadline = time.monotonic() + seconds
    swallowed = 0
    while time.monotonic() < deadline:
        try:
            time.sleep(0.01)
        except Exception:  # what such tasks do
            swallowed += 1
    return f"ran to the end ({swallowed} swallowed)"


@shared_task(soft_time_limit=0.2, time_limit=0.6)
def stubborn():
    """Swallows every Exception in its loop."""
    return swallow_every_exception()
