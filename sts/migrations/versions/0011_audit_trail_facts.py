"""What the audit trail says of itself: the records from before chaining, the newest prune's cutoff.

An outside audit found two things nothing recorded.  A record made up without a chain, with a low
id and a time before the first chain, passed for one written before chaining began (by a version
from before ``0004_audit_chains``), even with a checkpoint; and deleting a chain's oldest records
while older records of other chains stayed, with the chain's anchor moved by hand, passed for a
prune.  ``audit_trail`` holds one row (``name = 'trail'``):

* ``prechain_records`` and ``prechain_highest_id``: how many records without a chain were written
  before chaining began, and the highest id among them, counted here once.  On a trail that has
  chains they are the records without a chain with an id below the first chained record's and a
  time before the first chain was registered (what ``sts audit verify`` took for pre-chaining
  records until now); on a trail without chains yet, every record there is now.  Any other record
  without a chain was not written before chaining (``sts audit verify`` fails on it unless
  ``--allow-unchained``).
* ``pruned_below`` and ``pruned_before``: the record id and the time of the newest prune's cutoff
  (set by ``sts audit prune`` from this version on; NULL until then).

Counting reads the records without a chain once, through ``ux_audit_events_chain_seq`` (a record
without a chain is at its start): quick on a trail that began with chains, a second or so per
million records written before.  Versions before this one run on the schema as well: they neither
read nor write the table (a prune they make leaves ``pruned_below`` as it was, which only weakens
the check of the prunes since).

Revision ID: 0011_audit_trail_facts
Revises: 0010_baseline_failures
Create Date: 2026-12-07
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0011_audit_trail_facts"
down_revision = "0010_baseline_failures"
branch_labels = None
depends_on = None

#: Only a table added, which older code does not read: code from 0005 on runs on this schema.
oldest_reader = "0005_audit_queries"

_events = sa.table(
    "audit_events",
    sa.column("id", sa.BigInteger()),
    sa.column("chain_id", sa.String(32)),
    sa.column("time", sa.DateTime(timezone=True)),
)
_chains = sa.table("audit_chains", sa.column("started_at", sa.Float()))


def upgrade() -> None:
    bind = op.get_bind()
    trail = op.create_table(
        "audit_trail",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("prechain_records", sa.BigInteger(), nullable=False),
        sa.Column("prechain_highest_id", sa.BigInteger(), nullable=True),
        sa.Column("pruned_below", sa.BigInteger(), nullable=True),
        sa.Column("pruned_before", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    e = _events.c
    first_chained = bind.execute(sa.select(sa.func.min(e.id)).where(e.chain_id.is_not(None))).scalar()
    first_started = bind.execute(sa.select(sa.func.min(_chains.c.started_at))).scalar()
    before: list[sa.ColumnElement[bool]] = [e.chain_id.is_(None)]
    if first_chained is not None:
        before.append(e.id < first_chained)
    if first_started is not None:
        before.append(e.time < dt.datetime.fromtimestamp(float(first_started), tz=dt.UTC))
    records, highest = bind.execute(sa.select(sa.func.count(), sa.func.max(e.id)).where(*before)).one()
    op.bulk_insert(
        trail,
        [{"name": "trail", "prechain_records": int(records or 0), "prechain_highest_id": highest}],
    )


def downgrade() -> None:
    op.drop_table("audit_trail")
