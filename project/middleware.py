"""Django's stock middleware, run on the event loop under ASGI instead of one thread hop per hook.

Under ASGI, Django's `MiddlewareMixin` runs every `process_request` and `process_response` in a
thread (`sync_to_async`), and the handler runs every `process_view` in one too: with the stack in
`settings.MIDDLEWARE` that was about eighteen thread hops for one `GET /health/live`, most of the
web server's CPU per request (measured with bench/api.py and py-spy; see docs/benchmarks.md).
The hooks of these middleware only read and write headers, cookies and lazy objects, so here
they run inline on the event loop. The two that can touch the database do so only in cases they
can tell beforehand, and then still go to a thread: the session middleware when it will save
the session, the messages middleware when it will store messages. Anything else that reached
the database from the loop would raise Django's SynchronousOnlyOperation, never block silently.

`settings.MIDDLEWARE` keeps the stock class paths (Django's deploy checks look for them by name);
`project.asgi` loads them as the classes of `INLINE` (`inline_paths`). Under WSGI (the test
client, `manage.py runserver`) the stock classes run as ever.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import markcoroutinefunction, sync_to_async
from django.conf import settings
from django.contrib.auth import middleware as auth
from django.contrib.messages import middleware as messages
from django.contrib.sessions import middleware as sessions
from django.http import HttpRequest, HttpResponseBase
from django.middleware import clickjacking, common, csp, csrf, security


class InlineHooks:
    """For a `MiddlewareMixin` subclass: under ASGI, call its hooks on the event loop."""

    get_response: Any
    async_mode: bool

    def __init__(self, get_response: Any) -> None:
        super().__init__(get_response)  # type: ignore[call-arg]
        view_hook = getattr(self, "process_view", None)
        if self.async_mode and view_hook is not None:
            # The handler wraps a sync process_view in sync_to_async; an async one it awaits as is.
            async def process_view(request: HttpRequest, view: Any, args: Any, kwargs: Any) -> Any:
                return view_hook(request, view, args, kwargs)

            markcoroutinefunction(process_view)
            vars(self)["process_view"] = process_view  # an instance attribute: the class's stays for WSGI

    def response_blocks(self, request: HttpRequest) -> bool:
        """Whether `process_response` may do I/O for this request (then it runs in a thread)."""
        return False

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        response = None
        process_request = getattr(self, "process_request", None)
        if process_request is not None:
            response = process_request(request)
        response = response or await self.get_response(request)
        process_response = getattr(self, "process_response", None)
        if process_response is not None:
            if self.response_blocks(request):
                response = await sync_to_async(process_response, thread_sensitive=True)(request, response)
            else:
                response = process_response(request, response)
        return response


class SecurityMiddleware(InlineHooks, security.SecurityMiddleware):
    pass


class ContentSecurityPolicyMiddleware(InlineHooks, csp.ContentSecurityPolicyMiddleware):
    pass


class SessionMiddleware(InlineHooks, sessions.SessionMiddleware):
    def response_blocks(self, request: HttpRequest) -> bool:
        session = getattr(request, "session", None)
        return session is not None and (session.modified or settings.SESSION_SAVE_EVERY_REQUEST)


class CommonMiddleware(InlineHooks, common.CommonMiddleware):
    pass


class CsrfViewMiddleware(InlineHooks, csrf.CsrfViewMiddleware):
    pass


class AuthenticationMiddleware(InlineHooks, auth.AuthenticationMiddleware):
    pass


class MessageMiddleware(InlineHooks, messages.MessageMiddleware):
    def response_blocks(self, request: HttpRequest) -> bool:
        storage = getattr(request, "_messages", None)
        return storage is not None and (storage.used or storage.added_new)


class XFrameOptionsMiddleware(InlineHooks, clickjacking.XFrameOptionsMiddleware):
    pass


# Stock class path → the class the ASGI handler loads instead (WhiteNoise: project/static_files.py).
INLINE = {
    "django.middleware.security.SecurityMiddleware": "project.middleware.SecurityMiddleware",
    "django.middleware.csp.ContentSecurityPolicyMiddleware": "project.middleware.ContentSecurityPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware": "project.static_files.StaticFilesMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware": "project.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware": "project.middleware.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware": "project.middleware.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware": "project.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware": "project.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware": "project.middleware.XFrameOptionsMiddleware",
}


def inline_paths(paths: list[str]) -> list[str]:
    """`paths` (settings.MIDDLEWARE) with each stock class replaced by its event-loop variant."""
    return [INLINE.get(path, path) for path in paths]


__all__ = [
    "INLINE",
    "AuthenticationMiddleware",
    "CommonMiddleware",
    "ContentSecurityPolicyMiddleware",
    "CsrfViewMiddleware",
    "InlineHooks",
    "MessageMiddleware",
    "SecurityMiddleware",
    "SessionMiddleware",
    "XFrameOptionsMiddleware",
    "inline_paths",
]
