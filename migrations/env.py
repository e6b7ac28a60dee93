"""Alembic environment: the URL comes from the caller (`config.attributes["url"]`, set by migrations.runner)
or else from the Settings, never from alembic.ini. SQLite gets batch mode, since it cannot ALTER columns."""

from __future__ import annotations

import logging.config

from alembic import context
from sqlalchemy import Connection

# Every domain's tables, registered on Base.metadata.
import core.files.models  # noqa: F401
import core.jobs.models  # noqa: F401
import core.tenants.models  # noqa: F401
import core.webhooks.models  # noqa: F401
from core.config import get_settings
from core.db import Base, get_engine

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    return config.attributes.get("url") or get_settings().database_url


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    dialect = connection.dialect.name if connection is not None else (url or "").split(":", 1)[0]
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        render_as_batch=dialect.startswith("sqlite"),
        compare_type=True,
        literal_binds=connection is None,
    )


def run_migrations_offline() -> None:
    """Emit SQL to stdout (`alembic upgrade head --sql`) without a database."""
    _configure(url=_url())
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    with get_engine(_url()).connect() as connection:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
