"""Live job events: one LISTEN connection per web process, fanned out to every Server-Sent Events stream.

The writers (`jobs.transitions`, the worker) announce changes of a job's state, progress or step
on the `skiplock_job` channel through `skiplock_announce`: one NOTIFY per statement, its payload a
JSON array of {id, event, state, progress, step, attempts}, and none at all unless a listener is
registered in `skiplock_listener` — the hub registers itself there while it listens. `JobEventHub` holds the process's single LISTEN connection
(psycopg `AsyncConnection`, reconnected with backoff when it drops) and hands each notification
to the streams following that job; a small shared pool (never one connection per client) reads
snapshots. `job_event_stream` turns that into SSE text any async view can return:

    return StreamingHttpResponse(job_event_stream([job_id]), content_type="text/event-stream")

A stream first sends each job's current snapshot (so a reconnect shows the current state at
once), then `progress` and `state` events as they happen, `end` when a job finishes (with its
result or error), and closes when all its jobs have ended. Each event has an `id:` from the
job's state; a reconnect with `Last-Event-ID` skips a snapshot the client already has.
Slow clients never queue up unbounded work: pending events coalesce to the newest per job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from django.conf import settings
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from jobs.states import FINAL_STATES, display_state

logger = logging.getLogger(__name__)

CHANNEL = "skiplock_job"
LISTEN_APPLICATION_NAME = "skiplock-events-listen"
POOL_APPLICATION_NAME = "skiplock-events"
RECONNECT_MAX_DELAY = 5.0
LISTEN_KEEPALIVE = 30.0  # seconds between liveness probes of an idle LISTEN connection

_SNAPSHOT_SQL = """
SELECT job_id, state, progress, step, attempts, scheduled_at, expires_at, task_name, owner_id, custom_state, meta
FROM skiplock_job_view WHERE job_id = ANY(%(ids)s)
"""
_OUTCOME_SQL = """
SELECT job_id, state, progress, step, attempts, scheduled_at, expires_at, result,
       error_type, error_message, error_traceback, finished_at
FROM skiplock_job_view WHERE job_id = %(id)s
"""
# While this process listens, its row tells the writers to announce (skiplock_announce); it expires
# unless refreshed, so a process that died stops costing NOTIFYs within LISTENER_TTL.
LISTENER_TTL = 3 * 30.0
_REGISTER_LISTENER = """
INSERT INTO skiplock_listener (name, expires_at) VALUES (%(name)s, now() + make_interval(secs => %(ttl)s))
ON CONFLICT (name) DO UPDATE SET expires_at = EXCLUDED.expires_at
"""
_FORGET_LISTENER = "DELETE FROM skiplock_listener WHERE name = %(name)s OR expires_at < now() - interval '1 hour'"


def listener_name() -> str:
    import os
    import socket
    import uuid

    return f"events:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def parse_payload(raw: str) -> list[dict[str, Any]]:
    """The events of one notification: a JSON array of job events (or, from older writers, one object)."""
    payload = json.loads(raw)
    items = payload if isinstance(payload, list) else [payload]
    events = []
    for item in items:
        if not isinstance(item, dict):
            raise ValueError("a job event is a JSON object")
        int(item["id"])
        events.append(item)
    return events


def _connection_params(application_name: str) -> dict[str, Any]:
    from django.db import connections

    params = dict(connections["default"].get_connection_params())
    params.pop("cursor_factory", None)
    params.pop("context", None)
    params["application_name"] = application_name
    params.setdefault("keepalives", 1)
    params.setdefault("keepalives_idle", 30)
    return params


@dataclass(eq=False)
class Subscription:
    """One stream's interest in some jobs: the newest pending event per job, and a wake-up."""

    job_ids: frozenset[int]
    pending: dict[int, dict[str, Any]] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    resync: bool = False  # the listener reconnected: notifications may have been missed

    def push(self, job_id: int, payload: dict[str, Any]) -> None:
        previous = self.pending.get(job_id)
        if previous is not None and previous.get("event") == "state":
            payload = {**payload, "event": "state"}  # coalesced: a state change happened in between
        self.pending[job_id] = payload
        self.wake.set()

    def take(self) -> dict[int, dict[str, Any]]:
        pending, self.pending = self.pending, {}
        return pending


class JobEventHub:
    """The single LISTEN connection of this process (per event loop) and its subscribers."""

    def __init__(self) -> None:
        self._subscribers: dict[int, set[Subscription]] = {}
        self._listening = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pool: AsyncConnectionPool | None = None
        self._pool_lock = asyncio.Lock()
        self.connects = 0  # how many times LISTEN was (re)established, for tests and metrics
        self.notifications = 0
        self.listener_name = listener_name()

    # --- subscribers ---------------------------------------------------------------------------

    def subscribe(self, job_ids: Iterable[int]) -> Subscription:
        subscription = Subscription(frozenset(job_ids))
        for job_id in subscription.job_ids:
            self._subscribers.setdefault(job_id, set()).add(subscription)
        self._ensure_started()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        for job_id in subscription.job_ids:
            subscribers = self._subscribers.get(job_id)
            if subscribers is not None:
                subscribers.discard(subscription)
                if not subscribers:
                    del self._subscribers[job_id]

    @property
    def subscriber_count(self) -> int:
        return len({id(s) for subs in self._subscribers.values() for s in subs})

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    async def wait_listening(self, timeout: float) -> bool:
        self._ensure_started()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), timeout)
        return self._listening.is_set()

    def _dispatch(self, raw: str) -> None:
        try:
            events = parse_payload(raw)
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring a malformed %s notification", CHANNEL)
            return
        self.notifications += 1
        for payload in events:
            job_id = int(payload["id"])
            for subscription in self._subscribers.get(job_id, ()):
                subscription.push(job_id, payload)

    def _resync_all(self) -> None:
        for subscribers in self._subscribers.values():
            for subscription in subscribers:
                subscription.resync = True
                subscription.wake.set()

    # --- the LISTEN connection ---------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._listen_forever(), name="skiplock-events-listen")

    async def _listen_forever(self) -> None:
        delay = 0.1
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    **_connection_params(LISTEN_APPLICATION_NAME), autocommit=True
                )
            except Exception as exc:
                logger.warning("job events: cannot connect to PostgreSQL (%s); retrying in %.1fs", type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
                continue
            try:
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    await self._register(conn)
                    self.connects += 1
                    if self.connects > 1:
                        logger.info("job events: LISTEN re-established")
                    self._listening.set()
                    self._resync_all()  # whatever happened while we were away: re-read it
                    delay = 0.1
                    while True:
                        async for notify in conn.notifies(timeout=LISTEN_KEEPALIVE):
                            self._dispatch(notify.payload)
                        await self._register(conn)  # also proves an idle connection is still alive
            except asyncio.CancelledError:
                self._listening.clear()
                raise
            except Exception as exc:
                logger.warning("job events: LISTEN connection lost (%s); reconnecting", type(exc).__name__)
            self._listening.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_DELAY)

    async def _register(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Tell the writers someone listens (refreshed every LISTEN_KEEPALIVE seconds)."""
        await conn.execute(_REGISTER_LISTENER, {"name": self.listener_name, "ttl": LISTENER_TTL})

    async def _unregister(self) -> None:
        with contextlib.suppress(Exception):
            async with await psycopg.AsyncConnection.connect(
                **_connection_params(LISTEN_APPLICATION_NAME), autocommit=True
            ) as conn:
                await conn.execute(_FORGET_LISTENER, {"name": self.listener_name})

    # --- snapshot reads ------------------------------------------------------------------------

    async def _get_pool(self) -> AsyncConnectionPool:
        async with self._pool_lock:
            if self._pool is None:
                pool = AsyncConnectionPool(
                    kwargs=_connection_params(POOL_APPLICATION_NAME) | {"autocommit": True},
                    min_size=1, max_size=int(settings.SKIPLOCK_EVENTS_POOL_SIZE),
                    open=False, name="skiplock-events", timeout=5.0,
                    check=AsyncConnectionPool.check_connection,
                )
                await pool.open(wait=False)
                self._pool = pool
            return self._pool

    async def fetch(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        pool = await self._get_pool()
        async with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
            await cursor.execute(sql, params)
            return await cursor.fetchall()

    async def snapshot(self, job_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        rows = await self.fetch(_SNAPSHOT_SQL, {"ids": list(job_ids)})
        return {row["job_id"]: row for row in rows}

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            await self._unregister()
        if self._pool is not None:
            await self._pool.close()


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, JobEventHub] = weakref.WeakKeyDictionary()


def get_hub() -> JobEventHub:
    """This process's hub (one per event loop: the web server runs one loop per process)."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        hub = _hubs[loop] = JobEventHub()
    return hub


# --- SSE formatting ---------------------------------------------------------------------------------


def event_data(row: dict[str, Any]) -> dict[str, Any]:
    """What every event carries, from a notification or a row."""
    job_id = int(row.get("id") or row.get("job_id") or 0)
    state = str(row["state"])
    attempts = int(row.get("attempts") or 0)
    return {
        "id": job_id,
        "state": state,
        "display_state": str(display_state(state, scheduled_at=row.get("scheduled_at"), attempts=attempts,
                                           expires_at=row.get("expires_at"))),
        "progress": int(row.get("progress") or 0),
        "step": row.get("step") or "",
        "attempts": attempts,
        # A custom state (jobs.celery's update_state) and its meta, only on events that carry one.
        **({"custom_state": row["custom_state"], "meta": row.get("meta")} if row.get("custom_state") else {}),
    }


def event_id(data: dict[str, Any]) -> str:
    """A stable id for a job's observable state: equal ids mean the client is already current."""
    label = f":{data['custom_state']}" if data.get("custom_state") else ""
    return f"{data['id']}:{data['attempts']}:{data['state']}:{data['progress']}{label}"


def end_event_id(job_id: int) -> str:
    return f"{job_id}:end"


def sse(event: str, data: dict[str, Any], *, id: str | None = None) -> str:
    lines = []
    if id is not None:
        lines.append(f"id: {id}")
    lines.append(f"event: {event}")
    lines.append("data: " + json.dumps(data, separators=(",", ":"), default=str))
    return "\n".join(lines) + "\n\n"


def parse_last_event_id(value: str | None) -> tuple[int | None, str | None]:
    if not value:
        return None, None
    head = value.split(":", 1)[0]
    return (int(head), value) if head.isdigit() else (None, None)


async def _outcome(hub: JobEventHub, job_id: int, *, tracebacks: bool = False) -> dict[str, Any]:
    rows = await hub.fetch(_OUTCOME_SQL, {"id": job_id})
    if not rows:
        return {"id": job_id, "state": "deleted", "result": None, "error": None}
    row = rows[0]
    data = event_data(row)
    data["result"] = row["result"]
    data["error"] = (
        {"type": row["error_type"], "message": row["error_message"],
         "traceback": row["error_traceback"] if tracebacks else None}  # jobs.auth: operators only
        if row["error_type"] else None
    )
    data["finished_at"] = row["finished_at"].isoformat() if row["finished_at"] else None
    return data


async def job_event_stream(
    job_ids: list[int], *, last_event_id: str | None = None, heartbeat: float | None = None,
    tracebacks: bool = False,
) -> AsyncIterator[str]:
    """SSE text for these jobs until every one of them has ended (see the module docstring).

    `tracebacks`: whether `end` events carry the error's traceback (`Principal.sees_tracebacks`).
    """
    hub = get_hub()
    ids = list(dict.fromkeys(int(i) for i in job_ids))
    interval = float(heartbeat if heartbeat is not None else settings.SKIPLOCK_SSE_HEARTBEAT)
    subscription = hub.subscribe(ids)
    sent: dict[int, str] = {}
    last_job, last_id = parse_last_event_id(last_event_id)
    if last_job is not None and last_id is not None:
        sent[last_job] = last_id
    remaining = set(ids)
    try:
        yield "retry: 2000\n\n"
        await hub.wait_listening(timeout=5.0)

        async def emit_snapshot() -> AsyncIterator[str]:
            try:
                rows = await hub.snapshot(remaining)
            except Exception as exc:  # the database is away: say so, keep the stream, resync later
                logger.warning("job events: snapshot failed (%s)", type(exc).__name__)
                subscription.resync = True
                yield ": database unavailable, waiting\n\n"
                return
            for job_id in ids:
                if job_id not in remaining:
                    continue
                row = rows.get(job_id)
                if row is None:
                    remaining.discard(job_id)
                    yield sse("end", {"id": job_id, "state": "deleted", "result": None, "error": None},
                              id=end_event_id(job_id))
                    continue
                data = event_data(row)
                current = event_id(data)
                if sent.get(job_id) != current:
                    yield sse("state", data, id=current)
                    sent[job_id] = current
                if data["state"] in FINAL_STATES:
                    remaining.discard(job_id)
                    yield sse("end", await _outcome(hub, job_id, tracebacks=tracebacks), id=end_event_id(job_id))

        async for chunk in emit_snapshot():
            yield chunk
        while remaining:
            try:
                # While LISTEN is down, poll snapshots so the client still moves forward.
                await asyncio.wait_for(subscription.wake.wait(), timeout=interval if hub.listening else 1.0)
            except TimeoutError:
                if subscription.resync or not hub.listening:
                    subscription.resync = True
                else:
                    yield ": heartbeat\n\n"
                    continue
            subscription.wake.clear()
            if subscription.resync:
                subscription.resync = False
                subscription.take()  # the snapshot supersedes whatever was pending
                async for chunk in emit_snapshot():
                    yield chunk
                continue
            for job_id, payload in subscription.take().items():
                if job_id not in remaining:
                    continue
                data = event_data(payload)
                current = event_id(data)
                if sent.get(job_id) == current:
                    continue
                kind = "state" if payload.get("event") == "state" else "progress"
                yield sse(kind, data, id=current)
                sent[job_id] = current
                if data["state"] in FINAL_STATES:
                    remaining.discard(job_id)
                    try:
                        outcome = await _outcome(hub, job_id, tracebacks=tracebacks)
                    except Exception:
                        outcome = {**data, "result": None, "error": None}
                    yield sse("end", outcome, id=end_event_id(job_id))
    finally:
        hub.unsubscribe(subscription)
