"""Route optimisation over seeded random points: nearest neighbour, then 2-opt improvement rounds."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

Point = tuple[float, float]


def random_points(count: int, seed: int) -> list[Point]:
    rng = random.Random(seed)
    return [(rng.uniform(0, 1000), rng.uniform(0, 1000)) for _ in range(count)]


def route_length(points: list[Point], route: list[int]) -> float:
    return sum(math.dist(points[route[i - 1]], points[route[i]]) for i in range(len(route)))


def nearest_neighbour(points: list[Point]) -> list[int]:
    unvisited = set(range(1, len(points)))
    route = [0]
    while unvisited:
        last = points[route[-1]]
        nearest = min(unvisited, key=lambda i: math.dist(last, points[i]))
        route.append(nearest)
        unvisited.remove(nearest)
    return route


def two_opt_round(points: list[Point], route: list[int]) -> bool:
    """One pass of 2-opt over every pair of edges; True if the route got shorter."""
    improved = False
    n = len(route)
    dist = math.dist
    for i in range(1, n - 1):
        a, b = points[route[i - 1]], points[route[i]]
        for j in range(i + 1, n):
            c, d = points[route[j]], points[route[(j + 1) % n]]
            if dist(a, c) + dist(b, d) < dist(a, b) + dist(c, d) - 1e-9:
                route[i : j + 1] = reversed(route[i : j + 1])
                b = points[route[i]]
                improved = True
    return improved


def optimise(
    points: list[Point], max_rounds: int, on_round: Callable[[int, float], None] | None = None
) -> tuple[list[int], int]:
    route = nearest_neighbour(points)
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        improved = two_opt_round(points, route)
        if on_round:
            on_round(rounds, route_length(points, route))
        if not improved:
            break
    return route, rounds
