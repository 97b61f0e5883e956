"""The ASGI application: Django, plus (single-process mode) a Skiplock worker in the web process.

With SKIPLOCK_RUN_WORKER_IN_WEB=true, each web process also runs a worker on its event loop,
started and stopped through the ASGI lifespan protocol (uvicorn and gunicorn's uvicorn worker
send it), so one container is enough for a small deployment. Off by default: in production,
run `manage.py worker` (supervised processes, hard time limits) beside the web service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import django
from django.core.exceptions import ImproperlyConfigured
from django.core.handlers.asgi import ASGIHandler


class SkiplockASGIHandler(ASGIHandler):
    """Django's ASGI handler, loading settings.MIDDLEWARE's stock classes as their event-loop variants.

    Django's own `MiddlewareMixin` runs every hook in a thread of its own under ASGI (about
    eighteen thread hops per request with this stack); project/middleware.py runs the same hooks
    on the loop. MIDDLEWARE keeps the stock paths, which Django's deploy checks look for by name.
    """

    def load_middleware(self, is_async: bool = False) -> None:
        from django.conf import settings

        from project.middleware import inline_paths

        stock = settings.MIDDLEWARE
        settings.MIDDLEWARE = inline_paths(list(stock))  # at start-up only, before any request
        try:
            super().load_middleware(is_async)
        finally:
            settings.MIDDLEWARE = stock


def get_asgi_application() -> ASGIHandler:
    """django.core.asgi.get_asgi_application, with Skiplock's handler."""
    django.setup(set_prefix=False)
    return SkiplockASGIHandler()


os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
try:
    django_application = get_asgi_application()
except ImproperlyConfigured as exc:  # a missing SECRET_KEY, a bad variable: one line, not a traceback
    sys.exit(f"configuration error: {exc}")

from project.body_limit import BodyLimit  # noqa: E402  (after Django is set up: it reads settings)

logger = logging.getLogger("jobs.worker")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class LifespanWorker:
    """ASGI wrapper: answers the lifespan protocol and runs a worker when the setting asks for one."""

    def __init__(self, app: Any) -> None:  # an ASGI application (Django's handler)
        self.app = app
        self.worker: Any = None
        self.task: asyncio.Task[Any] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    logger.exception("could not start the in-web worker")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        from django.conf import settings

        if not settings.SKIPLOCK_RUN_WORKER_IN_WEB:
            return
        from jobs.worker import default_worker_name, run_worker

        started = asyncio.Event()

        def on_started(worker: Any) -> None:
            self.worker = worker
            started.set()

        self.task = asyncio.create_task(run_worker(
            queues=None, concurrency=settings.SKIPLOCK_WORKER_CONCURRENCY, name=f"web-{default_worker_name()}",
            wait=True, install_signal_handlers=False, on_started=on_started,
        ), name="skiplock in-web worker")
        self.task.add_done_callback(self._on_done)
        await asyncio.wait([self.task, asyncio.ensure_future(started.wait())], return_when=asyncio.FIRST_COMPLETED)
        if self.task.done():
            self.task.result()  # raise why it could not start
        logger.info("single-process mode: a worker runs in this web process (pid %s)", os.getpid())

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("the in-web worker stopped: %r", task.exception())

    async def shutdown(self) -> None:
        if self.task is None or self.task.done():
            return
        if self.worker is not None:
            self.worker.stop()  # drain: running jobs get SKIPLOCK_SHUTDOWN_GRACE, then are requeued
        try:
            await self.task
        except Exception:
            logger.exception("the in-web worker failed while stopping")


# BodyLimit first: a body over SKIPLOCK_MAX_BODY_BYTES is refused before Django reads any of it.
application = LifespanWorker(BodyLimit(django_application))
