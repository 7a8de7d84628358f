"""Fewer index writes per audit record: three indexes no query reads go, the client's is partial.

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

* ``ix_audit_events_client`` (``client_id``, ``id``) becomes ``ix_audit_events_by_client``,
  the same index on the records that have a client only (``WHERE client_id IS NOT NULL``): a
  decision without a client (a public client, or a refusal before the client was known) is
  never found by a client filter, which compares ``client_id`` with a value, and both
  databases use a partial index for such a comparison (SQLite: "Partial Indexes" §2,
  https://www.sqlite.org/partialindex.html; PostgreSQL: "Partial Indexes", a strict operator
  implies ``IS NOT NULL``).

Dropping an index is quick on both databases, and a version before this one runs as well
without them (none of its queries needs them; its client filter uses the partial index).
Building the partial index reads the table once: on a large PostgreSQL trail, build it
beforehand with ``CREATE INDEX CONCURRENTLY ix_audit_events_by_client ON audit_events
(client_id, id) WHERE client_id IS NOT NULL`` (this revision skips an index that exists).

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


_HAS_CLIENT = "client_id IS NOT NULL"


def upgrade() -> None:
    existing = {index["name"] for index in sa.inspect(op.get_bind()).get_indexes("audit_events")}
    if "ix_audit_events_by_client" not in existing:
        op.create_index(
            "ix_audit_events_by_client",
            "audit_events",
            ["client_id", "id"],
            sqlite_where=sa.text(_HAS_CLIENT),
            postgresql_where=sa.text(_HAS_CLIENT),
        )
    for name in ("ix_audit_events_client", *(f"ix_audit_events_{column}" for column in DROPPED)):
        if name in existing:
            op.drop_index(name, table_name="audit_events")


def downgrade() -> None:
    for column in DROPPED:
        op.create_index(f"ix_audit_events_{column}", "audit_events", [column])
    op.create_index("ix_audit_events_client", "audit_events", ["client_id", "id"])
    op.drop_index("ix_audit_events_by_client", table_name="audit_events")
