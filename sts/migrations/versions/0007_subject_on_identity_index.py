"""One index fewer written per audit record: ``subject`` alone is found on the identity index.

``ix_audit_events_subject`` served only a filter that names a subject without its
issuer (``sts audit tail --subject``, the review page's and ``sts audit``'s subject
filter).  It was written on every decision at a random place of a b-tree as large as
the trail (in process, 3% of the CPU of a whole exchange on a new trail).  Such a
filter now finds the issuers that have records of the subject on
``ix_audit_events_identity`` (``issuer``, ``subject``, ``id``), one lookup per issuer
ever recorded, then reads that index's ranges
(:mod:`sts.adapters.sql.subject_lookup`).

Dropping an index is quick on both databases.  A version before this one still works
on the schema without it, its subject-only filter scanning the trail.

Revision ID: 0007_subject_on_identity_index
Revises: 0006_audit_write_indexes
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_subject_on_identity_index"
down_revision = "0006_audit_write_indexes"
branch_labels = None
depends_on = None

DROPPED = "ix_audit_events_subject"


def upgrade() -> None:
    existing = {index["name"] for index in sa.inspect(op.get_bind()).get_indexes("audit_events")}
    if DROPPED in existing:
        op.drop_index(DROPPED, table_name="audit_events")


def downgrade() -> None:
    op.create_index(DROPPED, "audit_events", ["subject"])
