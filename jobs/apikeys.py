"""API keys: created with a random secret shown once, stored as a SHA-256 digest, scoped, revocable."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Iterable

from django.db.models import Q
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


def apikey_verify(raw_key: str) -> ApiKey | None:
    """The live key for this secret (not revoked, not expired), or None. Records its last use."""
    now = timezone.now()
    key = (
        ApiKey.objects.filter(key_hash=digest(raw_key), revoked_at__isnull=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .first()
    )
    if key is None:
        return None
    # At most one write a minute per key: last_used_at is for humans, not an audit log.
    if key.last_used_at is None or now - key.last_used_at > dt.timedelta(minutes=1):
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return key


def apikey_revoke(*, key_id: int) -> bool:
    return ApiKey.objects.filter(pk=key_id, revoked_at__isnull=True).update(revoked_at=timezone.now()) == 1
