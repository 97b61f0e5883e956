"""Skiplock's worker: a small asyncio loop on procrastinate's tables and SQL functions.

Used by the `worker` command (one per supervised process), the in-web worker and the testing
helper alike, so every path runs jobs the same way. It uses no private part of procrastinate:
its SQL is Skiplock's (jobs/transitions.py, "worker hot path"), checked against procrastinate's
own `procrastinate_fetch_job_v2` by tests/test_worker_claim.py.

    claim   ── one statement claims up to the number of free slots plus a prefetch sized to
               what ends during a round trip (procrastinate's order and `lock` rule; a job that
               is not due never blocks its lock).
    run     ── async tasks run on this loop, sync tasks in a thread pool of `concurrency` threads.
    finish  ── endings wait in a list and ride with the next claim: one pipeline, one commit,
               END_ATTEMPTS fenced per row on (job, worker, attempts), with the side row, the
               attempt row, the counters and one announcement. The claim loop is the only
               sender, so while a round trip is in flight the next batch gathers; with no claim
               due an ending waits at most the flush window.
    side    ── heartbeat (also polls abort requests and checks that running jobs are still ours,
               and runs stalled-job recovery), LISTEN for new jobs, released locks and abort
               requests, the periodic deferrer, and progress writers for jobs that report it.

Outages never stop it: every statement is retried with backoff, and the log gets one line per
change of the outage (lost, still down each minute, back). A claim whose answer was lost is
reconciled; a registration removed by stall recovery (the worker looked dead) is replaced by a
new one, and the old attempts' late writes match nothing.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import datetime as dt
import importlib
import inspect
import json
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import psycopg_pool
from django.conf import settings
from procrastinate import exceptions as procrastinate_exceptions
from procrastinate import job_context
from procrastinate.contrib.django import app
from procrastinate.contrib.django.utils import connector_params

from jobs import maintenance, recording, timelimits, transitions
from jobs.context import JobContext, _current
from jobs.exceptions import HardTimeLimitExceeded, JobAborted, SoftTimeLimitExceeded
from jobs.reconnect import Outage, backoff_delays, is_connection_error
from jobs.registry import DEFAULT_HARD_TIME_LIMIT, DEFAULT_SOFT_TIME_LIMIT, TaskSpec, find_task

logger = logging.getLogger(__name__)

FLUSH_WINDOW = 0.005  # seconds an ending waits for others to share its finish statement
FLUSH_MAX = 64  # endings per finish statement


def worker_pool(*, concurrency: int) -> psycopg_pool.AsyncConnectionPool:
    """The worker's pool of autocommit connections with prepared statements; opened without waiting."""
    params = connector_params("default")
    params.pop("pool", None)
    return psycopg_pool.AsyncConnectionPool(
        conninfo="",
        kwargs={**params, "autocommit": True, "prepare_threshold": 0},
        min_size=2,
        max_size=min(concurrency, 8) + 4,  # claim/finish + heartbeat + progress writers + deferrer
        open=False,
        timeout=5.0,
        # No check on checkout (a round trip each): a broken connection fails its statement, which
        # is retried, and the pool drops it.
        name="skiplock-worker",
    )


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def import_task_modules() -> None:
    """Import the task modules a worker serves beside each app's tasks.py (SKIPLOCK_IMPORT_PATHS)."""
    for path in settings.SKIPLOCK_IMPORT_PATHS:
        importlib.import_module(path)


@dataclass
class Running:
    """One attempt this worker runs."""

    job: recording.Claimed
    ctx: JobContext
    started_at: dt.datetime
    is_async: bool
    task: asyncio.Task[None] | None = None
    cancel_reason: str | None = None  # abort | soft | hard | shutdown | taken_back
    written_off: bool = False  # requeued or taken back: its ending is dropped
    timer: asyncio.TimerHandle | None = None
    progress_writer: asyncio.Task[None] | None = None
    writing: asyncio.Future[None] | None = None  # a progress write in flight


@dataclass
class _Wake:
    """Why the claimer woke up."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    notified: bool = False  # a job was inserted or a lock released
    slot_freed: bool = False


class Worker:
    """One worker: claims, runs and finishes jobs until stopped (module docstring)."""

    def __init__(
        self,
        *,
        queues: list[str] | None = None,
        concurrency: int = 1,
        name: str | None = None,
        wait: bool = True,
        listen_notify: bool = True,
        shutdown_grace: float | None = None,
        heartbeat_interval: float | None = None,
        poll_interval: float | None = None,
        abort_job_polling_interval: float | None = None,
        stalled_after: float | None = None,
        processes: int = 1,
        periodic: bool | None = None,
        sweep_on_start: bool | None = None,
        recover_stalled: bool | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        flush_window: float = FLUSH_WINDOW,
        flush_max: int = FLUSH_MAX,
        prefetch: int | None = None,
    ) -> None:
        if queues and maintenance.MAINTENANCE_QUEUE not in queues:
            queues = [*queues, maintenance.MAINTENANCE_QUEUE]  # every worker can run maintenance
        self.queues = queues or None
        self.concurrency = concurrency
        self.name = name or default_worker_name()
        self.wait = wait
        self.listen_notify = listen_notify
        self.shutdown_grace = float(settings.SKIPLOCK_SHUTDOWN_GRACE if shutdown_grace is None else shutdown_grace)
        self.heartbeat_interval = float(
            settings.SKIPLOCK_HEARTBEAT_INTERVAL if heartbeat_interval is None else heartbeat_interval
        )
        self.poll_interval = float(settings.SKIPLOCK_FETCH_POLL_INTERVAL if poll_interval is None else poll_interval)
        self.abort_poll_interval = min(self.heartbeat_interval, abort_job_polling_interval or self.heartbeat_interval)
        self.stalled_after = float(settings.SKIPLOCK_STALLED_AFTER if stalled_after is None else stalled_after)
        self.processes = processes
        self.periodic = wait if periodic is None else periodic  # a drain-and-exit worker runs no schedule
        self.sweep_on_start = wait if sweep_on_start is None else sweep_on_start
        self.recover_stalled = wait if recover_stalled is None else recover_stalled
        self.on_event = on_event
        self.flush_window = flush_window
        self.flush_max = flush_max
        # Jobs claimed ahead of a free slot, so a slot that frees starts its next job at once instead
        # of waiting for a round trip. A buffered job is `doing` (it holds its lock and no other
        # worker can take it), so by default the buffer is sized to what ends during one and a half
        # round trips: full for jobs shorter than a round trip, none for jobs of a second or more
        # (`_prefetch_now`). An explicit `prefetch` fixes the size.
        self.prefetch = prefetch
        self._job_seconds = 1.0  # moving average of how long a job runs (starts cautious: no prefetch)
        self._trip_seconds = 0.002  # moving average of a finish-and-claim round trip

        self.worker_id: int | None = None
        self.pool: psycopg_pool.AsyncConnectionPool | None = None
        self.jobs_left_running = 0  # sync jobs still running in threads after shutdown
        self._running: dict[int, Running] = {}
        self._buffer: collections.deque[recording.Claimed] = collections.deque()  # claimed, not started
        self._pending: list[recording.Ending] = []
        self._pending_since = 0.0  # loop time when the oldest unwritten ending arrived
        self._db_lock = asyncio.Lock()  # one claim/finish round trip at a time
        self._wake = _Wake()
        self._rate_wake: asyncio.TimerHandle | None = None
        self._limited_waiting = True  # jobs may wait under limits: claim them too (CLAIM says)
        self._claim_again = False
        self._stop = asyncio.Event()
        self._force_stop = asyncio.Event()
        self._needs_reconcile = False
        self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="job")
        self._outage = Outage(logger)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writers: set[asyncio.Task[None]] = set()
        self._supervised = timelimits.supervised()
        self._reports: list[str] = []  # job starts/ends for the supervisor, sent in batches

    # -- control -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop claiming; running jobs get the grace period, then are requeued."""
        self._stop.set()
        self._wake.event.set()

    def stop_now(self) -> None:
        """Stop without waiting for the grace period (running jobs are requeued)."""
        self._force_stop.set()
        self.stop()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        """SIGTERM/SIGINT: stop claiming and drain (grace period); a second one: requeue now."""

        def on_signal(signum: int) -> None:
            if self._stop.is_set():
                logger.warning("second %s: requeueing the running jobs now", signal.Signals(signum).name)
                self.stop_now()
            else:
                logger.info("%s: stopping after the running jobs (grace %.0f s)", signal.Signals(signum).name,
                            self.shutdown_grace)
                self.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)

    def report(self, event: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(event)

    # -- lifecycle -----------------------------------------------------------------------------
    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        # The pool would log each failed reconnection; the outage log says it once (jobs.reconnect.Outage).
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
        self.pool = worker_pool(concurrency=self.concurrency)
        await self.pool.open(wait=False)
        side: list[asyncio.Task[Any]] = []
        try:
            await self._register()
            if self.worker_id is None:
                return  # stopped before the database came back
            if self.sweep_on_start:
                await self._recover_stalled()
            side = self._start_side_tasks()
            await self._claim_loop()
        finally:
            await self._shutdown(side)
            await self.pool.close(timeout=2.0)
            self._threads.shutdown(wait=False, cancel_futures=True)

    def _start_side_tasks(self) -> list[asyncio.Task[Any]]:
        side = [
            asyncio.create_task(self._heartbeat_forever(), name="heartbeat"),
        ]
        if self.listen_notify:
            side.append(asyncio.create_task(self._listen_forever(), name="listener"))
        if self.periodic:
            from jobs import periodic

            side.append(asyncio.create_task(periodic.run_deferrer(self, stop=self._stop), name="deferrer"))
        return side

    async def _db(self, operation: Callable[[psycopg.AsyncConnection[Any]], Any], *, what: str,
                  stop: asyncio.Event | None = None) -> Any:
        """Run `operation` on a pooled connection, retrying while the database is unreachable."""
        assert self.pool is not None
        delays = backoff_delays()
        while True:
            try:
                async with self.pool.connection() as conn:
                    result = await operation(conn)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                self._outage.failed(exc, what)
                if stop is not None and stop.is_set():
                    raise
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for((stop or asyncio.Event()).wait(), timeout=next(delays))
                continue
            self._outage.recovered()
            return result

    async def _register(self) -> None:
        async def register(conn: psycopg.AsyncConnection[Any]) -> int:
            cursor = await conn.execute(transitions.REGISTER_WORKER, {
                "name": self.name, "hostname": socket.gethostname(), "pid": os.getpid(),
                "queues": json.dumps(list(self.queues or [])), "concurrency": self.concurrency,
                "processes": self.processes,
            })
            row = await cursor.fetchone()
            assert row is not None
            return int(row[0])

        try:
            self.worker_id = await self._db(register, what="registering the worker", stop=self._stop)
        except Exception:
            if self._stop.is_set():
                return
            raise
        logger.info("worker %s registered (id %s) on %s, concurrency %s", self.name, self.worker_id,
                    ", ".join(self.queues) if self.queues else "all queues", self.concurrency)
        self.report({"event": "worker", "worker_id": self.worker_id})

    # -- claiming ------------------------------------------------------------------------------
    async def _claim_loop(self) -> None:
        """The worker's one round-tripper: finishes what ended and claims what fits, together.

        Endings ride along with the next claim; while a round trip is in flight the next batch of
        endings gathers (group commit without a timer). Only when no claim is due do endings wait,
        at most `flush_window`, for a finish-only round trip.
        """
        more = True  # the last claim filled every free slot, or something said work is waiting
        delays = backoff_delays()
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            wake = self._wake
            free = self._wanted()
            claim = free > 0 and (more or wake.notified)
            flush_due = bool(self._pending) and (
                len(self._pending) >= self.flush_max or loop.time() >= self._pending_since + self.flush_window)
            if claim or flush_due:
                if claim:
                    wake.notified = wake.slot_freed = False
                    if self._pending and self._running:
                        # Neighbours finishing in this same loop iteration share the round trip.
                        await asyncio.sleep(0)
                        free = self._wanted()
                try:
                    claimed = await self._finish_and_claim(free if claim else 0)
                except Exception as exc:
                    if not is_connection_error(exc):
                        logger.exception("claiming jobs failed; retrying")
                    await self._sleep(next(delays))
                    more = True
                    continue
                delays = backoff_delays()
                for job in claimed:
                    if len(self._running) < self.concurrency and not self._buffer:
                        self._start(job)
                    else:
                        self._buffer.append(job)
                self._send_reports()  # before any of them runs: a job stuck in C must be known
                if claim:
                    more = len(claimed) == free or self._claim_again
                    self._claim_again = False
                    if more:
                        continue
                    if not claimed and not self.wait and not self._running and not self._buffer:
                        return  # drained: nothing runnable, nothing running
                if self._pending:
                    continue  # ended while the round trip was in flight
            wake.event.clear()
            free = self._wanted()
            if not (wake.slot_freed or (wake.notified and free > 0) or self._stop.is_set()):
                timeout = self.poll_interval
                if self._pending:
                    timeout = max(0.0, min(timeout, self._pending_since + self.flush_window - loop.time()))
                try:
                    await asyncio.wait_for(wake.event.wait(), timeout=timeout)
                except TimeoutError:
                    if not self._pending:
                        more = True  # poll: jobs may have become due, or a wake-up was missed
            if wake.slot_freed:
                wake.slot_freed = False
                if not self.wait:
                    more = True  # a drain-and-exit worker tries again whenever a job ends (lock chains)

    def _wanted(self) -> int:
        """How many jobs to claim now: the free slots, plus what keeps the prefetch buffer full."""
        return self.concurrency + self._prefetch_now() - len(self._running) - len(self._buffer)

    def _prefetch_now(self) -> int:
        """Jobs to hold ahead: those that end, at full concurrency, while 1.5 round trips go by."""
        if self.prefetch is not None:
            return self.prefetch
        if self.concurrency < 4:
            return 0  # a small worker holds no job it cannot start: what waits stays cancellable
        ending_meanwhile = 1.5 * self._trip_seconds * self.concurrency / max(self._job_seconds, 1e-4)
        return min(self.concurrency, round(ending_meanwhile))

    async def _finish_and_claim(self, n: int) -> list[recording.Claimed]:
        """Finish what is pending and claim up to `n` jobs: one round trip, one transaction."""

        async def round_trip(conn: psycopg.AsyncConnection[Any]) -> list[recording.Claimed]:
            if self._needs_reconcile:
                await self._reconcile(conn)
            if len(self._pending) > self.flush_max:
                await self._flush_on(conn)  # a backlog (after an outage): its own statements first
            for _ in range(5):
                batch = self._pending[: self.flush_max]
                sent = time.monotonic()
                try:
                    finished, rows = await self._pipelined(conn, batch, n)
                except psycopg.errors.UniqueViolation:
                    # Two claimers saw two heads of one lock (the index refused ours), or two retries
                    # of one queueing lock in the batch: finish on its own, then claim again.
                    if batch:
                        await self._flush_on(conn)
                    continue
                except psycopg.errors.ForeignKeyViolation:
                    await self._register_again("the claim found this worker's registration gone")
                    return []
                except Exception as exc:
                    if is_connection_error(exc):
                        self._needs_reconcile = True  # the claim may have committed without its answer
                    raise
                self._settle(batch, finished)
                self._trip_seconds += 0.2 * (time.monotonic() - sent - self._trip_seconds)
                claimed = [recording.Claimed(*row[:9]) for row in rows]
                claimed.sort(key=lambda job: (-job.priority, job.id))
                return claimed
            return []

        async with self._db_lock:
            result: list[recording.Claimed] = await self._db(round_trip, what="claiming jobs", stop=self._stop)
            return result

    async def _pipelined(
        self, conn: psycopg.AsyncConnection[Any], batch: list[recording.Ending], n: int,
    ) -> tuple[list[Any], list[Any]]:
        """The finish statement (if any ending waits) then the claim, sent together.

        In pipeline mode both run in one implicit transaction: one round trip and one commit, and
        the claim already sees the locks the finished jobs released.
        """
        async with conn.pipeline():
            finish = None
            if batch:
                finish = await _execute(conn, _END_ATTEMPTS, finish_params(
                    batch, worker_id=self.worker_id, worker_name=self.name))
            claim = limited = None
            if n > 0:
                params = {"queues": self.queues, "n": n, "worker_id": self.worker_id}
                claim = await _execute(conn, _CLAIM, params)
                if self._limited_waiting:
                    # Jobs under limits (flow control) are claimed by their own statement, after
                    # the claim, within the same `n`: it counts what the claim took against `held`.
                    held = len(self._running) + len(self._buffer) + len(self._pending) - len(batch)
                    limited = await _execute(conn, _CLAIM_LIMITED, {**params, "held": held})
        finished = await finish.fetchall() if finish is not None else []
        rows: list[Any] = []
        if claim is not None:
            answered = await claim.fetchall()
            waiting = bool(answered and answered[0][10])
            if waiting and limited is None:
                self._claim_again = True  # jobs wait under a limit: claim them at once
            self._limited_waiting = waiting
            rows = [row for row in answered if row[0] is not None]
        if limited is not None:
            for row in await limited.fetchall():
                if row[0] is None:
                    self._wake_in(row[9])
                else:
                    rows.append(row)
        return finished, rows

    async def _reconcile(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Requeue `doing` jobs of ours that we do not run (a claim whose answer was lost)."""
        cursor = await conn.execute(transitions.HELD_BY_WORKER, {"worker_id": self.worker_id})
        held = {row[0]: row[1] for row in await cursor.fetchall()}
        pending = {ending.job.id for ending in self._pending}
        orphans = sorted(set(held) - set(self._running) - pending - {job.id for job in self._buffer})
        if orphans:
            logger.warning("jobs %s were claimed by this worker in a round trip whose answer was lost; "
                           "requeueing them", orphans)
            now = dt.datetime.now(dt.UTC)
            for job_id in orphans:
                job = recording.Claimed(job_id, "", "", 0, None, None, {}, held[job_id])
                self._pending.append(recording.requeued(
                    job, now, error_type="WorkerLost", message="claimed in a round trip whose answer was lost",
                ))
        self._needs_reconcile = False

    async def _register_again(self, why: str) -> None:
        logger.error("%s (it looked dead to the others); registering again", why)
        self._buffer.clear()  # taken back with the rest
        for running in self._running.values():
            self._write_off(running, "taken_back")
        if self._pending:  # fenced on the old registration, they would match nothing
            logger.warning("dropping the outcomes of jobs %s: they were taken back", [e.job.id for e in self._pending])
            self._pending.clear()
        self.worker_id = None
        await self._register()

    # -- running -------------------------------------------------------------------------------
    def _start(self, job: recording.Claimed) -> None:
        spec = find_task(job.task_name)
        ctx = JobContext(
            job_id=job.id, attempt=job.attempts + 1, task_name=job.task_name, queue=job.queue,
            args=job.args,
            soft_time_limit=spec.soft_time_limit if spec else DEFAULT_SOFT_TIME_LIMIT,
            hard_time_limit=spec.hard_time_limit if spec else DEFAULT_HARD_TIME_LIMIT,
            abort_requested=job.abort_requested, worker_id=self.worker_id,
        )
        procrastinate_task = app.tasks.get(job.task_name)
        func = procrastinate_task.func if procrastinate_task is not None else None
        running = Running(job=job, ctx=ctx, started_at=dt.datetime.now(dt.UTC),
                          is_async=inspect.iscoroutinefunction(func))
        ctx._on_progress = self._progress_callback(running)
        self._running[job.id] = running
        running.task = asyncio.create_task(self._run(running, spec, procrastinate_task), name=f"job {job.id}")
        assert self._loop is not None
        running.timer = self._loop.call_later(ctx.soft_time_limit, self._time_limit, running, "soft")
        if self._supervised:
            self._reports.append(f"s {job.id} {ctx.hard_time_limit!r}\n")

    def _send_reports(self) -> None:
        timelimits.report_jobs(self._reports)
        self._reports.clear()

    async def _run(self, running: Running, spec: TaskSpec | None, procrastinate_task: Any) -> None:
        job = running.job
        token = _current.set(running.ctx)
        ending: recording.Ending | None
        try:
            if procrastinate_task is None:
                raise procrastinate_exceptions.TaskNotFound(
                    f"task {job.task_name!r} is not registered in this worker; check SKIPLOCK_IMPORT_PATHS"
                )
            args = self._arguments(running, procrastinate_task)
            if running.is_async:
                value = await procrastinate_task.func(**args)
            else:
                assert self._loop is not None
                value = await self._loop.run_in_executor(self._threads, self._call_sync, running,
                                                         procrastinate_task.func, args)
            ending = recording.succeeded(job, running.started_at, recording.encode_result(value))
        except asyncio.CancelledError as exc:
            ending = self._cancelled(running, spec, procrastinate_task, exc)
        except GeneratorExit:
            raise  # this coroutine is being closed (its loop is gone): nothing to record
        except BaseException as exc:  # SystemExit, KeyboardInterrupt…: this job's failure, never the worker's
            ending = recording.failed(job, running.started_at, exc, policy=spec.retry if spec else None,
                                      procrastinate_task=procrastinate_task,
                                      abort_requested=running.ctx.abort_requested)
        finally:
            with contextlib.suppress(ValueError):  # closed from another context when its loop is gone
                _current.reset(token)
        if running.writing is not None and not running.writing.done():
            # Its last progress write is in flight: let it land before the end is recorded (it would
            # otherwise meet the ended attempt's fence and be lost, its value with it).
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([running.writing], timeout=5.0)
        self._job_done(running, ending)

    def _arguments(self, running: Running, procrastinate_task: Any) -> dict[str, Any]:
        args = dict(running.job.args)
        if getattr(procrastinate_task, "pass_context", False):
            args = {"context": job_context.JobContext(
                app=app, worker_name=self.name, worker_queues=self.queues, job=running.job.as_procrastinate_job(),
                abort_reason=lambda: job_context.AbortReason.USER_REQUEST if running.ctx.abort_requested else None,
                start_timestamp=time.time(),
            ), **args}
            return args
        return args

    def _call_sync(self, running: Running, func: Callable[..., Any], args: dict[str, Any]) -> Any:
        """In a pool thread: run a sync task with its context, Django connections handled as per request."""
        from django.db import close_old_connections, reset_queries

        ctx = running.ctx
        ctx.thread_id = threading.get_ident()
        token = _current.set(ctx)
        close_old_connections()
        try:
            return func(**args)
        finally:
            ctx.thread_id = None
            timelimits.raise_in_thread(threading.get_ident(), None)  # an interruption that came too late
            _current.reset(token)
            close_old_connections()
            reset_queries()

    def _cancelled(self, running: Running, spec: TaskSpec | None, procrastinate_task: Any,
                   exc: asyncio.CancelledError) -> recording.Ending | None:
        reason = running.cancel_reason
        if reason in ("soft", "hard"):
            kind = SoftTimeLimitExceeded if reason == "soft" else HardTimeLimitExceeded
            limit = running.ctx.soft_time_limit if reason == "soft" else running.ctx.hard_time_limit
            error = kind(f"{reason} time limit exceeded ({limit:g} s)")
            return recording.failed(running.job, running.started_at, error, policy=spec.retry if spec else None,
                                    procrastinate_task=procrastinate_task, abort_requested=running.ctx.abort_requested)
        if reason == "abort":
            return recording.failed(running.job, running.started_at, exc, policy=None, procrastinate_task=None,
                                    abort_requested=True)
        if reason is None and not running.written_off:
            # Cancelled from outside (the loop is going away): requeue, never lose it.
            self._write_off(running, "shutdown")
            return recording.requeued(running.job, running.started_at, error_type="WorkerShutdown",
                                      message="the worker stopped before the job finished; it was requeued")
        return None

    def _job_done(self, running: Running, ending: recording.Ending | None) -> None:
        job_id = running.job.id
        ran = (dt.datetime.now(dt.UTC) - running.started_at).total_seconds()
        self._job_seconds += 0.1 * (ran - self._job_seconds)
        if running.timer is not None:
            running.timer.cancel()
        if self._running.get(job_id) is running:
            del self._running[job_id]
        if self._supervised:
            if not self._reports:
                assert self._loop is not None
                self._loop.call_soon(self._send_reports)
            self._reports.append(f"e {job_id}\n")
        if self._buffer and not self._stop.is_set():
            self._start(self._buffer.popleft())  # the slot's next job, claimed ahead
            self._send_reports()
        if ending is not None and running.written_off and ending.status != "requeue":
            logger.info("job %s was taken back from this worker while it ran; its outcome (%s) is dropped",
                        job_id, ending.status)
            ending = None
        if ending is not None:
            pending = running.ctx.take_progress()
            if pending is not None:
                ending.progress, ending.step = pending
            self._add_ending(ending)
        self._wake.slot_freed = True
        self._wake.event.set()

    def _add_ending(self, ending: recording.Ending) -> None:
        """Queue an ending for the next round trip (the claim loop writes it within flush_window)."""
        if not self._pending:
            self._pending_since = asyncio.get_running_loop().time()
        self._pending.append(ending)
        self._wake.event.set()

    def _time_limit(self, running: Running, kind: str) -> None:
        if running.task is None or running.task.done():
            return
        ctx = running.ctx
        if kind == "soft":
            ctx.soft_limit_hit = True
            assert self._loop is not None
            running.timer = self._loop.call_later(max(0.0, ctx.hard_time_limit - ctx.soft_time_limit),
                                                  self._time_limit, running, "hard")
        limit = ctx.soft_time_limit if kind == "soft" else ctx.hard_time_limit
        logger.warning("job %s (%s) ran past its %s time limit of %g s", running.job.id, running.job.task_name,
                       kind, limit)
        if running.is_async:
            running.cancel_reason = kind
            running.task.cancel()
        elif ctx.thread_id is not None:
            timelimits.raise_in_thread(ctx.thread_id, SoftTimeLimitExceeded if kind == "soft" else HardTimeLimitExceeded)

    def _write_off(self, running: Running, reason: str) -> None:
        """Stop a running attempt here because it is no longer ours to finish."""
        running.written_off = True
        if running.cancel_reason is None:
            running.cancel_reason = reason
        self._interrupt(running, reason)

    def _interrupt(self, running: Running, reason: str) -> None:
        if running.is_async:
            if running.task is not None and not running.task.done():
                running.cancel_reason = running.cancel_reason or reason
                running.task.cancel()
        elif running.ctx.thread_id is not None:
            timelimits.raise_in_thread(running.ctx.thread_id, JobAborted)  # not an Exception: uncatchable by `except Exception`

    def _abort_requested(self, job_ids: list[int]) -> None:
        for job_id in job_ids:
            buffered = next((job for job in self._buffer if job.id == job_id), None)
            if buffered is not None:  # never started: it ends aborted without running
                self._buffer.remove(buffered)
                self._add_ending(recording.Ending(
                    job=buffered, status="aborted", outcome="aborted", started_at=dt.datetime.now(dt.UTC),
                    error_type="JobAborted", error_message="aborted before it started", traceback="",
                ))
                continue
            running = self._running.get(job_id)
            if running is None or running.ctx.abort_requested:
                continue
            logger.info("job %s: abort requested", job_id)
            running.ctx.abort_requested = True
            if running.is_async and running.task is not None and not running.task.done():
                running.cancel_reason = "abort"
                running.task.cancel()
            elif running.ctx.interrupt_on_abort and running.ctx.thread_id is not None:
                timelimits.raise_in_thread(running.ctx.thread_id, JobAborted)  # jobs.celery: revoke(terminate=True)

    # -- progress ------------------------------------------------------------------------------
    def _progress_callback(self, running: Running) -> Callable[[], None]:
        def on_progress() -> None:
            loop = self._loop
            if loop is None:
                return
            try:
                same_loop = asyncio.get_running_loop() is loop
            except RuntimeError:
                same_loop = False
            if same_loop:
                self._ensure_progress_writer(running)
            else:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._ensure_progress_writer, running)

        return on_progress

    def _ensure_progress_writer(self, running: Running) -> None:
        if running.progress_writer is None and running.task is not None and not running.task.done():
            running.progress_writer = asyncio.create_task(self._write_progress(running), name=f"progress {running.job.id}")
            self._writers.add(running.progress_writer)

    async def _write_progress(self, running: Running) -> None:
        """Write the newest reported progress, at most once per SKIPLOCK_PROGRESS_INTERVAL, fenced."""
        interval = float(settings.SKIPLOCK_PROGRESS_INTERVAL)
        assert self.pool is not None
        try:
            while running.task is not None and not running.task.done():
                taken = running.ctx.take_progress()
                if taken is None:
                    return
                params = {"job_id": running.job.id, "worker_id": self.worker_id, "attempts": running.job.attempts,
                          "progress": taken[0], "step": taken[1]}
                assert self._loop is not None
                running.writing = self._loop.create_future()
                try:
                    async with self.pool.connection() as conn:
                        await _execute(conn, _WRITE_PROGRESS, params)
                except Exception as exc:  # best effort: the finish statement carries the last value
                    if is_connection_error(exc):
                        self._outage.failed(exc, "writing progress")
                    else:
                        logger.warning("could not store progress of job %s", running.job.id, exc_info=True)
                finally:
                    if not running.writing.done():
                        running.writing.set_result(None)
                await asyncio.sleep(interval)
        finally:
            running.progress_writer = None
            self._writers.discard(asyncio.current_task())

    # -- finishing -----------------------------------------------------------------------------
    async def flush(self) -> None:
        """Write every pending ending now (one statement per FLUSH_MAX endings)."""
        async with self._db_lock:
            await self._db(self._flush_on, what="recording finished jobs")

    async def _flush_on(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while self._pending:
            batch = self._pending[: self.flush_max]
            try:
                rows = await self._finish(conn, batch)
            except psycopg.errors.UniqueViolation:
                if len(batch) == 1:
                    raise
                rows = []  # two retries of one queueing lock in one batch: one statement each
                for ending in batch:
                    rows += await self._finish(conn, [ending])
            self._settle(batch, rows)

    def _settle(self, batch: list[recording.Ending], rows: list[Any]) -> None:
        """Forget a written batch; say which endings matched no attempt (taken back meanwhile)."""
        del self._pending[: len(batch)]
        ours = {row[0] for row in rows}
        for ending in batch:
            if ending.job.id not in ours:
                logger.warning("job %s is no longer this worker's attempt (taken back meanwhile); "
                               "its outcome (%s) is dropped", ending.job.id, ending.status)

    async def _finish(self, conn: psycopg.AsyncConnection[Any], batch: list[recording.Ending]) -> list[Any]:
        cursor = await _execute(conn, _END_ATTEMPTS, finish_params(batch, worker_id=self.worker_id,
                                                                      worker_name=self.name))
        return await cursor.fetchall()

    # -- heartbeat, aborts, ownership, stall recovery ------------------------------------------
    async def _heartbeat_forever(self) -> None:
        last_beat = last_recovery = time.monotonic()
        while True:
            await asyncio.sleep(self.abort_poll_interval)
            now = time.monotonic()
            if not self._running and not self._buffer and now - last_beat < self.heartbeat_interval:
                continue
            try:
                await self._beat()
                last_beat = now
            except Exception as exc:
                if is_connection_error(exc):
                    self._outage.failed(exc, "heartbeat")
                else:
                    logger.exception("heartbeat failed")
                continue
            self._outage.recovered()
            if self.recover_stalled and now - last_recovery >= self.heartbeat_interval:
                last_recovery = now
                await self._recover_stalled()

    async def _beat(self) -> None:
        assert self.pool is not None
        beating_as = self.worker_id
        held = [r.job for r in self._running.values()] + list(self._buffer)
        async with self.pool.connection() as conn:
            cursor = await _execute(conn, _HEARTBEAT, {
                "worker_id": beating_as, "ids": [job.id for job in held], "attempts": [job.attempts for job in held],
            })
            row = await cursor.fetchone()
        assert row is not None
        alive, to_abort, not_ours = row
        if to_abort:
            self._abort_requested(list(to_abort))
        for job_id in not_ours:
            for buffered in [b for b in self._buffer if b.id == job_id]:
                self._buffer.remove(buffered)
            job = self._running.get(job_id)
            if job is not None and not job.written_off:
                logger.error("job %s was taken back from this worker (it looked dead); stopping its run here", job_id)
                self._write_off(job, "taken_back")
        if not alive and self.worker_id == beating_as:
            async with self._db_lock:
                await self._register_again("this worker's registration was removed")

    async def _recover_stalled(self) -> None:
        """Take back the jobs of dead workers (from this loop: bounded whatever the slots' load)."""
        from asgiref.sync import sync_to_async

        try:
            await sync_to_async(_recover_stalled_jobs, thread_sensitive=False)(self.stalled_after)
        except Exception as exc:
            if is_connection_error(exc):
                self._outage.failed(exc, "recovering stalled jobs")
            else:
                logger.exception("recovering stalled jobs failed")

    # -- LISTEN --------------------------------------------------------------------------------
    async def _listen_forever(self) -> None:
        """LISTEN for new jobs, released locks and abort requests; reconnect with backoff."""
        channels = (
            ["procrastinate_any_queue_v1"] if not self.queues
            else [f"procrastinate_queue_v1#{queue}" for queue in self.queues]
        )
        params = connector_params("default")
        params.pop("pool", None)
        delays = backoff_delays(cap=5.0)
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(**params, autocommit=True)
                async with conn:
                    for channel in channels:
                        await conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
                    delays = backoff_delays(cap=5.0)
                    self._outage.recovered()
                    self._notify()  # jobs may have arrived while nobody listened
                    while True:
                        async for notification in conn.notifies(timeout=30.0):
                            self._on_notification(notification.payload)
                        await conn.execute("SELECT 1")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_connection_error(exc):
                    self._outage.failed(exc, "listening for new jobs")
                else:
                    logger.exception("LISTEN failed; reconnecting")
                await asyncio.sleep(next(delays))

    def _on_notification(self, payload: str) -> None:
        try:
            message = json.loads(payload)
            kind = message["type"]
        except (ValueError, KeyError, TypeError):
            return
        if kind == "job_inserted":
            self._notify()
        elif kind == "abort_job_requested":
            with contextlib.suppress(KeyError, TypeError, ValueError):
                self._abort_requested([int(message["job_id"])])

    def _notify(self) -> None:
        self._wake.notified = True
        self._wake.event.set()

    def _wake_in(self, seconds: float) -> None:
        """Claim again once a rate limit admits another start (the claim said when)."""
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, float(seconds))
        if self._rate_wake is not None:
            if loop.time() < self._rate_wake.when() <= when:
                return  # an earlier wake-up is already due
            self._rate_wake.cancel()
        self._rate_wake = loop.call_at(when, self._notify)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    # -- shutdown ------------------------------------------------------------------------------
    async def _shutdown(self, side: list[asyncio.Task[Any]]) -> None:
        while self._buffer:  # claimed ahead, never started: back to the queue, no attempt recorded
            job = self._buffer.popleft()
            self._pending.append(recording.Ending(job=job, status="release", outcome="released",
                                                  started_at=dt.datetime.now(dt.UTC)))
        if self._running and not self._force_stop.is_set():
            logger.info("waiting up to %.0f s for %d running job(s)", self.shutdown_grace, len(self._running))
            tasks = [r.task for r in self._running.values() if r.task is not None]
            all_done = asyncio.ensure_future(asyncio.wait(tasks))
            forced = asyncio.ensure_future(self._force_stop.wait())
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.shutdown_grace
            while not (all_done.done() or forced.done()) and loop.time() < deadline:
                # Jobs that end during the grace period are recorded as they end, not at its close.
                await asyncio.wait([all_done, forced], timeout=min(max(self.flush_window, 0.05), deadline - loop.time()),
                                   return_when=asyncio.FIRST_COMPLETED)
                if self._pending and self.worker_id is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self.flush(), timeout=5.0)
            all_done.cancel()
            forced.cancel()
        if self._running:
            leftover = list(self._running.values())
            logger.warning("grace period over: requeueing %d running job(s) %s", len(leftover),
                           [r.job.id for r in leftover])
            for running in leftover:
                self._write_off(running, "shutdown")
                self._pending.append(recording.requeued(
                    running.job, running.started_at, error_type="WorkerShutdown",
                    message="the worker shut down before the job finished; it was requeued without using up a retry",
                ))
            tasks = [r.task for r in leftover if r.task is not None and not r.task.done()]
            if tasks:
                await asyncio.wait(tasks, timeout=3.0)
            self.jobs_left_running = sum(1 for r in leftover if r.task is not None and not r.task.done())
        for task in [*side, *self._writers]:
            task.cancel()
        for task in [*side, *self._writers]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.worker_id is not None:
            try:
                if self._pending:
                    await asyncio.wait_for(self.flush(), timeout=10.0)
            except Exception:
                logger.warning("could not record %d finished job(s) before stopping; stall recovery will "
                               "take them back", len(self._pending))
            worker_id = self.worker_id

            async def unregister(conn: psycopg.AsyncConnection[Any]) -> None:
                await conn.execute(transitions.UNREGISTER_WORKER, {"worker_id": worker_id})

            try:
                await asyncio.wait_for(self._db(unregister, what="unregistering the worker"), timeout=5.0)
            except Exception:
                logger.warning("could not unregister worker %s (database unreachable)", worker_id)
        self.worker_id = None
        logger.info("worker %s stopped", self.name)


class _Statement:
    """A hot-path statement in PostgreSQL's own `$n` form, sent by a raw cursor as it is.

    psycopg parses `%(name)s` queries on every call once they are longer than its cache allows
    (4 kB); the finish statement is longer. Converted once here, prepared once per connection.
    """

    def __init__(self, sql: str) -> None:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match.group(1) not in names:
                names.append(match.group(1))
            return f"${names.index(match.group(1)) + 1}"

        self.sql = re.sub(r"%\((\w+)\)s", number, sql)
        self.names = tuple(names)

    def args(self, params: dict[str, Any]) -> list[Any]:
        return [params[name] for name in self.names]


_CLAIM = _Statement(transitions.CLAIM)
_CLAIM_LIMITED = _Statement(transitions.CLAIM_LIMITED)
_END_ATTEMPTS = _Statement(transitions.END_ATTEMPTS)
_WRITE_PROGRESS = _Statement(transitions.WRITE_PROGRESS)
_HEARTBEAT = _Statement(transitions.HEARTBEAT)


async def _execute(conn: psycopg.AsyncConnection[Any], statement: _Statement,
                   params: dict[str, Any]) -> psycopg.AsyncRawCursor[Any]:
    cursor = psycopg.AsyncRawCursor(conn)
    await cursor.execute(statement.sql, statement.args(params), prepare=True)
    return cursor


def finish_params(batch: list[recording.Ending], *, worker_id: int | None, worker_name: str) -> dict[str, Any]:
    """END_ATTEMPTS' parallel arrays for a batch of this worker's endings."""
    return {
        "ids": [e.job.id for e in batch],
        "worker_ids": [worker_id] * len(batch),
        "attempts": [e.job.attempts for e in batch],
        "statuses": [e.status for e in batch],
        "outcomes": [e.outcome for e in batch],
        "retry_at": [e.retry_at for e in batch],
        "results": [e.result for e in batch],
        "error_types": [e.error_type for e in batch],
        "error_messages": [e.error_message for e in batch],
        "tracebacks": [e.traceback for e in batch],
        "started": [e.started_at for e in batch],
        "worker_names": [worker_name] * len(batch),
        "progress": [e.progress for e in batch],
        "steps": [e.step for e in batch],
    }


def _recover_stalled_jobs(stalled_after: float) -> None:
    from django.db import connections

    try:
        recovery = transitions.recover_stalled(stalled_after=stalled_after)
        if recovery.retried or recovery.failed:
            logger.warning("jobs of dead workers taken back: %d requeued %s, %d failed %s", len(recovery.retried),
                           recovery.retried[:20], len(recovery.failed), recovery.failed[:20])
    finally:
        connections.close_all()


async def run_worker(
    *,
    install_signal_handlers: bool = True,
    on_started: Callable[[Worker], None] | None = None,
    **options: Any,
) -> Worker:
    """Run a worker until it is stopped (or, with wait=False, until nothing is runnable)."""
    import_task_modules()
    app.perform_import_paths()
    worker = Worker(**options)
    loop = asyncio.get_running_loop()
    if install_signal_handlers:
        worker.install_signal_handlers(loop)
    if on_started is not None:
        on_started(worker)
    run = asyncio.ensure_future(worker.run())
    try:
        await asyncio.shield(run)
    except asyncio.CancelledError:
        worker.stop()
        await run
        raise
    finally:
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    return worker
