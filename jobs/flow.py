"""Flow control: what a task declares (limits, uniqueness) and how operators steer queues.

Declared on a task (`@task(concurrency=..., rate_limit=..., unique=...)`):
- `ConcurrencyLimit(5, key="partner:{partner_id}")`: at most 5 jobs of the task with the same key
  run at once, across every worker and process.
- `RateLimit(100, per=60, key=...)`: at most 100 starts in any window of 60 s.
- `Unique(period=3600, fields=("partner_id",), states=("todo", "doing"))`: a start whose task and
  chosen arguments (or formatted `key`) match a job in those states created within the period
  returns that job instead of a second one.

Queues are steered at run time in jobs.queues (pause/resume, queue-wide limits). Both kinds of
limit are enforced when jobs are claimed (jobs.transitions: the claim skips limited jobs;
`skiplock_claim_limited` claims them under each limit's lock), so a job over a limit waits — it
never fails for it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from jobs.states import State

MAX_LIMIT = 1_000_000  # concurrency or starts per period
MAX_RATE_PER_PERIOD = 10_000  # the rate log holds up to twice this many start times
MAX_PERIOD_SECONDS = 366 * 24 * 3600.0


@dataclass(frozen=True)
class ConcurrencyLimit:
    """At most `limit` jobs of the task (per formatted `key`, when given) run at once, fleet-wide."""

    limit: int
    key: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or not 1 <= self.limit <= MAX_LIMIT:
            raise ValueError(f"a concurrency limit must be an integer from 1 to {MAX_LIMIT}, not {self.limit!r}")


@dataclass(frozen=True)
class RateLimit:
    """At most `limit` starts of the task (per formatted `key`) in any window of `per` seconds."""

    limit: int
    per: float
    key: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or not 1 <= self.limit <= MAX_RATE_PER_PERIOD:
            raise ValueError(f"a rate limit must be an integer from 1 to {MAX_RATE_PER_PERIOD}, not {self.limit!r}")
        if isinstance(self.per, bool) or not isinstance(self.per, int | float) or not 0 < self.per <= MAX_PERIOD_SECONDS:
            raise ValueError(f"a rate limit's period must be from 0 to {MAX_PERIOD_SECONDS:g} seconds, not {self.per!r}")


UNIQUE_STATES_DEFAULT = (State.TODO.value, State.DOING.value)


@dataclass(frozen=True)
class Unique:
    """Start at most one job per task and arguments (or `fields` of them, or a formatted `key`).

    A start finds the newest job with the same digest that is in one of `states` and was created
    less than `period` seconds ago (any time when None); it gets that job back (created: false).
    """

    period: float | None = None
    fields: tuple[str, ...] | None = None
    key: str | None = None
    states: tuple[str, ...] = UNIQUE_STATES_DEFAULT

    def __post_init__(self) -> None:
        if self.period is not None and (
            isinstance(self.period, bool) or not isinstance(self.period, int | float)
            or not 0 < self.period <= MAX_PERIOD_SECONDS
        ):
            raise ValueError(f"a unique period must be from 0 to {MAX_PERIOD_SECONDS:g} seconds, not {self.period!r}")
        if self.fields is not None and self.key is not None:
            raise ValueError("give a unique `key` or `fields`, not both")
        if self.fields is not None:
            object.__setattr__(self, "fields", tuple(self.fields))
        states = tuple(str(s) for s in self.states)
        unknown = set(states) - {s.value for s in State}
        if not states or unknown:
            raise ValueError(f"unique states must be job states ({', '.join(s.value for s in State)}), "
                             f"not {sorted(unknown) or 'none'}")
        object.__setattr__(self, "states", states)

    def digest(self, task_name: str, args: Mapping[str, Any]) -> str:
        """What two starts share when they are the same job for this rule (a hex SHA-256)."""
        if self.key is not None:
            subject: Any = self.key.format(**args)
        elif self.fields is not None:
            subject = {name: args.get(name) for name in self.fields}
        else:
            subject = dict(args)
        text = json.dumps([task_name, subject], sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    @classmethod
    def from_request(cls, value: Any) -> Unique:
        """A start request's `unique`: true, or {"period": s, "fields": [...], "key": "...", "states": [...]}."""
        if value is True:
            return cls()
        if not isinstance(value, Mapping):
            raise ValueError("unique must be true or an object with period, fields, key, states")
        unknown = set(value) - {"period", "fields", "key", "states"}
        if unknown:
            raise ValueError(f"unique has unknown fields: {', '.join(sorted(unknown))}")
        fields = value.get("fields")
        if fields is not None and (not isinstance(fields, list) or not all(isinstance(f, str) for f in fields)):
            raise ValueError("unique.fields must be a list of argument names")
        key = value.get("key")
        if key is not None and not isinstance(key, str):
            raise ValueError("unique.key must be a string")
        states = value.get("states", UNIQUE_STATES_DEFAULT)
        if not isinstance(states, list | tuple):
            raise ValueError("unique.states must be a list of states")
        return cls(period=value.get("period"), fields=tuple(fields) if fields is not None else None, key=key,
                   states=tuple(states))


@dataclass(frozen=True)
class TaskLimits:
    """A task's declared limits, as they apply to one job (one key for both)."""

    concurrency: ConcurrencyLimit | None = None
    rate: RateLimit | None = None

    @property
    def key_template(self) -> str | None:
        return (self.concurrency.key if self.concurrency else None) or (self.rate.key if self.rate else None)

    def check(self, task_name: str) -> None:
        if self.concurrency and self.rate and (self.concurrency.key or None) != (self.rate.key or None):
            raise ValueError(f"task '{task_name}': its concurrency and rate limits must use the same key")

    def key_for(self, task_name: str, args: Mapping[str, Any]) -> str | None:
        """The limit key a job of the task carries (None: the task has no limit)."""
        if not (self.concurrency or self.rate):
            return None
        template = self.key_template
        return f"{task_name}:{template.format(**args)}" if template else task_name

    def row(self, key: str, task_name: str) -> dict[str, Any]:
        return {
            "key": key, "task_name": task_name,
            "concurrency": self.concurrency.limit if self.concurrency else None,
            "rate_limit": self.rate.limit if self.rate else None,
            "rate_period": float(self.rate.per) if self.rate else None,
        }


# The limit rows of the keys a batch of starts uses. Read first, written only when missing or when
# the code's numbers changed: a start in a long transaction must not hold a row lock that the
# claim's rate log needs (INSERT … ON CONFLICT DO UPDATE locks the row even when it changes nothing).
_LIMITS_AS_DECLARED = """
SELECT key FROM skiplock_limit AS l
JOIN unnest(%(keys)s::text[], %(tasks)s::varchar[], %(concurrency)s::int[], %(rate_limit)s::int[],
            %(rate_period)s::float8[]) AS d(key, task_name, concurrency, rate_limit, rate_period) USING (key)
WHERE (l.concurrency, l.rate_limit, l.rate_period, l.task_name)
      IS NOT DISTINCT FROM (d.concurrency, d.rate_limit, d.rate_period, d.task_name)
"""
_WRITE_LIMITS = """
INSERT INTO skiplock_limit AS l (key, task_name, concurrency, rate_limit, rate_period, starts, updated_at)
SELECT *, '{}'::timestamptz[], now() FROM unnest(%(keys)s::text[], %(tasks)s::varchar[], %(concurrency)s::int[],
                                                 %(rate_limit)s::int[], %(rate_period)s::float8[])
ON CONFLICT (key) DO UPDATE
SET concurrency = EXCLUDED.concurrency, rate_limit = EXCLUDED.rate_limit, rate_period = EXCLUDED.rate_period,
    task_name = EXCLUDED.task_name, updated_at = now()
"""


def _limit_params(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "keys": [r["key"] for r in items], "tasks": [r["task_name"] for r in items],
        "concurrency": [r["concurrency"] for r in items], "rate_limit": [r["rate_limit"] for r in items],
        "rate_period": [r["rate_period"] for r in items],
    }


def write_task_limits(rows: Iterable[dict[str, Any]], *, cursor: Any) -> None:
    """Make the limit rows say what the code declares (called by the start of limited jobs)."""
    declared = {row["key"]: row for row in rows}
    if not declared:
        return
    cursor.execute(_LIMITS_AS_DECLARED, _limit_params(list(declared.values())))
    stale = [declared[key] for key in sorted(set(declared) - {row[0] for row in cursor.fetchall()})]
    if stale:
        cursor.execute(_WRITE_LIMITS, _limit_params(stale))
