"""Skiplock's own URLs beside the admin: the REST API, metrics and the job pages."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver

urlpatterns: list[URLPattern | URLResolver] = []

# Job pages for end users: launcher at /, status at /jobs/<id>/, sign-in at /login/ (jobs/pages.py).
from jobs import pages  # noqa: E402

urlpatterns += pages.urlpatterns

# REST API under /api/ (jobs/api.py) and Prometheus metrics at /metrics (jobs/metrics.py).
from django.urls import path, re_path  # noqa: E402

from jobs import metrics  # noqa: E402
from jobs.api import api, api_not_found  # noqa: E402

urlpatterns += [
    path("api/", api.urls),
    re_path(r"^api/", api_not_found),  # unknown /api/ paths answer JSON too
    path("metrics", metrics.metrics_view, name="metrics"),
]
