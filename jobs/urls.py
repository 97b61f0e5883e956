"""Skiplock's own URLs beside the admin: the REST API, metrics and the job pages."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver

urlpatterns: list[URLPattern | URLResolver] = []

# Job pages for end users: launcher at /, status at /jobs/<id>/, sign-in at /login/ (jobs/pages.py).
from jobs import pages  # noqa: E402

urlpatterns += pages.urlpatterns
