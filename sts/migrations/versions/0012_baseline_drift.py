"""An identity's drift state in a column of its own: a grant that did not change it leaves it.

The drift state of an identity (its confirmed stable facts and keys, a changed value pending
with its probation progress, how each value was confirmed) was kept in its baseline's JSON
(``baselines.baseline``).  A grant writes back, with its record, the whole baseline it read
before it was decided; a refused exchange that counts for the probation of a changed fact read
the baseline, added its step and wrote it back.  A step recorded between a grant's read and its
commit was undone by the grant (an outside audit: with the identity granted its confirmed value
on other instances at the same moment, a drifted workload's probation never completed, its count
going back to nothing or staying at 1), and two refusals at once undid each other.

``baselines.drift`` (nullable, :func:`sts.core.drift.drift_to_json`) holds it now: a grant writes
it only when its own review changed it (a fact seen first, a confirmation), else keeps the stored
one; a refusal's step is a compare and swap of it.  The baseline's JSON still carries the drift
state as each writer knew it.  NULL, in every row this revision finds, means the drift state is
the baseline's JSON's, as before; the first change fills it in.

Adding a nullable column is quick on both databases (no table rewrite), and a version before this
one runs on the schema as well: it neither reads nor writes the column.  While both run (a rolling
deploy), a drift change an older version makes (a probation step, a confirmation, an older
``sts baseline accept``) goes into the baseline's JSON only, which a version from this one on reads
only while the column is NULL: older instances then see the drift state newer ones wrote into the
JSON, newer ones their own.  Either keeps firing ``attestation_drift`` until it saw a confirmation.

Revision ID: 0012_baseline_drift
Revises: 0011_audit_trail_facts
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012_baseline_drift"
down_revision = "0011_audit_trail_facts"
branch_labels = None
depends_on = None

#: Only a nullable column added, which older code ignores: code from 0005 on runs on this schema.
oldest_reader = "0005_audit_queries"


def upgrade() -> None:
    columns = {column["name"] for column in sa.inspect(op.get_bind()).get_columns("baselines")}
    if "drift" not in columns:
        op.add_column("baselines", sa.Column("drift", sa.String(length=16000), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("baselines") as batch:
        batch.drop_column("drift")
