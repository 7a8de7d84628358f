"""SQLite: whether the files a process writes are still the ones at their paths (a readiness check)."""

from __future__ import annotations

import os

from sqlalchemy import Engine


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
        # As /proc/self/fd names the files: absolute, with symbolic links resolved.
        self.path = os.path.realpath(path)
        self.fd_directory = fd_directory
        self.identity = _identity(self.path)

    def problem(self) -> str | None:
        """What is wrong with the files, or None."""
        identity = _identity(self.path)
        if identity is None:
            return "the database file is gone"
        if self.identity is None:
            self.identity = identity
        elif identity != self.identity:
            return "the database file was replaced"
        for name in (self.path, self.path + "-wal"):
            held = self._held(name)
            if held is not None and held != _identity(name):
                return f"{os.path.basename(name)} in use was deleted or replaced"
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
