"""A paginator that never counts a million rows: exact up to a cap, then PostgreSQL's estimate."""

from __future__ import annotations

import json
from typing import Any

from django.core.paginator import Paginator
from django.db import connections
from django.db.models import QuerySet
from django.utils.functional import cached_property

from jobs import dashboard

EXACT_COUNT_CAP = 10_000


class EstimatedCountPaginator(Paginator):
    """Unfiltered: `reltuples`. Filtered: the planner's row estimate (EXPLAIN, no execution); when
    it expects at most EXACT_COUNT_CAP rows, an exact count that stops at the cap (a short index
    walk). `estimated` says whether the number shown is an estimate."""

    estimated = False
    exact = True  # False: never count, show the planner's estimate (searches that scan, not seek)

    @cached_property
    def count(self) -> int:
        queryset: QuerySet[Any] = self.object_list  # type: ignore[assignment]
        if queryset.query.is_empty():  # a filter that can match nothing (an unknown state, say): no SQL to plan
            return 0
        if not queryset.query.where:
            self.estimated = True
            return dashboard.estimated_total()
        guess = self._planner_estimate(queryset)
        if guess > EXACT_COUNT_CAP or not self.exact:
            self.estimated = True
            return guess
        capped = queryset.order_by()[: EXACT_COUNT_CAP + 1].count()
        if capped <= EXACT_COUNT_CAP:
            return capped
        self.estimated = True
        return max(capped, guess)

    @staticmethod
    def _planner_estimate(queryset: Any) -> int:
        sql, params = queryset.order_by().values("pk").query.sql_with_params()
        with connections[queryset.db].cursor() as cursor:
            cursor.execute("EXPLAIN (FORMAT JSON) " + sql, params)
            plan = cursor.fetchone()[0]
        if isinstance(plan, str):
            plan = json.loads(plan)
        return int(plan[0]["Plan"]["Plan Rows"])
