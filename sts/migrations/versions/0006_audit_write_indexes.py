"""Fewer indexes on audit_events: the three that no query of the service reads.

Every index of ``audit_events`` is written on every decision: one more b-tree page
per commit, and, for an index on a random key, a page read and written at a random
place of a b-tree that grows with the trail (on a trail of a million records, the
insert of one record into ``ix_audit_events_subject_token_sha256`` and
``ix_audit_events_issued_jti`` cost more than the rest of it).

* ``ix_audit_events_time`` duplicates ``ix_audit_events_time_outcome`` (``time``,
  ``outcome``), which serves every query on ``time`` (the id bounds of a time
  range, retention's cutoff, the charts).
* ``ix_audit_events_subject_token_sha256`` and ``ix_audit_events_issued_jti``: no query
  of ``sts audit``, the review page, retention or verification looks a record up by
  its token hash or issued ``jti``; they still find it through ``sts audit export``
  or a scan.  An operator who wants them for their own queries may create them
  again (under any other name).

Dropping an index is quick on both databases, and a version before this one
runs as well without them (none of its queries needs them).

Revision ID: 0006_audit_write_indexes
Revises: 0005_audit_queries
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_audit_write_indexes"
down_revision = "0005_audit_queries"
branch_labels = None
depends_on = None

#: The indexes of 0001 this revision drops: ``Column(..., index=True)`` named them ``ix_<table>_<column>``.
DROPPED = ("time", "subject_token_sha256", "issued_jti")


def upgrade() -> None:
    existing = {index["name"] for index in sa.inspect(op.get_bind()).get_indexes("audit_events")}
    for column in DROPPED:
        name = f"ix_audit_events_{column}"
        if name in existing:
            op.drop_index(name, table_name="audit_events")


def downgrade() -> None:
    for column in DROPPED:
        op.create_index(f"ix_audit_events_{column}", "audit_events", [column])
