"""manage.py apikey: create, list and revoke REST API keys. A new key is shown once, never again.

    manage.py apikey create --name billing --scopes start,read [--expires-in-days 90]
    manage.py apikey list
    manage.py apikey revoke <id or prefix>
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Q
from django.utils import timezone

from jobs.apikeys import SCOPES, apikey_create, apikey_revoke
from jobs.exceptions import SkiplockError
from jobs.models import ApiKey


class Command(BaseCommand):
    help = "Create, list and revoke REST API keys (a new key is printed once; only its hash is stored)."

    def add_arguments(self, parser: CommandParser) -> None:
        commands = parser.add_subparsers(dest="action", required=True)
        create = commands.add_parser("create", help="create a key and print it once")
        create.add_argument("--name", required=True, help="who or what uses the key")
        create.add_argument("--scopes", default="start,read",
                            help=f"comma-separated, some of: {', '.join(SCOPES)} (default: start,read)")
        create.add_argument("--expires-in-days", type=float, default=None, help="expire after this many days")
        create.add_argument("--json", action="store_true", help="print {id, name, key, scopes, expires_at} as JSON")
        listing = commands.add_parser("list", help="list keys (never their secrets)")
        listing.add_argument("--all", action="store_true", help="include revoked and expired keys")
        listing.add_argument("--json", action="store_true")
        revoke = commands.add_parser("revoke", help="revoke a key by id or prefix")
        revoke.add_argument("key", help="the key's id or its prefix (the 8 characters after sk_)")

    def handle(self, *args: Any, action: str, **options: Any) -> None:
        getattr(self, f"_{action}")(**options)

    def _create(self, *, name: str, scopes: str, expires_in_days: float | None, json: bool, **_: Any) -> None:
        expires_at = None
        if expires_in_days is not None:
            if expires_in_days <= 0:
                raise CommandError("--expires-in-days must be positive")
            expires_at = timezone.now() + dt.timedelta(days=expires_in_days)
        try:
            key, raw = apikey_create(name=name, scopes=[s.strip() for s in scopes.split(",") if s.strip()],
                                     expires_at=expires_at)
        except SkiplockError as exc:
            raise CommandError(exc.message) from None
        if json:
            self.stdout.write(_json({"id": key.pk, "name": key.name, "key": raw, "scopes": key.scopes,
                                     "expires_at": key.expires_at.isoformat() if key.expires_at else None}))
            return
        self.stdout.write(raw)
        self.stderr.write(
            f"API key #{key.pk} '{key.name}' with scopes {', '.join(key.scopes)}"
            + (f", expires {key.expires_at:%Y-%m-%d %H:%M} UTC" if key.expires_at else "")
            + ". Store it now: it is not shown again. Use it as `Authorization: Bearer <key>`."
        )

    def _list(self, *, all: bool, json: bool, **_: Any) -> None:
        now = timezone.now()
        keys = ApiKey.objects.order_by("pk")
        if not all:
            keys = keys.filter(revoked_at__isnull=True).filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        rows = [
            {
                "id": key.pk, "name": key.name, "prefix": f"sk_{key.prefix}_…", "scopes": key.scopes,
                "status": "revoked" if key.revoked_at else "expired" if key.expires_at and key.expires_at <= now else "active",
                "created_at": key.created_at.isoformat(),
                "expires_at": key.expires_at.isoformat() if key.expires_at else None,
                "last_used_at": key.last_used_at.isoformat() if key.last_used_at else None,
            }
            for key in keys
        ]
        if json:
            self.stdout.write(_json(rows))
            return
        if not rows:
            self.stdout.write("no API keys (create one: manage.py apikey create --name NAME --scopes start,read)")
            return
        self.stdout.write(f"{'ID':>4}  {'NAME':<24} {'PREFIX':<14} {'SCOPES':<20} {'STATUS':<8} LAST USED")
        for row in rows:
            self.stdout.write(
                f"{row['id']:>4}  {row['name'][:24]:<24} {row['prefix']:<14} {','.join(row['scopes']):<20} "
                f"{row['status']:<8} {(row['last_used_at'] or 'never')[:19]}"
            )

    def _revoke(self, *, key: str, **_: Any) -> None:
        wanted = key.removeprefix("sk_").split("_")[0]
        found = ApiKey.objects.filter(Q(prefix=wanted) | Q(pk=int(wanted)) if wanted.isdigit() else Q(prefix=wanted))
        matches = list(found[:2])
        if len(matches) != 1:
            raise CommandError(f"no single API key matches {key!r}; see manage.py apikey list")
        if not apikey_revoke(key_id=matches[0].pk):
            raise CommandError(f"API key #{matches[0].pk} was already revoked")
        self.stdout.write(f"revoked API key #{matches[0].pk} '{matches[0].name}'")


def _json(value: Any) -> str:
    return json.dumps(value, indent=2)
