"""Telling a lost database from a bug, and waiting for it to come back (with backoff and jitter)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator

import psycopg
import psycopg_pool
from procrastinate import exceptions as procrastinate_exceptions

logger = logging.getLogger(__name__)


_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    psycopg_pool.PoolTimeout,
    psycopg_pool.TooManyRequests,
    ConnectionError,
    procrastinate_exceptions.AppNotOpen,
)


# SQLSTATE classes that mean "the server or the connection went away", not "the query is wrong".
_TRANSIENT_SQLSTATES = ("08", "57", "53")  # connection exception, operator intervention, resources
_RETRYABLE_SQLSTATES = ("40001", "40P01")  # serialization failure, deadlock


def is_connection_error(exc: BaseException) -> bool:
    """True when `exc` means "the database is unreachable", not "the query is wrong"."""
    current: BaseException | None = exc
    for _ in range(5):
        if current is None:
            return False
        if isinstance(current, psycopg.Error):
            state = current.sqlstate
            if state is None:  # raised by the client: refused, closed or broken connection
                return isinstance(current, psycopg.OperationalError | psycopg.InterfaceError)
            return state[:2] in _TRANSIENT_SQLSTATES or state in _RETRYABLE_SQLSTATES
        if isinstance(current, _CONNECTION_ERRORS):
            return True
        current = current.__cause__
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


class Outage:
    """One log line per change of a database outage: lost, still down (each minute), back.

    Every part of a worker (claims, finishes, heartbeat, LISTEN, progress) reports its failures
    and successes here, so an outage of any length costs the log a few lines, not a traceback
    every few seconds.
    """

    REMIND_EVERY = 60.0

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.down_since: float | None = None
        self.reminded_at = 0.0

    def failed(self, exc: BaseException, what: str) -> None:
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = self.reminded_at = now
            self.log.warning("database unreachable while %s (%s); jobs wait until it is back, retrying",
                             what, _short(exc))
        elif now - self.reminded_at >= self.REMIND_EVERY:
            self.reminded_at = now
            self.log.warning("database still unreachable after %.0f s (%s)", now - self.down_since, _short(exc))

    def recovered(self) -> None:
        if self.down_since is not None:
            self.log.warning("database reachable again after %.1f s", time.monotonic() - self.down_since)
            self.down_since = None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]
