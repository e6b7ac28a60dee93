"""Reliability: key expiry and scopes, the step an event belongs to, when a job was last sent to the queue.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 00:00:00

- api_keys.expires_at: optional expiry; api_keys.scopes: space-separated scopes ("admin" may manage
  tenants and other tenants' keys).
- job_events.step: the training step an event reports (eval, checkpoint, ...), so that a resumed attempt
  can drop what a dead attempt logged after the resume point.
- jobs.enqueued_at: when the job's message was last sent, so a job whose message the broker lost can be
  sent again once it has waited longer than a setting.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("expires_at", Timestamp, nullable=True))
        batch.add_column(sa.Column("scopes", sa.String(length=200), nullable=False, server_default=""))
    with op.batch_alter_table("job_events") as batch:
        batch.add_column(sa.Column("step", sa.Integer(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("enqueued_at", Timestamp, nullable=True))
    op.create_index("ix_jobs_status_enqueued", "jobs", ["status", "enqueued_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_jobs_status_enqueued", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("enqueued_at")
    with op.batch_alter_table("job_events") as batch:
        batch.drop_column("step")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("scopes")
        batch.drop_column("expires_at")
