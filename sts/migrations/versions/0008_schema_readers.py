"""The oldest version that may run on the schema, recorded in it: rolling deploys and rollbacks.

A version meeting a schema at a revision it does not know (a later version upgraded
it) could not tell whether it may still run on it, so it was not ready: during a
rolling deploy, a process of the previous version started after the upgrade (a
restart, a rescheduled instance, a rollback) refused every request.  ``schema_readers``
holds one row: ``oldest_reader``, the oldest revision whose code runs on the schema
as it is now.  Each upgrade writes it (:func:`sts.migrations.upgrade`), from the
``oldest_reader`` of the revision it reached (a revision that only adds keeps its
predecessor's; one that removes or changes what older code uses names itself); a
version that finds an unknown revision runs on it if it knows ``oldest_reader``.

Only versions from this one on read it: a process of an earlier version started
after this upgrade is still not ready.

Revision ID: 0008_schema_readers
Revises: 0007_subject_on_identity_index
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_schema_readers"
down_revision = "0007_subject_on_identity_index"
branch_labels = None
depends_on = None

#: The oldest revision whose code runs on the schema this revision leaves: every change since
#: 0005 dropped indexes that code does not need, or (this one) added a table it does not read.
oldest_reader = "0005_audit_queries"


def upgrade() -> None:
    op.create_table(
        "schema_readers",
        sa.Column("oldest_reader", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("oldest_reader"),
    )


def downgrade() -> None:
    op.drop_table("schema_readers")
