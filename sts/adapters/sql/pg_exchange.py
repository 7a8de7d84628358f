"""PostgreSQL: an exchange in two round trips, its reads in one and its grant's writes in another.

On PostgreSQL every statement is a round trip, and a round trip costs the service more
than its wait: the thread sleeps, the server process runs, and the caches are cold when
the thread wakes.  The exchange makes two:

- **The reads.**  The risk stage reads the subject's state (under its identity keys), then
  the baseline of its identity, the first of those keys (:mod:`sts.core.exchange.risk_and_assurance`).
  :class:`StatesWithBaseline` reads both in one statement, and keeps the baseline for the
  same thread's next read of it (:meth:`StatesWithBaseline.baseline`).
- **The grant.**  The writes of a grant (its replay entries, its baseline, its audit record)
  become one statement (:func:`grant_statement`): PostgreSQL runs a statement with data-modifying
  ``WITH`` parts as one, atomically (PostgreSQL's documentation, "Data-Modifying Statements in
  WITH"), so in autocommit mode it is the transaction itself, without ``BEGIN`` and ``COMMIT``.
"""

from __future__ import annotations

import functools
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Engine

from ...core.ports import StoreUnavailable
from .chain_heads import ChainHead
from .group_commit import PendingUses
from .replay import first_uses_statement
from .statements import RawStatement

#: Seconds a baseline read ahead stays usable: far longer than the few microseconds between the two
#: reads of one exchange, short enough that no later request of the thread reads an old value.
READ_AHEAD_AGE = 1.0

_READS: weakref.WeakKeyDictionary[Engine, StatesWithBaseline] = weakref.WeakKeyDictionary()
_READS_LOCK = threading.Lock()


def states_with_baseline(engine: Engine) -> StatesWithBaseline | None:
    """PostgreSQL: the one reader of subject states and baselines of ``engine`` (None on SQLite)."""
    if engine.dialect.name != "postgresql":
        return None
    with _READS_LOCK:
        reads = _READS.get(engine)
        if reads is None:
            reads = _READS[engine] = StatesWithBaseline(engine)
        return reads


#: The counters of no baseline.
_NO_COUNTS: tuple[Any, ...] = (None, None, None, None, None)


@functools.cache
def _states_and_baseline_statement(keys: int) -> str:
    """Rows ``(kind, identity, value, failures, drift, *counters)``: ``s`` for each live state of
    the ``keys`` identities, ``b`` for the live baseline of the first, with the parts kept apart
    from it (its refusals, its drift state, its counters:
    :class:`~sts.adapters.sql.key_value.SqlBaselineStore`).  Parameters: the keys, now, the first
    key, now."""
    placeholders = ", ".join(["%s"] * keys)
    return (
        "SELECT 's', identity, state, NULL, NULL, NULL, NULL, NULL, NULL, NULL FROM subject_states "  # noqa: S608 - placeholders only
        f"WHERE identity IN ({placeholders}) AND expires_at > %s "
        "UNION ALL SELECT 'b', identity, baseline, failures, drift, grants, window_start, window_count, "
        "usual_rate, counts_first_seen FROM baselines WHERE identity = %s AND expires_at > %s"
    )


class StatesWithBaseline:
    """The subject states of an identity and its baseline, read in one round trip.

    :meth:`states` reads the baseline of the first identity with the states, and keeps it
    for this thread; :meth:`baseline` hands it over once, if it is the identity asked for and
    was read less than :data:`READ_AHEAD_AGE` ago.  A baseline written by this thread in
    between (:meth:`forget`) is read again.  A value read a moment earlier in the same request
    is one any concurrent request could have read: baselines are updated by each grant, without
    a lock, and the last write wins.
    """

    def __init__(self, engine: Engine) -> None:
        self._raw = RawStatement(engine)
        self._kept = threading.local()

    def states(self, keys: Sequence[str], now: float) -> dict[str, str]:
        """The live states under ``keys`` (:func:`~sts.adapters.sql.key_value.store_key` of each
        identity), by key; raises :class:`StoreUnavailable`."""
        self._kept.value = None
        if not keys:
            return {}
        sql = _states_and_baseline_statement(len(keys))
        try:
            rows = self._raw.query(sql, (*keys, now, keys[0], now))
        except self._raw.failures as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        found: dict[str, str] = {}
        baseline = failures = drift = None
        counts: tuple[Any, ...] = _NO_COUNTS
        for kind, key, value, refusals, facts, *counters in rows:
            if kind == "s":
                found[str(key)] = str(value)
            else:
                baseline, failures, drift, counts = str(value), refusals, facts, tuple(counters)
        self._kept.value = (keys[0], baseline, failures, drift, counts, time.monotonic())
        return found

    def baseline(self, key: str) -> tuple[bool, str | None, str | None, str | None, tuple[Any, ...]]:
        """``(True, value, failures, drift, counters)`` if this thread's last :meth:`states` read
        the baseline under ``key`` (``None``: there is none; its ``failures``, ``drift`` and
        counters columns, None when NULL) moments ago; else ``(False, None, None, None, (None,) *
        5)``, and it is to be read."""
        kept = getattr(self._kept, "value", None)
        self._kept.value = None
        if kept is None or kept[0] != key or time.monotonic() - kept[5] > READ_AHEAD_AGE:
            return False, None, None, None, _NO_COUNTS
        return True, kept[1], kept[2], kept[3], kept[4]

    def forget(self) -> None:
        """This thread wrote a baseline: what it read ahead is no longer the latest it knows."""
        self._kept.value = None


@functools.lru_cache(maxsize=64)
def grant_statement(uses: int, writes: tuple[str, ...]) -> str:
    """One statement doing what a grant's statements did in a transaction: insert its ``uses``
    replay entries (:func:`~sts.adapters.sql.replay.first_uses_statement`), then ``writes``.

    With uses, it fails with SQLSTATE ``22012`` (division by zero) unless it wrote every entry,
    and then writes nothing: the check, in the main query, fails the whole statement.
    Parameters: the entries' (``PendingUses.entry_params``), then each write's, in order.
    """
    parts = [f"entry AS ({first_uses_statement('%s', uses)})"] if uses else []
    rest = list(writes)
    # Built from constants, the count and the writes' own SQL; values are parameters.
    main = f"SELECT 1 / (count(*) / {uses}) FROM entry" if uses else rest.pop()  # noqa: S608
    parts += [f"write_{n} AS ({sql})" for n, sql in enumerate(rest)]
    return f"WITH {', '.join(parts)} {main}" if parts else main


def pipelined_grants(
    raw: RawStatement,
    head: ChainHead,
    batch: list[PendingUses],
    write_item: Callable[..., str],
    *,
    refusal: str,
) -> tuple[list[PendingUses], int, str]:
    """Commit ``batch`` on ``head``'s chain, in one round trip: each item one statement
    (:func:`grant_statement`), failing with SQLSTATE ``refusal`` if a use is taken.  One item's
    statement is its own transaction; several are pipelined with ``BEGIN`` and ``COMMIT``
    (:meth:`RawStatement.pipelined`).  ``write_item`` is
    :meth:`~sts.adapters.sql.audit_sink.SqlAuditSink._write_item`, given a function that collects
    its statements.  Returns the items, and the chain's new ``seq`` and hash.
    """

    def queue(conn: Any) -> tuple[list[PendingUses], int, str]:
        seq, prev, registered = head.seq, head.hash, head.registered
        for item in batch:
            item.taken = None
            seq += 1
            writes: list[tuple[str, Sequence[Any]]] = []
            prev = write_item(functools.partial(_collect, writes), head, item, seq, prev, registered)
            registered = True
            sql = grant_statement(len(item.entries), tuple(sql for sql, _ in writes))
            # Without uses the statement has no entry part, so none of its parameters (the
            # entries' end with ``now``, which alone was one parameter too many: every grant that
            # learned a baseline without a single use failed).
            entries = item.entry_params if item.entries else []
            conn.execute(sql, [*entries, *(value for _, params in writes for value in params)])
        return list(batch), seq, prev

    return raw.pipelined(queue, refusal=refusal, single=len(batch) == 1)


def _collect(writes: list[tuple[str, Sequence[Any]]], sql: str, params: Sequence[Any]) -> None:
    writes.append((sql, params))


def pipelined_uses(
    raw: RawStatement,
    head: ChainHead,
    batch: list[PendingUses],
    write_item: Callable[..., str],
    work: Callable[[Any], tuple[list[PendingUses], int, str]],
    refusal: str,
) -> tuple[list[PendingUses], int, str]:
    """Commit ``batch`` in one round trip if every use is free (the usual case).

    Each item's statements become one statement, which fails with SQLSTATE ``refusal`` if a use
    is taken (:func:`pipelined_grants`).  If one is, nothing is committed, and ``work`` does the
    batch again, statement by statement, to refuse exactly the items whose uses are taken.
    """
    try:
        return pipelined_grants(raw, head, batch, write_item, refusal=refusal)
    except raw.errors as exc:
        if getattr(exc, "sqlstate", None) != refusal:
            raise
    return raw.transaction(work)
