"""gunicorn settings: an ASGI (uvicorn) worker so Server-Sent Events streams don't block requests.

Run as `gunicorn -c project/gunicorn.conf.py project.asgi:application`. Everything comes from the
environment: BIND (or HOST and PORT), WEB_CONCURRENCY, GUNICORN_TIMEOUT,
GUNICORN_GRACEFUL_TIMEOUT, GUNICORN_PRELOAD, ACCESS_LOG.
"""

from __future__ import annotations

import gc
import os
from typing import Any

from project.env import env_bool, env_int

# Under ASGI every request runs in a fresh thread, so Django's persistent connections are never
# reused: the web server shares a psycopg pool instead (measured ~2x requests/s in bench/api.py).
os.environ.setdefault("SKIPLOCK_DB_POOL", "true")

_host = os.environ.get("HOST", "127.0.0.1")
_port = env_int("PORT", 8000, minimum=1)
bind = os.environ.get("BIND") or f"{_host}:{_port}"
workers = env_int("WEB_CONCURRENCY", 2, minimum=1)
worker_class = "project.gunicorn_worker.UvicornWorker"  # see project/gunicorn_worker.py
graceful_timeout = env_int("GUNICORN_GRACEFUL_TIMEOUT", 10, minimum=0)
timeout = env_int("GUNICORN_TIMEOUT", 60, minimum=0)
keepalive = 5
# Import the app once in the master and fork the workers from it: they start at once and share
# memory. Nothing in Skiplock opens a connection or a thread at import (the SSE hub starts on the
# first stream, in its worker's event loop). GUNICORN_PRELOAD=false imports in every worker.
preload_app = env_bool("GUNICORN_PRELOAD", True)
accesslog = "-" if env_bool("ACCESS_LOG", True) else None
errorlog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms'
proc_name = "skiplock-web"
# gunicorn ≥ 25 opens a control socket in $HOME by default: several web processes on one host
# would fight over it, and a read-only container home has no room for it. Nothing here uses it.
control_socket_disable = True


def post_worker_init(worker: Any) -> None:
    """Move everything loaded so far (Django, the API, the models: ~100,000 objects) out of the
    garbage collector's sight. Otherwise each full collection walks all of it: a pause of 100 ms
    and more in the middle of a request on a busy host (measured with gc.callbacks under
    bench/api.py's load), a pause that lands in the p99 at 5 clients."""
    gc.freeze()
