"""Single statements and short transactions on the DBAPI connection, outside SQLAlchemy's compiler.

The writes of every request (an audit record, a replay entry, a subject's state)
go through :class:`RawStatement`: one prepared statement, or a few in one
transaction, with no SQL compiled per call.  On a SQLite file the threads of a process run them
on one connection, in turn (:mod:`sts.adapters.sql.sqlite_local`).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from ..request_threads import waiting
from .deadline import DeadlinePassed
from .engines import retry_locked, statement_deadlines, statement_engine
from .sqlite_local import local_connections

T = TypeVar("T")


class RawStatement:
    """One prepared write statement run on the DBAPI connection, outside SQLAlchemy's compiler.

    The hot writes (an audit record, a replay entry) are a single statement each.
    On SQLite the connection is in autocommit mode, so the statement is its own
    transaction and the write lock is taken and released inside one call into
    SQLite with the GIL released: a thread never holds the lock while it waits
    for the GIL, which would stall every other worker process.  On PostgreSQL
    the connection is in autocommit mode too: one statement, one round trip.
    """

    def __init__(self, engine: Engine, *, writes_first: bool = False) -> None:
        self.sqlite = engine.dialect.name == "sqlite"
        self.writes_first = writes_first
        # PostgreSQL: the request pool, without pre-ping (a round trip on every checkout), shared
        # by every statement on this engine; a connection found dead is replaced and the statement
        # tried once more instead.
        self.engine = engine if self.sqlite else statement_engine(engine)
        #: PostgreSQL: the deadline of each statement (SQLite answers or fails by itself).
        self._deadlines = None if self.sqlite else statement_deadlines(engine)
        #: SQLite file: this thread's connection (none for an in-memory database).
        self._local = local_connections(engine) if self.sqlite else None
        self.placeholder = "?" if self.sqlite else "%s"
        dbapi = engine.dialect.loaded_dbapi
        self.errors: tuple[type[BaseException], ...] = (dbapi.Error, DeadlinePassed)
        #: Every failure a statement can end in: the driver's errors, SQLAlchemy's (the pool's), and
        #: a PostgreSQL statement's deadline (:mod:`sts.adapters.sql.deadline`).
        self.failures: tuple[type[BaseException], ...] = (dbapi.Error, SQLAlchemyError, DeadlinePassed)
        self._disconnects: tuple[type[BaseException], ...] = (dbapi.OperationalError, dbapi.InterfaceError)

    def set_up_connections(self, statements: list[str]) -> bool:
        """SQLite file: have this engine's per-process connection run ``statements`` once,
        before its next statement (:meth:`LocalConnections.set_up`); False elsewhere (nothing is run)."""
        if self._local is None:
            return False
        self._local.set_up(statements)
        return True

    def run(self, sql: str, params: list[Any] | tuple[Any, ...], *, once: bool = False) -> int:
        """Execute and commit; return the row count.  DBAPI errors propagate.  ``once``: a write
        whose second run would answer otherwise (a first use): not run again on PostgreSQL after
        the server ended its session (:func:`_session_ended`), which may have come after it
        committed."""
        return int(self._execute(sql, params, fetch=False, once=once))

    def query(self, sql: str, params: list[Any] | tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Execute a read; return the rows.  DBAPI errors propagate."""
        rows: list[tuple[Any, ...]] = self._execute(sql, params, fetch=True)
        return rows

    def _execute(
        self, sql: str, params: list[Any] | tuple[Any, ...], *, fetch: bool, once: bool = False
    ) -> Any:
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
            raw = self.engine.raw_connection() if self.sqlite else self._checkout()
            try:
                if self.sqlite:
                    cur = raw.cursor()
                    cur.execute(sql, params)
                    return [tuple(r) for r in cur.fetchall()] if fetch else int(cur.rowcount)
                cur = _kept_cursor(raw)
                with self._watch(raw):
                    cur.execute(sql, params)
                    # The request pool's connections are in autocommit mode, so the statement
                    # commits by itself, in its one round trip (see statement_engine).
                    return [tuple(r) for r in cur.fetchall()] if fetch else int(cur.rowcount)
            except BaseException as exc:
                if not self.sqlite:
                    self._discard(raw, exc)
                raise
            finally:
                raw.close()

        if self.sqlite:
            return retry_locked(attempt)
        with waiting():  # PostgreSQL: a round trip (and perhaps a connection to wait for)
            try:
                return attempt()
            except self._disconnects as exc:
                if once and _session_ended(exc):
                    # Ended by the server: the write, its own transaction, may have committed first,
                    # and run again would find its own entry (a first use refused as a replay).
                    raise
                # Nothing was committed on a connection that died (idle in the pool), or a second
                # run does no harm: one fresh try.
                return attempt()

    def _checkout(self) -> Any:
        """PostgreSQL: a connection of the request pool; none while the server is silent
        (:meth:`StatementDeadlines.admit`), which a new connection that timed out makes it."""
        deadlines = self._deadlines
        assert deadlines is not None
        deadlines.admit()
        try:
            return self.engine.raw_connection()
        except Exception as exc:
            from psycopg.errors import ConnectionTimeout  # the postgres extra, there with PostgreSQL

            # The pool raises the driver's own errors (SQLAlchemy wraps them only on a Connection).
            if isinstance(exc.orig if isinstance(exc, DBAPIError) else exc, ConnectionTimeout):
                deadlines.heard_nothing()
            else:
                deadlines.answered()  # refused, say: an answer, and no wait for the next one
            raise

    def _watch(self, raw: Any) -> contextlib.AbstractContextManager[None]:
        """PostgreSQL: the deadline of what runs on pooled connection ``raw`` in the block."""
        assert self._deadlines is not None
        return self._deadlines.watch(raw.driver_connection)

    def _discard(self, raw: Any, exc: BaseException) -> None:
        """PostgreSQL: a connection with a failed statement is not reused as it is.  If it was cut
        (a restarted server cuts them all), every pooled connection opened before it is replaced
        on its next checkout too, as SQLAlchemy does on a disconnect (its documentation, "Dealing
        with Disconnects"), so the retry does not take another dead one."""
        if isinstance(exc, self._disconnects) and self.engine.dialect.is_disconnect(
            exc,  # type: ignore[arg-type]  # one of the driver's errors, as the dialect expects
            raw.dbapi_connection,
            None,
        ):
            self.engine.pool._invalidate(raw, exc)
        else:
            raw.invalidate()

    def transaction(self, work: Callable[[Any], T]) -> T:
        """Run ``work(cursor)`` in one transaction and commit it; on any error, roll back.

        SQLite: ``BEGIN IMMEDIATE`` takes the write lock up front (a lock collision is
        retried like any other); made with ``writes_first`` (every ``work`` starts with a
        write), a plain ``BEGIN``, so that the lock is taken by that first statement: a
        thread holding the lock waits for the GIL after each statement (while the other
        processes wait for the lock), so one statement fewer under the lock counts.
        PostgreSQL: ``BEGIN`` on the autocommit connection.  A
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
            raw = self.engine.raw_connection() if self.sqlite else self._checkout()
            try:
                if self.sqlite:
                    cur = raw.cursor()
                    cur.execute("BEGIN IMMEDIATE")
                    stage[0] = "work"
                    result = work(cur)
                    stage[0] = "commit"
                    cur.execute("COMMIT")
                    return result
                cur = _kept_cursor(raw)
                with self._watch(raw):
                    cur.execute("BEGIN")
                    stage[0] = "work"
                    result = work(cur)
                    stage[0] = "commit"
                    raw.commit()
                return result
            except BaseException as exc:
                with contextlib.suppress(*self.errors):
                    raw.rollback()
                if not self.sqlite and isinstance(exc, self.errors):
                    self._discard(raw, exc)
                raise
            finally:
                raw.close()

        if self.sqlite:
            return retry_locked(attempt)
        with waiting():
            return self._postgresql_attempts(attempt, stage)

    def pipelined(self, work: Callable[[Any], T], *, refusal: str, single: bool = False) -> T:
        """PostgreSQL: run ``work(connection)`` in one transaction and commit it, in one round trip.

        ``work`` queues its statements on the psycopg connection; ``BEGIN``, they and ``COMMIT``
        reach the server together and their answers come back together (psycopg's pipeline
        mode: https://www.psycopg.org/psycopg3/docs/advanced/pipeline.html).  A statement
        refuses the commit by failing with the SQLSTATE ``refusal``: the server then skips the
        rest, ``COMMIT`` included (PostgreSQL's documentation, "Pipeline Mode"), the error
        propagates, and the connection is kept.  Once ``COMMIT`` is queued, the outcome is
        unknown (:class:`CommitOutcomeUnknown`) only if the connection breaks: an error the
        server reports means that nothing was committed.  Otherwise as :meth:`transaction`.
        ``single``: ``work`` runs one statement, its own transaction (autocommit), so neither
        ``BEGIN`` nor ``COMMIT`` nor the pipeline is needed (``work`` is given the connection's
        kept cursor, which executes as the connection does); its outcome is unknown in the same case.
        """
        stage = ["connect"]

        def attempt() -> T:
            stage[0] = "connect"
            raw = self._checkout()
            connection: Any = raw.driver_connection  # the psycopg connection
            try:
                with self._watch(raw):
                    if single:
                        stage[0] = "commit"
                        return work(_kept_cursor(raw))
                    with connection.pipeline():
                        connection.execute("BEGIN", prepare=False)
                        stage[0] = "work"
                        result = work(connection)
                        stage[0] = "commit"
                        connection.execute("COMMIT", prepare=False)
                    # Leaving the block sends what is queued and waits for every answer.
                    return result
            except BaseException as exc:
                if stage[0] == "commit" and not connection.broken and not _session_ended(exc):
                    stage[0] = "work"  # The server answered with an error: it did not commit.
                with contextlib.suppress(*self.errors):
                    raw.rollback()
                if isinstance(exc, self.errors) and getattr(exc, "sqlstate", None) != refusal:
                    self._discard(raw, exc)
                raise
            finally:
                raw.close()

        with waiting():
            return self._postgresql_attempts(attempt, stage)

    def _postgresql_attempts(self, attempt: Callable[[], T], stage: list[str]) -> T:
        """Run a transaction's ``attempt``; once more if its connection was dead before ``COMMIT``,
        and :class:`CommitOutcomeUnknown` if it broke during ``COMMIT``."""
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


def _session_ended(exc: BaseException) -> bool:
    """Whether PostgreSQL reported the end of the session (SQLSTATE class 57P, operator
    intervention: ``pg_terminate_backend``, a shutdown; or class 08, connection exception): it may
    come after ``COMMIT`` went through, before psycopg has found the connection closed, so it does
    not say that nothing was committed (an outside fault-injection audit: grants committed, then
    run again, refused as replays of their own uses)."""
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate.startswith(("57P", "08"))


#: PostgreSQL: the key, in a pooled connection's ``info``, of the cursor kept for its statements.
_CURSOR = "sts_cursor"


def _kept_cursor(raw: Any) -> Any:
    """PostgreSQL: the cursor of pooled connection ``raw``, made once and kept for its next statements.

    A psycopg cursor can run any number of statements, one after another (its ``execute``
    forgets the previous results), and making one costs about as much as running a short
    statement's Python side.  It is kept in the pool's ``info`` of the connection, which the
    pool empties when it replaces the connection (SQLAlchemy's documentation,
    ``PoolProxiedConnection.info``).
    """
    info = raw.info
    cur = info.get(_CURSOR)
    if cur is None or cur.connection is not raw.dbapi_connection:
        cur = info[_CURSOR] = raw.dbapi_connection.cursor()
    return cur


class CommitOutcomeUnknown(Exception):
    """``COMMIT`` was sent, and no answer came back: the transaction may or may not be committed."""


def failure_text(exc: BaseException) -> str:
    """What a failed audit commit is logged as: the error's class, and SQLite's message (``attempt
    to write a readonly database``, ``database or disk is full``: no values of the row).  Not the
    message of other drivers or of SQLAlchemy's wrappers, which can quote the statement's values."""
    cause = getattr(exc, "orig", None) if isinstance(exc, DBAPIError) else exc
    if isinstance(cause, sqlite3.Error):
        message = str(cause).splitlines()[0][:120] if str(cause) else ""
        return f"{type(cause).__name__}: {message}" if message else type(cause).__name__
    return type(exc).__name__
