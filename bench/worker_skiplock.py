"""A Skiplock worker as users run it (jobs.worker.run_worker, recording middleware, triggers), plus the bench tasks.

    python -m bench.worker_skiplock --concurrency 4 --name bench-0 [--profile out.prof]

With --profile, SIGUSR1 starts cProfile and SIGUSR2 stops it and writes the stats.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import signal
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--name", default=None)
    parser.add_argument("--profile", default=None)
    args = parser.parse_args()

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()
    import bench.tasks_skiplock  # noqa: F401  (registers the bench tasks)
    from jobs.worker import run_worker

    if args.profile:
        install_profiler(args.profile)
    asyncio.run(run_worker(queues=None, concurrency=args.concurrency, name=args.name, wait=True))


def install_profiler(path: str) -> None:
    profiler = cProfile.Profile()

    def start(*_: Any) -> None:
        profiler.enable()

    def stop(*_: Any) -> None:
        profiler.disable()
        profiler.dump_stats(path)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)


if __name__ == "__main__":
    main()
