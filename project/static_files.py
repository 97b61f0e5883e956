"""WhiteNoise as an async-capable middleware: requests outside STATIC_URL never leave the event loop.

WhiteNoise 6 is a sync-only middleware. In the middle of Django's ASGI middleware chain a sync-only
middleware costs every request two thread hops (the chain above it calls it in a thread, and it
calls the async chain below it back on the event loop), before the view's own hop; measured on
`POST /api/jobs` (bench/api.py) that was a large share of the web server's CPU per request.
This subclass serves the same files the same way, but only a path under STATIC_URL goes to
WhiteNoise (in a thread: it may stat and open files); every other path goes straight on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponseBase
from whitenoise.middleware import WhiteNoiseMiddleware


class StaticFilesMiddleware(WhiteNoiseMiddleware):
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any], **kwargs: Any) -> None:
        super().__init__(get_response, **kwargs)
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.serve_async(request)
        return super().__call__(request)

    def find(self, path: str) -> Any:
        """The static file at this URL path, or None (WhiteNoise's own lookup)."""
        return self.find_file(path) if self.autorefresh else self.files.get(path)

    async def serve_async(self, request: HttpRequest) -> HttpResponseBase:
        path = request.path_info
        # Every file WhiteNoise knows is under STATIC_URL here (no WHITENOISE_ROOT is configured).
        if path.startswith(self.static_prefix):
            static_file = await sync_to_async(self.find, thread_sensitive=False)(path)
            if static_file is not None:
                response: HttpResponseBase = await sync_to_async(self.serve, thread_sensitive=False)(
                    static_file, request
                )
                return response
        get_response: Callable[[HttpRequest], Awaitable[HttpResponseBase]] = self.get_response
        return await get_response(request)
