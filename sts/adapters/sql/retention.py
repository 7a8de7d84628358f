"""Retention of the audit trail: each hash chain's anchor moves past the records removed."""

from __future__ import annotations

from sqlalchemy import Connection, func, or_, select, update

from .schema import audit_chains, audit_events, audit_trail


class PruneWouldBreakChain(Exception):
    """Removing these records would leave a chain that no longer verifies from its anchor."""


def record_prune_anchors(conn: Connection, below_id: int, now: float) -> int:
    """Before the audit records with ``id < below_id`` are deleted: move each chain's anchor past them.

    Call it in the transaction that deletes them.  Retention removes the oldest records;
    within a chain ids grow with ``seq`` (a chain's records are committed one after the
    other), so the removed records of each chain are its oldest ones, ``anchor_seq + 1``
    up to some ``seq``, and the rest verifies from that ``seq`` and its hash, recorded here.
    Raises :class:`PruneWouldBreakChain` (delete nothing then) when a chain's removed
    records are not such a run: the trail is damaged already, and ``sts audit verify``
    says where.  Records written before chaining (no ``chain_id``) need no anchor.

    ``below_id`` is recorded too (``audit_trail.pruned_below``, when higher than the one there):
    anchors alone do not say where a prune cut, and an outside audit deleted one chain's oldest
    records, kept older ones of another chain and moved the anchor, which passed for a prune.
    ``sts audit verify`` now fails on any record left below it.  On SQLite, a prune of every record
    leaves none: the next records are numbered from 1 again.
    Returns the number of chains whose anchor moved.
    """
    c, chains = audit_events.c, audit_chains.c
    cuts = conn.execute(
        select(c.chain_id, func.min(c.seq), func.max(c.seq), func.count())
        .where(c.id < below_id, c.chain_id.is_not(None))
        .group_by(c.chain_id)
    ).all()
    for chain_id, low, high, count in cuts:
        anchor = conn.execute(select(chains.anchor_seq).where(chains.chain_id == chain_id)).scalar()
        if anchor is None or low != anchor + 1 or count != high - low + 1:
            raise PruneWouldBreakChain(
                f"chain {chain_id}: the records to remove (seq {low} to {high}, {count} of them) are not "
                f"the oldest run after its anchor (seq {anchor}); run `sts audit verify`"
            )
        digest = conn.execute(select(c.hash).where(c.chain_id == chain_id, c.seq == high)).scalar_one()
        conn.execute(
            update(audit_chains)
            .where(chains.chain_id == chain_id)
            .values(anchor_seq=high, anchor_hash=digest, pruned_at=now)
        )
    t = audit_trail.c
    if (
        conn.dialect.name == "sqlite"
        and conn.execute(select(c.id).where(c.id >= below_id).limit(1)).first() is None
    ):
        # Every record goes, and SQLite numbers the next one from 1 in an empty table: below this
        # cutoff, so it is forgotten (as the summaries' watermark is, see audit_retention).
        conn.execute(update(audit_trail).where(t.name == "trail").values(pruned_below=None))
    else:
        conn.execute(
            update(audit_trail)
            .where(t.name == "trail", or_(t.pruned_below.is_(None), t.pruned_below < below_id))
            .values(pruned_below=below_id)
        )
    return len(cuts)
