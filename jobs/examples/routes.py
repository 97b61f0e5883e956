"""Route optimisation over seeded random points: nearest neighbour, then 2-opt improvement rounds."""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable

Point = tuple[float, float]


def random_points(count: int, seed: int) -> list[Point]:
    rng = random.Random(seed)
    return [(rng.uniform(0, 1000), rng.uniform(0, 1000)) for _ in range(count)]


def route_length(points: list[Point], route: list[int]) -> float:
    return sum(math.dist(points[route[i - 1]], points[route[i]]) for i in range(len(route)))


def nearest_neighbour(points: list[Point], start: int = 0) -> list[int]:
    unvisited = set(range(len(points))) - {start}
    route = [start]
    while unvisited:
        last = points[route[-1]]
        nearest = min(unvisited, key=lambda i: math.dist(last, points[i]))
        route.append(nearest)
        unvisited.remove(nearest)
    return route


def two_opt_round(
    points: list[Point], route: list[int], on_row: Callable[[float], None] | None = None
) -> bool:
    """One pass of 2-opt over every pair of edges; True if the route got shorter."""
    improved = False
    n = len(route)
    dist = math.dist
    report_every = max(1, n // 20)
    for i in range(1, n - 1):
        a, b = points[route[i - 1]], points[route[i]]
        for j in range(i + 1, n):
            c, d = points[route[j]], points[route[(j + 1) % n]]
            if dist(a, c) + dist(b, d) < dist(a, b) + dist(c, d) - 1e-9:
                route[i : j + 1] = reversed(route[i : j + 1])
                b = points[route[i]]
                improved = True
        if on_row is not None and i % report_every == 0:
            on_row(i / n)
    return improved


def optimise(
    points: list[Point],
    max_rounds: int,
    restarts: int = 1,
    on_progress: Callable[[float, str], None] | None = None,
) -> tuple[list[int], int]:
    """Multi-start local search: 2-opt from `restarts` nearest-neighbour tours; the best wins.

    Progress is reported within every round: each restart is an equal share, and inside a
    restart round r covers the next half of what is left (2-opt rounds shrink as it converges).
    """
    best: list[int] | None = None
    best_length = math.inf
    total_rounds = 0

    def report(restart: int, round_number: int, fraction: float) -> None:
        if on_progress is not None:
            low, high = 1 - 0.5 ** (round_number - 1), 1 - 0.5**round_number
            done = (restart + low + (high - low) * fraction) / restarts
            on_progress(done, f"restart {restart + 1}/{restarts}, 2-opt round {round_number}")

    starts = [round(k * len(points) / restarts) % len(points) for k in range(restarts)]
    for number, start in enumerate(starts):
        route = nearest_neighbour(points, start)
        for round_number in range(1, max_rounds + 1):
            improved = two_opt_round(points, route, functools.partial(report, number, round_number))
            total_rounds += 1
            if not improved:
                break
        length = route_length(points, route)
        if length < best_length:
            best, best_length = route, length
        if on_progress is not None:
            on_progress((number + 1) / restarts, f"restart {number + 1}/{restarts}: best {best_length:.1f}")
    assert best is not None
    return best, total_rounds
