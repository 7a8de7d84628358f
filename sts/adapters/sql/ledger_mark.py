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
from .files_in_use import WatchedFile, sqlite_file
from .schema import audit_events
from .sqlite_files import open_beside_database

log = logging.getLogger(__name__)

#: Seconds after a loss during which credentials that predate it are refused.
LOSS_HORIZON = 86400.0
_LAYOUT = struct.Struct("<dd")  # the newest grant's start, the loss (0.0: none)

_MARKS: weakref.WeakKeyDictionary[Engine, LedgerMark | None] = weakref.WeakKeyDictionary()
_MARKS_LOCK = threading.Lock()


class LedgerMark:
    """The mark of one SQLite database (see the module docstring)."""

    def __init__(self, path: Path, watched: WatchedFile | None = None) -> None:
        #: This process's SQLite files, checked before a credential is (see :meth:`check_use`).
        self.watched = watched
        self._noticed = False
        fd = open_beside_database(str(path))  # never through a link (see sqlite_files)
        try:
            if os.fstat(fd).st_size < _LAYOUT.size:
                os.pwrite(fd, bytes(_LAYOUT.size), 0)
            self._map = mmap.mmap(fd, _LAYOUT.size)
        finally:
            os.close(fd)
        self.path = path

    def _read(self) -> tuple[float, float]:
        newest, lost = _LAYOUT.unpack(self._map[: _LAYOUT.size])
        return float(newest), float(lost)

    def granted(self, started: float) -> None:
        """A grant whose request started at ``started`` is committed (an 8-byte store, atomic)."""
        if started > self._read()[0]:
            self._map[0:8] = struct.pack("<d", started)

    def lost(self, now: float) -> None:
        """The database lost commits, found at ``now``."""
        if self._read()[1] < now:
            self._map[8:16] = struct.pack("<d", now)

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
        lost = self._read()[1]
        if lost and now - lost < LOSS_HORIZON and (valid_from is None or valid_from < lost):
            raise ReplayWindowLost(lost)

    def check(self, engine: Engine, now: float) -> None:
        """At start: a database holding nothing as new as the newest grant committed has lost it.

        Only a grant of the last :data:`LOSS_HORIZON` seconds counts: an older one's credentials
        have expired, and ``sts audit prune`` removes only records older than a day, so a trail
        pruned to nothing is no loss."""
        newest_grant = self._read()[0]
        if not newest_grant or now - newest_grant >= LOSS_HORIZON:
            return
        with engine.connect() as conn:
            newest = conn.execute(select(func.max(audit_events.c.time))).scalar()
        newest_time = _epoch(newest)
        if newest_time is not None and newest_time + 1e-6 >= newest_grant:
            return
        self.lost(now)
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
    """The mark of a SQLite file engine (one per engine and process); None for another database,
    an in-memory one, or a directory the mark cannot be made in (logged: readiness reports on
    the database itself)."""
    with _MARKS_LOCK:
        if engine in _MARKS:
            return _MARKS[engine]
        database = engine.url.database if engine.dialect.name == "sqlite" else None
        mark = None
        if database and database != ":memory:" and not database.startswith("file:"):
            try:
                file = sqlite_file(engine)
                mark = LedgerMark(Path(f"{database}.ledger-mark"), WatchedFile(file) if file else None)
            except OSError as exc:
                log.warning("lost commits of the database will not be noticed: %s", exc)
        _MARKS[engine] = mark
        return mark


def check_at_start(mark: LedgerMark, engine: Engine, now: float) -> None:
    """:meth:`LedgerMark.check`, where a database that cannot be read now is left to readiness."""
    try:
        mark.check(engine, now)
    except SQLAlchemyError as exc:
        log.warning("could not check the database for lost commits: %s", type(exc).__name__)
