"""Who is calling the API: a bearer API key with scopes, or a logged-in Django session.

API keys (`Authorization: Bearer sk_…`) act on every job within their scopes: `start` starts
jobs, `read` reads them and follows their events, `manage` cancels, aborts and retries them.
Session users are people in a browser: staff may do everything on every job; other users may
start jobs (they own them) and read, follow, cancel and abort their own jobs only — someone
else's job is answered 404, so ids cannot be probed. Unsafe methods over a session need the
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
ACTION_SCOPE = {"start": "start", "read": "read", "cancel": "manage", "abort": "manage", "retry": "manage"}
# What a signed-in user who is not staff may do, on their own jobs.
OWNER_ACTIONS = frozenset({"start", "read", "cancel", "abort"})


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    kind: str  # "key" or "user"
    name: str  # for logs and audit: the key's name and prefix, or the username; never a secret
    scopes: frozenset[str]
    user_id: int | None = None
    is_staff: bool = False
    key_id: int | None = None

    @property
    def sees_all_jobs(self) -> bool:
        return self.kind == "key" or self.is_staff

    @property
    def owner_filter(self) -> int | None:
        """The owner id this caller is confined to, or None when it sees every job."""
        return None if self.sees_all_jobs else self.user_id

    def may(self, action: str) -> bool:
        if self.kind == "key":
            return ACTION_SCOPE[action] in self.scopes
        return self.is_staff or action in OWNER_ACTIONS

    def require(self, action: str) -> None:
        if self.may(action):
            return
        if self.kind == "key":
            scope = ACTION_SCOPE[action]
            raise AuthorizationError(
                message=f"this API key lacks the '{scope}' scope needed to {action} jobs; "
                f"it has: {', '.join(sorted(self.scopes)) or 'none'}"
            )
        raise AuthorizationError(message=f"only staff users may {action} jobs")

    def owns(self, owner_id: int | None) -> bool:
        return self.sees_all_jobs or (owner_id is not None and owner_id == self.user_id)


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
        return Principal(
            kind="user", name=user.get_username(), scopes=frozenset(), user_id=user.pk,
            is_staff=bool(user.is_staff),
        )


bearer_key = BearerKey()
session_user = SessionUser()
API_AUTH = [bearer_key, session_user]


def principal_of(request: HttpRequest) -> Principal:
    auth = getattr(request, "auth", None)
    if not isinstance(auth, Principal):  # ninja ran no auth: a programming error, never a user's
        raise AuthenticationError()
    return auth


def read_access(request: HttpRequest) -> Principal | None:
    """For plain Django views (health, metrics) behind a setting: a `read` key or a staff session."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        key = apikey_verify(token.strip())
        if key is not None and "read" in key.scopes:
            return key_principal(key)
        return None
    user: Any = getattr(request, "user", None)
    if user is not None and user.is_authenticated and user.is_staff:
        return Principal(kind="user", name=user.get_username(), scopes=frozenset(), user_id=user.pk, is_staff=True)
    return None


def manages_jobs(principal: Principal) -> bool:
    """Whether the caller may place jobs as it likes (any priority, a new queue): who may retry any job.

    That is a `manage` key, or a user with the right to act on every job (issue 13 item 1).
    """
    return principal.may("retry")
