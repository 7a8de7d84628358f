"""Retention: remove the oldest audit records, archived first, keeping the hash chains verifiable.

Removal is always a contiguous oldest prefix in id order, oldest first, in
batches; each batch moves the chains' anchors past what it removes
(:func:`~sts.adapters.sql.retention.record_prune_anchors`, docs/audit.md "Retention"), and with an
archive every record is written and fsynced before anything is deleted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, delete, func, or_, select, update

from .audit_integrity import verify_prefix
from .audit_tables import RECORD, SUMMARY_STATE, AuditTables
from .sql.engines import transaction
from .sql.retention import PruneWouldBreakChain, record_prune_anchors
from .sql.schema import (
    audit_counts,
    audit_edges,
    audit_events,
    audit_summary_state,
    audit_terms,
    audit_trail,
)


class PruneAborted(Exception):
    """Records below the boundary changed while they were archived; nothing was deleted."""


@dataclass(frozen=True)
class PruneResult:
    records: int
    boundary_id: int | None
    archive: Path | None = None


class AuditRetention(AuditTables):
    """``sts audit prune``: what a cutoff removes, and removing it."""

    def prune_boundary(self, cutoff: float) -> tuple[int, int]:
        """``(count, boundary)``: records with ``id < boundary`` are all older than ``cutoff``
        (boundary is the smallest id of any record at or after it; with none, on SQLite, the
        newest record's id: it stays), and their count."""
        c = audit_events.c
        with self.engine.connect() as conn:
            if self.sqlite:
                # ``+id`` keeps SQLite from answering min(id) by walking the table from its start.
                boundary = conn.execute(
                    select(func.min(c.id + 0)).where(c.time >= self._time(cutoff))
                ).scalar()
            else:
                boundary = conn.execute(select(func.min(c.id)).where(c.time >= self._time(cutoff))).scalar()
            if boundary is None:
                newest = conn.execute(select(func.max(c.id))).scalar() or 0
                # Every record is older than the cutoff.  On SQLite the newest stays: in an empty
                # table SQLite numbers the next record from 1 again (no AUTOINCREMENT), below the
                # ids checkpoints saw, and a later prune then looked like a hand-made one to
                # `sts audit verify` (an outside re-check).  PostgreSQL's sequence never goes back.
                boundary = newest if self.sqlite and newest else newest + 1
            count = conn.execute(
                select(func.count()).select_from(audit_events).where(c.id < boundary)
            ).scalar()
        return int(count or 0), int(boundary)

    def prune(
        self, *, cutoff: float, archive: Path | None = None, dry_run: bool = False, batch: int = 5000
    ) -> PruneResult:
        """Remove the records older than ``cutoff``: a contiguous oldest prefix in id order.

        Only ids below the smallest id of any record at or after ``cutoff`` go, so what
        remains is always a contiguous run of ids (a record older than the cutoff that was
        written after a newer one stays until a later prune).  Within a hash chain ids grow
        with ``seq``, so this removes each chain's oldest records; each batch moves the chains'
        anchors past what it removes (:func:`sts.adapters.sql.retention.record_prune_anchors`),
        so what remains
        verifies from there (docs/audit.md, Retention).  The whole range is checked first:
        when it is not the oldest run of some chain (the trail is damaged already),
        :class:`~sts.adapters.sql.retention.PruneWouldBreakChain` is raised and nothing is deleted.

        With ``archive``, every record to remove is first written to that file as JSON lines
        (the export format, with each record's chain link), flushed and fsynced with its
        directory, before anything is deleted.  Deletion runs oldest first, ``batch`` records
        per transaction, so a crash leaves a shorter prefix removed, never a hole.  Records
        still being written cannot fall below the boundary: it is at least a day old (the
        CLI refuses less).
        """
        count, boundary = self.prune_boundary(cutoff)
        if dry_run or count == 0:
            return PruneResult(count, boundary, None)
        with self.engine.connect() as conn, conn.begin() as checking:
            # The anchors the whole prune would set, computed and thrown away: a refusal now
            # leaves everything in place.
            record_prune_anchors(conn, boundary, self.clock())
            checking.rollback()
        with self.engine.connect() as conn, conn.begin():
            # What goes must verify: a prune never carries an edited record out of the trail.
            broken = verify_prefix(conn, boundary)
        if broken:
            raise PruneWouldBreakChain(
                f"the records to remove do not verify ({broken[0]}); run `sts audit verify`"
            )
        if archive is not None:
            written = self._archive(archive, boundary)
            again, _ = self.prune_boundary(cutoff)
            if written != count or again != count:
                # Never delete a record the archive does not hold.
                raise PruneAborted(f"{count} records to archive, {written} archived, {again} now")
        c = audit_events.c
        removed = 0
        while True:
            with self.engine.connect() as conn:
                oldest = conn.execute(select(func.min(c.id))).scalar()
            if oldest is None or oldest >= boundary:
                break
            upper = min(boundary, int(oldest) + batch)

            def work(conn: Connection, upper: int = upper) -> int:
                # Each hash chain's anchor moves to the last record removed, in the same transaction
                # (docs/audit.md, Retention); a chain whose oldest run this is not refuses the batch.
                record_prune_anchors(conn, upper, self.clock())
                conn.execute(delete(audit_terms).where(audit_terms.c.audit_id < upper))
                gone = int(conn.execute(delete(audit_events).where(c.id < upper)).rowcount or 0)
                if self.sqlite and conn.execute(select(func.max(c.id))).scalar() is None:
                    # SQLite numbers the next record from 1 in an empty table (no AUTOINCREMENT):
                    # the summaries' watermark starts again with it, or it would never be
                    # summarised (an outside review of the summary check).
                    conn.execute(
                        update(audit_summary_state)
                        .where(audit_summary_state.c.name == SUMMARY_STATE)
                        .values(last_id=0)
                    )
                return gone

            removed += transaction(self.engine, work)

        if self.sqlite:
            # The newest record kept although older than the cutoff (see prune_boundary): the
            # prune cut at its time, which every record left is at or after.
            with self.engine.connect() as conn:
                kept = self._facts(conn, [c.id == boundary], newest_first=False, limit=1)
            if kept and kept[0].time < cutoff:
                cutoff = kept[0].time

        def forget(conn: Connection) -> None:
            # Edges unused since the cutoff, and hours that ended before it.  A record older than
            # the cutoff that stays (written after a newer one) keeps its edge: only edges last
            # seen before every record left are unused.
            staying = self._facts(
                conn, [c.id >= boundary, c.time < self._time(cutoff)], newest_first=False, limit=10_000
            )
            unused_before = min([cutoff, *(fact.time for fact in staying)])
            conn.execute(delete(audit_edges).where(audit_edges.c.last_seen < unused_before))
            conn.execute(delete(audit_counts).where(audit_counts.c.hour <= int(cutoff) - 3600))
            # Which hours' counts a prune may have changed: `sts audit verify` checks the rest
            # exactly (an outside audit had the oldest hours' counts go unchecked).
            t = audit_trail.c
            conn.execute(
                update(audit_trail)
                .where(or_(t.pruned_before.is_(None), t.pruned_before < cutoff))
                .values(pruned_before=cutoff)
            )

        transaction(self.engine, forget)
        return PruneResult(removed, boundary, archive)

    def _archive(self, path: Path, boundary: int) -> int:
        """Write records with ``id < boundary`` to a new file (mode 0600), then fsync it and its
        directory.  An existing file is never overwritten; a failed write removes the file."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        written = 0
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                for row in self._oldest(boundary, batch=1000):
                    out.write(json.dumps(row, sort_keys=True, default=str) + "\n")
                    written += 1
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return written

    def _oldest(self, boundary: int, *, batch: int) -> Iterator[dict[str, Any]]:
        """Records with ``id < boundary`` as exported, oldest first, read in keyset batches
        (no read transaction is held open between batches)."""
        c = audit_events.c
        after = 0
        while True:
            with self.engine.connect() as conn:
                query = select(*RECORD).where(c.id > after, c.id < boundary).order_by(c.id).limit(batch)
                rows = self._rows(conn, query)
            if not rows:
                return
            yield from rows
            after = rows[-1]["id"]
