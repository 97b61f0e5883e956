from __future__ import annotations
import json
from typing import Any
def table(data: dict[str, Any]) -> str:
    return json.dumps(data["benchmarks"], indent=1)[:20000]
def markdown(data: dict[str, Any]) -> str:
    return "# Benchmarks\n"
