from __future__ import annotations

import importlib

from django.apps import AppConfig
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

# Skiplock's own task modules: every process registers them, whether or not it runs a worker.
INTERNAL_TASK_MODULES = ("jobs.maintenance",)


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "Skiplock jobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from jobs import checks  # noqa: F401  (registers system checks)

        import_task_modules()


def import_task_modules() -> None:
    """Register every task in every process (web, worker, commands), so all see the same task list.

    Each app's `tasks.py` is imported by procrastinate's app (listed before this one); here come
    Skiplock's own task modules and those named by SKIPLOCK_IMPORT_PATHS. Importing twice is free.
    """
    for path in INTERNAL_TASK_MODULES:
        importlib.import_module(path)
    for path in settings.SKIPLOCK_IMPORT_PATHS:
        try:
            importlib.import_module(path)
        except ImportError as exc:
            raise ImproperlyConfigured(
                f"SKIPLOCK_IMPORT_PATHS names the module '{path}', which cannot be imported: {exc}"
            ) from exc
