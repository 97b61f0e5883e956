from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from jobs import health

urlpatterns = [
    path("admin/", admin.site.urls),
    path("health/live", health.live, name="health-live"),
    path("health/ready", health.ready, name="health-ready"),
    path("", include("jobs.urls")),
]
