"""A loss of commits the operator declares (``sts db restored``): after restoring a backup.

The embedded store keeps spent single uses (subject tokens, DPoP proofs' ``jti``, client
assertions) in the database.  Restoring a backup brings back the database as it was, without the
uses spent since: an outside audit restored a PostgreSQL dump and exchanged a spent single-use
token a second time.  SQLite notices a restored file by itself (:mod:`.ledger_mark`, a file beside
the database that is not restored with it); a PostgreSQL database has nothing beside it that every
instance can keep, so the operator says so: ``sts db restored`` records the time of the restore in
the database (the ``ledger_epochs`` table, under :data:`NAME`).  From then on, for
:data:`~.ledger_mark.LOSS_HORIZON` seconds, a credential that could have been accepted before that
time (its ``valid_from`` earlier, or unknown) is refused, :class:`~sts.core.ports.ReplayWindowLost`,
as after a Redis that lost its records.

Each process reads the record at its first check and again at most every :data:`REREAD` seconds,
so instances left running through the restore see it too.  A read that fails keeps the last value.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref

from sqlalchemy import Engine

from ...core.ports import ReplayWindowLost, StoreUnavailable
from .ledger_mark import LOSS_HORIZON
from .statements import RawStatement

log = logging.getLogger(__name__)

#: The key of the declared loss in ``ledger_epochs``.
NAME = "declared-loss"
#: Seconds between two reads of the declaration by one process.
REREAD = 30.0

_LOSSES: weakref.WeakKeyDictionary[Engine, DeclaredLoss] = weakref.WeakKeyDictionary()
_LOSSES_LOCK = threading.Lock()


class DeclaredLoss:
    """The declared loss of one PostgreSQL database, as its processes check it (module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self._raw = RawStatement(engine)
        p = self._raw.placeholder
        self._put = (
            f"INSERT INTO ledger_epochs (identity, epoch, expires_at) VALUES ({p}, {p}, {p}) "  # noqa: S608
            "ON CONFLICT (identity) DO UPDATE SET epoch = excluded.epoch, expires_at = excluded.expires_at"
        )
        # (Placeholders only: the values are parameters.)
        self._get = f"SELECT epoch FROM ledger_epochs WHERE identity = {p} AND expires_at > {p}"  # noqa: S608
        self._unreadable: tuple[type[BaseException], ...] = (*self._raw.failures, ValueError, TypeError)
        self._lost = 0.0
        self._read_at: float | None = None
        self._lock = threading.Lock()

    def declare(self, now: float) -> None:
        """Record a loss found (a restore) at ``now``; raises :class:`StoreUnavailable`."""
        try:
            self._raw.run(self._put, (NAME, repr(now), now + LOSS_HORIZON + 60))
        except self._raw.failures as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        with self._lock:
            self._lost, self._read_at = now, time.monotonic()

    def lost_at(self) -> float:
        """When a loss was declared (0.0: none within the horizon)."""
        with self._lock:
            fresh = self._read_at is not None and time.monotonic() - self._read_at < REREAD
            if fresh:
                return self._lost
            self._read_at = time.monotonic()
        try:
            rows = self._raw.query(self._get, (NAME, time.time()))
            lost = float(rows[0][0]) if rows else 0.0
        except self._unreadable as exc:
            log.warning("the declared loss of the database could not be read: %s", type(exc).__name__)
            return self._lost
        with self._lock:
            self._lost = lost
        return lost

    def check_use(self, valid_from: float | None, now: float) -> None:
        """Raise :class:`ReplayWindowLost` for a credential the restore may have un-spent."""
        lost = self.lost_at()
        if lost and now - lost < LOSS_HORIZON and (valid_from is None or valid_from < lost):
            raise ReplayWindowLost(lost)


def declared_loss(engine: Engine) -> DeclaredLoss | None:
    """The declared loss of a PostgreSQL engine (one per engine and process); None for SQLite,
    which notices a restored file itself (:mod:`.ledger_mark`)."""
    if engine.dialect.name != "postgresql":
        return None
    with _LOSSES_LOCK:
        loss = _LOSSES.get(engine)
        if loss is None:
            loss = _LOSSES[engine] = DeclaredLoss(engine)
        return loss
