"""The embedded replay store: ``replay_entries``, correct across the processes of one machine.

An ``INSERT ... ON CONFLICT DO UPDATE ... WHERE expired`` is one atomic
statement, so of two concurrent first uses exactly one succeeds.
"""

from __future__ import annotations

import functools
import hashlib
import random

from sqlalchemy import Engine

from ...core.ports import CLOCK_MARGIN, StoreUnavailable
from .declared_loss import declared_loss
from .ledger_mark import ledger_mark
from .statements import RawStatement


def replay_key(purpose: str, key: str) -> str:
    """The ``replay_entries`` key of ``key`` under ``purpose``."""
    full_key = f"{purpose}:{key}"
    if len(full_key) > 200 or not full_key.isprintable():
        # Truncating would make distinct keys collide, and a text column refuses NUL and lone
        # surrogates; a digest keeps every such key distinct and storable.
        digest = hashlib.sha256(full_key.encode("utf-8", "surrogatepass")).hexdigest()
        full_key = f"{purpose[:120]}:sha256:{digest}"
    return full_key


def first_use_statement(placeholder: str) -> str:
    """``INSERT`` a replay entry unless a live one exists: one row changed on a first use, none on a
    replay.  An existing entry is only replaced once it has expired.  One statement, atomic on both
    databases: of concurrent first uses exactly one inserts (on PostgreSQL, a second one waits for
    the first one's transaction, and wins only if that rolls back)."""
    p = placeholder
    return (
        f"INSERT INTO replay_entries (key, expires_at) VALUES ({p}, {p}) "  # noqa: S608 - placeholders
        "ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at "
        f"WHERE replay_entries.expires_at <= {p}"
    )


@functools.cache
def first_uses_statement(placeholder: str, rows: int) -> str:
    """:func:`first_use_statement` for ``rows`` entries in one statement, returning the key of each
    entry it wrote: a key not returned has a live entry already (a replay).  Parameters: the key
    and ``expires_at`` of each entry, then ``now``."""
    p = placeholder
    values = ", ".join([f"({p}, {p})"] * rows)
    return (
        f"INSERT INTO replay_entries (key, expires_at) VALUES {values} "  # noqa: S608 - placeholders
        "ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at "
        f"WHERE replay_entries.expires_at <= {p} RETURNING key"
    )


class SqlReplayCache:
    """The embedded replay store (ports.ReplayCache) on the same database.

    It lives in the database, which forgets nothing unless it loses commits (SQLite: its ``-wal``
    deleted, an older copy restored; :mod:`.ledger_mark`): a credential valid before such a loss
    is refused, :class:`~sts.core.ports.ReplayWindowLost`.
    """

    def __init__(self, engine: Engine, *, purge_probability: float = 0.001) -> None:
        self.engine = engine
        self.purge_probability = purge_probability
        self._raw = RawStatement(engine)
        p = self._raw.placeholder
        self._first_use = first_use_statement(p)
        self._release = f"DELETE FROM replay_entries WHERE key = {p}"  # noqa: S608 - placeholder only
        self._purge = f"DELETE FROM replay_entries WHERE expires_at <= {p}"  # noqa: S608 - placeholder only
        #: SQLite: a credential that predates commits the database lost is refused (.ledger_mark).
        self._mark = ledger_mark(engine)
        #: PostgreSQL: the same, after a restore the operator declared (.declared_loss).
        self._loss = declared_loss(engine)

    @staticmethod
    def _key(purpose: str, key: str) -> str:
        return replay_key(purpose, key)

    def release(self, purpose: str, key: str) -> None:
        try:
            self._raw.run(self._release, (self._key(purpose, key),))
        except self._raw.failures as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    def first_use(
        self, purpose: str, key: str, expires_at: float, now: float, *, valid_from: float | None = None
    ) -> bool:
        if self._mark is not None:
            self._mark.check_use(valid_from, now)
        if self._loss is not None:
            self._loss.check_use(valid_from, now)
        try:
            first = self._raw.run(self._first_use, (self._key(purpose, key), expires_at, now), once=True) == 1
            if random.random() < self.purge_probability:  # noqa: S311 - not security relevant
                self._raw.run(self._purge, (now - CLOCK_MARGIN,))  # (see CLOCK_MARGIN)
        except self._raw.failures as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        return first
