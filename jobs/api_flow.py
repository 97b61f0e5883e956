"""Flow control over the REST API: queues paused, resumed and limited at run time, task limits
observed, a waiting job changed, jobs cancelled, retried or deleted in bulk by filter.

Every endpoint needs the `manage` scope (over a session: staff with the change permission on
jobs; deleting in bulk: the delete permission). The writes are jobs.queues' and jobs.transitions',
through jobs.services; errors leave through the API's one exception handler (jobs/api.py).
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja import NinjaAPI
from ninja.errors import AuthorizationError

from jobs import services
from jobs.auth import Principal, manages_jobs, principal_of
from jobs.exceptions import InvalidArguments, SkiplockError
from jobs.queues import QueueInfo
from jobs.registry import queue_problem
from jobs.schemas import (
    ErrorOut,
    JobBulkIn,
    JobBulkOut,
    JobChangeIn,
    QueueLimitsIn,
    QueueListOut,
    QueueOut,
    TaskLimitListOut,
    TransitionOut,
)
from jobs.states import FINAL_STATES, State

# One bulk call acts on at most this many jobs (each through its transition, one by one), as the
# job console's bulk actions do (jobs/console/jobs.py MAX_BULK).
MAX_BULK = 10_000
# The states each bulk action applies to (the transition decides for real, row by row).
BULK_ACTIONS: dict[str, tuple[Any, frozenset[str]]] = {
    "cancel": (services.job_cancel, frozenset({State.TODO})),
    "retry": (services.job_retry, frozenset({State.FAILED, State.DISCARDED, State.EXPIRED})),
    "delete": (services.job_delete, frozenset({State.TODO, *FINAL_STATES})),
}


class TooManyJobs(SkiplockError):
    """Too many jobs match for one bulk call."""

    code = "too_many_jobs"
    status = 422


def require_manage(principal: Principal, doing: str) -> None:
    """403 unless the caller may steer every job: a `manage` key, or staff with the change permission."""
    if manages_jobs(principal):
        return
    if principal.kind == "key":
        raise AuthorizationError(
            message=f"this API key lacks the 'manage' scope needed to {doing}; "
            f"it has: {', '.join(sorted(principal.scopes)) or 'none'}"
        )
    raise AuthorizationError(
        message=f"you may not {doing}: that needs staff status and the 'change' permission on jobs (ask an administrator)"
    )


def _changed_by(principal: Principal) -> str:
    return f"api: {principal.name}"[:200]


def _check_name(name: str) -> None:
    problem = queue_problem(name)
    if problem:
        raise InvalidArguments(
            f"name: a queue name {problem}", details=[{"field": "name", "message": f"a queue name {problem}",
                                                       "type": "value_error"}],
        )


def _queue_out(info: QueueInfo) -> dict[str, Any]:
    out = info.as_dict()
    out["paused_at"] = info.paused_at
    return out


# --- queues -----------------------------------------------------------------------------------------------


def list_queues(request: HttpRequest) -> dict[str, Any]:
    """Every queue the tasks declare or that holds jobs or a setting: paused or not, its limits,
    jobs by state, running count, how long the oldest runnable job has waited, starts in the rate window."""
    require_manage(principal_of(request), "read queues")
    return {"queues": [_queue_out(info) for info in services.every_queue()]}


def get_queue(request: HttpRequest, name: str) -> dict[str, Any]:
    """One queue as in the list (a queue nothing uses yet reads as running, unlimited and empty)."""
    require_manage(principal_of(request), "read queues")
    _check_name(name)
    return _queue_out(services.get_queue(name))


def pause_queue(request: HttpRequest, name: str) -> dict[str, Any]:
    """No worker starts a job of the queue until it is resumed (running jobs finish; new jobs are
    still accepted). Pausing a paused queue changes nothing; the answer is the queue's status."""
    principal = principal_of(request)
    require_manage(principal, "pause queues")
    _check_name(name)
    services.pause_queue(name, by=_changed_by(principal))
    return _queue_out(services.get_queue(name))


def resume_queue(request: HttpRequest, name: str) -> dict[str, Any]:
    """Workers start the queue's jobs again (they are woken at once). Resuming a running queue changes nothing."""
    principal = principal_of(request)
    require_manage(principal, "resume queues")
    _check_name(name)
    services.resume_queue(name, by=_changed_by(principal))
    return _queue_out(services.get_queue(name))


def change_queue(request: HttpRequest, name: str, payload: QueueLimitsIn) -> dict[str, Any]:
    """`{"concurrency": n|null, "rate_limit": n|null, "rate_period": seconds|null}`: only the fields
    given change, null clears; `rate_limit` and `rate_period` go together. Enforced at every
    worker's next claim. A bad value is a `422` naming the field, and nothing changes."""
    principal = principal_of(request)
    require_manage(principal, "change queue limits")
    _check_name(name)
    given = payload.model_fields_set
    if not given:
        raise InvalidArguments(
            "give concurrency, rate_limit and rate_period, or some of them (null clears a limit)",
            details=[{"field": "body", "message": "no field given", "type": "missing"}],
        )
    if ("rate_limit" in given) != ("rate_period" in given) or (payload.rate_limit is None) != (payload.rate_period is None):
        field = "rate_period" if "rate_limit" in given and payload.rate_limit is not None else "rate_limit"
        message = "give rate_limit and rate_period together (both numbers, or both null to clear the rate limit)"
        raise InvalidArguments(f"{field}: {message}", details=[{"field": field, "message": message,
                                                                  "type": "value_error"}])
    changes = {field: getattr(payload, field) for field in given}
    try:
        services.set_queue_limits(name, by=_changed_by(principal), **changes)
    except services.QueueProblem as exc:
        raise InvalidArguments(str(exc), details=[{"field": sorted(given)[0], "message": str(exc),
                                                   "type": "value_error"}]) from None
    return _queue_out(services.get_queue(name))


# --- task limits -----------------------------------------------------------------------------------------


def list_limits(request: HttpRequest) -> dict[str, Any]:
    """Each task limit key (a task's `concurrency` / `rate_limit`, per formatted key): its limits,
    jobs running under it, jobs waiting and how long the oldest has waited, starts in the rate window."""
    require_manage(principal_of(request), "read task limits")
    return {"limits": [limit.as_dict() for limit in services.list_task_limits()]}


# --- bulk actions -----------------------------------------------------------------------------------------


def bulk_jobs(request: HttpRequest, payload: JobBulkIn) -> dict[str, Any]:
    """`{"action": "cancel"|"retry"|"delete", "filter": {...GET /api/jobs filters}, "dry_run": bool}`.

    Each matched job goes through the same transition as `POST /api/jobs/{id}/cancel|retry` and
    the job console's bulk actions; one the action does not apply to is skipped. At most 10,000
    jobs per call: above that it is a `422` (`too_many_jobs`) and nothing changes — narrow the
    filter (e.g. `created_before`). `dry_run` counts and changes nothing.
    """
    from jobs.api import matching_jobs

    principal = principal_of(request)
    principal.require(payload.action)
    service, states = BULK_ACTIONS[payload.action]
    rows = list(
        matching_jobs(payload.filter, owner_id=principal.owner_filter)
        .order_by("job_id").values_list("job_id", "state", "owner_id")[: MAX_BULK + 1]
    )
    if len(rows) > MAX_BULK:
        raise TooManyJobs(
            f"more than {MAX_BULK} jobs match; one call acts on at most {MAX_BULK}: narrow the filter "
            "(e.g. created_before) and call again (nothing was changed)",
            details={"max_jobs": MAX_BULK},
        )
    allowed = [job_id for job_id, _state, owner_id in rows if principal.can_act(payload.action, owner_id)]
    changed = 0
    if payload.dry_run:
        applies = {job_id for job_id, state, _owner in rows if state in states}
        changed = sum(1 for job_id in allowed if job_id in applies)
    else:
        for job_id in allowed:
            try:
                service(job_id=job_id)
            except SkiplockError:
                continue  # its state changed meanwhile, or the action never applied: skipped
            changed += 1
    return {"action": payload.action, "dry_run": payload.dry_run, "matched": len(rows), "changed": changed,
            "skipped": len(rows) - changed, "max_jobs": MAX_BULK}


# --- changing one waiting job -----------------------------------------------------------------------------


def change_job(request: HttpRequest, job_id: int, payload: JobChangeIn) -> dict[str, Any]:
    """A waiting job's `priority` and/or `run_at` (null: runnable now). `409` when the job is not
    waiting (its state in `details.state`), `422` for a bad value (nothing changes)."""
    from jobs.api import _utc, _visible_job, job_url

    principal = principal_of(request)
    require_manage(principal, "change jobs")
    _visible_job(principal, job_id)
    changes: dict[str, Any] = {}
    if "priority" in payload.model_fields_set:
        if payload.priority is None:
            raise InvalidArguments("priority: must be an integer, not null",
                                   details=[{"field": "priority", "message": "must be an integer", "type": "value_error"}])
        changes["priority"] = payload.priority
    if "run_at" in payload.model_fields_set:
        changes["run_at"] = _utc(payload.run_at, "run_at")
    services.job_change(job_id=job_id, **changes)
    record = _visible_job(principal, job_id)
    return {"id": job_id, "state": record.state, "display_state": record.display_state, "status_url": job_url(job_id)}



def register(api: NinjaAPI, common: dict[int, Any]) -> None:
    """Add these endpoints to the API. jobs.api calls it before it declares `/jobs/{job_id}`:
    Django tries paths in order, so `/jobs/bulk` must come first."""
    queue = {200: QueueOut, **common}
    api.get("/queues", response={200: QueueListOut, **common}, tags=["queues"], summary="List queues")(list_queues)
    api.get("/queues/{name}", response=queue, tags=["queues"], summary="Read a queue")(get_queue)
    api.post("/queues/{name}/pause", response=queue, tags=["queues"], summary="Pause a queue")(pause_queue)
    api.post("/queues/{name}/resume", response=queue, tags=["queues"], summary="Resume a queue")(resume_queue)
    api.patch("/queues/{name}", response=queue, tags=["queues"], summary="Set a queue's limits")(change_queue)
    api.get("/limits", response={200: TaskLimitListOut, **common}, tags=["queues"],
            summary="List task limits")(list_limits)
    api.post("/jobs/bulk", response={200: JobBulkOut, **common}, tags=["jobs"],
             summary="Cancel, retry or delete jobs by filter")(bulk_jobs)
    api.patch("/jobs/{job_id}", response={200: TransitionOut, 404: ErrorOut, 409: ErrorOut, **common}, tags=["jobs"],
              summary="Change a waiting job")(change_job)
