"""Single statements and short transactions on the DBAPI connection, outside SQLAlchemy's compiler.

The writes of every request (an audit record, a replay entry, a subject's state)
go through :class:`RawStatement`: one prepared statement, or a few in one
transaction, with no SQL compiled per call.  On a SQLite file each thread runs them
on a connection of its own (:mod:`sts.adapters.sql.sqlite_local`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from .engines import retry_locked, statement_engine
from .sqlite_local import local_connections

T = TypeVar("T")


class RawStatement:
    """One prepared write statement run on the DBAPI connection, outside SQLAlchemy's compiler.

    The hot writes (an audit record, a replay entry) are a single statement each.
    On SQLite the connection is in autocommit mode, so the statement is its own
    transaction and the write lock is taken and released inside one call into
    SQLite with the GIL released: a thread never holds the lock while it waits
    for the GIL, which would stall every other worker process.  On PostgreSQL
    it is followed by a commit.
    """

    def __init__(self, engine: Engine, *, writes_first: bool = False) -> None:
        self.sqlite = engine.dialect.name == "sqlite"
        self.writes_first = writes_first
        # PostgreSQL: a pool without pre-ping (a round trip on every checkout), shared by every
        # statement on this engine; a connection found dead is replaced and the statement tried
        # once more instead.
        self.engine = engine if self.sqlite else statement_engine(engine)
        #: SQLite file: this thread's connection (none for an in-memory database).
        self._local = local_connections(engine) if self.sqlite else None
        self.placeholder = "?" if self.sqlite else "%s"
        dbapi = engine.dialect.loaded_dbapi
        self.errors: tuple[type[BaseException], ...] = (dbapi.Error,)
        #: Every failure a statement can end in: the driver's errors and SQLAlchemy's (the pool's).
        self.failures: tuple[type[BaseException], ...] = (dbapi.Error, SQLAlchemyError)
        self._disconnects: tuple[type[BaseException], ...] = (dbapi.OperationalError, dbapi.InterfaceError)

    def run(self, sql: str, params: list[Any] | tuple[Any, ...]) -> int:
        """Execute and commit; return the row count.  DBAPI errors propagate."""
        return int(self._execute(sql, params, fetch=False))

    def query(self, sql: str, params: list[Any] | tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Execute a read; return the rows.  DBAPI errors propagate."""
        rows: list[tuple[Any, ...]] = self._execute(sql, params, fetch=True)
        return rows

    def _execute(self, sql: str, params: list[Any] | tuple[Any, ...], *, fetch: bool) -> Any:
        local = self._local
        if local is not None:

            def local_attempt() -> Any:
                with local.cursor() as cur:
                    changes = cur.connection.total_changes
                    cur.execute(sql, params)
                    result = cur.fetchall() if fetch else cur.rowcount
                    if cur.connection.total_changes != changes:  # a write (also INSERT ... RETURNING)
                        local.checkpoints.wrote()
                    return result

            return retry_locked(local_attempt)

        def attempt() -> Any:
            raw = self.engine.raw_connection()
            try:
                cur = raw.cursor()
                cur.execute(sql, params)
                result = [tuple(r) for r in cur.fetchall()] if fetch else int(cur.rowcount)
                if not self.sqlite:
                    raw.commit()
                return result
            except BaseException:
                if not self.sqlite:
                    # A connection with a failed statement is not reused as it is.
                    raw.invalidate()
                raise
            finally:
                raw.close()

        if self.sqlite:
            return retry_locked(attempt)
        try:
            return attempt()
        except self._disconnects:
            # Nothing was committed on a connection that died; one fresh try.
            return attempt()

    def transaction(self, work: Callable[[Any], T]) -> T:
        """Run ``work(cursor)`` in one transaction and commit it; on any error, roll back.

        SQLite: ``BEGIN IMMEDIATE`` takes the write lock up front (a lock collision is
        retried like any other); made with ``writes_first`` (every ``work`` starts with a
        write), a plain ``BEGIN``, so that the lock is taken by that first statement: a
        thread holding the lock waits for the GIL after each statement (while the other
        processes wait for the lock), so one statement fewer under the lock counts.
        PostgreSQL: the driver's implicit transaction.  A
        connection found dead before anything was sent is replaced and the work tried
        once more.  On PostgreSQL a failure during ``COMMIT`` (the connection broke) is
        :class:`CommitOutcomeUnknown`: the server may have committed.  Other DBAPI
        errors, and whatever ``work`` raises, propagate.
        """
        local = self._local
        if local is not None:
            begin = "BEGIN" if self.writes_first else "BEGIN IMMEDIATE"

            def local_attempt() -> T:
                with local.cursor() as cur:
                    cur.execute(begin)
                    result = work(cur)
                    cur.execute("COMMIT")
                local.checkpoints.wrote()
                return result

            return retry_locked(local_attempt)
        stage = ["connect"]

        def attempt() -> T:
            stage[0] = "connect"
            raw = self.engine.raw_connection()
            try:
                cur = raw.cursor()
                if self.sqlite:
                    cur.execute("BEGIN IMMEDIATE")
                stage[0] = "work"
                result = work(cur)
                stage[0] = "commit"
                if self.sqlite:
                    cur.execute("COMMIT")
                else:
                    raw.commit()
                return result
            except BaseException as exc:
                with contextlib.suppress(*self.errors):
                    raw.rollback()
                if not self.sqlite and isinstance(exc, self.errors):
                    # A connection with a failed statement is not reused as it is.
                    raw.invalidate()
                raise
            finally:
                raw.close()

        if self.sqlite:
            return retry_locked(attempt)
        try:
            try:
                return attempt()
            except self._disconnects:
                if stage[0] == "commit":
                    raise
                # The server drops an uncommitted transaction with its connection: one fresh try
                # (typically a pooled connection that died while idle).
                return attempt()
        except self.errors as exc:
            if stage[0] == "commit":
                raise CommitOutcomeUnknown(type(exc).__name__) from exc
            raise


class CommitOutcomeUnknown(Exception):
    """``COMMIT`` was sent, and no answer came back: the transaction may or may not be committed."""
