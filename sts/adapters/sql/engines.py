"""Engines and connections of the audit and state database: SQLite files and pragmas, pools, locks.

SQLite by default (WAL journal, so readers do not block the writer and commits
survive a process crash; the file and its ``-wal``/``-shm`` companions made
``0600``, see :mod:`.sqlite_files`), PostgreSQL from a ``postgresql+psycopg://``
URL.  A SQLite lock collision between worker processes is retried here (:func:`retry_locked`) with
sleeps near the time a write holds the lock; schema changes run under a lock of
their own (:func:`schema_transaction`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import select
import sqlite3
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError, OperationalError, SQLAlchemyError

from ...core.canonical_json import canonical_json, canonical_record
from ..request_threads import waiting
from .deadline import DeadlinePassed, StatementDeadlines
from .sqlite_files import private_sqlite_files
from .sqlite_local import read_only

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolOptions:
    """The connection pools of a PostgreSQL engine (SQLite opens files, and ignores these).

    A process has two pools.  The request pool (:func:`statement_engine`) serves every
    statement of a request (:class:`~sts.adapters.sql.statements.RawStatement`): it keeps
    ``size`` connections open and opens up to ``max_overflow`` more under load, closed
    again when returned, so ``size`` should cover every thread (each holds at most one
    connection at a time).  The engine's own pool serves the rare SQLAlchemy transactions
    (schema migrations, readiness, security-event state updates): one connection kept,
    ``TRANSACTION_OVERFLOW`` more at most, checked with a ping on checkout.  A request waits
    at most ``timeout`` seconds for a connection, then fails closed, and at most ``deadline``
    seconds for the answer to a statement of the request pool.
    """

    size: int = 9
    max_overflow: int = 0
    timeout: float = 5.0
    #: Seconds a request's statement may go unanswered before it is cancelled (then cut): see
    #: :mod:`sts.adapters.sql.deadline`; 0 waits as long as the connection stands.
    deadline: float = 5.0

    #: The engine's own pool: connections kept, and opened beyond them at most.
    TRANSACTION_SIZE: ClassVar[int] = 1
    TRANSACTION_OVERFLOW: ClassVar[int] = 2

    def engine_arguments(self) -> dict[str, Any]:
        """The request pool's arguments to :func:`sqlalchemy.create_engine`."""
        return {"pool_size": self.size, "max_overflow": self.max_overflow, "pool_timeout": self.timeout}

    def transaction_arguments(self) -> dict[str, Any]:
        """The engine's own pool's arguments to :func:`sqlalchemy.create_engine`."""
        return {
            "pool_size": self.TRANSACTION_SIZE,
            "max_overflow": self.TRANSACTION_OVERFLOW,
            "pool_timeout": self.timeout,
        }


#: Seconds to wait for a PostgreSQL server to accept a connection (libpq waits forever by default),
#: unless the URL sets ``connect_timeout`` itself.
CONNECT_TIMEOUT = 5
#: Milliseconds data sent to PostgreSQL may stay unacknowledged before the connection is dropped
#: (libpq ``tcp_user_timeout``, Linux's ``TCP_USER_TIMEOUT``), unless the URL sets it.
TCP_USER_TIMEOUT_MS = 10_000
#: SQLite: an execution option that opens the connection's transaction with ``BEGIN IMMEDIATE``.
_IMMEDIATE = "sts_sqlite_immediate"
#: The keyword arguments each PostgreSQL engine was made with, for its statement pool.
_ENGINE_ARGUMENTS: weakref.WeakKeyDictionary[Engine, dict[str, Any]] = weakref.WeakKeyDictionary()
_STATEMENT_ENGINES: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()
_STATEMENT_ENGINES_LOCK = threading.Lock()
#: The deadlines of each PostgreSQL engine's request pool.
_DEADLINES: weakref.WeakKeyDictionary[Engine, StatementDeadlines] = weakref.WeakKeyDictionary()


def json_text(value: Any) -> str:
    """A JSON column's text when SQLAlchemy writes one (a tool, a test): canonical, as the audit
    sink writes records (:func:`~sts.core.canonical_json.canonical_record`), since verification
    holds a record's text to its canonical JSON."""
    return canonical_record(value)[0] if isinstance(value, Mapping) else canonical_json(value)


class DatabaseMissing(Exception):
    """``existing``: the SQLite file named does not exist (nothing was created)."""

    def __init__(self, path: str) -> None:
        super().__init__(f"no database at {path}")
        self.path = path


def make_engine(url: str, pool: PoolOptions | None = None, *, existing: bool = False) -> Engine:
    """One engine (and pool) per process, created at start; no connection is opened here.

    A SQLite file that does not exist is created (with its directories), unless ``existing``:
    then :class:`DatabaseMissing` is raised and nothing is made.  The commands that read or
    repair the trail ask for that: pointed at a path with a typo, ``sts audit verify`` made a
    new, empty, migrated database there and reported it intact (an outside audit).
    """
    if url.startswith("sqlite:///") and existing:
        missing = url.removeprefix("sqlite:///")
        if (
            missing not in ("", ":memory:")
            and not missing.startswith("file:")
            and not os.path.exists(missing)
        ):
            raise DatabaseMissing(missing)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        private_sqlite_files(url.removeprefix("sqlite:///"))
        # busy_timeout 0: SQLite's own busy handler sleeps 1 ms, then 2, 5, 10... on any lock
        # collision between worker processes, though a write holds the lock for ~30 us.
        # The callers retry instead, with sleeps of a tenth of a millisecond upward.
        database = url.removeprefix("sqlite:///")
        if database not in ("", ":memory:") and not database.startswith("file:"):
            # Every connection after this start opens the file as it is (SQLite's ``mode=rw``,
            # https://www.sqlite.org/uri.html): one deleted under the process is not made again,
            # empty and with the process's umask (an outside audit found a new 0644 file a
            # second after deleting it), and the process stays not ready until a restart.
            opened = "file:" + urllib.parse.quote(str(Path(database).absolute())) + "?mode=rw"
            engine = create_engine(
                url,
                creator=lambda: sqlite3.connect(opened, timeout=0, check_same_thread=False, uri=True),
                json_serializer=json_text,
            )
        else:
            engine = create_engine(
                url, connect_args={"timeout": 0, "check_same_thread": False}, json_serializer=json_text
            )

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            # SQLAlchemy's documented pysqlite recipe: the driver never opens transactions by
            # itself (a statement outside one commits alone); the "begin" hook below opens them.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            retry_locked(lambda: cur.execute("PRAGMA journal_mode=WAL"))
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=0")
            cur.close()

        @event.listens_for(engine, "handle_error")
        def _sqlite_read_only(context: Any) -> None:
            # A pooled connection opened read-only is dropped as if disconnected (SQLAlchemy
            # "Custom disconnect detection"): the pool opens another (see sqlite_local.read_only).
            if read_only(context.original_exception):
                context.is_disconnect = True

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # IMMEDIATE takes the write lock at once (for a read-then-write such as the schema check).
            conn.exec_driver_sql(
                "BEGIN IMMEDIATE" if conn.get_execution_options().get(_IMMEDIATE) else "BEGIN"
            )

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    options = pool or PoolOptions()
    query = make_url(url).query
    # libpq's own defaults unless the URL says otherwise: bounded connection attempts, and a
    # connection whose sent data goes unacknowledged for TCP_USER_TIMEOUT ms (a network partition,
    # a host gone) is dropped instead of waited on for the kernel's ~15 minutes.
    arguments = {
        name: value
        for name, value in (
            ("connect_timeout", CONNECT_TIMEOUT),
            ("tcp_user_timeout", TCP_USER_TIMEOUT_MS),
            ("keepalives", 1),
            ("keepalives_idle", 30),
        )
        if name not in query
    }
    connect: dict[str, Any] = {"connect_args": arguments} if arguments else {}
    engine = create_engine(
        url, pool_pre_ping=True, json_serializer=json_text, **options.transaction_arguments(), **connect
    )
    _ENGINE_ARGUMENTS[engine] = {**options.engine_arguments(), **connect}
    _DEADLINES[engine] = StatementDeadlines(options.deadline)
    return engine


def statement_deadlines(engine: Engine) -> StatementDeadlines:
    """PostgreSQL: the deadlines of ``engine``'s request pool (:mod:`sts.adapters.sql.deadline`)."""
    with _STATEMENT_ENGINES_LOCK:
        deadlines = _DEADLINES.get(engine)
        if deadlines is None:
            deadlines = _DEADLINES[engine] = StatementDeadlines(PoolOptions().deadline)
        return deadlines


def statement_engine(engine: Engine) -> Engine:
    """PostgreSQL: the request pool, one per engine and shared by every :class:`RawStatement` on it
    (shaped by :class:`PoolOptions`).

    ``sts serve`` opens its connections when a worker starts (:func:`open_request_pool`); they are
    handed out most recently used first (``pool_use_lifo``, SQLAlchemy's "Using FIFO vs. LIFO"), so
    the few a worker needs at a time stay warm and the rest idle until a burst needs them.
    Its connections are in autocommit mode: a single statement is its own transaction, one
    round trip instead of three (psycopg would otherwise send ``BEGIN`` before it and
    ``COMMIT`` after it); a transaction is opened explicitly with ``BEGIN``
    (psycopg: "Transactions management", autocommit).  No ping on checkout (a round trip
    each time), but a look at the socket (:func:`_closed_by_server`); a connection found
    dead later is replaced, with every other pooled connection as old as it, and the
    statement tried once more (:class:`RawStatement`).
    """
    with _STATEMENT_ENGINES_LOCK:
        statements = _STATEMENT_ENGINES.get(engine)
        if statements is None:
            arguments = _ENGINE_ARGUMENTS.get(engine, PoolOptions().engine_arguments())
            statements = create_engine(
                engine.url, isolation_level="AUTOCOMMIT", pool_use_lifo=True, **arguments
            )
            event.listen(statements, "checkout", _closed_by_server)
            _STATEMENT_ENGINES[engine] = statements
            # Disposing of the engine (tests, the CLI) closes the statement pool's connections too.
            event.listen(engine, "engine_disposed", lambda _engine, pool=statements: pool.dispose())
        return statements


def open_request_pool(engine: Engine) -> int:
    """PostgreSQL: open the request pool's ``size`` connections now (a worker's start), not one by
    one under load; returns how many are open and idle.  SQLite: nothing to open (0).

    The pool opens a connection the first time more threads than it holds need one at once:
    that request waits for a new backend (PostgreSQL forks one per connection), at any time
    under load.  Opened here, before the first request, every thread finds one idle.  A server
    that cannot be reached is not an error here (the readiness check reports it, and the
    pool opens connections when it can): the ones opened are kept, the failure is logged.
    """
    if engine.dialect.name != "postgresql":
        return 0
    pool = statement_engine(engine)
    size = int(_ENGINE_ARGUMENTS.get(engine, PoolOptions().engine_arguments())["pool_size"])
    opened: list[Any] = []
    try:
        while len(opened) < size:
            opened.append(pool.raw_connection())
    except (SQLAlchemyError, pool.dialect.loaded_dbapi.Error, OSError) as exc:
        log.warning(
            "request pool: %d of %d connections opened at start (%s)", len(opened), size, type(exc).__name__
        )
    finally:
        for connection in opened:
            connection.close()  # back to the pool, open and idle
    return len(opened)


def _closed_by_server(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """On checkout from the request pool: refuse a connection the server has closed, without a round trip.

    An idle connection receives nothing unless the server ends it: a backend terminated
    (``pg_terminate_backend``, a server shut down or restarted) sends its ``FATAL`` error
    and closes the socket.  If the socket has something to read, libpq reads it
    (``PQconsumeInput``, which does not block); a connection then broken, or whose socket
    still has something to read (the end of the stream), is dead, and
    :class:`sqlalchemy.exc.DisconnectionError` has the pool open a new one in its place
    (SQLAlchemy's documentation, "Disconnect Handling - Pessimistic", custom checks).
    Anything else (a TLS record, say) leaves the connection in use.
    """
    pgconn = dbapi_connection.pgconn
    try:
        if not _readable(pgconn.socket):
            return
        pgconn.consume_input()
        if pgconn.status == _CONNECTION_OK and not _readable(pgconn.socket):
            return
    except (OSError, ValueError, dbapi_connection.Error) as exc:
        raise DisconnectionError(f"connection unusable: {type(exc).__name__}") from exc
    raise DisconnectionError("the server closed the connection while it was idle")


#: libpq's CONNECTION_OK (``PQstatus``).
_CONNECTION_OK = 0


def _readable(socket: int) -> bool:
    """Whether ``socket`` has something to read (or is closed or in error), without waiting.

    ``poll``, not ``select``: a process serving many clients has descriptors above ``select``'s
    limit (``FD_SETSIZE``, 1024)."""
    poller = select.poll()
    poller.register(socket, select.POLLIN)
    return bool(poller.poll(0))


_LOCK_DEADLINE = 10.0
T = TypeVar("T")


def _is_locked(exc: BaseException) -> bool:
    text = str(getattr(exc, "orig", exc))
    return isinstance(exc, sqlite3.OperationalError | OperationalError) and (
        "locked" in text or "busy" in text
    )


#: The time (``time.monotonic()``) after which this thread's commit of the moment must not wait
#: for SQLite's lock, nor start (see :func:`commit_by`); None: only ``retry_locked``'s own.
_COMMIT_BY: ContextVar[float | None] = ContextVar("sts_commit_by", default=None)


@contextlib.contextmanager
def commit_by(moment: float | None) -> Iterator[None]:
    """Within the block, :func:`retry_locked` neither waits for the lock nor starts past ``moment``
    (``time.monotonic()``):
    it raises :class:`~.deadline.DeadlinePassed` (the audit sink's group commit sets it to its
    oldest request's start plus ``database_deadline``, so that no grant is committed after its
    client is likely gone: an outside audit had a write lock held elsewhere for 15 s spend
    single-use tokens whose clients had timed out after 10 s)."""
    if moment is None:
        yield
        return
    token = _COMMIT_BY.set(moment)
    try:
        yield
    finally:
        _COMMIT_BY.reset(token)


def retry_locked(work: Callable[[], T], *, deadline: float = _LOCK_DEADLINE) -> T:
    """Run ``work``; on a SQLite lock collision, retry with short, jittered sleeps.

    A write holds the lock for tens of microseconds (one statement inside SQLite),
    so sleeps stay near that: a long back-off would leave the lock idle while a
    whole batch of requests waits behind this one.  Within :func:`commit_by`, past its
    time: :class:`~.deadline.DeadlinePassed`, without trying (again).
    """
    delay, end = 0.00005, time.monotonic() + deadline
    by = _COMMIT_BY.get()
    while True:
        if by is not None and time.monotonic() > by:
            raise DeadlinePassed("not committed within database_deadline of the request's start")
        try:
            return work()
        except (sqlite3.OperationalError, OperationalError) as exc:
            if not _is_locked(exc) or time.monotonic() > end:
                raise
            with waiting():
                time.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter, not security
            delay = min(delay * 1.5, 0.0005)


def transaction(engine: Engine, work: Callable[[Connection], T]) -> T:
    """Run ``work`` in one SQLAlchemy transaction, retrying SQLite lock collisions."""

    def attempt() -> T:
        with engine.begin() as conn:
            return work(conn)

    return retry_locked(attempt)


def schema_transaction(engine: Engine, work: Callable[[Connection], T]) -> T:
    """Run ``work`` in one transaction under the schema lock, safely from any number of processes at once.

    Schema migrations (:mod:`sts.migrations`) run here: reading the schema's revision and
    changing it happen in one transaction under a database lock, so that of several workers
    or instances starting together one migrates and the others find the schema current: on
    PostgreSQL a transaction-scoped advisory lock (per database and schema), on SQLite
    ``BEGIN IMMEDIATE`` (the write lock; a collision is retried).
    """

    def attempt() -> T:
        with engine.connect() as conn, conn.execution_options(**{_IMMEDIATE: True}).begin():
            if conn.dialect.name == "postgresql":
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(hashtext('sts.schema'), hashtext(current_schema()))")
                )
            return work(conn)

    return retry_locked(attempt)


def where(engine: Engine) -> str:
    """The database named without credentials: ``host:port/name`` or the SQLite file."""
    url = engine.url
    if url.get_backend_name() == "sqlite":
        return str(url.database)
    return f"{url.host}:{url.port or 5432}/{url.database}"
