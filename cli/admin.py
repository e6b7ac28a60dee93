"""Administration: `distill db upgrade` and `distill keys create`."""

from __future__ import annotations

import argparse

from sqlalchemy.engine import make_url

from cli.service import prepare_local_dirs
from core.config import get_settings


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
    create.set_defaults(handler=run_keys_create)


def run_db_upgrade(args: argparse.Namespace) -> int:
    from migrations.runner import current_revision, upgrade_database

    settings = get_settings()
    prepare_local_dirs(settings)
    upgrade_database(settings.database_url)
    url = make_url(settings.database_url).render_as_string()
    print(f"database {url} is at revision {current_revision(settings.database_url)}")
    return 0


def run_keys_create(args: argparse.Namespace) -> int:
    from core.db import get_sessionmaker
    from core.tenants.keys import create_api_key

    settings = get_settings()
    with get_sessionmaker(settings.database_url)() as session:
        key, plaintext = create_api_key(session, tenant_name=args.tenant, name=args.name)
        print(f"created key {key.id} for tenant {args.tenant!r}; it is shown only once:")
    print(plaintext)
    return 0
