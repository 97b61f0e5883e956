"""API keys: created with a random secret shown once, stored as a SHA-256 digest, scoped, revocable."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
from collections.abc import Iterable

from django.db import connection
from django.utils import timezone

from jobs.exceptions import SkiplockError
from jobs.models import ApiKey

KEY_PREFIX = "sk_"
SCOPES = tuple(ApiKey.Scope.values)


def digest(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def apikey_create(
    *, name: str, scopes: Iterable[str], expires_at: dt.datetime | None = None, created_by_id: int | None = None
) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the raw key, which is never stored and shown only now."""
    scope_list = sorted(set(scopes))
    unknown = [s for s in scope_list if s not in SCOPES]
    if unknown or not scope_list:
        raise SkiplockError(f"scopes must be some of {', '.join(SCOPES)}; got {', '.join(scope_list) or 'none'}")
    if not name.strip():
        raise SkiplockError("an API key needs a name")
    if expires_at is not None and expires_at <= timezone.now():
        raise SkiplockError("expires_at must be in the future")
    prefix = secrets.token_hex(4)
    raw = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    key = ApiKey.objects.create(
        name=name.strip(), prefix=prefix, key_hash=digest(raw), scopes=scope_list,
        expires_at=expires_at, created_by_id=created_by_id,
    )
    return key, raw


# One round trip: the live key for a digest, and (at most once a minute per key: last_used_at is
# for humans, not an audit log) its last use recorded. A request that records nothing writes nothing.
_VERIFY = """
WITH found AS (
    SELECT id, name, prefix, key_hash, scopes::text AS scopes, created_at, expires_at, revoked_at, last_used_at,
           created_by_id
    FROM skiplock_api_key
    WHERE key_hash = %(digest)s AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > %(now)s)
),
touched AS (
    UPDATE skiplock_api_key k SET last_used_at = %(now)s
    FROM found
    WHERE k.id = found.id AND (found.last_used_at IS NULL OR found.last_used_at <= %(now)s - interval '1 minute')
    RETURNING k.id
)
SELECT found.*, EXISTS (SELECT FROM touched) FROM found
"""
_VERIFY_FIELDS = ("id", "name", "prefix", "key_hash", "scopes", "created_at", "expires_at", "revoked_at",
                  "last_used_at", "created_by_id")


def apikey_verify(raw_key: str) -> ApiKey | None:
    """The live key for this secret (not revoked, not expired), or None. Records its last use."""
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(_VERIFY, {"digest": digest(raw_key), "now": now})
        row = cursor.fetchone()
    if row is None:
        return None
    values = dict(zip(_VERIFY_FIELDS, row[:-1], strict=True))
    values["scopes"] = json.loads(values["scopes"])
    if row[-1]:
        values["last_used_at"] = now
    return ApiKey.from_db(connection.alias, list(values), list(values.values()))


def apikey_revoke(*, key_id: int) -> bool:
    return ApiKey.objects.filter(pk=key_id, revoked_at__isnull=True).update(revoked_at=timezone.now()) == 1
