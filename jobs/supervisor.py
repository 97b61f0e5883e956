"""The worker supervisor: N worker processes, restarted when they die, stopped with the signals it gets.

`manage.py worker --processes N` runs this in the foreground. Each child is forked from the
supervisor once Django is set up (so a restart takes milliseconds), runs one `SkiplockWorker`
with its own event loop and pool, and reports on a pipe when it registers and when each job
starts and ends. The supervisor:

- forwards SIGTERM/SIGINT to every child (a second signal is forwarded too: children then
  requeue their running jobs at once) and exits 0 once all children stopped cleanly;
- restarts a child that dies, with a growing delay if it keeps dying young (no crash loop),
  and takes back at once the jobs the dead child was running (attempt outcome `lost`, no retry
  used up) instead of waiting for the stalled-job timeout;
- kills a child running a job that ignored its hard time limit (a loop inside C code never sees
  the exception the worker raises in its thread), records that job `timed_out` and retries it by
  its policy, puts the other jobs of that child back in the queue without charging them an
  attempt (outcome `requeued`), and starts a fresh child (see jobs/timelimits.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from django.db import close_old_connections, connection, connections, transaction

from jobs import maintenance, timelimits

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ForkedProcess:
    """The little of subprocess.Popen the supervisor needs, for a forked child."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -signal.SIGKILL
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        while self.poll() is None:
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def run_child(
    *, queues: list[str], concurrency: int, processes: int, name: str | None, shutdown_grace: float | None,
    report_fd: int | None,
) -> int:
    """One worker process: run a SkiplockWorker until stopped; returns the exit code."""
    import asyncio

    from jobs import timelimits
    from jobs.worker import run_worker

    # A stop signal that arrives while this process is still starting: stop right after start.
    early: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: early.append(signum))
    reporter = timelimits.pipe_reporter(report_fd) if report_fd is not None else None
    timelimits.set_reporter(reporter, report_fd)
    worker = asyncio.run(run_worker(
        queues=queues, concurrency=concurrency, name=name, wait=True, processes=processes,
        shutdown_grace=shutdown_grace, on_event=reporter,
        on_started=lambda w: w.stop() if early else None,
    ))
    connections.close_all()
    if worker.jobs_left_running:
        # Sync tasks that ignore interruption still run in threads; their jobs were requeued.
        logger.warning("%d job thread(s) did not stop; exiting anyway (their jobs were requeued)",
                       worker.jobs_left_running)
        logging.shutdown()
        os._exit(0)
    return 0


@dataclass
class Child:
    index: int
    process: ForkedProcess
    read_fd: int
    started: float = field(default_factory=time.monotonic)
    worker_ids: list[int] = field(default_factory=list)
    jobs: dict[int, float] = field(default_factory=dict)  # job id → hard deadline (monotonic)
    buffer: bytes = b""
    killed_for: int | None = None  # job id whose hard limit got this child killed


@dataclass
class Supervisor:
    processes: int
    queues: list[str]
    concurrency: int
    name: str
    shutdown_grace: float | None = None
    children: dict[int, Child] = field(default_factory=dict)
    stopping: int = 0
    failures: dict[int, int] = field(default_factory=dict)
    restart_at: dict[int, float] = field(default_factory=dict)
    # (worker ids of a dead child, the job whose hard limit got it killed, not before, why it died)
    pending_recoveries: list[tuple[list[int], int | None, float, str]] = field(default_factory=list)
    restarts: int = 0

    # -- lifecycle -----------------------------------------------------------------------------
    def run(self) -> int:
        from procrastinate.contrib.django import app

        from jobs.worker import import_task_modules

        import_task_modules()  # retry policies of the jobs it takes back
        app.perform_import_paths()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        logger.info("supervisor %s (pid %s): %d process(es) × concurrency %d on %s", self.name, os.getpid(),
                    self.processes, self.concurrency, ", ".join(self.queues) or "all queues")
        for index in range(self.processes):
            self._spawn(index)
        clean = True
        while self.children or (not self.stopping and self.restart_at):
            self._pump(timeout=0.1)
            clean = self._reap() and clean
            self._enforce_hard_limits()
            self._recover_pending()
            if not self.stopping:
                self._restart_due()
        for worker_ids, timed_out_job, _, why in self.pending_recoveries:
            try:
                self._recover(worker_ids, timed_out_job, why)
            except Exception:
                logger.warning("could not take back the jobs of workers %s; the stalled-job sweeper will", worker_ids)
        close_old_connections()
        logger.info("supervisor %s stopped", self.name)
        return 0 if clean else 1

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopping += 1
        logger.info("%s received: stopping %d worker process(es)%s", signal.Signals(signum).name,
                    len(self.children), " now" if self.stopping > 1 else "")
        self.restart_at.clear()
        for child in self.children.values():
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)

    def child_name(self, index: int) -> str:
        return self.name if self.processes == 1 else f"{self.name}-{index + 1}"

    def _spawn(self, index: int) -> None:
        """Fork a worker process: Django is already set up here, so a (re)start takes milliseconds."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        connections.close_all()  # never share a database connection with a child
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                os.close(read_fd)
                for child in self.children.values():
                    os.close(child.read_fd)
                os.setsid()  # terminal signals reach the supervisor only; it forwards them
                _die_with_parent()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                code = run_child(
                    queues=self.queues, concurrency=self.concurrency, processes=self.processes,
                    name=self.child_name(index), shutdown_grace=self.shutdown_grace, report_fd=write_fd,
                )
            except BaseException:
                logger.exception("worker process %s failed", self.child_name(index))
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(write_fd)
        self.children[index] = Child(index=index, process=ForkedProcess(pid), read_fd=read_fd)
        logger.info("started worker process %s (pid %s)", self.child_name(index), pid)

    # -- reports from children -----------------------------------------------------------------
    def _pump(self, timeout: float) -> None:
        fds = {child.read_fd: child for child in self.children.values()}
        if not fds:
            time.sleep(timeout)
            return
        try:
            ready, _, _ = select.select(list(fds), [], [], timeout)
        except InterruptedError:
            return
        for fd in ready:
            self._read(fds[fd])

    def _read(self, child: Child) -> None:
        while True:
            try:
                chunk = os.read(child.read_fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            child.buffer += chunk
        *lines, child.buffer = child.buffer.split(b"\n")
        now = time.monotonic()
        for line in lines:
            if line.startswith(b"s "):  # a job started: s <job id> <hard limit>
                _, job_id, limit = line.split()
                child.jobs[int(job_id)] = now + float(limit) + timelimits.HARD_LIMIT_GRACE
                continue
            if line.startswith(b"e "):  # a job ended: e <job id>
                child.jobs.pop(int(line.split()[1]), None)
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "worker":
                child.worker_ids.append(int(event["worker_id"]))

    # -- dead children -------------------------------------------------------------------------
    def _reap(self) -> bool:
        clean = True
        for index, child in list(self.children.items()):
            code = child.process.poll()
            if code is None:
                continue
            self._read(child)
            os.close(child.read_fd)
            del self.children[index]
            # Killed by our own SIGTERM before it installed its handler (still starting): no job ran.
            early_stop = self.stopping and code == -signal.SIGTERM and not child.worker_ids
            unexpected = child.killed_for is None and not early_stop and (code != 0 or not self.stopping)
            if unexpected:
                how = f"signal {-code}" if code < 0 else f"code {code}"
                logger.error("worker process %s (pid %s) died (%s) running %d job(s)",
                             self.child_name(index), child.process.pid, how, len(child.jobs))
                if child.worker_ids:
                    why = f"worker process {self.child_name(index)} (pid {child.process.pid}) died ({how})"
                    self.pending_recoveries.append((child.worker_ids, None, 0.0, why))
                if code != 0 and self.stopping:
                    clean = False  # a child that did not stop cleanly when asked to
            if not self.stopping:
                lived = time.monotonic() - child.started
                failures = 0 if lived > 30 else self.failures.get(index, 0) + 1
                self.failures[index] = failures
                delay = 0.0 if child.killed_for is not None or failures <= 1 else min(30.0, 0.5 * 2 ** (failures - 1))
                self.restart_at[index] = time.monotonic() + delay
                if delay:
                    logger.warning("restarting %s in %.1f s (it died %d times in a row)", self.child_name(index),
                                   delay, failures)
        return clean

    def _restart_due(self) -> None:
        now = time.monotonic()
        for index, when in list(self.restart_at.items()):
            if when <= now:
                del self.restart_at[index]
                self.restarts += 1
                self._spawn(index)

    # -- hard time limits ----------------------------------------------------------------------
    def _enforce_hard_limits(self) -> None:
        now = time.monotonic()
        for child in list(self.children.values()):
            if child.killed_for is not None:
                continue
            overdue = [job_id for job_id, deadline in child.jobs.items() if deadline <= now]
            if not overdue:
                continue
            job_id = overdue[0]
            logger.error("job %s ran past its hard time limit: killing worker process %s (pid %s)",
                         job_id, self.child_name(child.index), child.process.pid)
            child.killed_for = job_id
            with contextlib.suppress(ProcessLookupError):
                child.process.kill()
            child.process.wait()
            why = (f"worker process {self.child_name(child.index)} (pid {child.process.pid}) was killed because "
                   f"job {job_id} ignored its hard time limit")
            self.pending_recoveries.append((child.worker_ids, job_id, 0.0, why))

    def _recover_pending(self) -> None:
        now = time.monotonic()
        still: list[tuple[list[int], int | None, float, str]] = []
        for worker_ids, timed_out_job, not_before, why in self.pending_recoveries:
            if not_before > now:
                still.append((worker_ids, timed_out_job, not_before, why))
                continue
            try:
                self._recover(worker_ids, timed_out_job, why)
            except Exception as exc:
                logger.warning("could not take back the jobs of workers %s yet (%s); retrying", worker_ids, exc)
                with contextlib.suppress(Exception):
                    connection.close()
                still.append((worker_ids, timed_out_job, now + 2.0, why))
        self.pending_recoveries = still

    def _recover(self, worker_ids: list[int], timed_out_job: int | None, why: str) -> None:
        """Take back the jobs of a dead child: the over-limit one ends `timed_out`, the rest wait again."""
        if timed_out_job is not None:
            # One transaction: whoever sees the over-limit job's verdict sees its neighbours requeued.
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(
                    "SELECT task_name, attempts FROM procrastinate_jobs "
                    "WHERE id = %s AND status = 'doing' AND worker_id = ANY(%s) FOR UPDATE",
                    [timed_out_job, worker_ids],
                )
                row = cursor.fetchone()
                if row is not None:
                    spec_limit = _hard_limit(row[0])
                    verdict = maintenance.end_attempt(
                        cursor, job_id=timed_out_job, task_name=row[0], attempts_done=row[1] + 1,
                        outcome="timed_out", error_type="HardTimeLimitExceeded",
                        message=f"hard time limit exceeded ({spec_limit:g} s): the worker process running it was killed",
                    )
                    logger.error("job %s: hard time limit exceeded, %s", timed_out_job, verdict)
                # The neighbours did nothing wrong: back in the queue, no attempt charged.
                maintenance.recover_stalled_jobs(
                    worker_ids=worker_ids, outcome="requeued",
                    reason=f"{why}; this job was put back in the queue without using up a retry",
                )
            return
        maintenance.recover_stalled_jobs(worker_ids=worker_ids, outcome="lost",
                                         reason=f"{why} while running this job; the job was taken back")


def _hard_limit(task_name: str) -> float:
    from jobs.registry import DEFAULT_HARD_TIME_LIMIT, find_task

    spec = find_task(task_name)
    return spec.hard_time_limit if spec else DEFAULT_HARD_TIME_LIMIT
