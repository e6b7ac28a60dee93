"""A sweep's Idempotency-Key: a retried `POST /v1/sweeps` returns the first sweep instead of a second one.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-12 00:00:00

- sweeps.idempotency_key: unique per tenant, like jobs.idempotency_key.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sweeps") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(length=255), nullable=True))
        # (tenant, idempotency key); the name comes from the naming convention's first column.
        batch.create_unique_constraint(op.f("uq_sweeps_tenant_id"), ["tenant_id", "idempotency_key"])


def downgrade() -> None:
    with op.batch_alter_table("sweeps") as batch:
        batch.drop_constraint(op.f("uq_sweeps_tenant_id"), type_="unique")
        batch.drop_column("idempotency_key")
