"""Administration: `distill db upgrade` and `distill keys create|list|revoke|rotate`."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url

from cli.service import prepare_local_dirs
from core.config import get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `db` and `keys` subcommands."""
    db = subparsers.add_parser("db", help="Database management.")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    upgrade = db_commands.add_parser("upgrade", help="Apply the migrations (idempotent).")
    upgrade.set_defaults(handler=run_db_upgrade)

    keys = subparsers.add_parser("keys", help="API keys.")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    create = keys_commands.add_parser("create", help="Create a key; prints it alone on the last line.")
    create.add_argument("--tenant", required=True, help="Tenant name (created if new).")
    create.add_argument("--name", default=None, help="A label for the key.")
    create.add_argument("--admin", action="store_true", help="May create tenants and manage every key.")
    create.add_argument("--expires-in-days", type=_positive_days, default=None, metavar="N")
    create.set_defaults(handler=run_keys_create)

    listing = keys_commands.add_parser("list", help="List keys (never the keys themselves).")
    listing.add_argument("--tenant", default=None, help="Only this tenant's (name or id).")
    listing.add_argument("--json", action="store_true", help="One JSON array instead of a table.")
    listing.set_defaults(handler=run_keys_list)

    revoke = keys_commands.add_parser("revoke", help="Revoke a key now.")
    revoke.add_argument("key_id", metavar="KEY_ID")
    revoke.set_defaults(handler=run_keys_revoke)

    rotate = keys_commands.add_parser(
        "rotate", help="Replace a key (same tenant, name, scopes); prints the new key alone on the last line."
    )
    rotate.add_argument("key_id", metavar="KEY_ID")
    rotate.add_argument(
        "--grace-seconds", type=int, default=0, metavar="S", help="The old key keeps working this long."
    )
    rotate.set_defaults(handler=run_keys_rotate)


def _positive_days(value: str) -> int:
    days = int(value)
    if not 1 <= days <= 3650:
        raise argparse.ArgumentTypeError("must be between 1 and 3650")
    return days


def run_db_upgrade(args: argparse.Namespace) -> int:
    from migrations.runner import current_revision, upgrade_database

    settings = get_settings()
    prepare_local_dirs(settings)
    upgrade_database(settings.database_url)
    url = make_url(settings.database_url).render_as_string()
    print(f"database {url} is at revision {current_revision(settings.database_url)}")
    return 0


def _session() -> Session:
    from core.db import get_sessionmaker  # imported late, like the other commands' heavy imports

    return get_sessionmaker(get_settings().database_url)()


def run_keys_create(args: argparse.Namespace) -> int:
    from core.db import utcnow
    from core.tenants.keys import ADMIN_SCOPE, create_api_key

    expires_at = utcnow() + timedelta(days=args.expires_in_days) if args.expires_in_days else None
    with _session() as session:
        key, plaintext = create_api_key(
            session,
            tenant_name=args.tenant,
            name=args.name,
            scopes=[ADMIN_SCOPE] if args.admin else [],
            expires_at=expires_at,
        )
        kind = "admin key" if args.admin else "key"
        until = f", valid until {expires_at.isoformat(timespec='seconds')}" if expires_at else ""
        print(f"created {kind} {key.id} for tenant {args.tenant!r}{until}; it is shown only once:")
    print(plaintext)
    return 0


def _when(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def run_keys_list(args: argparse.Namespace) -> int:
    from core.tenants.keys import all_api_keys, find_tenant, key_state, scopes_of

    with _session() as session:
        tenant_id = None
        if args.tenant is not None:
            tenant = find_tenant(session, name_or_id=args.tenant)
            if tenant is None:
                print(f"no tenant {args.tenant!r}", file=sys.stderr)
                return 1
            tenant_id = tenant.id
        rows = [
            {
                "id": key.id,
                "tenant_id": key.tenant_id,
                "tenant": key.tenant.name,
                "name": key.name,
                "prefix": key.prefix,
                "scopes": sorted(scopes_of(key)),
                "status": key_state(key),
                "created_at": _when(key.created_at),
                "last_used_at": _when(key.last_used_at),
                "expires_at": _when(key.expires_at),
                "revoked_at": _when(key.revoked_at),
            }
            for key in all_api_keys(session, tenant_id=tenant_id)
        ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ("id", "tenant", "name", "prefix", "scopes", "status", "last_used_at", "expires_at")
    table = [columns] + [
        tuple(" ".join(r[c]) if c == "scopes" else str(r[c] if r[c] is not None else "-") for c in columns)
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    return 0


def run_keys_revoke(args: argparse.Namespace) -> int:
    from core.errors import NotFound
    from core.tenants.keys import get_api_key, revoke

    with _session() as session:
        try:
            key = get_api_key(session, key_id=args.key_id)
        except NotFound as exc:
            print(exc.message, file=sys.stderr)
            return 1
        revoke(session, key=key)
        print(f"key {key.id} is revoked (since {_when(key.revoked_at)})")
    return 0


def run_keys_rotate(args: argparse.Namespace) -> int:
    from core.errors import ServiceError
    from core.tenants.keys import get_api_key, rotate

    if args.grace_seconds < 0:
        print("--grace-seconds must be 0 or more", file=sys.stderr)
        return 2
    with _session() as session:
        try:
            old = get_api_key(session, key_id=args.key_id)
            new, plaintext = rotate(session, key=old, grace=timedelta(seconds=args.grace_seconds))
        except ServiceError as exc:
            print(exc.message, file=sys.stderr)
            return 1
        print(
            f"created key {new.id} to replace {old.id}, which stops working at {_when(old.revoked_at)}; "
            "the new key is shown only once:"
        )
    print(plaintext)
    return 0
