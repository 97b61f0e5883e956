"""The service answers over real HTTP (uvicorn serving the ASGI app on the test database)."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.django_db(transaction=True)


def test_health_and_admin_login_answer_over_http(asgi_server: str) -> None:
    assert httpx.get(f"{asgi_server}/health/live").json() == {"status": "ok"}
    assert httpx.get(f"{asgi_server}/admin/login/").status_code == 200
