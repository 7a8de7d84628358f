"""Readiness heartbeats and the Redis ledger's epoch memory.

``heartbeats``: one row per serving process, rewritten by each readiness check
(a commit proves the audit database takes writes).  ``ledger_epochs``: which
epoch of the Redis replay store was last seen, so that a process started after
Redis lost its records still knows they were lost.

Versions between 0.1.0 and this migration created either table with
``metadata.create_all``, in this same shape: a table that exists is left as it is.

Revision ID: 0002_heartbeats_ledger_epochs
Revises: 0001_v0_1_0
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_heartbeats_ledger_epochs"
down_revision = "0001_v0_1_0"
branch_labels = None
depends_on = None


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    if "heartbeats" not in existing:
        op.create_table(
            "heartbeats",
            sa.Column("instance", sa.String(200), primary_key=True),
            sa.Column("checked_at", sa.Float(), nullable=False),
        )
    if "ledger_epochs" not in existing:
        op.create_table(
            "ledger_epochs",
            sa.Column("identity", sa.String(600), primary_key=True),
            sa.Column("epoch", sa.String(600), nullable=False),
            sa.Column("expires_at", sa.Float(), nullable=False),
        )


def downgrade() -> None:
    op.drop_table("ledger_epochs")
    op.drop_table("heartbeats")
