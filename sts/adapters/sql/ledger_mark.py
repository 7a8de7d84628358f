"""SQLite: noticing that the database lost grants it had committed, so that their tokens stay spent.

The embedded store keeps spent single uses (subject tokens, DPoP proofs' ``jti``, client
assertions) in the database, which "never forgets" only while nothing is lost.  Two things
lose its newest commits: its ``-wal`` deleted or replaced under the running service (the
commits not yet checkpointed go with it), and an older copy restored.  An outside
fault-injection audit exchanged tokens spent before either a second time, with nothing logged.
The Redis store has its ledger epoch for this (:mod:`sts.adapters.redis.epoch`); this is
SQLite's counterpart.

A small memory-mapped file beside the database (``<database>.ledger-mark``, 16 bytes) holds
two times on the service's clock: the start of the newest grant committed, written after each
commit by every process (a memory store: no system call), and the time a loss was found, if
one was.  A loss is found

* at start (:meth:`LedgerMark.check`): the database holds no record as new as the newest grant
  the mark says was committed;
* while serving: the audit sink finds its file deleted or replaced (:meth:`LedgerMark.lost`).

From then on a credential that could have been accepted before the loss (its ``valid_from``
earlier, or unknown) is refused, :class:`~sts.core.ports.ReplayWindowLost`, as with Redis, for
:data:`LOSS_HORIZON` seconds: longer than any credential here lives.  The mark's file is not
synced to disk: a power loss can lose it too (as it loses the WAL's last commits).
"""

from __future__ import annotations

import datetime as dt
import logging
import mmap
import os
import struct
import threading
import weakref
from pathlib import Path

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from ...core.ports import ReplayWindowLost, StoreUnavailable
from ...errors import ConfigurationError
from .files_in_use import WatchedFile, sqlite_file
from .schema import audit_events
from .sqlite_files import open_beside_database

log = logging.getLogger(__name__)

#: Seconds between attempts to open a mark file that could not be opened.
RETRY_INTERVAL = 1.0
#: Seconds after a loss during which credentials that predate it are refused.
LOSS_HORIZON = 86400.0
_LAYOUT = struct.Struct("<dd")  # the newest grant's start, the loss (0.0: none)

_MARKS: weakref.WeakKeyDictionary[Engine, LedgerMark | None] = weakref.WeakKeyDictionary()
_MARKS_LOCK = threading.Lock()


class LedgerMark:
    """The mark of one SQLite database (see the module docstring).

    A mark file that cannot be opened (a directory in its place, a read-only mount, a full disk)
    is tried again, at most once every :data:`RETRY_INTERVAL` seconds, by each use and by
    readiness; until it opens every credential is refused, :class:`StoreUnavailable` (a ``503``),
    and the instance is not ready: without the mark, a restored older copy of the database would
    accept spent tokens again (an outside re-check had ``/token`` grant while ``/readyz`` said not
    ready).  Once it opens, the database is checked against it as at start (:meth:`check`).
    """

    def __init__(self, path: Path, watched: WatchedFile | None = None, engine: Engine | None = None) -> None:
        #: This process's SQLite files, checked before a credential is (see :meth:`check_use`).
        self.watched = watched
        self.path = path
        # Weakly: the mark is the value of a weak-keyed map keyed by this engine (_MARKS), which a
        # strong reference would keep alive for ever, and with it the engine's threads.
        self._engine = weakref.ref(engine) if engine is not None else None
        self._noticed = False
        self._map: mmap.mmap | None = None
        #: Why the mark file could not be opened, while it cannot; None once open.
        self.problem: str | None = None
        self._next_try = 0.0
        self._opening = threading.Lock()
        self._map = self._open()

    def _open(self) -> mmap.mmap | None:
        """The mark file opened (or created) and mapped; None, with :attr:`problem` set, when it
        cannot be (an ``OSError``).  A :class:`~sts.errors.ConfigurationError` (a link or another
        user's file in its place) is raised."""
        try:
            fd = open_beside_database(str(self.path))  # never through a link (see sqlite_files)
        except OSError as exc:
            self.problem = f"{self.path}: {exc.strerror or type(exc).__name__}"
            return None
        try:
            if os.fstat(fd).st_size < _LAYOUT.size:
                os.pwrite(fd, bytes(_LAYOUT.size), 0)
            mapped = mmap.mmap(fd, _LAYOUT.size)
        except OSError as exc:
            self.problem = f"{self.path}: {exc.strerror or type(exc).__name__}"
            return None
        finally:
            os.close(fd)
        self.problem = None
        return mapped

    def reopen(self, now: float) -> str | None:
        """While the mark is not open: try again (at most once every :data:`RETRY_INTERVAL`
        seconds), and check the database against it as at start before it is used: until that
        check is done every credential is still refused (an outside re-check had one accepted
        while the check's query ran).  The problem left, or None."""
        if self._map is not None:
            return None
        if not self._opening.acquire(blocking=False):  # another thread opens it: no waiting
            return f"{self.path}: being opened and checked against the database"
        try:
            if self._map is None and now >= self._next_try:
                self._next_try = now + RETRY_INTERVAL
                try:
                    opened = self._open()
                except ConfigurationError as exc:
                    opened, self.problem = None, str(exc)
                if opened is not None:
                    try:
                        engine = self._engine() if self._engine is not None else None
                        if engine is not None:
                            _check(opened, engine, now)
                    except SQLAlchemyError as exc:
                        opened.close()
                        self.problem = f"the database could not be checked against it: {type(exc).__name__}"
                    else:
                        log.warning("the database's ledger mark %s is open now", self.path)
                        self._map = opened
            return None if self._map is not None else self.problem
        finally:
            self._opening.release()

    def _read(self) -> tuple[float, float]:
        return _read(self._map) if self._map is not None else (0.0, 0.0)

    def granted(self, started: float) -> None:
        """A grant whose request started at ``started`` is committed (an 8-byte store, atomic)."""
        if self._map is not None and started > self._read()[0]:
            self._map[0:8] = struct.pack("<d", started)

    def lost(self, now: float) -> None:
        """The database lost commits, found at ``now``."""
        if self._map is not None:
            _lost(self._map, now)

    def check_use(self, valid_from: float | None, now: float) -> None:
        """Raise :class:`ReplayWindowLost` for a credential the lost commits may have spent.

        First, :class:`StoreUnavailable` while the files this process writes are deleted or
        replaced (:class:`~.files_in_use.WatchedFile`): nothing can be committed until it
        restarts, so every request is a ``503``, as readiness says, rather than a ``400`` that
        asks for fresh credentials, which an outside audit had answered to new ones too (their
        ``iat`` less the leeway precedes a loss found a moment ago) for a minute and more."""
        problem = self.watched.problem() if self.watched is not None else None
        if problem is not None:
            if not self._noticed:  # the commits in those files are lost (as the audit sink marks)
                self._noticed = True
                self.lost(now)
            raise StoreUnavailable(f"the database: {problem} (restart the process)")
        if self._map is None:
            unopened = self.reopen(now)
            if unopened is not None:
                raise StoreUnavailable(f"the database's ledger mark cannot be opened: {unopened}")
        lost = self._read()[1]
        if lost and now - lost < LOSS_HORIZON and (valid_from is None or valid_from < lost):
            raise ReplayWindowLost(lost)

    def check(self, engine: Engine, now: float) -> None:
        """At start: a database holding nothing as new as the newest grant committed has lost it
        (see :func:`_check`); a mark not open yet is checked once it opens (:meth:`reopen`)."""
        if self._map is not None:
            _check(self._map, engine, now)


def _read(mapped: mmap.mmap) -> tuple[float, float]:
    newest, lost = _LAYOUT.unpack(mapped[: _LAYOUT.size])
    return float(newest), float(lost)


def _lost(mapped: mmap.mmap, now: float) -> None:
    if _read(mapped)[1] < now:
        mapped[8:16] = struct.pack("<d", now)


def _check(mapped: mmap.mmap, engine: Engine, now: float) -> None:
    """A database holding nothing as new as the newest grant the mark ``mapped`` says was committed
    has lost it: the loss is marked.

    Only a grant of the last :data:`LOSS_HORIZON` seconds counts: an older one's credentials
    have expired, and ``sts audit prune`` removes only records older than a day, so a trail
    pruned to nothing is no loss."""
    newest_grant = _read(mapped)[0]
    if not newest_grant or now - newest_grant >= LOSS_HORIZON:
        return
    with engine.connect() as conn:
        newest = conn.execute(select(func.max(audit_events.c.time))).scalar()
    newest_time = _epoch(newest)
    if newest_time is not None and newest_time + 1e-6 >= newest_grant:
        return
    _lost(mapped, now)
    log.error(
        "the database %s has lost commits (its newest record is older than the newest grant "
        "committed: its -wal deleted, or an older copy restored); credentials that could have "
        "been accepted before now (issued before now plus the leeway) are refused as possibly "
        "spent, for %d hours",
        engine.url.database,
        LOSS_HORIZON // 3600,
    )


def _epoch(value: object) -> float | None:
    """A stored audit time (a datetime, or SQLite's text of one) in epoch seconds."""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.timestamp()
    return None


def ledger_mark(engine: Engine) -> LedgerMark | None:
    """The mark of a SQLite file engine (one per engine and process); None for another database or
    an in-memory one.  A mark file that cannot be opened is logged, and tried again
    (:meth:`LedgerMark.reopen`): until then the mark refuses every credential, and readiness
    reports it."""
    with _MARKS_LOCK:
        if engine in _MARKS:
            return _MARKS[engine]
        database = engine.url.database if engine.dialect.name == "sqlite" else None
        mark = None
        if database and database != ":memory:" and not database.startswith("file:"):
            try:
                file = sqlite_file(engine)
            except OSError as exc:
                log.warning("the database's files cannot be watched: %s", exc)
                file = None
            mark = LedgerMark(Path(f"{database}.ledger-mark"), WatchedFile(file) if file else None, engine)
            if mark.problem is not None:
                log.error(
                    "the database's ledger mark cannot be opened (%s): every credential is refused "
                    "(503) and the instance is not ready until it can be; it is tried again every %d s",
                    mark.problem,
                    RETRY_INTERVAL,
                )
        _MARKS[engine] = mark
        return mark


def check_at_start(mark: LedgerMark, engine: Engine, now: float) -> None:
    """:meth:`LedgerMark.check`, where a database that cannot be read now is left to readiness."""
    try:
        mark.check(engine, now)
    except SQLAlchemyError as exc:
        log.warning("could not check the database for lost commits: %s", type(exc).__name__)
