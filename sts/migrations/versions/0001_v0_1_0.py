"""The schema of the first release, 0.1.0: audit trail and embedded store.

Exactly what 0.1.0 created with ``metadata.create_all`` (same types, nullability,
index names).  A database that 0.1.0 (or a later version without migrations)
created has these tables and no ``alembic_version``: :mod:`sts.migrations`
recognises it and stamps it at this revision instead of running it.

Revision ID: 0001_v0_1_0
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_v0_1_0"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("endpoint", sa.String(32), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("error", sa.String(64)),
        sa.Column("client_id", sa.String(128)),
        sa.Column("client_auth_method", sa.String(32)),
        sa.Column("issuer", sa.String(64)),
        sa.Column("subject", sa.String(512)),
        sa.Column("subject_token_type", sa.String(128)),
        sa.Column("subject_token_sha256", sa.String(64)),
        sa.Column("subject_token_jti", sa.String(256)),
        sa.Column("actor_issuer", sa.String(64)),
        sa.Column("actor_subject", sa.String(512)),
        sa.Column("actor_token_sha256", sa.String(64)),
        sa.Column("rule", sa.String(128)),
        sa.Column("issued_jti", sa.String(64)),
        sa.Column("issued_exp", sa.Float()),
        sa.Column("issued_kid", sa.String(128)),
        sa.Column("source_ip", sa.String(64)),
        sa.Column("record", sa.JSON(), nullable=False),
    )
    # The names SQLAlchemy gave the indexes of ``Column(..., index=True)``.
    for column in ("time", "subject", "subject_token_sha256", "issued_jti"):
        op.create_index(f"ix_audit_events_{column}", "audit_events", [column])

    op.create_table(
        "replay_entries",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("expires_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_replay_entries_expires_at", "replay_entries", ["expires_at"])

    for table, column, length in (
        ("subject_states", "state", 4000),
        ("baselines", "baseline", 16000),
        ("revoked_tokens", "revoked", 16),
    ):
        op.create_table(
            table,
            sa.Column("identity", sa.String(600), primary_key=True),
            sa.Column(column, sa.String(length), nullable=False),
            sa.Column("expires_at", sa.Float(), nullable=False),
        )


def downgrade() -> None:
    for table in ("revoked_tokens", "baselines", "subject_states", "replay_entries", "audit_events"):
        op.drop_table(table)
