"""The SQLite database's files on disk: created ``0600``, restricted when left wider, and refused
when another user could have put them there.

The audit trail names subjects, clients and addresses: only the service account may read it.
SQLite creates the ``-wal`` and ``-shm`` files with the database file's permission bits, so
creating the database file first, ``0600``, covers them too; existing ones wider than that are
restricted here.  Any command opens the database (``sts db current``, ``sts audit tail``), often
run as root, so nothing here may change a file that is not this database's own: an outside audit
had another user who could write in the database's directory plant ``sts.sqlite-shm`` as a
symbolic link to a file of root's, which a read-only command run by root then made ``0600``; and a
``database_url`` naming a file that is no database had its mode changed before SQLite refused it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

from ...errors import ConfigurationError

log = logging.getLogger(__name__)

#: The first 16 bytes of every SQLite database file ("The Database Header",
#: https://www.sqlite.org/fileformat.html#the_database_header).
SQLITE_HEADER = b"SQLite format 3\x00"
#: The files SQLite keeps beside a database in WAL mode (https://www.sqlite.org/tempfiles.html).
COMPANION_SUFFIXES = ("-wal", "-shm")
#: Opens a file as it is: never through a symbolic link, never waiting on a FIFO.
_OPEN_AS_IT_IS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def private_sqlite_files(database: str) -> None:
    """Create the SQLite file ``database`` ``0600`` (as the keys are), refuse one that another user
    may have planted, and restrict to their owner those left wider before.

    Refused, with :class:`~sts.errors.ConfigurationError` naming the file and nothing changed: a
    symbolic link or anything but a regular file in place of the database, its ``-wal`` or its
    ``-shm``, and, in a directory others may write in, a file of a user other than this process's
    or root or a file with more than one name (:func:`check_database_file`).  A file wider than
    ``0600`` is restricted only when this process's user owns it (root running a command on the
    service account's database leaves that account's files alone), and only once the database
    file's header says it is a SQLite database.

    Existing files are looked at with ``lstat`` and opened only to restrict them: opening and
    closing a file releases every POSIX lock this process holds on it (fcntl locks belong to the
    process, and any close drops them), so a connection already open in this process would lose
    its shared lock, and another process could then take itself for the last connection,
    checkpoint and delete the ``-wal`` and ``-shm`` files under it.  A file this process has open
    was restricted when its engine was made, so it is never opened here again.
    """
    if database in ("", ":memory:") or database.startswith("file:"):
        return
    try:
        shared = bool(stat.S_IMODE(os.stat(Path(database).absolute().parent).st_mode) & 0o022)
        found = _look_at(database, shared_directory=shared)  # before anything is made or changed
        if database not in found:
            try:
                # O_EXCL: only a file that does not exist yet is opened here, never through a link.
                flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                os.close(os.open(database, flags, 0o600))
            except FileExistsError:  # made meanwhile, by another process starting
                found = _look_at(database, shared_directory=shared)
    except OSError:
        return  # SQLite reports the problem when it opens the file, with its own message.
    wide = [(path, info) for path, info in found.items() if stat.S_IMODE(info.st_mode) & 0o077]
    mine = [(path, info) for path, info in wide if info.st_uid == os.geteuid()]
    for path, info in wide:
        if info.st_uid != os.geteuid():
            log.warning(
                "database file %s has mode %o but belongs to uid %d, not to this process's user: "
                "left as it is (its owner should restrict it to 600)",
                path,
                stat.S_IMODE(info.st_mode),
                info.st_uid,
            )
    if mine and _is_database(database, shared_directory=shared):
        for path, _info in mine:
            _restrict(path, shared_directory=shared)


def open_beside_database(path: str) -> int:
    """Open for reading and writing, creating it ``0600``, a small file of this service's beside
    the database (the ledger mark, the subject states' change counter): never through a symbolic
    link, and refused as the database's own files are (:func:`check_database_file`).  These were
    opened as they came: a link planted by another user who may write in the directory made a
    command run by root (``sts audit tail``) overwrite a file of root's (an outside re-check).
    Raises :class:`~sts.errors.ConfigurationError` when refused, ``OSError`` when it cannot be
    opened; the caller closes the descriptor."""
    shared = bool(stat.S_IMODE(os.stat(Path(path).absolute().parent).st_mode) & 0o022)
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    created = False
    try:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            created = True
        except FileExistsError:
            fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigurationError(
                f"database file {path} is a symbolic link: refused (another user who may write in "
                "its directory could have made it); remove the link"
            ) from None
        raise
    try:
        check_database_file(path, os.fstat(fd), shared_directory=shared)
        if created:
            _give_to_database_owner(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _give_to_database_owner(fd: int, path: str) -> None:
    """A file just made beside the database by another user than the database's owner (root
    running ``sts audit tail`` on the service account's database) goes to that owner, as SQLite
    gives it the ``-wal`` and ``-shm`` it makes: else the service could not open it and ran with
    its ledger mark off, while ready (an outside re-check)."""
    database = path.rpartition(".")[0]
    try:
        owner = os.stat(database, follow_symlinks=False)
    except OSError:
        return
    if owner.st_uid != os.geteuid() and os.geteuid() == 0:
        os.fchown(fd, owner.st_uid, owner.st_gid)


def _look_at(database: str, *, shared_directory: bool) -> dict[str, os.stat_result]:
    """The database file and its companions that exist, each checked (:func:`check_database_file`)."""
    found = {}
    for path in (database, *(database + suffix for suffix in COMPANION_SUFFIXES)):
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        check_database_file(path, info, shared_directory=shared_directory)
        found[path] = info
    return found


def check_database_file(path: str, info: os.stat_result, *, shared_directory: bool) -> None:
    """Raise :class:`~sts.errors.ConfigurationError` unless ``path`` (its ``lstat`` ``info``) may be
    the database, or its ``-wal`` or ``-shm``, of this process.

    A symbolic link is refused (SQLite itself follows one for the database file, and its
    ``-wal`` and ``-shm`` are then those beside the link's target; it refuses one in their place
    with its bare "unable to open database file"); so is anything but a regular file.  A file
    owned by neither this process's user nor root is refused in a directory that others than its
    owner may write in (``shared_directory``): another user may have put it there, to have this
    process write its database into, or read it from, a file of theirs; so is a file with more
    than one name there (a hard link to someone else's file).  In a directory only its
    owner may write in, whoever owns the files was put there by that owner (root running a command
    on the service account's database, whose ``-wal`` and ``-shm`` SQLite gives to that account).
    """
    if stat.S_ISLNK(info.st_mode):
        raise ConfigurationError(
            f"database file {path} is a symbolic link: refused (another user who may write in its "
            "directory could have made it); name the file itself in database_url, or remove the link"
        )
    if not stat.S_ISREG(info.st_mode):
        raise ConfigurationError(f"database file {path} is not a regular file: refused")
    if shared_directory and info.st_nlink > 1:
        raise ConfigurationError(
            f"database file {path} has {info.st_nlink} names (hard links), in a directory others may "
            "write in: refused (another user could have linked a file of someone else's there)"
        )
    if shared_directory and info.st_uid not in (os.geteuid(), 0):
        raise ConfigurationError(
            f"database file {path} belongs to uid {info.st_uid}, neither this process's user "
            f"(uid {os.geteuid()}) nor root, in a directory others may write in: refused; "
            "remove it, or keep the database in a directory only its owner may write in"
        )


def _open_as_it_is(path: str, *, shared_directory: bool) -> int | None:
    """``path`` opened for reading, never through a link, and checked again on the descriptor;
    None (with a warning) when it cannot be opened otherwise: then nothing of it is changed."""
    try:
        fd = os.open(path, _OPEN_AS_IT_IS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link put in its place since it was looked at
            raise ConfigurationError(f"database file {path} is a symbolic link: refused") from None
        log.warning("database file %s cannot be opened to restrict it: %s", path, exc.strerror)
        return None
    try:
        check_database_file(path, os.fstat(fd), shared_directory=shared_directory)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_database(database: str, *, shared_directory: bool) -> bool:
    """Whether ``database`` is empty (SQLite makes it a database) or starts with a SQLite database's
    header; :class:`~sts.errors.ConfigurationError` when it has content but not that header.
    False when it cannot be read: then nothing of it (nor of the files named after it) is changed."""
    fd = _open_as_it_is(database, shared_directory=shared_directory)
    if fd is None:
        return False
    try:
        header = os.pread(fd, len(SQLITE_HEADER), 0)
    except OSError as exc:
        log.warning("database file %s cannot be read: %s", database, exc.strerror)
        return False
    finally:
        os.close(fd)
    if header and header != SQLITE_HEADER:
        raise ConfigurationError(
            f"database file {database} is not a SQLite database (it does not start with "
            "'SQLite format 3'): refused, and left as it is"
        )
    return True


def _restrict(path: str, *, shared_directory: bool) -> None:
    """Restrict ``path`` to its owner, on the file opened (``fchmod``), not on what its name may
    point to by then."""
    fd = _open_as_it_is(path, shared_directory=shared_directory)
    if fd is None:
        return
    try:
        info = os.fstat(fd)
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid != os.geteuid() or not mode & 0o077:
            return  # Replaced since it was looked at: not this process's to change.
        os.fchmod(fd, mode & 0o700)
        log.warning("database file %s had mode %o; restricted to %o", path, mode, mode & 0o700)
    except OSError as exc:
        log.warning("database file %s cannot be restricted to its owner: %s", path, exc.strerror)
    finally:
        os.close(fd)
