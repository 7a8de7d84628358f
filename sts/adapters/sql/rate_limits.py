"""Rate-limit state in the embedded SQL database (ports.RateLimitStore), shared by every process.

One statement admits a request against all its keys, or against none::

    WITH req(key, interval, tolerance) AS (VALUES (?, ?, ?), ...)
    INSERT INTO rate_limits (key, tat, tolerance)
    SELECT key, :now + interval, tolerance FROM req
    WHERE NOT EXISTS (SELECT 1 FROM req q JOIN rate_limits c ON c.key = q.key
                      WHERE max(c.tat, :now) + q.interval - q.tolerance > :now)   -- all or nothing
    ON CONFLICT (key) DO UPDATE SET tat = max(rate_limits.tat, :now) + interval
    WHERE max(rate_limits.tat, :now) + interval - tolerance <= :now                -- exact per key
    RETURNING key

On SQLite the statement runs alone under the database's write lock, so it is
atomic across every process on the machine.  On PostgreSQL the ``NOT EXISTS``
test reads the statement's snapshot, and the ``DO UPDATE ... WHERE`` re-tests
each key on the row it has locked: two racing requests can never both take a
key's last cell, and in the rare race where one key of several refuses, the
others keep the charge (a refusal for them a little sooner, never an excess).

The request was admitted when every key came back from ``RETURNING``.  Only
on a refusal are the keys read again, to say how long to wait; a TAT written
under an earlier, stricter limit is lowered then to what the current limit
allows (``SqlRateLimits._capped``).

This is the hot path: one write per check (``benchmarks/rate_limits.py`` measures it).
On SQLite the counts are kept in a file of their own (:func:`rate_limit_engine`), so
that these writes do not compete with the audit trail's.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import weakref
from collections.abc import Sequence

from sqlalchemy import Engine
from sqlalchemy.schema import CreateTable

from ...core.ports import LimitedKey, StoreUnavailable
from ...core.rate_limit import CLOCK_SKEW
from .engines import make_engine, transaction
from .schema import rate_limits
from .statements import RawStatement

_MAX_KEY = 200


def _stored_key(key: str) -> str:
    if len(key) <= _MAX_KEY and key.isprintable():
        return key
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def own_rate_limit_file(engine: Engine) -> str | None:
    """The file of their own the counts are kept in (see :func:`rate_limit_engine`); None when
    they are kept in the main database."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return f"{database}.rate-limits"


def rate_limit_engine(engine: Engine) -> Engine:
    """Where the counts are kept: on SQLite, a database file of their own beside the main one.

    ``<database>.rate-limits`` (WAL, mode 0600, like the main file): every request writes
    to it, and SQLite lets one writer at a time into a file; in the main file these writes
    would queue, across every worker process, behind the audit trail's commits (and they
    behind these).  The counts are also worthless after a while, so they stay out of the
    audit database.  On PostgreSQL (and an in-memory SQLite database) the ``rate_limits``
    table of the main database is used.
    """
    path = own_rate_limit_file(engine)
    if path is None:
        return engine
    with _OWN_ENGINES_LOCK:
        # One engine per file and process, whoever asks (the limits of the endpoints, the review
        # page's sign-ins): one pool, one per-process connection and checkpoints.
        key = (os.path.abspath(path), os.getpid())
        own = _OWN_ENGINES.get(key)
        if own is None:
            own = make_engine(f"sqlite:///{path}")
            transaction(own, lambda conn: conn.execute(CreateTable(rate_limits, if_not_exists=True)))
            _OWN_ENGINES[key] = own
    return own


def dispose_rate_limit_engines() -> None:
    """Close every connection of this process's rate-limit engines (the next statement opens new
    ones).  Before a fork: a SQLite connection must not cross one (SQLite keeps the locks it holds
    per process, so a child would believe it holds its parent's locks and take none)."""
    with _OWN_ENGINES_LOCK:
        engines = list(_OWN_ENGINES.values())
    for engine in engines:
        engine.dispose()


#: Weak: an engine nobody uses any more (an app of the tests, say) closes as before.
_OWN_ENGINES: weakref.WeakValueDictionary[tuple[str, int], Engine] = weakref.WeakValueDictionary()
_OWN_ENGINES_LOCK = threading.Lock()


class SqlRateLimits:
    """ports.RateLimitStore on the embedded database (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine, *, purge_probability: float = 0.001) -> None:
        self._raw = RawStatement(engine)
        self.purge_probability = purge_probability
        postgres = engine.dialect.name == "postgresql"
        #: How far beyond what a limit allows a TAT of that same limit is believed (see _capped).
        self._clock_skew = CLOCK_SKEW
        self._greatest = "GREATEST" if postgres else "max"
        p = self._raw.placeholder
        # PostgreSQL infers no types for bare parameters in VALUES: say them.
        self._row = f"({p}::text, {p}::float8, {p}::float8)" if postgres else f"({p}, {p}, {p})"
        self._now = f"{p}::float8" if postgres else p
        # PostgreSQL: this transaction (the statement and its commit) does not wait for the WAL
        # flush: SET LOCAL synchronous_commit, from within the statement, since the pool runs one
        # statement per transaction.  The commit is visible to every other connection at once,
        # as always; a crash of PostgreSQL may forget the last fraction of a second of counts,
        # which only makes the limits briefly more generous, where waiting for the disk would
        # cost a millisecond or more on every check.
        self._commit_setting = (
            "async_commit AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)), "
            if postgres
            else ""
        )
        self._commit_join = " CROSS JOIN async_commit" if postgres else ""
        self._sql_by_size: dict[int, str] = {}
        self._select = "SELECT key, tat, tolerance FROM rate_limits WHERE key IN "
        self._purge = f"DELETE FROM rate_limits WHERE tat < {p}"  # noqa: S608 - placeholder only
        # Only lowers a TAT, and only one written under another limit or by a wrong clock (see _capped).
        self._cap = (
            f"UPDATE rate_limits SET tat = {p}, tolerance = {p} "  # noqa: S608 - placeholders only
            f"WHERE key = {p} AND tat > {p} AND (tolerance <> {p} OR tat > {p})"
        )

    def _acquire_sql(self, size: int) -> str:
        sql = self._sql_by_size.get(size)
        if sql is None:
            g, now = self._greatest, self._now
            rows = ", ".join([self._row] * size)
            # Built from constants and placeholders only; every value is a parameter.
            sql = (
                f"WITH {self._commit_setting}req(key, step, tolerance) AS (VALUES {rows}) "  # noqa: S608
                f"INSERT INTO rate_limits (key, tat, tolerance) SELECT key, {now} + step, tolerance "
                f"FROM req{self._commit_join} "
                "WHERE NOT EXISTS (SELECT 1 FROM req q JOIN rate_limits c ON c.key = q.key "
                f"WHERE {g}(c.tat, {now}) + q.step - q.tolerance > {now}) "
                "ON CONFLICT (key) DO UPDATE SET "
                f"tat = {g}(rate_limits.tat, {now}) + (excluded.tat - {now}), tolerance = excluded.tolerance "
                f"WHERE {g}(rate_limits.tat, {now}) + (excluded.tat - {now}) - excluded.tolerance <= {now} "
                "RETURNING key"
            )
            self._sql_by_size[size] = sql
        return sql

    def acquire(self, keys: Sequence[LimitedKey], now: float) -> Sequence[float]:
        stored = [_stored_key(k.key) for k in keys]
        params: list[object] = []
        for name, k in zip(stored, keys, strict=True):
            params.extend((name, k.interval, k.tolerance))
        # The order of the parameters follows the statement: now in SELECT, NOT EXISTS (x2),
        # SET (x2), DO UPDATE WHERE (x3).
        params.extend([now] * 8)
        try:
            admitted = {row[0] for row in self._raw.query(self._acquire_sql(len(keys)), params)}
            if len(admitted) == len(keys):
                if random.random() < self.purge_probability:  # noqa: S311 - not security relevant
                    self._raw.run(self._purge, (now,))
                return [0.0] * len(keys)
            placeholders = ", ".join([self._raw.placeholder] * len(keys))
            rows = self._raw.query(self._select + f"({placeholders})", stored)
            tats = {name: tat for name, tat, _ in rows}
            self._capped(keys, stored, {name: tolerance for name, _, tolerance in rows}, tats, now)
        except self._raw.failures as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        # As the statement counted: a TAT still beyond the tolerance (another instance's, within
        # CLOCK_SKEW) refuses until it is due, and the wait says so.
        waits = [
            max(tats.get(name) or now, now) + k.interval - k.tolerance - now
            for name, k in zip(stored, keys, strict=True)
        ]
        if max(waits) <= 0:
            # Another process took the last cell between the two statements: still a refusal.
            worst = max(range(len(keys)), key=lambda i: keys[i].interval)
            waits[worst] = keys[worst].interval
        return waits

    def _capped(
        self,
        keys: Sequence[LimitedKey],
        stored: Sequence[str],
        tolerances: dict[str, float],
        tats: dict[str, float],
        now: float,
    ) -> None:
        """On a refusal: lower each TAT written under another limit, or by a clock that was ahead, to
        what the current limit allows.

        A TAT further ahead than ``now + tolerance`` is read as that much
        (:func:`~sts.core.rate_limit.gcra_start`), but the statement above refuses it and
        writes nothing, so it would refuse the key again until the old limit's state ran out (an
        outside audit: a /24 refused for 110 s, up to an hour with a period of 3600, after its
        limit was raised to the default).  Written back as ``now + tolerance`` (the current
        limit's burst spent), the key is admitted again one interval later.  Only a row whose
        stored tolerance is another limit's: with PostgreSQL, instances count by their own
        clocks, and one whose clock is behind must not lower the TATs another one wrote under
        the same limit (that would hand the other one the difference, again and again), unless
        the TAT is more than :data:`CLOCK_SKEW` beyond: a clock that far ahead was wrong (this
        one's, since corrected, or another instance's), and counting what it wrote refused the
        key for as long as it had been ahead (an outside fault campaign: an hour ahead, then set
        right, and every client of one network refused with ``Retry-After: 1``).  SQLite's
        workers read one machine's clock, but each request counts by the time it started, so a
        later check of an earlier request reads TATs written after it: within ``CLOCK_SKEW`` they
        are counted as they are there too (lowered, a flood got 4.5 times its limit: a review).
        """
        for name, k in zip(stored, keys, strict=True):
            tat, tolerance = tats.get(name), tolerances.get(name)
            if tat is None or tolerance is None or tat <= now + k.tolerance:
                continue
            if tolerance == k.tolerance and tat <= now + k.tolerance + self._clock_skew:
                continue
            cap = now + k.tolerance
            self._raw.run(self._cap, (cap, k.tolerance, name, cap, k.tolerance, cap + self._clock_skew))
            tats[name] = cap
