"""Expired rows of the small key-value tables, removed a slice at a time.

The baselines, subject states and revoked tokens (:mod:`.key_value`, :mod:`.subject_state`)
each carry ``expires_at``, and every read leaves an expired row out, so removing one changes no
answer.  Nothing else removes them: a workload that stops exchanging, a token revoked a year
ago, a subject pattern over branch names kept their rows for good (Redis expires its keys).

:class:`ExpiredRows` walks each table in slices of :data:`SLICE` identities, in the order of
its primary key, one slice per call, and removes the expired rows among them; after the last
slice it starts again from the first.  A call therefore costs the same whatever the table's
size, and needs no index on ``expires_at`` (which every grant's baseline write would have to
update).  Each process keeps its own place.  A row is removed only once it has been expired for
:data:`~sts.core.ports.CLOCK_MARGIN`: an instance whose clock is behind still reads it as live.

On PostgreSQL the rows are taken ``FOR UPDATE SKIP LOCKED`` (see the PostgreSQL documentation
of ``SELECT``, "The Locking Clause"): a row that a grant in flight holds, as a baseline it is
writing again, is left for a later turn, so the removal never waits for a grant, and a batch of
grants never waits on a removal that waits on it in turn.  On SQLite the removal is one write
transaction like a grant's.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import Engine

from .statements import RawStatement

log = logging.getLogger(__name__)

#: The tables whose rows expire and whose reads leave the expired ones out.
EXPIRING_TABLES = ("baselines", "subject_states", "revoked_tokens")

#: Identities looked at per table and call.
SLICE = 500


class ExpiredRows:
    """Removes the expired rows of ``tables``, one slice of each per :meth:`remove` (see the module)."""

    def __init__(
        self, engine: Engine, tables: tuple[str, ...] = EXPIRING_TABLES, *, size: int = SLICE
    ) -> None:
        self._raw = RawStatement(engine)
        p = self._raw.placeholder
        lock = "" if self._raw.sqlite else " FOR UPDATE SKIP LOCKED"
        self._tables = tables
        #: Per table: the last identity of the slice removed last ("" before the first slice).
        self._after = dict.fromkeys(tables, "")
        self._busy = threading.Lock()
        # Table names are the constants above; values are parameters.
        self._end = {
            t: f"SELECT identity FROM {t} WHERE identity > {p} ORDER BY identity LIMIT 1 OFFSET {size - 1}"  # noqa: S608
            for t in tables
        }
        self._remove_slice = {t: self._removal(t, f"AND identity <= {p} ", lock) for t in tables}
        self._remove_rest = {t: self._removal(t, "", lock) for t in tables}

    def _removal(self, table: str, upper: str, lock: str) -> str:
        p = self._raw.placeholder
        # The table is one of the constants above; values are parameters.
        return (
            f"DELETE FROM {table} WHERE identity IN (SELECT identity FROM {table} "  # noqa: S608
            f"WHERE identity > {p} {upper}AND expires_at <= {p}{lock})"
        )

    def remove(self, before: float) -> int:
        """Remove the rows of the next slice of each table that expired at or before ``before``;
        how many.  A call while another thread's is running does nothing; a failure is logged
        (housekeeping: the rows stay for a later turn)."""
        if not self._busy.acquire(blocking=False):
            return 0
        removed = 0
        try:
            for table in self._tables:
                removed += self._remove_next(table, before)
        except self._raw.failures as exc:
            log.warning("expired rows not removed: %s", type(exc).__name__)
        finally:
            self._busy.release()
        return removed

    def _remove_next(self, table: str, before: float) -> int:
        after = self._after[table]
        end = self._raw.query(self._end[table], (after,))
        if end:
            last = str(end[0][0])
            removed = self._raw.run(self._remove_slice[table], (after, last, before))
            self._after[table] = last
        else:  # the last slice: the rest of the table, then from the start again
            removed = self._raw.run(self._remove_rest[table], (after, before))
            self._after[table] = ""
        return removed
