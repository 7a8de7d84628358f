"""Rate-limit counters.

``rate_limits``: one GCRA theoretical arrival time per limited key (see
:mod:`sts.core.rate_limit`), shared by every process and instance of the
embedded store on PostgreSQL.  On SQLite the counts live in a file of their own
beside the database (``<database>.rate-limits``, created as needed, never
migrated: its rows mean nothing a few seconds after they were written); the
table here stays empty.

Revision ID: 0003_rate_limits
Revises: 0002_heartbeats_ledger_epochs
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_rate_limits"
down_revision = "0002_heartbeats_ledger_epochs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rate_limits",
        sa.Column("key", sa.String(length=200), primary_key=True),
        sa.Column("tat", sa.Float(), nullable=False),
        sa.Column("tolerance", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rate_limits")
