"""The records without a chain, and what ``audit_trail`` records of the trail (revision 0011).

Records without a chain were written before chaining began (by versions before
``0004_audit_chains``), which nothing can vouch for, or by something else since.  Split from
:mod:`.audit_integrity` (which verifies the chains and checkpoints, and re-exports these) to keep
each module readable; :mod:`.audit_summary_check` reads :func:`trail_facts` too.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, func, not_, select

from ..core.audit_checkpoint import TrailFacts
from .sql.schema import audit_chains, audit_events, audit_trail


@dataclass(frozen=True)
class Unchained:
    """Records without a chain: written before chaining began, or inserted by something else.

    ``before`` were written before chaining began (older versions of the service): nothing can
    vouch for them.  ``after`` came later, which the service never does: another writer put them
    there (or an instance of an older version, during an upgrade); ``first_after`` is the id of
    the first of them.
    """

    before: int
    after: int
    first_after: int | None


def trail_facts(conn: Connection) -> TrailFacts | None:
    """What ``audit_trail`` records of the trail (revision 0011); None when it does not hold its one
    row (someone deleted or added one)."""
    t = audit_trail.c
    rows = conn.execute(
        select(t.name, t.prechain_records, t.prechain_highest_id, t.pruned_below).limit(2)
    ).all()
    if len(rows) != 1 or rows[0].name != "trail":
        return None
    _name, records, highest, below = rows[0]
    return TrailFacts(
        int(records), None if highest is None else int(highest), None if below is None else int(below)
    )


def unchained(conn: Connection, bounds: Iterable[TrailFacts] = ()) -> Unchained:
    """Count the records without a chain.  Before chaining began means an id no higher than the
    highest of the records that ``audit_trail`` (or, where given, a checkpoint: ``bounds``, of
    which the tightest counts) says were written before chaining, no more of them than it says
    there were, and a time before the first chain was registered.  An outside audit inserted a made
    up grant with id 0, without a chain, dated before the first chain: it passed for an old one
    (verify said only ``note:``), even with a checkpoint.  Without any bound (the row deleted, no
    checkpoint), an id below the first chained record's is taken, as before revision 0011."""
    c = audit_events.c
    bounds = list(bounds)
    total = conn.execute(select(func.count()).where(c.chain_id.is_(None))).scalar() or 0
    first_started = conn.execute(select(func.min(audit_chains.c.started_at))).scalar()
    old: list[Any] = [c.chain_id.is_(None)]
    allowed: int | None = None
    if bounds:
        allowed = min(bound.prechain_records for bound in bounds)
        highest = [bound.prechain_highest_id for bound in bounds]
        if allowed == 0 or None in highest:
            return Unchained(0, int(total), conn.execute(select(func.min(c.id)).where(old[0])).scalar())
        old.append(c.id <= min(h for h in highest if h is not None))
    else:
        first_chained = conn.execute(select(func.min(c.id)).where(c.chain_id.is_not(None))).scalar()
        if first_chained is None and first_started is None:
            return Unchained(int(total), 0, None)
        if first_chained is not None:
            old.append(c.id < first_chained)
    if first_started is not None:
        old.append(c.time < dt.datetime.fromtimestamp(float(first_started), tz=dt.UTC))
    before = int(conn.execute(select(func.count()).where(and_(*old))).scalar() or 0)
    first_after = conn.execute(select(func.min(c.id)).where(c.chain_id.is_(None), not_(and_(*old)))).scalar()
    if allowed is not None and before > allowed:
        # More of them than there were: some were made up (which ones, nothing can tell).
        if first_after is None:
            first_after = conn.execute(select(func.max(c.id)).where(and_(*old))).scalar()
        before = allowed
    return Unchained(before, int(total) - before, first_after)


__all__ = ["Unchained", "trail_facts", "unchained"]
