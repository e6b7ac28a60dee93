"""Keyset pagination, newest first, for the tenant-owned tables (files, jobs).

The cursor is the id of the last row of the previous page; ordering by (created_at, id) makes pages stable
while rows are added, with no offsets to drift.
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select, or_, select
from sqlalchemy.orm import Session

from core.errors import InvalidRequest

Row = TypeVar("Row")


def newest_first_page(
    session: Session, query: Select[Any], model: type[Row], *, tenant_id: str, after: str | None, limit: int
) -> tuple[list[Row], bool]:
    """One page of `query` (rows of `model`), after the row with id `after`, and whether more follow."""
    columns: Any = model
    if after is not None:
        cursor = session.scalar(select(model).where(columns.id == after, columns.tenant_id == tenant_id))
        if cursor is None:
            noun = model.__name__.lower()  # type: ignore[attr-defined]
            raise InvalidRequest("invalid_cursor", f"no {noun} {after!r} to continue after", param="after")
        query = query.where(
            or_(
                columns.created_at < cursor.created_at,
                (columns.created_at == cursor.created_at) & (columns.id < cursor.id),
            )
        )
    ordered = query.order_by(columns.created_at.desc(), columns.id.desc()).limit(limit + 1)
    rows = list(session.scalars(ordered))
    return rows[:limit], len(rows) > limit
