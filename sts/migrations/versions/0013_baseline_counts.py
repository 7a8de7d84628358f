"""An identity's counters in columns of their own: grants decided at once each count.

A grant writes back, with its record, the baseline it read before it was decided, its count and
its rate window advanced by one.  Grants of one identity decided at the same time each wrote the
count they had read plus one, the last write winning: a burst sent all at once was counted low
(an outside audit: 14 parallel exchanges where 10 make a burst did not fire ``unexpected_s2s``),
and a workload stayed ``learning`` longer than its grants.

``baselines.grants``, ``window_start``, ``window_count`` and ``usual_rate`` (nullable) hold the
counters now, ``counts_first_seen`` the ``first_seen`` of the baseline they count (a version before
this one may start another in the row of an expired one, writing only the JSON): a grant's
statement advances the stored ones by one
(:mod:`sts.adapters.sql.baseline_writes`, :mod:`sts.core.baseline_counts`).  The baseline's JSON
still carries them as each writer knew them.  NULL, in every row this revision finds, means the
JSON's, as before; the first grant fills them in.

Adding nullable columns is quick on both databases (no table rewrite), and a version before this
one runs on the schema as well: it neither reads nor writes the columns.  While both run (a rolling
deploy), an older version's grant writes only the JSON: a newer one takes the JSON's counters when
its count is ahead of the columns' (:func:`sts.core.baseline_counts.with_counts`), and advances the
columns only when they are not behind what it read.

Revision ID: 0013_baseline_counts
Revises: 0012_baseline_drift
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013_baseline_counts"
down_revision = "0012_baseline_drift"
branch_labels = None
depends_on = None

#: Only nullable columns added, which older code ignores: code from 0005 on runs on this schema.
oldest_reader = "0005_audit_queries"

_COLUMNS = (
    ("grants", sa.BigInteger),
    ("window_start", sa.Float),
    ("window_count", sa.BigInteger),
    ("usual_rate", sa.Float),
    ("counts_first_seen", sa.Float),
)


def upgrade() -> None:
    columns = {column["name"] for column in sa.inspect(op.get_bind()).get_columns("baselines")}
    for name, kind in _COLUMNS:
        if name not in columns:
            op.add_column("baselines", sa.Column(name, kind(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("baselines") as batch:
        for name, _ in reversed(_COLUMNS):
            batch.drop_column(name)
