"""Who is calling the API or a job page, and what they may see and do: the one rule of job rights.

API keys (`Authorization: Bearer sk_…`) act on every job within their scopes: `start` starts
jobs, `read` reads them and follows their events, `manage` cancels, aborts and retries them.
Signed-in users get what the admin would give them, never more for being staff: everyone may
start jobs (they own them) and read, follow, cancel and abort their own; reading someone else's
job needs staff status and the `view` (or `change`) permission on jobs, acting on it `change`
(deleting: `delete`), exactly as the job console decides. A job the caller may not see is
answered 404, so ids cannot be probed; one they may see but not touch is a 403 naming the
permission. Tracebacks are for operators: users with the view permission and `manage` keys;
everyone else sees an error's type and message only. Unsafe methods over a session need the
CSRF token (`X-CSRFToken`), as any Django form would. Raw keys are never logged or stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.http import HttpRequest
from ninja.errors import AuthenticationError, AuthorizationError, HttpError
from ninja.security import APIKeyCookie, HttpBearer
from ninja.utils import check_csrf

from jobs.apikeys import apikey_verify
from jobs.models import ApiKey

# What each action needs from an API key.
ACTION_SCOPE = {"start": "start", "read": "read", "cancel": "manage", "abort": "manage", "retry": "manage",
                "delete": "manage"}
# What any signed-in user may do on their own jobs.
OWNER_ACTIONS = frozenset({"start", "read", "cancel", "abort"})
# The Django permission on jobs an action on someone else's job needs (the console's ACTIONS agree).
ACTION_PERMISSION = {"read": "view", "cancel": "change", "abort": "change", "retry": "change", "delete": "delete"}


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    kind: str  # "key" or "user"
    name: str  # for logs and audit: the key's name and prefix, or the username; never a secret
    scopes: frozenset[str]
    user_id: int | None = None
    is_staff: bool = False
    key_id: int | None = None
    # A user's permissions on jobs that count here: "view", "change", "delete" (staff only, as in the admin).
    job_perms: frozenset[str] = frozenset()

    @property
    def sees_all_jobs(self) -> bool:
        return self.kind == "key" or "view" in self.job_perms

    @property
    def sees_tracebacks(self) -> bool:
        """Tracebacks show file paths and the server's layout: operators only (view permission, manage key)."""
        return "manage" in self.scopes if self.kind == "key" else "view" in self.job_perms

    @property
    def owner_filter(self) -> int | None:
        """The owner id this caller is confined to, or None when it sees every job."""
        return None if self.sees_all_jobs else self.user_id

    def may(self, action: str) -> bool:
        """Whether the caller may `action` at least some jobs (their own, for a user)."""
        if self.kind == "key":
            return ACTION_SCOPE[action] in self.scopes
        return action in OWNER_ACTIONS or ACTION_PERMISSION.get(action, "") in self.job_perms

    def require(self, action: str) -> None:
        if self.may(action):
            return
        if self.kind == "key":
            scope = ACTION_SCOPE[action]
            raise AuthorizationError(
                message=f"this API key lacks the '{scope}' scope needed to {action} jobs; "
                f"it has: {', '.join(sorted(self.scopes)) or 'none'}"
            )
        raise AuthorizationError(message=_permission_message(action))

    def can_see(self, owner_id: int | None) -> bool:
        """Whether the caller may read a job owned by `owner_id` (None: started by a key or the system)."""
        return self.sees_all_jobs or self.is_owner(owner_id)

    owns = can_see  # the name callers used before the rule distinguished seeing from owning

    def is_owner(self, owner_id: int | None) -> bool:
        return self.kind == "user" and owner_id is not None and owner_id == self.user_id

    def can_act(self, action: str, owner_id: int | None) -> bool:
        """Whether the caller may `action` a job owned by `owner_id` (seeing it is checked apart)."""
        if self.kind == "key":
            return ACTION_SCOPE[action] in self.scopes
        if self.is_owner(owner_id) and action in OWNER_ACTIONS:
            return True
        return ACTION_PERMISSION.get(action, "") in self.job_perms

    def error_of(self, error_type: str, message: str, traceback: str) -> dict[str, str | None] | None:
        """A job's error as this caller may see it: the traceback only for operators (else None)."""
        if not error_type:
            return None
        return {"type": error_type, "message": message, "traceback": traceback if self.sees_tracebacks else None}

    def require_on(self, action: str, owner_id: int | None) -> None:
        """403 when the caller may see the job but not `action` it (call after the 404 check)."""
        if not self.can_act(action, owner_id):
            raise AuthorizationError(message=_permission_message(action, someone_elses=True))


def _permission_message(action: str, *, someone_elses: bool = False) -> str:
    permission = ACTION_PERMISSION.get(action, "change")
    whose = "other users' jobs" if someone_elses or action not in OWNER_ACTIONS else "jobs"
    return (f"you may not {action} {whose}: that needs staff status and the '{permission}' permission on jobs "
            "(ask an administrator)")


def job_perms_of(user: Any) -> frozenset[str]:
    """The job permissions the admin would honour for `user`: none unless active staff."""
    if not (getattr(user, "is_authenticated", False) and user.is_active and user.is_staff):
        return frozenset()
    perms = {name for name in ("view", "change", "delete") if user.has_perm(f"jobs.{name}_jobrecord")}
    if "change" in perms:
        perms.add("view")  # the admin lets `change` read too (has_view_permission)
    return frozenset(perms)


def user_principal(user: Any) -> Principal:
    """The principal of a Django user; an anonymous one sees no job (views ask for a login before this)."""
    if not getattr(user, "is_authenticated", False):
        return Principal(kind="user", name="anonymous", scopes=frozenset())
    return Principal(
        kind="user", name=user.get_username(), scopes=frozenset(), user_id=user.pk,
        is_staff=bool(user.is_staff), job_perms=job_perms_of(user),
    )


def key_principal(key: ApiKey) -> Principal:
    return Principal(kind="key", name=f"{key.name} ({key.prefix}…)", scopes=frozenset(key.scopes), key_id=key.pk)


class BearerKey(HttpBearer):
    """`Authorization: Bearer <key>`; a key that is wrong, revoked or expired is a 401 at once."""

    openapi_description = "An API key from `manage.py apikey create` or the admin (scopes: start, read, manage)."

    def __call__(self, request: HttpRequest) -> Principal | None:
        # ninja's own parser logs unexpected headers in DEBUG; a header may hold a key, so never log it.
        value = request.headers.get("Authorization")
        if not value:
            return None
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer":
            raise AuthenticationError(message="use `Authorization: Bearer <API key>`")
        return self.authenticate(request, token)

    def authenticate(self, request: HttpRequest, token: str) -> Principal | None:
        token = token.strip()
        key = apikey_verify(token) if token else None
        if key is None:
            raise AuthenticationError(message="the API key is invalid, revoked or expired")
        return key_principal(key)


class SessionUser(APIKeyCookie):
    """A signed-in Django user (browser JavaScript on the job pages and the admin)."""

    param_name = settings.SESSION_COOKIE_NAME
    openapi_description = "A Django session cookie; unsafe methods also need the X-CSRFToken header."

    def _get_key(self, request: HttpRequest) -> str | None:
        key = request.COOKIES.get(self.param_name)
        # CSRF matters only when a session could authenticate this request.
        if key and self.csrf and not getattr(request, "_ninja_csrf_exempt", False) and check_csrf(request):
            raise HttpError(403, "CSRF check failed: send the csrftoken cookie's value in the X-CSRFToken header")
        return key

    def authenticate(self, request: HttpRequest, key: str | None) -> Principal | None:
        if not key:
            return None
        user: Any = request.user
        if not user.is_authenticated or not user.is_active:
            return None
        return user_principal(user)


bearer_key = BearerKey()
session_user = SessionUser()
API_AUTH = [bearer_key, session_user]


def principal_of(request: HttpRequest) -> Principal:
    auth = getattr(request, "auth", None)
    if not isinstance(auth, Principal):  # ninja ran no auth: a programming error, never a user's
        raise AuthenticationError()
    return auth


def read_access(request: HttpRequest) -> Principal | None:
    """For plain Django views (health, metrics) behind a setting: a `read` key, or a session that may read every job."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        key = apikey_verify(token.strip())
        if key is not None and "read" in key.scopes:
            return key_principal(key)
        return None
    user: Any = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return None
    principal = user_principal(user)
    return principal if principal.sees_all_jobs else None


def manages_jobs(principal: Principal) -> bool:
    """Whether the caller may place jobs as it likes (any priority, a new queue): who may retry any job.

    That is a `manage` key, or a user with the right to act on every job (issue 13 item 1).
    """
    return principal.may("retry")
