"""Celery 5 + Redis with the bench's task bodies. Runs only in bench/.venv (never a Skiplock dependency).

BENCH_REDIS_URL: the bench's private Redis; BENCH_CELERY_BACKEND=1 adds the Redis result backend;
BENCH_DONE_PORT: each pool process sends its running count of finished tasks there over UDP
(one sendto per task, ~10 µs), which is how the bench sees a drain end without a result backend.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from celery import Celery
from celery.signals import task_postrun

from bench.stamp import send_stamp

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
WITH_BACKEND = os.environ.get("BENCH_CELERY_BACKEND") == "1"
QUEUE = "bench"

app = Celery("bench", broker=REDIS_URL, backend=REDIS_URL if WITH_BACKEND else None)
app.conf.update(
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_ignore_result=not WITH_BACKEND,
)


@app.task(name="bench_noop")
def bench_noop() -> None:
    """Do nothing."""


@app.task(name="bench_io10")
def bench_io10() -> None:
    time.sleep(0.01)


@app.task(name="bench_stamp")
def bench_stamp(port: int, marker: int) -> None:
    send_stamp(port, marker)


_done = 0
_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
_done_port = int(os.environ.get("BENCH_DONE_PORT", "0"))


@task_postrun.connect
def _count_done(**_: Any) -> None:
    global _done
    _done += 1
    if _done_port:
        _sock.sendto(f"{os.getpid()} {_done}".encode(), ("127.0.0.1", _done_port))
