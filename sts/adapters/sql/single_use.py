"""Single use on the embedded database: the uses commit with the grant's audit record."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

from ...core.audit import AuditRecord
from ...core.ports import CLOCK_MARGIN, BaselineUpdate, SingleUse, StoreUnavailable
from .audit_sink import SqlAuditSink
from .declared_loss import declared_loss
from .expired_rows import ExpiredRows
from .ledger_mark import check_at_start
from .replay import replay_key

log = logging.getLogger(__name__)


class SqlSingleUseLedger:
    """ports.SingleUseLedger on the embedded database: the uses, the baseline update and the
    audit record of a grant commit together, in one write transaction.

    ``reserve`` and ``spend`` look nothing up; the entries are inserted by :meth:`commit`,
    in the transaction that commits the grant's audit record, and the insert decides: of
    any number of requests with one subject token (or one DPoP proof), at once or one
    after another, the database lets exactly one insert the entry, and every other is
    refused as a replay (its record rolled back, its token withheld).
    """

    def __init__(self, audit: SqlAuditSink, *, purge_probability: float = 0.001) -> None:
        # The audit sink's connections: the same database, and no pool of its own.
        self._raw = audit._raw
        self._audit = audit
        self.purge_probability = purge_probability
        p = self._raw.placeholder
        self._purge = f"DELETE FROM replay_entries WHERE expires_at <= {p}"  # noqa: S608 - placeholder only
        self._live = f"SELECT 1 FROM replay_entries WHERE key = {p} AND expires_at > {p}"  # noqa: S608
        #: The baselines, subject states and revocations that have expired, removed at the same turns.
        self._expired = ExpiredRows(audit.engine)
        #: SQLite: whether the database lost commits (see :mod:`.ledger_mark`), checked at start.
        self._mark = audit.mark
        if self._mark is not None:
            check_at_start(self._mark, audit.engine, audit.clock())
        #: PostgreSQL: a restore the operator declared (see :mod:`.declared_loss`).
        self._loss = declared_loss(audit.engine)

    def _check_loss(self, valid_from: float | None, now: float) -> None:
        """Raise :class:`~sts.core.ports.ReplayWindowLost` for a credential lost commits may have
        spent (SQLite: noticed, :mod:`.ledger_mark`; PostgreSQL: declared, :mod:`.declared_loss`)."""
        if self._mark is not None:
            self._mark.check_use(valid_from, now)
        if self._loss is not None:
            self._loss.check_use(valid_from, now)

    def reserve(self, use: SingleUse, now: float) -> SingleUse:
        """Nothing to look up: the insert in :meth:`commit` decides (a used token raises
        :class:`AlreadyUsed` there, and the grant becomes a refusal before its token leaves).

        A read here would only move the refusal of a replay earlier, at the price of one
        statement (on PostgreSQL one round trip) for every request that is not a replay.
        A credential that predates commits the database lost (SQLite, :mod:`.ledger_mark`) is
        refused: :class:`~sts.core.ports.ReplayWindowLost`.
        """
        self._check_loss(use.valid_from, now)
        return use

    def used(self, use: SingleUse, now: float) -> bool:
        """A live entry of ``use`` (committed: entries are written only with a grant's record)."""
        self._check_loss(use.valid_from, now)
        try:
            return bool(self._raw.query(self._live, (replay_key(use.purpose, use.key), now)))
        except self._raw.failures as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    def spend(self, use: SingleUse, now: float) -> SingleUse | None:
        """As :meth:`reserve`: the proof's ``jti`` is inserted with the record, or found used there.

        The database forgets nothing unless it loses commits, which :meth:`reserve` checks for.
        """
        self._check_loss(use.valid_from, now)
        return use

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
                self._raw.run(self._purge, (now - CLOCK_MARGIN,))  # (see CLOCK_MARGIN)
            except self._raw.failures as exc:
                log.warning("expired replay entries not purged: %s", type(exc).__name__)
            self._expired.remove(now - CLOCK_MARGIN)

    def cancel(self, uses: Sequence[SingleUse]) -> None:
        """Nothing to undo: nothing is written before :meth:`commit`."""
