"""Single-use subject tokens on the embedded database: the use commits with the grant's audit record."""

from __future__ import annotations

from collections.abc import Sequence

from ...core.audit import AuditRecord
from ...core.ports import AlreadyUsed, SingleUse, StoreUnavailable
from .audit_sink import SqlAuditSink
from .replay import replay_key


class SqlSingleUseLedger:
    """ports.SingleUseLedger on the embedded database: the use and the audit record commit together.

    ``reserve`` only looks (a committed use refuses the request before a token is
    minted); the entry itself is inserted by :meth:`commit`, in the transaction that
    commits the grant's audit record.  Two concurrent requests with one token both
    get that far; the database lets exactly one insert the entry, and the other
    is refused as a replay.
    """

    def __init__(self, audit: SqlAuditSink) -> None:
        # The audit sink's connections: the same database, and no pool of its own.
        self._raw = audit._raw
        self._audit = audit
        p = self._raw.placeholder
        self._seen = f"SELECT 1 FROM replay_entries WHERE key = {p} AND expires_at > {p}"  # noqa: S608

    def reserve(self, use: SingleUse, now: float) -> SingleUse:
        try:
            seen = self._raw.query(self._seen, (replay_key(use.purpose, use.key), now))
        except self._raw.failures as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        if seen:
            raise AlreadyUsed
        return use

    def commit(self, record: AuditRecord, uses: Sequence[SingleUse], now: float) -> None:
        self._audit.write_with_uses(record, uses, now)

    def cancel(self, uses: Sequence[SingleUse]) -> None:
        """Nothing to undo: nothing is written before :meth:`commit`."""
