"""Runs one Celery-side measurement (bench.celery_side) in bench/.venv and returns its figures."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.common import ROOT, Bench, python_env


def run(bench: Bench, op: str, *, backend: bool, timeout: float = 900, **spec: Any) -> dict[str, Any]:
    if not bench.has_celery:
        raise RuntimeError("the Celery side is not installed")
    full = {"op": op, "redis_url": bench.redis_url, "backend": backend, **spec}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        proc = subprocess.run(
            [str(bench.celery_python), "-m", "bench.celery_side", json.dumps(full), str(out)],
            cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"Celery {op} failed: {proc.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(out.read_text())
    bench.celery_versions.update(result.pop("versions", {}))
    return result


SYSTEMS = (("celery", False, "Celery+Redis"), ("celery_backend", True, "Celery+Redis+results"))
