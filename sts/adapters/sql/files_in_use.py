"""SQLite: whether the files a process writes are still the ones at their paths (checked by
readiness, and by the audit sink before its commits)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from sqlalchemy import Engine

log = logging.getLogger(__name__)

#: Free bytes below which the database's file system counts as full (readiness: ``database``).
MIN_FREE_BYTES = 1 << 20


class SqliteFile:
    """The SQLite files this process writes are still the ones at their paths.

    Deleting or replacing the database file, its ``-wal`` or their directory does not stop
    the process's connections: they write on into files no one can open again (a new
    connection, a CLI command, makes a new empty ``-wal`` beside them), and a crash, or the
    last connection's close, loses what they hold.  So each check compares the files this
    process has open (Linux: ``/proc/self/fd``) with the files at the paths; readiness
    reports ``database`` while they differ.  Elsewhere only the database file's identity
    (device and inode, as first seen) is compared.
    """

    def __init__(self, path: str, fd_directory: str = "/proc/self/fd") -> None:
        #: The path as configured: what a new connection (another worker, the CLI) opens, through
        #: any symbolic link in it as it is now.
        self.configured = os.path.abspath(path)
        # As /proc/self/fd names the files this process opened: absolute, links resolved then.
        self.path = os.path.realpath(path)
        self.fd_directory = fd_directory
        self.identity = _identity(self.configured)
        #: The ``-wal`` and ``-shm`` this process had open at the last check that found nothing wrong.
        self.held_identities: dict[str, tuple[int, int] | None] = {}

    def moved(self) -> bool:
        """Whether the database file, or the ``-wal`` or ``-shm`` the last good check found in use,
        is another file at its path now (three ``stat`` calls: cheap enough for every commit, where
        :meth:`problem` reads every open file's link).  True only says to check again."""
        if _identity(self.configured) != self.identity:
            return True
        return any(
            held is not None and _identity(self.configured + suffix) != held
            for suffix, held in self.held_identities.items()
        )

    def problem(self) -> str | None:
        """What is wrong with the files, or None.  The ``-shm`` too: a connection that keeps using a
        deleted one overwrites what connections opened since (another worker, the CLI) committed
        (an outside review lost every row another process committed after the deletion)."""
        identity = _identity(self.configured)
        if identity is None:
            return "the database file is gone"
        if self.identity is None:
            self.identity = identity
        elif identity != self.identity:
            return "the database file was replaced"
        for suffix in ("", "-wal", "-shm"):
            held = self._held(self.path + suffix)
            if held is not None and held != _identity(self.configured + suffix):
                return f"{os.path.basename(self.path + suffix)} in use was deleted or replaced"
            if suffix:
                self.held_identities[suffix] = held
        return None

    def space_problem(self) -> str | None:
        """Whether the file system holding the database has less than :data:`MIN_FREE_BYTES` left
        for this process (then a commit that must grow the ``-wal`` or the file soon fails: an
        outside audit filled the disk, and readiness said ready for seconds after every grant
        had failed, as a short check commit still fitted in the reused ``-wal``)."""
        try:
            found = os.statvfs(os.path.dirname(self.path))
        except OSError:
            return None  # the file checks say what is wrong with the directory
        free = found.f_bavail * found.f_frsize
        if free < MIN_FREE_BYTES:
            return f"the disk holding the database is full ({free // 1024} KiB free)"
        return None

    def _held(self, name: str) -> tuple[int, int] | None:
        """The identity of a file of that name this process has open (one deleted since has
        ``(0, 0)``); None when it has none open, or cannot tell."""
        try:
            fds = os.listdir(self.fd_directory)
        except OSError:
            return None
        for fd in fds:
            try:
                target = os.readlink(os.path.join(self.fd_directory, fd))
            except OSError:
                continue
            if target == name + " (deleted)":
                return 0, 0
            if target == name:
                try:
                    found = os.stat(os.path.join(self.fd_directory, fd))
                except OSError:
                    continue
                return found.st_dev, found.st_ino
        return None


class WatchedFile:
    """:meth:`SqliteFile.problem` for the request path: checked at most every ``interval`` seconds
    (reading ``/proc/self/fd`` costs a system call per open file, client sockets included), the
    last answer given in between.  A problem stays: the process's connections hold the old files
    until it restarts.

    ``before_commit``: the files are also looked at (:meth:`SqliteFile.moved`, three ``stat``
    calls) and checked at once if one is another file now, so that no grant is committed into a file
    replaced since the last check (an outside fault campaign had ten grants answered in the 0.13 s
    after the database file was deleted, their records in a file no one could open again)."""

    def __init__(
        self, file: SqliteFile, interval: float = 1.0, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.file, self.interval, self._monotonic = file, interval, monotonic
        self._lock = threading.Lock()
        self._next = -1.0
        self._problem: str | None = None

    def problem(self, *, before_commit: bool = False) -> str | None:
        if self._problem is not None:
            return self._problem
        if self._monotonic() < self._next and not (before_commit and self.file.moved()):
            return None
        with self._lock:
            if self._problem is None:
                self._next = self._monotonic() + self.interval
                self._problem = self.file.problem()
                if self._problem is not None:
                    log.error("SQLite: %s: nothing more is committed; restart the process", self._problem)
        return self._problem


def _identity(path: str) -> tuple[int, int] | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def sqlite_file(engine: Engine) -> SqliteFile | None:
    """The SQLite file of ``engine`` to watch (None for PostgreSQL or an in-memory database)."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    return SqliteFile(database) if database and database != ":memory:" else None
