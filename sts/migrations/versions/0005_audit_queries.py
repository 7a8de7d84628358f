"""Audit queries and the review page: indexes on audit_events, summary tables.

Indexes on ``audit_events`` for the filters of ``sts audit`` and the review
page (identity, client, outcome, rule; each ending in the id, for keyset pages),
decisions over time by outcome (time, outcome), and step-ups per identity (a
partial index: only those refusals pay for it).  Tables for what the records'
JSON holds, filled after the records are written (sts/adapters/audit_query.py):
``audit_terms`` (fired signals and audiences), ``audit_edges`` (subject to
audience), ``audit_counts`` (decisions per hour and outcome) and
``audit_summary_state`` (how far they have read).

Building an index on a large PostgreSQL ``audit_events`` blocks audit writes
while it runs: an index that exists already is skipped, so that an operator can
build it beforehand with ``CREATE INDEX CONCURRENTLY`` under the same name.

Revision ID: 0005_audit_queries
Revises: 0004_audit_chains
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_audit_queries"
down_revision = "0004_audit_chains"
branch_labels = None
depends_on = None

_STEP_UP = "error = 'insufficient_user_authentication'"
INDEXES: list[tuple[str, list[str], dict[str, object]]] = [
    ("ix_audit_events_identity", ["issuer", "subject", "id"], {}),
    ("ix_audit_events_client", ["client_id", "id"], {}),
    ("ix_audit_events_outcome", ["outcome", "id"], {}),
    ("ix_audit_events_rule", ["rule", "id"], {}),
    ("ix_audit_events_time_outcome", ["time", "outcome"], {}),
    (
        "ix_audit_events_step_ups",
        ["issuer", "subject", "id"],
        {"sqlite_where": sa.text(_STEP_UP), "postgresql_where": sa.text(_STEP_UP)},
    ),
]


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    existing = {index["name"] for index in inspector.get_indexes("audit_events")}
    for name, columns, options in INDEXES:
        if name not in existing:
            op.create_index(name, "audit_events", columns, **options)  # type: ignore[arg-type]
    op.create_table(
        "audit_summary_state",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "audit_terms",
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("value", sa.String(256), primary_key=True),
        sa.Column("audit_id", sa.BigInteger(), primary_key=True),
        sa.Column("time", sa.Float(), nullable=False),
    )
    op.create_index("ix_audit_terms_time", "audit_terms", ["kind", "time", "value"])
    op.create_index("ix_audit_terms_audit_id", "audit_terms", ["audit_id"])
    op.create_table(
        "audit_edges",
        sa.Column("edge", sa.String(64), primary_key=True),
        sa.Column("issuer", sa.String(64)),
        sa.Column("subject", sa.String(512)),
        sa.Column("audience", sa.String(512), nullable=False),
        sa.Column("first_seen", sa.Float(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.Column("decisions", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_audit_edges_last_seen", "audit_edges", ["last_seen"])
    op.create_table(
        "audit_counts",
        sa.Column("hour", sa.BigInteger(), primary_key=True),
        sa.Column("outcome", sa.String(16), primary_key=True),
        sa.Column("decisions", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_counts")
    op.drop_table("audit_edges")
    op.drop_table("audit_terms")
    op.drop_table("audit_summary_state")
    for name, _columns, _options in reversed(INDEXES):
        op.drop_index(name, table_name="audit_events")
