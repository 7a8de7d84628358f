"""Hash chains of the audit trail.

``audit_events`` gains ``chain_id``, ``seq``, ``prev_hash`` and ``hash`` (NULL on
the records written before: nothing vouches for those) and a unique index on
``(chain_id, seq)``; ``audit_chains`` registers every chain, with its genesis
hash and the anchor retention moves (see ``sts/core/audit_chain.py`` and
docs/audit.md).  Only additions: an instance of the previous version keeps
writing, unchained, during a rolling upgrade.

Building the index reads the whole table, and on PostgreSQL blocks its writes
meanwhile; an index of that name that exists is left as it is, so that it can
be built beforehand with ``CREATE UNIQUE INDEX CONCURRENTLY
ux_audit_events_chain_seq ON audit_events (chain_id, seq)`` once the columns
are there.

Revision ID: 0004_audit_chains
Revises: 0003_rate_limits
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_audit_chains"
down_revision = "0003_rate_limits"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_chains",
        sa.Column("chain_id", sa.String(length=32), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("writer", sa.String(length=200), nullable=False),
        sa.Column("genesis_hash", sa.String(length=64), nullable=False),
        sa.Column("anchor_seq", sa.BigInteger(), nullable=False),
        sa.Column("anchor_hash", sa.String(length=64), nullable=False),
        sa.Column("pruned_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("chain_id"),
    )
    # Plain ALTER TABLE ... ADD COLUMN on both databases: no copy of the table.
    op.add_column("audit_events", sa.Column("chain_id", sa.String(length=32), nullable=True))
    op.add_column("audit_events", sa.Column("seq", sa.BigInteger(), nullable=True))
    op.add_column("audit_events", sa.Column("prev_hash", sa.String(length=64), nullable=True))
    op.add_column("audit_events", sa.Column("hash", sa.String(length=64), nullable=True))
    indexes = {index["name"] for index in sa.inspect(op.get_bind()).get_indexes("audit_events")}
    if "ux_audit_events_chain_seq" not in indexes:
        op.create_index("ux_audit_events_chain_seq", "audit_events", ["chain_id", "seq"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index("ux_audit_events_chain_seq")
        batch_op.drop_column("hash")
        batch_op.drop_column("prev_hash")
        batch_op.drop_column("seq")
        batch_op.drop_column("chain_id")
    op.drop_table("audit_chains")
