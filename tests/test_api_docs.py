"""docs/api.md's examples run: every ```bash block (top to bottom, one shell) and every ```python block."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from django.conf import settings
from django.db import connection

from jobs.models import ApiKey, JobRecord
from tests.api_fixtures import WorkerThread, clean_queue  # noqa: F401

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("clean_queue"), pytest.mark.slow]

DOC = Path(settings.BASE_DIR) / "docs" / "api.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def database_url() -> str:
    """The test database as a DATABASE_URL, for the docs' `manage.py` commands."""
    params = connection.settings_dict
    host = params["HOST"] or ""
    netloc = f"{quote(params['USER'] or '')}:{quote(params['PASSWORD'] or '')}@"
    if host.startswith("/"):
        return f"postgresql://{netloc}/{params['NAME']}?host={quote(host)}&port={params['PORT'] or 5432}"
    return f"postgresql://{netloc}{host}:{params['PORT'] or 5432}/{params['NAME']}"


def test_the_docs_examples_run_against_a_real_server_and_worker(asgi_server: str, tmp_path: Path) -> None:
    bash, python = blocks("bash"), blocks("python")
    assert len(bash) >= 4
    assert len(python) >= 2
    env = {**os.environ, "SKIPLOCK_URL": asgi_server, "DATABASE_URL": database_url(), "DEBUG": "true"}
    env.pop("SKIPLOCK_KEY", None)
    key_file = tmp_path / "key"
    script = "set -euo pipefail\n" + "\n".join(bash) + f'\necho "$SKIPLOCK_KEY" > {key_file}\n'
    with WorkerThread(concurrency=2):
        shell = subprocess.run(["bash", "-c", script], cwd=settings.BASE_DIR, env=env, capture_output=True,
                               text=True, timeout=180)
        assert shell.returncode == 0, shell.stdout[-3000:] + shell.stderr[-3000:]
        assert "event: end" in shell.stdout
        env["SKIPLOCK_KEY"] = key_file.read_text().strip()
        for number, code in enumerate(python):
            run = subprocess.run([sys.executable, "-c", code], cwd=settings.BASE_DIR, env=env, capture_output=True,
                                 text=True, timeout=120)
            assert run.returncode == 0, f"python block {number}:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
            assert "route length" in run.stdout
    assert ApiKey.objects.filter(name="docs").count() == 1  # made by `manage.py apikey create` in the docs
    assert JobRecord.objects.filter(task_name="deploy_stack", state="succeeded").exists()
    assert JobRecord.objects.filter(state="cancelled").count() == 3  # one, then two by the bulk example
    assert JobRecord.objects.filter(task_name="optimize_route", priority=10).exists()  # the PATCH example
    assert not JobRecord.objects.filter(expires_at__isnull=False).exclude(task_name="optimize_route").exists()
    assert JobRecord.objects.filter(task_name="optimize_route", state="succeeded").count() >= 2
