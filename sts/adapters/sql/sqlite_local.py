"""SQLite: one connection per process for the per-request statements, and WAL checkpoints
in a thread of their own.

:class:`~sts.adapters.sql.statements.RawStatement` runs every request's reads and writes on
SQLite through :class:`LocalConnections`: each process keeps one connection of the engine
(opened through the engine, so with its pragmas and connect events, then detached from its
pool, see SQLAlchemy's ``PoolProxiedConnection.detach``), which its threads take in turn, one
statement (or one short transaction) at a time.  A statement then costs what SQLite costs, not
a pool checkout and a rollback on return as well.  Disposing of the engine (``Engine.dispose``)
closes it; the next statement opens a new one.

Why one and not one per thread: in WAL mode a connection that finds the database changed since
its last transaction, by any other connection, drops its whole page cache and reads again every
page its next statement touches (https://www.sqlite.org/wal.html; the pager resets its cache when
the WAL's index header has changed).  With a connection per request thread every commit emptied
the cache of the others, so nearly every statement started cold; with one per process only the
other workers' commits do.  Measured with ``strace -c`` on ``benchmarks/exchange_cpu.py
--processes 2 --in-flight 4`` (2,400 exchanges): 21,035 ``pread64`` against 33,966.  The threads
lose nothing by sharing it: a worker runs one request thread at a time
(:mod:`sts.adapters.request_threads`), and SQLite serialises the statements of a process anyway.

A WAL commit only appends to the ``-wal`` file; the checkpoint that copies the WAL back into
the database (and syncs both files) is the slow part of a write.  SQLite runs it in whichever
commit finds the WAL past ``wal_autocheckpoint`` pages, so one request in some dozens waited
for two syncs, and, as the audit sink's group commit holds every other committer of its
process behind it, so did they.  Here :class:`WalCheckpoints` runs it in a thread of its own,
every :data:`CHECKPOINT_EVERY` writes (``PRAGMA wal_checkpoint(PASSIVE)``: it never holds the
write lock, https://www.sqlite.org/wal.html#ckpt); the request connections keep SQLite's own
automatic checkpoint only as a safety net, at :data:`AUTOCHECKPOINT_PAGES`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, event

from .process_id import current_pid

log = logging.getLogger(__name__)

#: Writes between two checkpoints of the WAL (an exchange's transaction writes some 20 pages).
CHECKPOINT_EVERY = 100
#: WAL frames (pages) past which a checkpoint also restarts the WAL.
RESTART_FRAMES = 8192
#: How long (ms) a restart waits for the lock and for the readers (writers wait meanwhile).
RESTART_WAIT_MS = 10
#: Bytes the WAL file is cut back to when it starts over (``PRAGMA journal_size_limit``).
WAL_SIZE_LIMIT = 64 * 1024 * 1024
#: The automatic checkpoint of the request connections: a safety net should the thread fall behind.
AUTOCHECKPOINT_PAGES = 20000
#: Seconds between two checkpoints at least, and at most while anything was written.
_MIN_INTERVAL, _MAX_INTERVAL = 0.02, 5.0

_REGISTRY: weakref.WeakKeyDictionary[Engine, LocalConnections] = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()
#: Connections a forked child found in its thread (kept open, never used).
_INHERITED: list[_Held] = []


def _after_fork_in_child() -> None:
    """A forked child has only the thread that forked: locks another thread held stay held in it
    for ever, so each is made anew (the connections themselves are left alone, see :meth:`cursor`)."""
    global _REGISTRY_LOCK
    _REGISTRY_LOCK = threading.Lock()
    for connections in list(_REGISTRY.values()):
        connections.forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


def local_connections(engine: Engine) -> LocalConnections | None:
    """The per-process connection of a SQLite file engine (one per engine); None for an
    in-memory database (each connection is a database of its own) or another database."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    with _REGISTRY_LOCK:
        connections = _REGISTRY.get(engine)
        if connections is None:
            connections = _REGISTRY[engine] = LocalConnections(engine)
        return connections


#: SQLITE_READONLY, the primary code of every "attempt to write a readonly database".
_SQLITE_READONLY = 8


def read_only(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite's SQLITE_READONLY (or one of its extended codes).

    A connection opened while its file (or directory) was not writable is opened read-only,
    silently: SQLite falls back to reading when it cannot write ("SQLITE_OPEN_READWRITE: ... or
    reading only if the file is write protected by the operating system",
    https://www.sqlite.org/c3ref/open.html).  It stays so after the file is writable again, so
    such a connection is closed, and the next statement opens another.
    """
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.Error) and isinstance(code, int) and code & 0xFF == _SQLITE_READONLY


def _sqlite(proxy: Any) -> sqlite3.Connection:
    """The driver's connection behind a pool's proxy."""
    conn = proxy.dbapi_connection
    if not isinstance(conn, sqlite3.Connection):  # pragma: no cover - pysqlite is the only driver
        raise TypeError(f"not a sqlite3 connection: {type(conn).__name__}")
    return conn


class _Held:
    """The process's connection, its cursor, and the engine generation it was opened in."""

    __slots__ = ("__weakref__", "busy", "conn", "cursor", "generation", "pid", "set_up")

    def __init__(self, proxy: Any, generation: int) -> None:
        # The driver's connection only, not the pool's proxy of it (detached: the pool has let it
        # go): the proxy holds its pool, and through the pool's listeners its engine, which the
        # registry (keyed weakly by the engine) could then never let go, with its threads.
        self.conn = _sqlite(proxy)
        self.cursor = self.conn.cursor()
        self.generation = generation
        self.pid = current_pid()
        self.busy = False
        #: How many of :attr:`LocalConnections.setup` this connection has run.
        self.set_up = 0

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()


class _Slot:
    """Where the process's connection is kept (None until the first statement)."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held: _Held | None = None


class LocalConnections:
    """One connection per process for the statements of a SQLite engine, which its threads take
    in turn (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = weakref.ref(engine)
        self._slot = _Slot()
        #: Held by the thread using the connection, for one statement or transaction.
        self._use = threading.Lock()
        #: The thread holding :attr:`_use` (its ``threading.get_ident()``), 0 when none does.
        self._user = 0
        self._lock = threading.Lock()
        self._generation = 0
        self._held: weakref.WeakSet[_Held] = weakref.WeakSet()
        #: Statements each connection runs once, before its first statement (see :meth:`set_up`).
        self.setup: list[str] = []
        self.checkpoints = WalCheckpoints(self._engine)
        event.listen(engine, "engine_disposed", self._disposed)

    def forked(self) -> None:
        """In a forked child (see :func:`_after_fork_in_child`): fresh locks, no user."""
        self._use = threading.Lock()
        self._user = 0
        self._lock = threading.Lock()

    def _disposed(self, _engine: Engine) -> None:
        """``Engine.dispose``: close the connection; the next statement opens a new one."""
        with self._lock:
            self._generation += 1
            held, self._held = list(self._held), weakref.WeakSet()
        self.checkpoints.stop()
        for one in held:
            if not one.busy and one.pid == current_pid():
                one.close()

    def set_up(self, statements: list[str]) -> None:
        """Have the connection run ``statements`` once, before its next statement (a TEMP view and
        its trigger, say: they live as long as the connection, and only in it).  Not the
        connections lent from the pool to a thread already using this one (see :meth:`cursor`)."""
        with self._lock:
            if not all(sql in self.setup for sql in statements):
                self.setup = [*self.setup, *statements]

    def _open(self) -> _Held:
        engine = self._engine()
        if engine is None:  # pragma: no cover - the statements hold their engine
            raise sqlite3.ProgrammingError("the engine is gone")
        proxy = engine.raw_connection()
        try:
            proxy.detach()  # Ours until closed: never returned to the pool, so never reset there.
            for pragma in (
                f"wal_autocheckpoint={AUTOCHECKPOINT_PAGES}",
                f"journal_size_limit={WAL_SIZE_LIMIT}",
            ):
                _sqlite(proxy).execute(f"PRAGMA {pragma}")
        except BaseException:
            proxy.close()
            raise
        with self._lock:
            held = _Held(proxy, self._generation)
            self._held.add(held)
        return held

    @contextlib.contextmanager
    def cursor(self) -> Iterator[sqlite3.Cursor]:
        """The process's cursor, on a connection outside any transaction (autocommit), for this
        thread alone until the block ends (other threads wait for it).

        A thread already using the connection (a statement run from within a transaction's
        work) gets one of the engine's pool instead, as every statement did before.
        """
        me = threading.get_ident()
        if self._user == me:
            with self._pooled_cursor() as cur:
                yield cur
            return
        with self._use:
            self._user = me
            try:
                with self._held_cursor() as cur:
                    yield cur
            finally:
                self._user = 0

    @contextlib.contextmanager
    def _pooled_cursor(self) -> Iterator[sqlite3.Cursor]:
        engine = self._engine()
        assert engine is not None
        proxy = engine.raw_connection()
        try:
            # Without :attr:`setup`: a pooled connection may yet run a migration, which must not
            # meet TEMP objects of ours (a statement needing them fails, and its caller knows).
            yield _sqlite(proxy).cursor()
        finally:
            proxy.close()

    @contextlib.contextmanager
    def _held_cursor(self) -> Iterator[sqlite3.Cursor]:
        """The cursor of the process's connection (opened first if need be); under :attr:`_use`."""
        held = self._slot.held
        pid = current_pid()
        if held is None or held.generation != self._generation or held.pid != pid:
            if held is not None and held.pid == pid:
                held.close()
            elif held is not None:
                # Inherited over fork(): left alone, not even closed (SQLite: never use one in the child).
                _INHERITED.append(held)
            held = self._slot.held = None
            held = self._slot.held = self._open()
        held.busy = True
        try:
            if held.set_up != len(self.setup):
                setup = self.setup
                for sql in setup[held.set_up :]:
                    held.cursor.execute(sql)
                held.set_up = len(setup)
            yield held.cursor
        except BaseException as exc:
            if read_only(exc):
                # Opened read-only (see read_only): never used again.
                self._slot.held = None
                held.close()
                raise
            if held.conn.in_transaction:
                try:
                    held.cursor.execute("ROLLBACK")
                except sqlite3.Error:
                    # A connection that cannot roll back is not used again.
                    self._slot.held = None
                    held.close()
            raise
        finally:
            held.busy = False


class WalCheckpoints:
    """Checkpoints of the WAL in a daemon thread of this process (see the module docstring).

    :meth:`wrote` counts the writes; every :data:`CHECKPOINT_EVERY` of them (and, while any
    was written, every few seconds) the thread runs a passive checkpoint on a connection of
    its own.  Another process's checkpoint running at the time makes this one a no-op.
    """

    def __init__(self, engine: weakref.ref[Engine], every: int = CHECKPOINT_EVERY) -> None:
        self._engine = engine
        self.every = every
        self._writes = 0
        #: The running thread's wake-up call; None while no thread runs (in this process).
        self._wake: threading.Event | None = None
        self._pid = 0
        self._lock = threading.Lock()
        #: Checkpoints run (for tests and diagnostics).
        self.runs = 0

    def wrote(self) -> None:
        self._writes += 1
        wake = self._wake
        if wake is None or self._pid != current_pid():
            wake = self._start()
        if self._writes >= self.every:
            wake.set()

    def _start(self) -> threading.Event:
        with self._lock:
            if self._wake is None or self._pid != current_pid():
                self._pid, self._wake = current_pid(), threading.Event()
                stop = threading.Event()
                self._stop = stop
                threading.Thread(
                    target=self._run, args=(self._wake, stop), name="sts-wal-checkpoint", daemon=True
                ).start()
            return self._wake

    def stop(self) -> None:
        """End the thread (the engine was disposed of); the next write starts another."""
        with self._lock:
            wake, self._wake = self._wake, None
            if wake is not None:
                self._stop.set()
                wake.set()

    def _run(self, wake: threading.Event, stop: threading.Event) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                wake.wait(_MAX_INTERVAL)
                wake.clear()
                if stop.is_set() or self._engine() is None:
                    # Stopped, or its engine is gone (garbage, never disposed of: a test suite's
                    # thousand apps left as many threads, all waking every few seconds).
                    return
                if not self._writes:
                    # Idle: the connection goes, since through its pool it holds the engine, which
                    # could then never be garbage; the next checkpoint opens another.
                    if conn is not None:
                        with contextlib.suppress(sqlite3.Error):
                            conn.close()
                        conn = None
                    continue
                self._writes = 0
                engine = self._engine()
                if engine is None:
                    return
                try:
                    if conn is None:
                        proxy = engine.raw_connection()
                        proxy.detach()
                        conn = _sqlite(proxy)  # the driver's alone (see _Held)
                        del proxy
                        # A restart waits this long (ms) for the writer and the readers of the moment.
                        conn.execute(f"PRAGMA busy_timeout={RESTART_WAIT_MS}")
                    checkpoint(conn)
                    self.runs += 1
                except Exception as exc:  # noqa: BLE001 - the next round tries again
                    log.debug("WAL checkpoint not run: %s", exc)
                    if conn is not None:
                        conn.close()
                        conn = None
                del engine
                time.sleep(_MIN_INTERVAL)
        finally:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()


def checkpoint(conn: sqlite3.Connection) -> tuple[int, int]:
    """Copy the WAL into the database; when it has grown past :data:`RESTART_FRAMES`, restart it.

    A passive checkpoint copies what it can without taking a lock anyone waits for.  It
    never lets the WAL start over while writes keep coming (SQLite restarts it only when a
    writer finds every frame copied, https://www.sqlite.org/wal.html#avoiding_excessively_large_wal_files),
    so a long one is then checkpointed once more with ``RESTART``: that takes the write lock
    for the few frames written since and waits for the readers of the moment (the checkpoint
    thread's ``busy_timeout`` is :data:`RESTART_WAIT_MS`; writers wait meanwhile), so that the
    next writer starts the WAL over.  Returns the frames in
    the WAL and those copied, as SQLite reports them.
    """
    _busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    if frames > RESTART_FRAMES:
        _busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
    return int(frames), int(copied)
