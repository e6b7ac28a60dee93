"""Run the Alembic migrations programmatically (for `distill db upgrade`, `distill serve` and tests).

The script location is the installed `migrations` package, so this works from any working directory and
from an installed copy; alembic.ini is only for the `alembic` command line.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from core.db import get_engine


def _script_location() -> Path:
    import migrations

    return Path(next(iter(migrations.__path__))).resolve()


def alembic_config(url: str) -> Config:
    """An Alembic config for `url` that leaves the process' logging configuration alone."""
    config = Config()
    config.set_main_option("script_location", str(_script_location()))
    config.attributes["url"] = url
    config.attributes["configure_logging"] = False
    return config


def upgrade_database(url: str, revision: str = "head") -> None:
    """Apply every migration up to `revision` (idempotent: an up-to-date database is left as is)."""
    command.upgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    """The revision the database is at, or None when it has never been migrated."""
    with get_engine(url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


@lru_cache(maxsize=1)
def head_revision() -> str | None:
    """The newest revision among the migration scripts."""
    return ScriptDirectory(str(_script_location())).get_current_head()
