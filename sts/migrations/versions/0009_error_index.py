"""The error filter on an index: records that have an error, by error and id.

``sts audit query --error CODE`` and the review page's error filter compared ``error``
with no index to read: a rare or absent code scanned the whole trail (an outside audit:
about a second on a million records, longer beyond).  ``ix_audit_events_by_error``
(``error``, ``id``) is partial, ``WHERE error IS NOT NULL``: a grant has no error, so
the exchanges that grant, most of them, write no more than before; a refusal or an
error writes one index more.  Both databases use a partial index for a comparison of
``error`` with a value (SQLite: "Partial Indexes" §2, https://www.sqlite.org/partialindex.html;
PostgreSQL: "Partial Indexes", a strict operator implies ``IS NOT NULL``), in id order
for keyset pages.

Building it reads the table once: on a large PostgreSQL trail, build it beforehand with
``CREATE INDEX CONCURRENTLY ix_audit_events_by_error ON audit_events (error, id) WHERE
error IS NOT NULL`` (this revision skips an index that exists and is valid; one left invalid by
a build that failed is built again).  Versions before this one
run on the schema as well (they do not read the index; SQLite and PostgreSQL keep it).

Revision ID: 0009_error_index
Revises: 0008_schema_readers
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_error_index"
down_revision = "0008_schema_readers"
branch_labels = None
depends_on = None

#: Only an index added: code from 0005 on runs on the schema this revision leaves.
oldest_reader = "0005_audit_queries"

NAME = "ix_audit_events_by_error"
_HAS_ERROR = "error IS NOT NULL"


def upgrade() -> None:
    bind = op.get_bind()
    existing = {index["name"] for index in sa.inspect(bind).get_indexes("audit_events")}
    if NAME in existing and bind.dialect.name == "postgresql" and not _valid(bind):
        # A CREATE INDEX CONCURRENTLY that failed or was cancelled leaves an INVALID index of the
        # name, which no query uses (an outside re-check): built again here.
        op.drop_index(NAME, table_name="audit_events")
        existing.discard(NAME)
    if NAME not in existing:
        op.create_index(
            NAME,
            "audit_events",
            ["error", "id"],
            sqlite_where=sa.text(_HAS_ERROR),
            postgresql_where=sa.text(_HAS_ERROR),
        )


def _valid(bind: sa.Connection) -> bool:
    """PostgreSQL: whether the index of that name in the search path is valid (``pg_index``)."""
    query = sa.text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)")
    return bool(bind.execute(query, {"name": NAME}).scalar())


def downgrade() -> None:
    op.drop_index(NAME, table_name="audit_events")
