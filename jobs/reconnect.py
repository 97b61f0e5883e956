"""Telling a lost database from a bug, and waiting for it to come back (with backoff and jitter)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterator

import psycopg
import psycopg_pool
from procrastinate import exceptions as procrastinate_exceptions

logger = logging.getLogger(__name__)


_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,  # includes AdminShutdown, "connection is closed", refused connects
    psycopg.InterfaceError,
    psycopg_pool.PoolTimeout,
    psycopg_pool.TooManyRequests,
    ConnectionError,
    procrastinate_exceptions.AppNotOpen,
)


def is_connection_error(exc: BaseException) -> bool:
    """True when `exc` means "the database is unreachable", not "the query is wrong"."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 5:
        if isinstance(current, _CONNECTION_ERRORS):
            return True
        if isinstance(current, psycopg.errors.SerializationFailure | psycopg.errors.DeadlockDetected):
            return True
        current = current.__cause__ or current.__context__
        seen += 1
    return False


def backoff_delays(first: float = 0.1, cap: float = 5.0) -> Iterator[float]:
    """0.1 s, 0.2 s, 0.4 s … capped, each with ±25 % jitter so reconnecting workers spread out."""
    delay = first
    while True:
        yield delay * random.uniform(0.75, 1.25)
        delay = min(delay * 2, cap)


async def until_connected[T](
    operation: Callable[[], Awaitable[T]],
    *,
    what: str,
    deadline: float | None = None,
    stop: asyncio.Event | None = None,
) -> T:
    """Run `operation`, retrying it while the database is unreachable.

    Gives up (re-raising the last error) after `deadline` seconds or once `stop` is set;
    errors that are not about the connection are raised at once.
    """
    loop = asyncio.get_running_loop()
    ends = None if deadline is None else loop.time() + deadline
    delays = backoff_delays()
    warned = False
    while True:
        try:
            result = await operation()
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            if (ends is not None and loop.time() >= ends) or (stop is not None and stop.is_set()):
                raise
            if not warned:
                logger.warning("database unreachable while %s (%s); retrying", what, exc)
                warned = True
            delay = next(delays)
            if ends is not None:
                delay = min(delay, max(0.0, ends - loop.time()))
            await asyncio.sleep(delay)
            continue
        if warned:
            logger.warning("database reachable again: %s done", what)
        return result
