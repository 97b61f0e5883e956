"""Skiplock's own URLs beside the admin: the REST API, metrics and the job pages."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver

urlpatterns: list[URLPattern | URLResolver] = []
