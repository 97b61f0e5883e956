"""Limits on live event streams: a cap per caller, credentials re-checked, a maximum lifetime.

`jobs.events` produces a stream's events; this module decides how long a caller may keep it:

- **A cap per caller**: at most SKIPLOCK_SSE_MAX_STREAMS open streams per API key or per user in
  each web process; one more is answered `429 too_many_streams`. The count is of the streams
  this process serves (the event hub is per process), so with W web processes a caller may hold
  up to W times the cap; it bounds what one client can pin in one process.
- **Credentials re-checked** every SKIPLOCK_SSE_AUTH_RECHECK seconds: a revoked or expired key,
  a key that lost its `read` scope, a session that was logged out, expired or invalidated (password
  changed), or a deactivated user ends the stream. The client's reconnect then gets its 401.
- **A maximum lifetime** of SKIPLOCK_SSE_MAX_DURATION seconds: the stream ends with a `retry:`
  hint, and the client (EventSource does it by itself) reconnects with `Last-Event-ID`, so it
  misses nothing and is authenticated afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from importlib import import_module
from types import SimpleNamespace
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.http import HttpRequest

from jobs.auth import Principal
from jobs.exceptions import SkiplockError

logger = logging.getLogger("jobs.events")

RECONNECT_HINT_MS = 1000


class TooManyStreams(SkiplockError):
    """This caller already has as many event streams open as allowed."""

    code = "too_many_streams"
    status = 429


# Open streams of this process per caller: weak references, so a stream that is dropped without
# ever being read (the client left before the first byte) frees its place as well.
_open_streams: dict[tuple[str, int], weakref.WeakSet[Any]] = {}


def _caller(principal: Principal) -> tuple[str, int]:
    if principal.kind == "key" and principal.key_id is not None:
        return ("key", principal.key_id)
    return ("user", principal.user_id or 0)


def open_streams(principal: Principal) -> int:
    """How many event streams this caller has open in this process."""
    streams = _open_streams.get(_caller(principal))
    return len(streams) if streams is not None else 0


def limited_stream(request: HttpRequest, principal: Principal, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """`events` under this caller's limits; raises TooManyStreams (429) when the cap is reached."""
    limit = int(settings.SKIPLOCK_SSE_MAX_STREAMS)
    caller = _caller(principal)
    streams = _open_streams.setdefault(caller, weakref.WeakSet())
    if len(streams) >= limit:
        logger.warning("refused an event stream to %s: %d streams open (SKIPLOCK_SSE_MAX_STREAMS)",
                       principal.name, len(streams))
        raise TooManyStreams(
            f"this caller already has {len(streams)} event streams open, the most allowed; "
            "close one (one stream can follow up to 100 jobs: /api/events?ids=…)",
            details={"limit": limit},
        )
    session_key = request.COOKIES.get(settings.SESSION_COOKIE_NAME) if principal.kind == "user" else None
    itself: list[weakref.ref[Any]] = []  # a weak self-reference: the stream frees its own place

    def release() -> None:
        stream = itself[0]() if itself else None
        if stream is not None:  # collected: the weak set has already let it go
            streams.discard(stream)

    stream = _guarded(events, principal, session_key, release)
    itself.append(weakref.ref(stream))
    streams.add(stream)
    return stream


async def _guarded(
    events: AsyncIterator[str], principal: Principal, session_key: str | None, release: Callable[[], None]
) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    recheck = float(settings.SKIPLOCK_SSE_AUTH_RECHECK)
    deadline = loop.time() + float(settings.SKIPLOCK_SSE_MAX_DURATION)
    next_check = loop.time() + recheck
    pending: asyncio.Future[str] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            timeout = max(0.0, min(deadline, next_check) - loop.time())
            done, _ = await asyncio.wait({pending}, timeout=timeout)
            if pending in done:
                try:
                    chunk = pending.result()
                except StopAsyncIteration:
                    return
                finally:
                    pending = None
                yield chunk
            now = loop.time()
            if now >= deadline:
                yield (f"retry: {RECONNECT_HINT_MS}\n\n"
                       ": the stream reached SKIPLOCK_SSE_MAX_DURATION; reconnect with Last-Event-ID\n\n")
                return
            if now >= next_check:
                if not await sync_to_async(_still_allowed)(principal, session_key):
                    logger.info("ended an event stream of %s: its credentials are no longer valid", principal.name)
                    yield ": credentials no longer valid; the stream ends\n\n"
                    return
                next_check = loop.time() + recheck
    finally:
        release()
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                await pending
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


def _still_allowed(principal: Principal, session_key: str | None) -> bool:
    """Would this caller still be let in? Re-read from the database, never from the request."""
    try:
        if principal.kind == "key":
            return _key_still_reads(principal.key_id)
        return _session_still_valid(principal.user_id, session_key)
    finally:
        connection.close()  # the stream may last for hours: hold no connection between checks


def _key_still_reads(key_id: int | None) -> bool:
    from django.db.models import Q
    from django.utils import timezone

    from jobs.models import ApiKey

    if key_id is None:
        return False
    scopes = (
        ApiKey.objects.filter(pk=key_id, revoked_at__isnull=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()))
        .values_list("scopes", flat=True)
        .first()
    )
    return scopes is not None and "read" in scopes


def _session_still_valid(user_id: int | None, session_key: str | None) -> bool:
    from django.contrib.auth import get_user

    if not session_key or user_id is None:
        return False
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    # get_user checks the session's user, backend and password hash, and that the user is active.
    user: Any = get_user(SimpleNamespace(session=store))  # type: ignore[arg-type]
    return bool(user.is_authenticated and user.pk == user_id)
