"""Liveness and readiness endpoints for load balancers and orchestrators.

`/health/live` says the process answers; it never touches the database (a database outage must
not get every web process restarted). `/health/ready` says whether this deployment can do its
work: database reachable, migrations applied, at least one live worker; it answers 503 with
the reason when not. A queue deeper than SKIPLOCK_ALERT_QUEUE_DEPTH is reported as `degraded`
(200): taking web processes out of rotation would not drain it. With SKIPLOCK_OPEN_HEALTH=false
readiness needs an API key with the `read` scope (or a staff session); liveness stays open.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.migrations.executor import MigrationExecutor
from django.http import HttpRequest, JsonResponse

logger = logging.getLogger(__name__)

_migrations_applied = False  # once true it stays true for this process (migrations are not undone live)


def live(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def unauthorized() -> JsonResponse:
    response = JsonResponse(
        {"error": {"code": "unauthenticated", "message": "send `Authorization: Bearer <API key>` with the read scope",
                   "details": None}},
        status=401,
    )
    response["WWW-Authenticate"] = 'Bearer realm="skiplock"'
    return response


def ready(request: HttpRequest) -> JsonResponse:
    if not settings.SKIPLOCK_OPEN_HEALTH:
        from jobs.auth import read_access

        try:
            if read_access(request) is None:
                return unauthorized()
        except DatabaseError:
            return _unavailable({"database": {"ok": False, "error": "unreachable"}}, "database unreachable")
    checks: dict[str, Any] = {}
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET LOCAL statement_timeout = '2s'")
            cursor.execute("SELECT 1")
            checks["database"] = {"ok": True}
            checks["migrations"] = _migrations_check()
            if not checks["migrations"]["ok"]:
                return _unavailable(checks, f"{checks['migrations']['pending']} migration(s) not applied")
            cursor.execute(
                "SELECT count(*), max(last_heartbeat) FROM procrastinate_workers "
                "WHERE last_heartbeat > now() - make_interval(secs => %s)",
                [settings.SKIPLOCK_WORKER_LIVE_AFTER],
            )
            live_workers, last_heartbeat = cursor.fetchone()
            checks["workers"] = {"ok": live_workers > 0, "live": live_workers,
                                 "last_heartbeat": last_heartbeat.isoformat() if last_heartbeat else None}
            threshold = int(settings.SKIPLOCK_ALERT_QUEUE_DEPTH)
            # Counting stops past the threshold: readiness stays cheap with a million waiting jobs.
            cursor.execute(
                "SELECT count(*) FROM (SELECT 1 FROM procrastinate_jobs WHERE status = 'todo' "
                "AND (scheduled_at IS NULL OR scheduled_at <= now()) LIMIT %s) AS waiting",
                [threshold + 1],
            )
            depth = int(cursor.fetchone()[0])
            checks["queue_depth"] = {"ok": depth <= threshold, "waiting": depth if depth <= threshold else f">{threshold}",
                                     "threshold": threshold}
    except DatabaseError as exc:
        logger.warning("readiness: database unreachable (%s)", type(exc).__name__)
        checks["database"] = {"ok": False, "error": type(exc).__name__}
        return _unavailable(checks, "database unreachable")
    if not checks["workers"]["ok"]:
        return _unavailable(
            checks, f"no live worker (no heartbeat in the last {settings.SKIPLOCK_WORKER_LIVE_AFTER:g} s)"
        )
    if not checks["queue_depth"]["ok"]:
        return JsonResponse({"status": "degraded", "reason": f"queue depth over {checks['queue_depth']['threshold']}",
                             "checks": checks})
    return JsonResponse({"status": "ok", "checks": checks})


def _unavailable(checks: dict[str, Any], reason: str) -> JsonResponse:
    response = JsonResponse({"status": "unavailable", "reason": reason, "checks": checks}, status=503)
    response["Retry-After"] = "5"
    return response


def _migrations_check() -> dict[str, Any]:
    global _migrations_applied
    if _migrations_applied:
        return {"ok": True}
    executor = MigrationExecutor(connection)
    plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    if plan:
        return {"ok": False, "pending": len(plan), "first": f"{plan[0][0].app_label}.{plan[0][0].name}"}
    _migrations_applied = True
    return {"ok": True}
