"""Single use on the embedded database: the uses commit with the grant's audit record."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

from ...core.audit import AuditRecord
from ...core.ports import AlreadyUsed, BaselineUpdate, SingleUse, StoreUnavailable
from .audit_sink import SqlAuditSink
from .replay import replay_key

log = logging.getLogger(__name__)


class SqlSingleUseLedger:
    """ports.SingleUseLedger on the embedded database: the uses, the baseline update and the
    audit record of a grant commit together, in one write transaction.

    ``reserve`` and ``spend`` only look (a committed use refuses the request before a
    token is minted); the entries themselves are inserted by :meth:`commit`, in the
    transaction that commits the grant's audit record.  Two concurrent requests with
    one subject token (or one DPoP proof) both get that far; the database lets exactly
    one insert the entry, and the other is refused as a replay.
    """

    def __init__(self, audit: SqlAuditSink, *, purge_probability: float = 0.001) -> None:
        # The audit sink's connections: the same database, and no pool of its own.
        self._raw = audit._raw
        self._audit = audit
        self.purge_probability = purge_probability
        p = self._raw.placeholder
        self._seen = f"SELECT 1 FROM replay_entries WHERE key = {p} AND expires_at > {p}"  # noqa: S608
        self._purge = f"DELETE FROM replay_entries WHERE expires_at <= {p}"  # noqa: S608 - placeholder only

    def reserve(self, use: SingleUse, now: float) -> SingleUse:
        try:
            seen = self._raw.query(self._seen, (replay_key(use.purpose, use.key), now))
        except self._raw.failures as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        if seen:
            raise AlreadyUsed(use)
        return use

    def spend(self, use: SingleUse, now: float) -> SingleUse | None:
        """Look now, insert with the record (the database never forgets: ``valid_from`` is not needed)."""
        return self.reserve(use, now)

    def commit(
        self,
        record: AuditRecord,
        uses: Sequence[SingleUse],
        now: float,
        baseline: BaselineUpdate | None = None,
    ) -> None:
        self._audit.write_with_uses(record, uses, now, baseline)
        if random.random() < self.purge_probability:  # noqa: S311 - housekeeping, not security relevant
            try:
                self._raw.run(self._purge, (now,))
            except self._raw.failures as exc:
                log.warning("expired replay entries not purged: %s", type(exc).__name__)

    def cancel(self, uses: Sequence[SingleUse]) -> None:
        """Nothing to undo: nothing is written before :meth:`commit`."""
