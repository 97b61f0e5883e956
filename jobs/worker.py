"""Running a procrastinate worker with Skiplock's recording and recovery, in this process.

Used by the `worker` command (one per supervised process), the in-web worker and the testing
helper alike, so every path runs jobs the same way. `SkiplockWorker` is procrastinate's worker
with what it lacks for production (procrastinate notes §2, §5, §6):

- **Database outages** never stop it: registering, fetching, heartbeats, LISTEN, the periodic
  deferrer and recording an outcome all retry with backoff until PostgreSQL is back (the
  engine's own worker stops or hangs when a side task hits a dropped connection).
- **Outcomes are fenced**: a job is finished or retried only while it is still this worker's
  attempt (`status = 'doing' AND worker_id = us AND attempts = n`), so a job the sweeper took
  back, or one requeued at shutdown, can never be overwritten by a late result.
- **Shutdown never loses a job**: after the grace period the jobs still running are requeued
  (attempt outcome `aborted`, error `WorkerShutdown`) before they are aborted locally.
- **Lost ownership is noticed**: each heartbeat checks that the running jobs are still ours
  and aborts locally those that are not; a fetch whose answer was lost in a dropped
  connection is reconciled (a `doing` job of ours that we do not run is requeued).
- The worker is registered in `skiplock_worker` (name, host, pid, queues, concurrency) before
  it fetches, so the attempt trigger can name it; heartbeats keep `last_seen_at` fresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import psycopg
import psycopg_pool
from django.conf import settings
from procrastinate import job_context, jobs, utils
from procrastinate import retry as procrastinate_retry
from procrastinate.contrib.django import app
from procrastinate.contrib.django.utils import connector_params
from procrastinate.psycopg_connector import PsycopgConnector
from procrastinate.worker import Worker

from jobs import maintenance, timelimits, transitions
from jobs.reconnect import backoff_delays, is_connection_error, until_connected

logger = logging.getLogger(__name__)

PERSIST_RETRY_SECONDS = 600.0

_LOCK_OWNED = """
SELECT id, attempts FROM procrastinate_jobs
WHERE id = ANY(%(job_ids)s) AND status = 'doing' AND worker_id = %(worker_id)s
FOR UPDATE
"""

_ANNOUNCE_CLAIM = (
    "SELECT skiplock_announce(jsonb_agg(" + transitions.event_sql() + ")) "
    "FROM procrastinate_jobs j LEFT JOIN skiplock_job r ON r.job_id = j.id WHERE j.id = %(job_id)s"
)

_REGISTER = """
WITH w AS (INSERT INTO procrastinate_workers DEFAULT VALUES RETURNING id)
INSERT INTO skiplock_worker (worker_id, name, hostname, pid, queues, concurrency, processes,
                             started_at, last_seen_at)
SELECT id, %(name)s, %(hostname)s, %(pid)s, %(queues)s::jsonb, %(concurrency)s, %(processes)s, now(), now()
FROM w RETURNING worker_id
"""

_HEARTBEAT = """
WITH beat AS (UPDATE procrastinate_workers SET last_heartbeat = now() WHERE id = %(worker_id)s RETURNING id),
seen AS (UPDATE skiplock_worker SET last_seen_at = now() WHERE worker_id IN (SELECT id FROM beat))
SELECT count(*) FROM beat
"""

_NOT_OURS = """
SELECT id FROM procrastinate_jobs
WHERE id = ANY(%(job_ids)s) AND status IN ('todo', 'doing')
  AND (status <> 'doing' OR worker_id IS DISTINCT FROM %(worker_id)s)
"""

_OURS_IN_DB = "SELECT id FROM procrastinate_jobs WHERE status = 'doing' AND worker_id = %(worker_id)s"

_UNREGISTER = """
WITH gone AS (DELETE FROM procrastinate_workers WHERE id = %(worker_id)s)
UPDATE skiplock_worker SET stopped_at = now(), last_seen_at = now() WHERE worker_id = %(worker_id)s
"""


def worker_pool(*, concurrency: int) -> psycopg_pool.AsyncConnectionPool:
    """The worker's pool: opened without waiting, so a database that is down delays, never crashes."""
    return psycopg_pool.AsyncConnectionPool(
        conninfo="",
        kwargs=connector_params("default"),
        min_size=1,
        max_size=concurrency + 4,  # jobs' record writes + fetch/finish + heartbeat + abort polls + deferrer
        open=False,
        timeout=5.0,
        check=psycopg_pool.AsyncConnectionPool.check_connection,
        name="skiplock-worker",
    )


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def import_task_modules() -> None:
    """Import the task modules a worker serves beside each app's tasks.py (SKIPLOCK_IMPORT_PATHS)."""
    for path in settings.SKIPLOCK_IMPORT_PATHS:
        importlib.import_module(path)


def worker_options(
    *,
    queues: list[str] | None,
    concurrency: int,
    name: str | None,
    wait: bool,
    listen_notify: bool = True,
    shutdown_grace: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    if queues and maintenance.MAINTENANCE_QUEUE not in queues:
        queues = [*queues, maintenance.MAINTENANCE_QUEUE]  # every worker can run maintenance
    return {
        **app.worker_defaults,
        "queues": queues or None,
        "concurrency": concurrency,
        "name": name or default_worker_name(),
        "wait": wait,
        "listen_notify": listen_notify,
        "install_signal_handlers": False,  # SkiplockWorker.install_signal_handlers does it
        "shutdown_graceful_timeout": settings.SKIPLOCK_SHUTDOWN_GRACE if shutdown_grace is None else shutdown_grace,
        "update_heartbeat_interval": settings.SKIPLOCK_HEARTBEAT_INTERVAL,
        # procrastinate prunes workers silent for this long when a worker starts: never a live one.
        "stalled_worker_timeout": float(settings.SKIPLOCK_STALLED_AFTER),
        "fetch_job_polling_interval": settings.SKIPLOCK_FETCH_POLL_INTERVAL,
        "delete_jobs": "never",
        **extra,
    }


class SkiplockWorker(Worker):
    """procrastinate's worker, made to survive outages, shutdowns and lost jobs (module docstring)."""

    def __init__(
        self,
        *args: Any,
        processes: int = 1,
        periodic: bool = True,
        sweep_on_start: bool = True,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.processes = processes
        self.periodic = periodic
        self.sweep_on_start = sweep_on_start
        self.on_event = on_event
        self._fetch_lock = asyncio.Lock()
        self._abandoned: set[int] = set()
        self._force_stop = asyncio.Event()
        self._needs_reconcile = False
        self.jobs_left_running = 0  # sync jobs still running in threads after shutdown

    @property
    def pool(self) -> psycopg_pool.AsyncConnectionPool:
        return self.app.connector.pool  # type: ignore[attr-defined]

    def report(self, event: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(event)

    # -- signals -------------------------------------------------------------------------------
    def install_signal_handlers_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """SIGTERM/SIGINT: stop fetching and drain (grace period); a second one: requeue now."""

        def on_signal(signum: int) -> None:
            if self._stop_event.is_set():
                logger.warning("second %s: requeueing the running jobs now", signal.Signals(signum).name)
                self._force_stop.set()
            else:
                logger.info("%s: stopping after the running jobs (grace %.0f s)",
                            signal.Signals(signum).name, self.shutdown_graceful_timeout or 0)
            self.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)

    def stop(self) -> None:
        super().stop()

    def stop_now(self) -> None:
        """Stop without waiting for the grace period (running jobs are requeued)."""
        self._force_stop.set()
        self.stop()

    # -- lifecycle -----------------------------------------------------------------------------
    async def run(self) -> None:
        self._stop_event.clear()
        if self.sweep_on_start:
            # Jobs orphaned by a crash come back as soon as any worker starts. (lean-data adapter: before
            # pruning, so the dead workers' jobs are ended while their worker is still known.)
            await until_connected(self._sweep, what="recovering stalled jobs", stop=self._stop_event)
        await until_connected(
            lambda: self.app.job_manager.prune_stalled_workers(self.stalled_worker_timeout),
            what="pruning dead workers", stop=self._stop_event,
        )
        await self._register()
        self.run_task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        loop_task = asyncio.create_task(self._run_loop(), name="worker loop")
        try:
            await asyncio.shield(loop_task)
        except asyncio.CancelledError:
            self.stop()
            await loop_task
            raise
        finally:
            self._loop = None

    async def _sweep(self) -> None:
        from asgiref.sync import sync_to_async

        await sync_to_async(maintenance.recover_stalled_jobs, thread_sensitive=False)()

    async def _register(self) -> None:
        async def register() -> int:
            async with self.pool.connection() as conn, conn.transaction():
                cursor = await conn.execute(_REGISTER, {
                    "name": self.worker_name, "hostname": socket.gethostname(), "pid": os.getpid(),
                    "queues": json.dumps(list(self.queues or [])), "concurrency": self.concurrency,
                    "processes": self.processes,
                })
                row = await cursor.fetchone()
                assert row is not None
                return int(row[0])

        self.worker_id = await until_connected(register, what="registering the worker", stop=self._stop_event)
        logger.info("worker %s registered (id %s) on %s, concurrency %s", self.worker_name, self.worker_id,
                    utils.queues_display(self.queues), self.concurrency)
        self.report({"event": "worker", "worker_id": self.worker_id})

    def _start_side_tasks(self) -> list[asyncio.Task[Any]]:
        side_tasks = [
            asyncio.create_task(self._update_heartbeat(), name="update_heartbeats"),
            asyncio.create_task(self._poll_jobs_to_abort(), name="poll_jobs_to_abort"),
        ]
        if self.periodic:
            from jobs import periodic

            side_tasks.append(asyncio.create_task(
                periodic.run_deferrer(self.app.connector, stop=self._stop_event), name="deferrer"
            ))
        if self.listen_notify:
            side_tasks.append(asyncio.create_task(self._listen_forever(), name="listener"))
        return side_tasks

    # -- fetching ------------------------------------------------------------------------------
    async def _fetch_and_process_jobs(self) -> None:
        """procrastinate's fetch loop, with database errors turned into a backoff instead of a crash."""
        delays = backoff_delays()
        while not self._stop_event.is_set():
            acquire_sem_task = asyncio.create_task(self._job_semaphore.acquire())
            job = None
            failed = False
            try:
                await utils.wait_any(acquire_sem_task, self._stop_event.wait())
                if self._stop_event.is_set():
                    break
                assert self.worker_id is not None
                fetching_as = self.worker_id
                try:
                    async with self._fetch_lock:
                        if self._needs_reconcile:
                            await self._reconcile()
                        job = await self.app.job_manager.fetch_job(queues=self.queues, worker_id=self.worker_id)
                        if job is not None:  # lean-data adapter: announce the claim (no trigger does)
                            async with self.pool.connection() as conn:
                                await conn.execute(_ANNOUNCE_CLAIM, {"job_id": job.id})
                except Exception as exc:
                    failed = True
                    self._needs_reconcile = True  # the answer may be lost while the claim committed
                    if isinstance(exc.__cause__, psycopg.errors.ForeignKeyViolation):
                        if self.worker_id == fetching_as:  # the heartbeat may have re-registered already
                            logger.error("this worker's registration is gone; registering again")
                            await self._register()
                    elif not is_connection_error(exc):
                        logger.exception("fetching a job failed; retrying")
                    else:
                        logger.warning("fetching a job failed, database unreachable (%s); retrying", exc)
            finally:
                if (not job or self._stop_event.is_set()) and acquire_sem_task.done():
                    self._job_semaphore.release()
                self._new_job_event.clear()

            if failed:
                await self._sleep_or_stop(next(delays))
                continue
            delays = backoff_delays()
            if not job:
                break
            self._start_job(job)

    def _start_job(self, job: jobs.Job) -> None:
        job_id = job.id
        context = job_context.JobContext(
            app=self.app,
            worker_name=self.worker_name,
            worker_queues=self.queues,
            additional_context=self.additional_context.copy() if self.additional_context else {},
            job=job,
            abort_reason=functools.partial(self._abort_reason_of, job_id),
            start_timestamp=time.time(),
        )
        job_task = asyncio.create_task(self._process_job(context), name=f"process job {job.task_name}[{job.id}]")
        self._running_jobs[job_task] = context

        def on_job_complete(task: asyncio.Task[Any]) -> None:
            del self._running_jobs[task]
            self._job_semaphore.release()

        job_task.add_done_callback(on_job_complete)

    def _abort_reason_of(self, job_id: int | None) -> job_context.AbortReason | None:
        return self._job_ids_to_abort.get(job_id) if job_id else None

    async def _reconcile(self) -> None:
        """Requeue `doing` jobs of ours that we do not run (a claim whose answer was lost)."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(_OURS_IN_DB, {"worker_id": self.worker_id})
            in_db = {row[0] for row in await cursor.fetchall()}
        running = {ctx.job.id for ctx in self._running_jobs.values()}
        orphans = sorted(in_db - running)
        if orphans:
            logger.warning("jobs %s were claimed by this worker in a lost round trip; requeueing them", orphans)
            await self._requeue(orphans, outcome="lost", error_type="WorkerLost",
                                message="claimed by a worker whose connection dropped before it saw the job")
        self._needs_reconcile = False

    async def _sleep_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), timeout=seconds)

    # -- recording the outcome -----------------------------------------------------------------
    async def _persist_job_status(
        self,
        job: jobs.Job,
        status: jobs.Status,
        retry_decision: procrastinate_retry.RetryDecision | None,
        context: job_context.JobContext,
        job_result: job_context.JobResult | None,
    ) -> None:
        assert job.id is not None
        try:
            if job.id in self._abandoned:
                logger.info("job %s was requeued while it ran; its outcome (%s) is dropped", job.id, status.value)
                return
            timed_out = timelimits.pop_timed_out(job.id)
            # lean-data adapter: the fenced end of the attempt through jobs.transitions (no triggers).
            end = transitions.AttemptEnd(
                job_id=job.id, worker_id=self.worker_id, attempts=job.attempts,
                status="todo" if retry_decision is not None else status.value,
                outcome="timed_out" if timed_out else ("retried" if retry_decision is not None else status.value),
                retry_at=(retry_decision.retry_at or utils.utcnow()) if retry_decision is not None else None,
            )

            async def persist() -> int:
                async with self.pool.connection() as conn, conn.transaction():
                    cursor = await conn.execute(transitions.end_attempts_sql(), transitions.end_attempts_params([end]))
                    row = await cursor.fetchone()
                    return len(row[0]) if row else 0

            try:
                # However long the outage: if the sweeper takes the job back meanwhile, the fence drops this.
                owned = await until_connected(
                    persist, what=f"recording the outcome of job {job.id}", deadline=PERSIST_RETRY_SECONDS,
                    stop=self._force_stop,
                )
            except Exception:
                logger.exception("could not record the outcome of job %s; it will be requeued", job.id)
                self._needs_reconcile = True  # still `doing` under our id: the reconcile requeues it
                return
            if not owned:
                logger.warning(
                    "job %s is no longer this worker's attempt (taken back meanwhile); its outcome (%s) is dropped",
                    job.id, status.value,
                )
        finally:
            self._job_ids_to_abort.pop(job.id, None)
            self._abandoned.discard(job.id)

    async def _requeue(self, job_ids: list[int], *, outcome: str, error_type: str, message: str) -> list[int]:
        """Retry now jobs this worker owns, closing their attempt with `outcome`."""

        async def requeue() -> list[int]:
            async with self.pool.connection() as conn, conn.transaction():
                cursor = await conn.execute(_LOCK_OWNED, {"job_ids": job_ids, "worker_id": self.worker_id})
                ends = [
                    transitions.AttemptEnd(
                        job_id=job_id, worker_id=self.worker_id, attempts=attempts, status="todo", outcome=outcome,
                        error_type=error_type, error_message=message, error_traceback="",
                    )
                    for job_id, attempts in await cursor.fetchall()
                ]
                if not ends:
                    return []
                cursor = await conn.execute(transitions.end_attempts_sql(), transitions.end_attempts_params(ends))
                row = await cursor.fetchone()
                return [int(job_id) for job_id, _ in (row[0] if row else [])]

        return await until_connected(requeue, what=f"requeueing jobs {job_ids}", deadline=10.0)

    # -- heartbeats and ownership --------------------------------------------------------------
    async def _update_heartbeat(self) -> None:
        warned = False
        while True:
            await asyncio.sleep(self.update_heartbeat_interval)
            try:
                await self._beat()
            except Exception as exc:
                if is_connection_error(exc):
                    if not warned:
                        logger.warning("heartbeat failed, database unreachable (%s); retrying", exc)
                    warned = True
                else:
                    logger.exception("heartbeat failed")
            else:
                warned = False

    async def _beat(self) -> None:
        beating_as = self.worker_id
        async with self.pool.connection() as conn:
            cursor = await conn.execute(_HEARTBEAT, {"worker_id": self.worker_id})
            row = await cursor.fetchone()
            alive = bool(row and row[0])
            running = {ctx.job.id: (task, ctx) for task, ctx in self._running_jobs.items() if ctx.job.id}
            lost: list[int] = []
            if running:
                cursor = await conn.execute(_NOT_OURS, {"job_ids": list(running), "worker_id": self.worker_id})
                lost = [r[0] for r in await cursor.fetchall()]
        for job_id in lost:
            if job_id in self._abandoned:
                continue
            logger.error("job %s was taken back from this worker (it looked dead); aborting its run here", job_id)
            self._abandoned.add(job_id)
            task, ctx = running[job_id]
            self._abort_job(task, ctx, job_context.AbortReason.SHUTDOWN)
            timelimits.interrupt_sync_job(job_id)
        if not alive and self.worker_id == beating_as:
            logger.error("this worker's registration was removed (it looked dead); registering again")
            await self._register()
            self._needs_reconcile = True

    async def _listen_forever(self) -> None:
        """LISTEN for new jobs and abort requests, reconnecting with backoff (procrastinate's stops)."""
        channels = (
            ["procrastinate_any_queue_v1"] if not self.queues
            else [f"procrastinate_queue_v1#{queue}" for queue in self.queues]
        )
        delays = backoff_delays(cap=5.0)
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(**connector_params("default"), autocommit=True)
                async with conn:
                    for channel in channels:
                        await conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
                    delays = backoff_delays(cap=5.0)
                    self._new_job_event.set()  # jobs may have arrived while we were not listening
                    while True:
                        gen = conn.notifies(timeout=30.0)
                        async for notification in gen:
                            with contextlib.suppress(ValueError, KeyError):
                                await self._handle_notification(
                                    channel=notification.channel, notification=json.loads(notification.payload)
                                )
                        await conn.execute("SELECT 1")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_connection_error(exc):
                    logger.warning("LISTEN connection lost (%s); reconnecting", exc)
                else:
                    logger.exception("LISTEN failed; reconnecting")
                await asyncio.sleep(next(delays))

    # -- shutdown ------------------------------------------------------------------------------
    async def _shutdown(self, side_tasks: list[asyncio.Task[Any]]) -> None:
        await utils.cancel_and_capture_errors(side_tasks)
        if self._running_jobs and not self._force_stop.is_set():
            logger.info("waiting up to %.0f s for %d running job(s)", self.shutdown_graceful_timeout or 0,
                        len(self._running_jobs))
            await utils.wait_any(
                asyncio.wait(list(self._running_jobs), timeout=self.shutdown_graceful_timeout),
                self._force_stop.wait(),
            )
        if self._running_jobs:
            leftover = list(self._running_jobs.items())
            job_ids = [ctx.job.id for _, ctx in leftover if ctx.job.id]
            logger.warning("grace period over: requeueing %d running job(s) %s", len(job_ids), job_ids)
            try:
                requeued = await self._requeue(
                    job_ids, outcome="aborted", error_type="WorkerShutdown",
                    message="the worker shut down before the job finished; it was requeued",
                )
                self._abandoned.update(requeued)
            except Exception:
                logger.exception("could not requeue %s; the stalled-job sweeper will take them back", job_ids)
            for task, ctx in leftover:
                self._abort_job(task, ctx, job_context.AbortReason.SHUTDOWN)
                if ctx.job.id:
                    timelimits.interrupt_sync_job(ctx.job.id)
            if self._running_jobs:
                await asyncio.wait(list(self._running_jobs), timeout=3.0)
            self.jobs_left_running = len(self._running_jobs)
        if self.worker_id is not None:
            worker_id = self.worker_id

            async def unregister() -> None:
                async with self.pool.connection() as conn:
                    await conn.execute(_UNREGISTER, {"worker_id": worker_id})

            try:
                await until_connected(unregister, what="unregistering the worker", deadline=5.0)
            except Exception:
                logger.warning("could not unregister worker %s (database unreachable)", worker_id)
        self.worker_id = None
        logger.info("worker %s stopped", self.worker_name)


async def run_worker(
    *,
    install_signal_handlers: bool = True,
    processes: int = 1,
    periodic: bool | None = None,
    sweep_on_start: bool | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    on_started: Callable[[SkiplockWorker], None] | None = None,
    **options: Any,
) -> SkiplockWorker:
    """Run a worker until it is stopped (or, with wait=False, until the queues are empty)."""
    import_task_modules()
    app.perform_import_paths()
    opts = worker_options(**options)
    if periodic is None:  # a worker that drains the queue and exits (tests) runs no schedule
        periodic = bool(opts["wait"])
    if sweep_on_start is None:
        sweep_on_start = bool(opts["wait"])
    pool = worker_pool(concurrency=opts["concurrency"])
    await pool.open(wait=False)
    connector = PsycopgConnector(kwargs=connector_params("default"))
    await connector.open_async(pool=pool)
    try:
        with app.replace_connector(connector) as real_app:
            worker = SkiplockWorker(
                app=real_app,
                processes=processes, periodic=periodic, sweep_on_start=sweep_on_start, on_event=on_event, **opts,
            )
            if install_signal_handlers:
                worker.install_signal_handlers_on(asyncio.get_running_loop())
            if on_started is not None:
                on_started(worker)
            try:
                await worker.run()
            except Exception:
                if not worker._stop_event.is_set():
                    raise
                logger.warning("stopped while waiting for the database")
            finally:
                if install_signal_handlers:
                    loop = asyncio.get_running_loop()
                    for sig in (signal.SIGTERM, signal.SIGINT):
                        loop.remove_signal_handler(sig)
    finally:
        await connector.close_async()
        await pool.close(timeout=2.0)
    return worker
