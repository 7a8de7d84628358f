"""SQLite: the writes of a batch of grants in one statement, through a TEMP view's trigger.

A grant writes its replay entries (its subject token, its DPoP proof's ``jti``), its
baseline and its audit record, in one transaction.  Statement by statement that is
``BEGIN``, three inserts and ``COMMIT`` (and a savepoint around each grant of a batch):
each is a call into SQLite that releases the GIL, and the thread holding SQLite's write
lock then waits for the GIL again between its statements while the other worker
processes find the lock taken and retry.  Here the writes of a whole batch are one
``INSERT INTO sts_grants`` with a row per grant: ``sts_grants`` is a TEMP view (of no
rows) whose ``INSTEAD OF INSERT`` trigger does each grant's writes
(https://www.sqlite.org/lang_createtrigger.html#instead_of_triggers).  A statement outside
a transaction is its own transaction (autocommit), so the batch commits, or none of it,
within one call into SQLite, with the write lock held only there.

Single use stays decided by the database: the trigger first looks for a live entry of each
use and, finding one (committed by anyone, or written by an earlier grant of the same
batch), fails the statement with ``RAISE(ABORT)``, which undoes all of it
(https://www.sqlite.org/lang_createtrigger.html#raise).  The batch is then committed
statement by statement, which refuses exactly the grants whose uses are taken (as on
PostgreSQL, :mod:`sts.adapters.sql.pg_exchange`); so is a batch whose statement fails for any
other reason, so that each failure is met, and reported, as the statements always met it.
The view and its trigger are made on each connection before its first statement
(:meth:`~sts.adapters.sql.sqlite_local.LocalConnections.set_up`); they live in the
connection's ``temp`` schema, never in the database file.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .baseline_writes import COUNT_COLUMNS, ROW_VALUES, advanced_counts_sql
from .chain_heads import ChainHead
from .group_commit import PendingUses
from .statements import RawStatement

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Uses a grant can have in the view's row (its subject token and its DPoP proof); more go the slow way.
USE_SLOTS = 2
#: The message of the trigger's ``RAISE(ABORT)``: a use of the statement is taken.
TAKEN = "sts: a use is taken"
_SLOTS = [
    *(f"use{n}_{part}" for n in range(1, USE_SLOTS + 1) for part in ("key", "expires")),
    "now",
    "baseline_identity",
    "baseline_value",
    "baseline_drift",
    "baseline_expires",
    *(f"baseline_{column}" for column in COUNT_COLUMNS),
    "baseline_at",
]


def grant_view_statements(columns: Sequence[str]) -> list[str]:
    """The TEMP view ``sts_grants`` and its trigger, for ``audit_events`` columns ``columns`` (in the
    order of the audit sink's parameters).  Written to be run again on a connection that has them."""
    names = [*_SLOTS, *columns]
    uses = [
        # An existing entry is live (the check above found none) or expired: an expired one is replaced.
        f"INSERT INTO replay_entries (key, expires_at) SELECT NEW.use{n}_key, NEW.use{n}_expires "
        f"WHERE NEW.use{n}_key IS NOT NULL "
        "ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at;"
        for n in range(1, USE_SLOTS + 1)
    ]
    keys = ", ".join(f"NEW.use{n}_key" for n in range(1, USE_SLOTS + 1))
    audit = (
        f"INSERT INTO audit_events ({', '.join(columns)}) VALUES ({', '.join(f'NEW.{c}' for c in columns)});"  # noqa: S608
    )
    # Built from constants and the table's own column names; values are the view's row.
    body = [
        "SELECT RAISE(ABORT, '" + TAKEN + "') WHERE EXISTS (SELECT 1 FROM replay_entries "  # noqa: S608
        f"WHERE key IN ({keys}) AND expires_at > NEW.now);",
        *uses,
        # The drift state only if the grant changed it (else the stored one, unless expired: one a
        # refusal wrote since the grant read it), the counters advanced from the stored ones, as
        # :class:`~.baseline_writes.BaselineWrite` does.
        f"INSERT INTO baselines (identity, baseline, drift, expires_at, {', '.join(COUNT_COLUMNS)}) "
        "SELECT NEW.baseline_identity, NEW.baseline_value, NEW.baseline_drift, NEW.baseline_expires, "
        + ", ".join(f"NEW.baseline_{column}" for column in COUNT_COLUMNS)
        + " WHERE NEW.baseline_identity IS NOT NULL ON CONFLICT (identity) "
        "DO UPDATE SET baseline = excluded.baseline, drift = CASE WHEN excluded.drift IS NOT NULL "
        "THEN excluded.drift WHEN baselines.expires_at > NEW.now THEN baselines.drift END, "
        "failures = CASE WHEN baselines.expires_at > NEW.now THEN baselines.failures END, "
        f"expires_at = excluded.expires_at, {advanced_counts_sql('NEW.now', 'NEW.baseline_at')};",
        audit,
    ]
    return [
        f"CREATE TEMP VIEW IF NOT EXISTS sts_grants ({', '.join(names)}) AS "
        f"SELECT {', '.join(['NULL'] * len(names))} WHERE 0",
        "CREATE TEMP TRIGGER IF NOT EXISTS sts_grant INSTEAD OF INSERT ON sts_grants BEGIN "
        + " ".join(body)
        + " END",
    ]


class SqliteGrants:
    """Commits a batch of grants in one statement (see the module docstring), on a SQLite file."""

    def __init__(self, raw: RawStatement, columns: Sequence[str]) -> None:
        self._raw = raw
        #: Whether the statement can run: SQLite, with its per-process connection (a file, not ``:memory:``).
        self.ready = raw.set_up_connections(grant_view_statements(columns))
        self._width = len(_SLOTS) + len(columns)
        self._sql_by_size: dict[int, str] = {}

    def fits(self, head: ChainHead, batch: Sequence[PendingUses]) -> bool:
        """Whether ``batch`` can go in one statement: the chain is registered (its row goes with its
        first record) and no grant has more uses than the view has room for."""
        return self.ready and head.registered and all(len(item.entries) <= USE_SLOTS for item in batch)

    def commit(
        self,
        head: ChainHead,
        batch: list[PendingUses],
        link: Callable[[ChainHead, PendingUses, int, str], tuple[str, list[Any]]],
        work: Callable[[Any], T],
    ) -> tuple[list[PendingUses], int, str] | T:
        """Commit ``batch`` on ``head``'s chain in one statement; ``link`` links an item as ``seq``
        after ``prev`` and gives its digest and its ``audit_events`` parameters.  Returns the items
        and the chain's new ``seq`` and hash.  If the batch does not fit (:meth:`fits`) or a use is
        taken or the statement fails (nothing is then committed), ``work`` does it statement by
        statement, in a transaction (:meth:`RawStatement.transaction`): its result is returned, its
        errors propagate."""
        if not self.fits(head, batch):
            return self._raw.transaction(work)
        seq, prev = head.seq, head.hash
        params: list[Any] = []
        for item in batch:
            item.taken = None
            seq += 1
            prev, audit = link(head, item, seq, prev)
            slots: list[Any] = item.entry_params[:-1]
            slots += [None] * (2 * USE_SLOTS - len(slots))
            params += slots
            params.append(item.entry_params[-1])
            # The baseline's values but its last (``now``, which the row has already).
            params += item.baseline[:ROW_VALUES] if item.baseline is not None else (None,) * ROW_VALUES
            params += audit
        try:
            self._raw.run(self._sql(len(batch)), params)
        except sqlite3.Error as exc:
            # Nothing was written: a statement outside a transaction that fails is rolled back whole.
            # ``work`` decides again: a use taken, or any other failure, which it meets and reports
            # as the statements always did.  (A trigger's statement that finds a table gone does not
            # have SQLite reload a schema another connection changed, as a plain statement does:
            # without ``work`` the connection would keep failing once the table is back.)
            if str(exc) != TAKEN:
                log.debug("grants not committed in one statement: %s", type(exc).__name__)
            return self._raw.transaction(work)
        return list(batch), seq, prev

    def _sql(self, rows: int) -> str:
        sql = self._sql_by_size.get(rows)
        if sql is None:
            one = "(" + ", ".join(["?"] * self._width) + ")"
            # Placeholders only: the values are parameters.
            sql = self._sql_by_size[rows] = "INSERT INTO sts_grants VALUES " + ", ".join([one] * rows)  # noqa: S608
        return sql
