"""An ASGI guard that refuses request bodies over SKIPLOCK_MAX_BODY_BYTES before anything reads them.

Django's ASGI handler reads the whole body (spooling it to a temporary file past 2.5 MB) before
any middleware, authentication or size check runs, so an anonymous client could make every web
process write gigabytes to /tmp. This guard sits in front of Django, on every path:

- a declared `Content-Length` over the limit is answered `413` at once: the body is never read
  (and a client that sent `Expect: 100-continue` never gets the go-ahead);
- a body without a length (chunked) is counted as it arrives, and the moment it passes the limit
  Django is told the client went away (so it stops reading and never sees the request) and the
  client gets the `413`.

The answer is the API's JSON error under /api/, plain text elsewhere, and closes the connection
so the server stops reading the rest. A proxy in front should refuse such bodies first
(nginx `client_max_body_size`, see docs/operations.md); this guard is the second line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from django.conf import settings

logger = logging.getLogger("skiplock.requests")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, or None when it has none (chunked) or it is unreadable."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects a malformed length before the app sees it
    return None


async def send_too_large(scope: Scope, send: Send, limit: int) -> None:
    message = f"the request body is over {limit} bytes"
    if scope.get("path", "").startswith("/api/"):
        body = json.dumps({"error": {"code": "body_too_large", "message": message,
                                     "details": {"max_bytes": limit}}}).encode()
        content_type = b"application/json"
    else:
        body = f"413 Request Entity Too Large: {message}\n".encode()
        content_type = b"text/plain; charset=utf-8"
    await send({
        "type": "http.response.start",
        "status": 413,
        "headers": [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),  # the server stops reading the rest of the body
        ],
    })
    await send({"type": "http.response.body", "body": body, "more_body": False})


class BodyLimit:
    """ASGI middleware: 413 for a body over the limit, before the application buffers any of it."""

    def __init__(self, app: Any) -> None:  # an ASGI application (Django's handler)
        self.app: ASGIApp = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = int(settings.SKIPLOCK_MAX_BODY_BYTES)
        length = declared_length(scope)
        if length is not None and length > limit:
            logger.warning("refused a %d-byte body to %s (limit %d)", length, scope.get("path", ""), limit)
            await send_too_large(scope, send, limit)
            return

        received = 0
        over = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    return {"type": "http.disconnect"}  # Django stops reading and drops the request
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, counting_receive, tracking_send)
        if over and not started:
            logger.warning("refused a streamed body over %d bytes to %s", limit, scope.get("path", ""))
            await send_too_large(scope, send, limit)
