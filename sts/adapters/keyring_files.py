"""The key ring's directory on disk: permissions, the lock, and crash-safe writes.

Layout of the directory (created ``0700``)::

    keyring.json      metadata: one entry per key (kid, alg, state, times),
                      see :mod:`sts.adapters.keyring_metadata`
    <kid>.pem         the private key, PKCS#8 PEM, mode 0600, optionally
                      encrypted at rest with a passphrase
                      (see :mod:`sts.adapters.signing_keys`)
    .keyring.lock     lock file: writers hold an exclusive flock(2) on it,
                      readers a shared one

Rotation runs in another process (the CLI) while servers are serving, so
``keyring.json`` and every PEM are written to a temporary file and renamed
over the target with :func:`os.replace` (readers see the old or the new file,
never half of one), under the exclusive lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import stat
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Final

from sts.errors import ConfigurationError

# The key ring's modules log under one name, so one logging setting covers all of it.
logger = logging.getLogger("sts.adapters.keyring")

LOCK_FILE: Final = ".keyring.lock"

# An RFC 7638 SHA-256 thumbprint is 32 bytes, i.e. 43 base64url characters.  The
# pattern also keeps ``<kid>.pem`` inside the key directory.
KID_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{43}")


def key_file(directory: Path, kid: str) -> Path:
    """Where the private key ``kid`` is kept."""
    return directory / f"{kid}.pem"


def ensure_directory(directory: Path) -> None:
    """Create ``directory`` (``0700``), or restrict an existing one that others can read; refuse
    one that belongs to another user (:func:`check_owner`) before changing anything in it."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
    except OSError as exc:
        raise ConfigurationError(f"cannot create key directory {directory}: {exc.strerror}") from None
    check_owner(directory, info, "key directory")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        # Only the service account may list or read the key files.
        try:
            directory.chmod(0o700)
        except OSError as exc:
            logger.warning(
                "key directory %s has mode %o and cannot be restricted: %s", directory, mode, exc.strerror
            )
        else:
            logger.warning("key directory %s had mode %o; restricted to 700", directory, mode)


def check_owner(
    path: Path, info: os.stat_result, what: str, *, risk: str = "its owner could replace the signing keys"
) -> None:
    """Raise :class:`ConfigurationError` unless ``path`` (``info``, its ``stat`` or ``fstat``, of
    the file itself and not of a link to it) belongs to this process's user or to root.

    The owner of the key directory may replace the key ring at any time (whatever its mode: an
    owner may change that back), and the owner of ``keyring.json`` or of a key file may rewrite
    it: the service would then sign with, and publish, keys of theirs.  An outside audit had
    another local user create ``keys_dir`` before the first start, the service adopt it (only
    restricting its mode) and write its keys there, and that user then swap in a key ring of
    their own, which ``sts keys list`` showed active.  As OpenSSH does for its key files
    (``StrictModes``), the files must be the service's own; root's are accepted too, as OpenSSH
    accepts them: only root could have made them, and Kubernetes mounts a Secret's files (links
    into ``..data``) owned by root, whichever user the service runs as.
    """
    if info.st_uid not in (os.geteuid(), 0):
        raise ConfigurationError(
            f"{what} {path} belongs to uid {info.st_uid}, neither this service's user "
            f"(uid {os.geteuid()}) nor root: refused, as {risk}; "
            "give it to the service's user (chown), or remove it for a new one"
        )


def check_creatable(directory: Path) -> None:
    """What :func:`ensure_directory` would meet, without creating anything (``sts config check``):
    ``directory``, or its nearest existing ancestor, must be a directory this process may write
    in; else :class:`ConfigurationError`, with the message a start would give."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = "File exists" if existing == directory else "Not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = "Permission denied"
    if problem is not None:
        raise ConfigurationError(f"cannot create key directory {directory}: {problem}")
    if existing == directory:
        check_owner(directory, directory.stat(), "key directory")


@contextlib.contextmanager
def ring_lock(directory: Path, *, exclusive: bool, blocking: bool) -> Iterator[bool]:
    """Hold flock(2) on the ring's lock file; yield whether it was taken.

    A shared lock on a read-only directory without a lock file is skipped:
    nobody can be writing there.
    """
    path = directory / LOCK_FILE
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exclusive or exc.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise ConfigurationError(f"cannot open key ring lock {path}: {exc.strerror}") from None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            yield True
            return
        except OSError as exc2:
            raise ConfigurationError(f"cannot open key ring lock {path}: {exc2.strerror}") from None
    try:
        operation = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        if not blocking:
            operation |= fcntl.LOCK_NB
        try:
            fcntl.flock(fd, operation)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def write_file_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600: a new temporary file, fsync, then ``os.replace``."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(temporary, flags, 0o600)
    except OSError as exc:
        raise ConfigurationError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    fsync_directory(path.parent)


#: Present while a first start creates the ring's keys (removed once ``keyring.json`` is written):
#: key files beside it are that unfinished creation's, which never signed anything.
CREATING_FILE: Final = ".keyring.creating"


def refuse_orphaned_keys(directory: Path, metadata_file: str) -> None:
    """Raise :class:`ConfigurationError` when ``directory`` holds key files (``<kid>.pem``) but no
    key ring (its ``metadata_file`` is missing; the caller has looked), unless a first start that
    created them was cut short (:data:`CREATING_FILE` is there: they never signed anything).

    Keys without their ring are a lost or moved ``keyring.json``: a new ring made over them would
    sign with keys no resource server knows, cut off every token issued, and ``keys prune`` would
    then delete the old keys (an outside audit had ``sts keys list`` do all of that).  Other
    ``.pem`` files (a TLS certificate kept there) are no key of the ring."""
    if (directory / CREATING_FILE).exists():
        return
    orphans = sorted(path.name for path in directory.glob("*.pem") if KID_PATTERN.fullmatch(path.stem))
    if orphans:
        shown = ", ".join(orphans[:3]) + (", ..." if len(orphans) > 3 else "")
        raise ConfigurationError(
            f"keys_dir {directory} holds key files ({shown}) but no {metadata_file}: restore it "
            "(from a backup), or move the key files away to start a new key ring"
        )


def delete_unlisted_key_files(directory: Path, listed: Collection[str]) -> None:
    """Delete every ``<kid>.pem`` whose kid is not ``listed``, then make that durable.

    Such files are pruned keys, or keys left by a crash between writing a key
    and recording it.
    """
    for path in directory.glob("*.pem"):
        if KID_PATTERN.fullmatch(path.stem) and path.stem not in listed:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    fsync_directory(directory)


def fsync_directory(directory: Path) -> None:
    """Make renames and deletions in ``directory`` durable (best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
