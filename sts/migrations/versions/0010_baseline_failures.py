"""An identity's recent refusals in a column of their own: a grant no longer writes them back.

The ``recent_failures`` signal counts an identity's refusals, which were kept in its baseline's
JSON (``baselines.baseline``).  A refusal read the baseline, added itself and wrote it back; a
grant writes back, with its record, the whole baseline it read before it was decided.  A refusal
recorded between a grant's read and its commit was undone by the grant (an outside audit: of 4
refusals sent at the same instant as 12 grants of the identity, 2 were kept), so a workload that
is granted could probe with refusals and stay under ``max_failures``.

``baselines.failures`` (nullable, a JSON array of times) holds them now: only a refusal writes
it (appended atomically) or a reset clears it, and a grant writes ``baseline`` alone.  NULL, in
every row this revision finds, means the refusals are those of the baseline's JSON, as before;
the first refusal recorded fills it in.

Adding a nullable column is quick on both databases (no table rewrite), and a version before this
one runs on the schema as well: it neither reads nor writes the column (the refusals it records
go into the baseline's JSON, which a version from this one on reads only while the column is NULL).

Revision ID: 0010_baseline_failures
Revises: 0009_error_index
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_baseline_failures"
down_revision = "0009_error_index"
branch_labels = None
depends_on = None

#: Only a nullable column added, which older code ignores: code from 0005 on runs on this schema.
oldest_reader = "0005_audit_queries"


def upgrade() -> None:
    columns = {column["name"] for column in sa.inspect(op.get_bind()).get_columns("baselines")}
    if "failures" not in columns:
        op.add_column("baselines", sa.Column("failures", sa.String(length=2000), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("baselines") as batch:
        batch.drop_column("failures")
