"""A bare procrastinate worker with Skiplock's worker settings: python -m bench.worker_procrastinate CONNINFO -c 4."""

from __future__ import annotations

import argparse
import asyncio

from bench.procrastinate_app import WORKER_OPTIONS, make_app


async def run(conninfo: str, concurrency: int, name: str | None) -> None:
    app = make_app(conninfo, concurrency=concurrency)
    async with app.open_async():
        await app.run_worker_async(
            queues=None, concurrency=concurrency, name=name, wait=True, **WORKER_OPTIONS  # type: ignore[arg-type]
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("conninfo")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    asyncio.run(run(args.conninfo, args.concurrency, args.name))


if __name__ == "__main__":
    main()
