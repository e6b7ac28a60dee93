"""The Alembic migrations build exactly the schema of the models, on SQLite and on PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

# Every domain's tables, registered on Base.metadata.
import core.files.models  # noqa: F401
import core.jobs.models  # noqa: F401
import core.tenants.models  # noqa: F401
import core.webhooks.models  # noqa: F401
from core.db import Base, get_engine
from migrations.runner import current_revision, head_revision, upgrade_database


def _schema_diff(url: str) -> list[object]:
    with get_engine(url).connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def test_unmigrated_database_differs_from_models(db_url: str) -> None:
    # The comparison itself must see a missing schema, or the next test proves nothing.
    diff = _schema_diff(db_url)
    added = {op[1].name for op in diff if op[0] == "add_table"}
    assert added == set(Base.metadata.tables)
    assert current_revision(db_url) is None


def test_migrated_schema_equals_models(db_url: str) -> None:
    upgrade_database(db_url)
    assert current_revision(db_url) == head_revision() is not None
    assert _schema_diff(db_url) == []


def test_upgrade_is_idempotent(db_url: str) -> None:
    upgrade_database(db_url)
    upgrade_database(db_url)
    tables = set(inspect(get_engine(db_url)).get_table_names())
    assert set(Base.metadata.tables) | {"alembic_version"} == tables
