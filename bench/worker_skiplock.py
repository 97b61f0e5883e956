"""A Skiplock worker as users run it (jobs.worker.run_worker: batched claim and finish), plus the bench tasks.

    python -m bench.worker_skiplock --concurrency 4 --name bench-0
"""

from __future__ import annotations

import argparse
import asyncio
import os


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--name", default=None)
    parser.add_argument("--queues", default=None, help="comma-separated (default: every queue)")
    args = parser.parse_args()

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()
    import bench.tasks_skiplock  # noqa: F401  (registers the bench tasks)
    from jobs.worker import run_worker

    queues = args.queues.split(",") if args.queues else None
    asyncio.run(run_worker(queues=queues, concurrency=args.concurrency, name=args.name, wait=True))


if __name__ == "__main__":
    main()
