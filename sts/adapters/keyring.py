"""The service's own signing keys: a key ring in a directory, rotated publish-before-use.

Layout of the directory (created ``0700``)::

    keyring.json      metadata: one entry per key (kid, alg, state, times)
    <kid>.pem         the private key, PKCS#8 PEM, mode 0600, optionally
                      encrypted at rest with a passphrase
    .keyring.lock     lock file: writers hold an exclusive flock(2) on it,
                      readers a shared one

Every ``kid`` is the RFC 7638 JWK thumbprint (SHA-256, base64url) of the
public key, computed by joserfc, so a ``kid`` names exactly one key and is
re-checked whenever a PEM file is loaded.

Publish-before-use rotation
---------------------------

Relying parties cache our JWK Set (RFC 7517 §5) for a while.  A key that
starts signing the moment it is created would produce tokens those caches
cannot verify yet.  So the ring always holds a ``next`` key that is published
in the JWK Set but never signs::

    state:   next ──rotate──▶ active ──rotate──▶ retired ──prune──▶ (deleted)
    signs:    no               yes               no
    JWKS:     yes              yes               yes, until publish_until

:meth:`KeyRing.rotate` promotes ``next`` to ``active`` (refusing when it has
been published for less than ``min_published`` seconds, i.e. shorter than
relying parties' JWKS cache lifetime), retires the former active key, which
stays published until every token it signed has expired
(``publish_until = now + max_token_lifetime + 60 s`` of clock skew), and
creates a fresh ``next`` key.  :meth:`KeyRing.prune` deletes retired keys once
``publish_until`` has passed.

Rotation runs in another process (the CLI) while servers are serving, so
``keyring.json`` and every PEM are written to a temporary file and renamed
over the target with :func:`os.replace` (readers see the old or the new file,
never half of one), under the exclusive lock; a running server notices the
change with :meth:`KeyRing.reload_if_changed`, which costs at most one
``stat`` per ``check_interval``.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import json
import logging
import math
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias

from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    KeySerializationEncryption,
    NoEncryption,
    PrivateFormat,
)
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, Key, KeyParameters, KeySet, OKPKey, RSAKey

from sts.errors import ConfigurationError

from .jwks import StaticJWKS

logger = logging.getLogger(__name__)

KeyState: TypeAlias = Literal["next", "active", "retired"]
AsymmetricJWK: TypeAlias = ECKey | RSAKey | OKPKey

METADATA_FILE: Final = "keyring.json"
LOCK_FILE: Final = ".keyring.lock"
METADATA_FORMAT: Final = 1
DEFAULT_ALG: Final = "ES256"
DEFAULT_CHECK_INTERVAL: Final = 5.0
#: Added to ``max_token_lifetime`` when a key retires: relying parties' clocks may run late.
ROTATION_SKEW_SECONDS: Final = 60
RSA_KEY_SIZE: Final = 3072
#: RFC 8725 §3.5 / NIST SP 800-131A: refuse to load weaker RSA keys.
RSA_MIN_KEY_SIZE: Final = 2048

# An RFC 7638 SHA-256 thumbprint is 32 bytes, i.e. 43 base64url characters.  The
# pattern also keeps ``<kid>.pem`` inside the key directory.
_KID_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{43}")
_STATES: Final[frozenset[str]] = frozenset({"next", "active", "retired"})


@dataclass(frozen=True, slots=True)
class _AlgorithmSpec:
    key_type: Literal["EC", "RSA", "OKP"]
    curve: str | None


#: The JWS algorithms a key of this ring may use (RFC 7518 §3.1, RFC 8037 §3.1,
#: RFC 9864 §2.2).  ``EdDSA`` is the RFC 8037 name, which most relying parties
#: understand; RFC 9864 deprecates it for the fully specified ``Ed25519``, and
#: joserfc emits a ``SecurityWarning`` whenever ``EdDSA`` is used.
SUPPORTED_ALGORITHMS: Final[Mapping[str, _AlgorithmSpec]] = {
    "ES256": _AlgorithmSpec("EC", "P-256"),
    "ES384": _AlgorithmSpec("EC", "P-384"),
    "RS256": _AlgorithmSpec("RSA", None),
    "PS256": _AlgorithmSpec("RSA", None),
    "EdDSA": _AlgorithmSpec("OKP", "Ed25519"),
    "Ed25519": _AlgorithmSpec("OKP", "Ed25519"),
}


class KeyRotationRefused(ConfigurationError):
    """:meth:`KeyRing.rotate` will not promote the ``next`` key now (see the message)."""


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One key of the ring as recorded in ``keyring.json`` (times are Unix seconds).

    ``publish_until`` is set on retired keys only: the key stays in the JWK Set
    until then, so every token it signed can still be verified.
    """

    kid: str
    alg: str
    state: KeyState
    created_at: float
    activated_at: float | None = None
    retired_at: float | None = None
    publish_until: float | None = None


class KeySigner:
    """Signs with the active key; satisfies :class:`sts.core.ports.Signer`.

    The private key was parsed when the ring was loaded; signing never touches
    the disk.  ``repr`` shows the ``kid`` only.
    """

    __slots__ = ("_alg", "_key", "_kid")

    def __init__(self, key: AsymmetricJWK, kid: str, alg: str) -> None:
        self._key = key
        self._kid = kid
        self._alg = alg

    @property
    def alg(self) -> str:
        return self._alg

    @property
    def kid(self) -> str:
        return self._kid

    def sign(self, header: Mapping[str, Any], claims: Mapping[str, Any]) -> str:
        """Return the compact JWS (RFC 7515 §7.1) of ``claims``.

        ``alg`` and ``kid`` are set here, overriding any value in ``header``;
        the caller supplies the rest (``typ: at+jwt`` for RFC 9068 tokens).
        No ``typ`` is added when the caller gives none.
        """
        protected = {**header, "alg": self._alg, "kid": self._kid}
        return jwt.encode(protected, dict(claims), self._key, algorithms=[self._alg], default_type=None)

    def __repr__(self) -> str:
        return f"KeySigner(kid={self._kid!r}, alg={self._alg!r})"


# (st_dev, st_ino, st_mtime_ns, st_size) of keyring.json.  Every write replaces
# the file, so the inode changes even when the mtime resolution is coarse.
_FileId: TypeAlias = tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """Everything a request needs, parsed once and swapped as a whole."""

    entries: tuple[KeyEntry, ...]
    signer: KeySigner
    jwks: Mapping[str, Any]
    public_keys: tuple[AsymmetricJWK, ...]
    file_id: _FileId


class KeyRing:
    """The key ring in one directory.  Create it with :meth:`KeyRing.open`.

    Reading methods (:meth:`signer`, :meth:`public_jwks`, :meth:`entries`,
    :meth:`verification_keys`) use an immutable snapshot that
    :meth:`reload_if_changed` replaces atomically, so they are thread-safe and
    never block or touch the disk.  Callers should ask for :meth:`signer`
    for every token rather than keep it, so a rotation takes effect.
    """

    def __init__(
        self,
        directory: Path,
        *,
        passphrase: bytes | None = None,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
    ) -> None:
        if passphrase is not None and len(passphrase) == 0:
            raise ConfigurationError("the key passphrase (STS_KEY_PASSPHRASE) must not be empty")
        if not math.isfinite(check_interval) or check_interval < 0:
            raise ConfigurationError("check_interval must be a non-negative number of seconds")
        self._directory = Path(directory)
        self._passphrase = passphrase
        self._check_interval = check_interval
        self._snapshot: _Snapshot | None = None
        self._last_check = -math.inf
        self._reload_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        passphrase: bytes | None = None,
        create_alg: str = DEFAULT_ALG,
        now: float | None = None,
        create: bool = True,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
    ) -> KeyRing:
        """Load the key ring in ``directory``, first creating it when empty and ``create``.

        Creation makes the directory (``0700``) and two ``create_alg`` keys, one
        ``active`` and one ``next`` (see :meth:`initialize`).  Raises
        :class:`ConfigurationError` when the ring is absent and ``create`` is
        false, or when a file is invalid, a key is encrypted and the passphrase
        is missing or wrong.
        """
        _check_alg(create_alg)
        ring = cls(directory, passphrase=passphrase, check_interval=check_interval)
        now = time.time() if now is None else now
        if create:
            ring.initialize(now, alg=create_alg)
        else:
            with ring._lock(exclusive=False, blocking=True) as locked:
                if not locked:  # pragma: no cover - blocking locks are always taken
                    raise ConfigurationError(f"cannot lock the key ring in {ring._directory}")
                ring._snapshot = ring._read_snapshot()
        ring._last_check = now
        return ring

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def metadata_path(self) -> Path:
        return self._directory / METADATA_FILE

    # -- reading ---------------------------------------------------------------

    def signer(self) -> KeySigner:
        """The :class:`sts.core.ports.Signer` of the current ``active`` key."""
        return self._current().signer

    def public_jwks(self) -> dict[str, Any]:
        """The RFC 7517 §5 JWK Set to serve at ``jwks_uri``.

        Holds the public part of every ``next``, ``active`` and not yet pruned
        ``retired`` key, each with ``kid`` (RFC 7638 thumbprint), ``alg`` and
        ``use: "sig"`` (RFC 7517 §4.2-4.5).  The result is a fresh copy.
        """
        return copy.deepcopy(dict(self._current().jwks))

    def verification_keys(self) -> KeySet:
        """The published public keys as a joserfc key set, to verify our own tokens."""
        return KeySet(list(self._current().public_keys))

    def entries(self) -> list[KeyEntry]:
        """Every key of the ring: active first, then next, then retired (newest first)."""
        return list(self._current().entries)

    def reload_if_changed(self, now: float) -> bool:
        """Pick up a change made by another process (the rotation CLI); True when reloaded.

        Cheap enough for every request: at most one ``stat`` of ``keyring.json``
        per ``check_interval`` seconds, and the PEM files are parsed again only
        when the file's identity, mtime or size changed.  A reload never blocks
        on a rotation in progress (it tries again after the next interval) and
        a ring that fails to load is logged while the previous snapshot keeps
        serving.
        """
        if 0 <= now - self._last_check < self._check_interval:
            return False
        if not self._reload_lock.acquire(blocking=False):
            return False  # Another thread is checking right now.
        try:
            self._last_check = now
            try:
                current = _file_id(os.stat(self.metadata_path))
            except OSError as exc:
                logger.error("cannot stat key ring metadata %s: %s", self.metadata_path, exc.strerror)
                return False
            if current == self._current().file_id:
                return False
            with self._lock(exclusive=False, blocking=False) as locked:
                if not locked:
                    logger.info("key ring %s is being changed; reload deferred", self._directory)
                    return False
                try:
                    snapshot = self._read_snapshot()
                except ConfigurationError as exc:
                    logger.error("key ring reload failed, keeping the previous keys: %s", exc)
                    return False
            self._snapshot = snapshot
            logger.info("key ring reloaded; active kid %s", snapshot.signer.kid)
            return True
        finally:
            self._reload_lock.release()

    # -- writing -----------------------------------------------------------------

    def initialize(self, now: float, *, alg: str = DEFAULT_ALG) -> bool:
        """Create the ring's first keys (one ``active``, one ``next``) unless it has keys.

        Returns True when keys were created.  Several processes may call this at
        once: each takes the exclusive lock and re-reads ``keyring.json``, so
        only the first creates keys and the others load them.
        """
        _check_alg(alg)
        self._ensure_directory()
        with self._lock(exclusive=True, blocking=True):
            if self.metadata_path.exists():
                self._snapshot = self._read_snapshot()
                return False
            active = replace(self._create_key(alg, "active", now), activated_at=now)
            upcoming = self._create_key(alg, "next", now)
            self._write_metadata([active, upcoming])
            self._snapshot = self._read_snapshot()
        logger.info(
            "key ring created in %s: active %s, next %s (%s)", self._directory, active.kid, upcoming.kid, alg
        )
        return True

    def rotate(
        self,
        now: float,
        *,
        max_token_lifetime: int,
        min_published: int = 0,
        force: bool = False,
        next_alg: str | None = None,
    ) -> KeyEntry:
        """Promote ``next`` to ``active``, retire the active key and create a new ``next``.

        The retired key stays published until ``now + max_token_lifetime + 60``
        so that tokens it signed still verify.  Unless ``force``, refuses with
        :class:`KeyRotationRefused` when the ``next`` key has been published for
        less than ``min_published`` seconds (the relying parties' JWKS cache
        lifetime) or when there is no ``next`` key; with ``force`` and no
        ``next`` key a fresh key is activated at once.  The new ``next`` key
        uses ``next_alg`` (default: the promoted key's algorithm), which is how
        the ring migrates to another algorithm, itself publish-before-use.

        Returns the entry of the new active key.
        """
        if max_token_lifetime < 0 or min_published < 0:
            raise ValueError("max_token_lifetime and min_published must not be negative")
        if next_alg is not None:
            _check_alg(next_alg)
        with self._lock(exclusive=True, blocking=True):
            # Load the ring as it is on disk now (another process may have
            # rotated); this also proves that our passphrase opens every key.
            current = self._read_snapshot()
            entries = list(current.entries)
            old_active = next(e for e in entries if e.state == "active")
            upcoming = next((e for e in entries if e.state == "next"), None)
            if upcoming is None:
                if not force:
                    raise KeyRotationRefused(
                        f"the key ring in {self._directory} has no next key to promote; "
                        "rotate with force to activate a key that no relying party has seen yet"
                    )
                new_active = replace(self._create_key(old_active.alg, "active", now), activated_at=now)
            else:
                published_for = now - upcoming.created_at
                if published_for < min_published and not force:
                    raise KeyRotationRefused(
                        f"next key {upcoming.kid} has been published for {published_for:.0f} s, less than "
                        f"the required {min_published} s; relying parties may not have fetched it yet "
                        "(wait, or force the rotation)"
                    )
                new_active = replace(upcoming, state="active", activated_at=now)
                entries.remove(upcoming)
            retired = replace(
                old_active,
                state="retired",
                retired_at=now,
                publish_until=now + max_token_lifetime + ROTATION_SKEW_SECONDS,
            )
            fresh = self._create_key(next_alg or new_active.alg, "next", now)
            entries.remove(old_active)
            self._write_metadata([new_active, fresh, retired, *entries])
            self._snapshot = self._read_snapshot()
        logger.info(
            "key ring rotated: active %s, next %s, retired %s published until %.0f",
            new_active.kid,
            fresh.kid,
            retired.kid,
            retired.publish_until,
        )
        return new_active

    def prune(self, now: float) -> list[KeyEntry]:
        """Delete the retired keys whose ``publish_until`` has passed; return them.

        ``keyring.json`` is rewritten before the PEM files are deleted, so no
        reader ever sees a listed key without its file.  PEM files that no entry
        lists (left by a crash between writing a key and recording it) are
        deleted too.
        """
        with self._lock(exclusive=True, blocking=True):
            current = self._read_snapshot()
            expired = [
                e
                for e in current.entries
                if e.state == "retired" and e.publish_until is not None and e.publish_until <= now
            ]
            if expired:
                self._write_metadata([e for e in current.entries if e not in expired])
            listed = {e.kid for e in current.entries if e not in expired}
            for path in self._directory.glob("*.pem"):
                if _KID_PATTERN.fullmatch(path.stem) and path.stem not in listed:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
            _fsync_directory(self._directory)
            self._snapshot = self._read_snapshot()
        for entry in expired:
            logger.info("pruned retired key %s (published until %.0f)", entry.kid, entry.publish_until)
        return expired

    # -- internals ---------------------------------------------------------------

    def _current(self) -> _Snapshot:
        if self._snapshot is None:  # pragma: no cover - open() always loads one
            raise ConfigurationError("the key ring has not been loaded")
        return self._snapshot

    def _ensure_directory(self) -> None:
        try:
            self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            mode = stat.S_IMODE(self._directory.stat().st_mode)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot create key directory {self._directory}: {exc.strerror}"
            ) from None
        if mode & 0o077:
            # Only the service account may list or read the key files.
            try:
                self._directory.chmod(0o700)
            except OSError as exc:
                logger.warning(
                    "key directory %s has mode %o and cannot be restricted: %s",
                    self._directory,
                    mode,
                    exc.strerror,
                )
            else:
                logger.warning("key directory %s had mode %o; restricted to 700", self._directory, mode)

    @contextlib.contextmanager
    def _lock(self, *, exclusive: bool, blocking: bool) -> Iterator[bool]:
        """Hold flock(2) on the lock file; yield whether it was taken.

        A shared lock on a read-only directory without a lock file is skipped:
        nobody can be writing there.
        """
        path = self._directory / LOCK_FILE
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

    def _create_key(self, alg: str, state: KeyState, now: float) -> KeyEntry:
        """Generate a key, write its PEM (0600, atomically) and return its entry (not yet recorded)."""
        key = _generate_key(alg)
        kid = key.thumbprint()
        encryption: KeySerializationEncryption
        if self._passphrase is not None:
            encryption = BestAvailableEncryption(self._passphrase)
        else:
            encryption = NoEncryption()
        private_key = key.private_key
        if private_key is None:  # pragma: no cover - generate_key makes private keys
            raise ConfigurationError("key generation returned no private key")
        pem = private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, encryption)
        _write_file_atomically(self._directory / f"{kid}.pem", pem)
        if alg == "EdDSA":
            logger.warning("alg EdDSA is deprecated by RFC 9864; consider Ed25519")
        return KeyEntry(kid=kid, alg=alg, state=state, created_at=now)

    def _write_metadata(self, entries: list[KeyEntry]) -> None:
        document = {
            "format": METADATA_FORMAT,
            "keys": [
                {
                    "kid": e.kid,
                    "alg": e.alg,
                    "state": e.state,
                    "created_at": e.created_at,
                    "activated_at": e.activated_at,
                    "retired_at": e.retired_at,
                    "publish_until": e.publish_until,
                }
                for e in entries
            ],
        }
        data = (json.dumps(document, indent=2) + "\n").encode("utf-8")
        _write_file_atomically(self.metadata_path, data)

    def _read_snapshot(self) -> _Snapshot:
        """Read ``keyring.json`` and parse every PEM it lists (the caller holds a lock)."""
        path = self.metadata_path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ConfigurationError(
                f"no key ring in {self._directory} ({METADATA_FILE} is missing); initialise it first"
            ) from None
        except OSError as exc:
            raise ConfigurationError(f"cannot open {path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as fh:
            file_id = _file_id(os.fstat(fh.fileno()))
            raw = fh.read()
        entries = _parse_metadata(raw, path)

        order = {"active": 0, "next": 1, "retired": 2}
        entries.sort(key=lambda e: (order[e.state], -(e.retired_at or 0.0)))
        signer: KeySigner | None = None
        public_keys: list[AsymmetricJWK] = []
        for entry in entries:
            key = self._load_private_key(entry)
            if entry.state == "active":
                signer = KeySigner(key, entry.kid, entry.alg)
            public_keys.append(_public_part(key, entry))
        assert signer is not None  # _parse_metadata guarantees exactly one active key
        jwks = {"keys": [k.as_dict(private=False) for k in public_keys]}
        return _Snapshot(
            entries=tuple(entries),
            signer=signer,
            jwks=jwks,
            public_keys=tuple(public_keys),
            file_id=file_id,
        )

    def _load_private_key(self, entry: KeyEntry) -> AsymmetricJWK:
        """Parse ``<kid>.pem`` and check it matches its entry (type, curve, size, thumbprint)."""
        path = self._directory / f"{entry.kid}.pem"
        try:
            info = os.stat(path, follow_symlinks=False)
            data = path.read_bytes()
        except FileNotFoundError:
            raise ConfigurationError(f"key file {path} listed in {METADATA_FILE} is missing") from None
        except OSError as exc:
            raise ConfigurationError(f"cannot read key file {path}: {exc.strerror}") from None
        if stat.S_IMODE(info.st_mode) & 0o077:
            logger.warning(
                "key file %s is readable by group or others (mode %o); it should be 600",
                path,
                stat.S_IMODE(info.st_mode),
            )

        encrypted = _pem_is_encrypted(data)
        if encrypted and self._passphrase is None:
            raise ConfigurationError(
                f"key file {path} is encrypted but no passphrase is configured (set STS_KEY_PASSPHRASE)"
            )
        if not encrypted and self._passphrase is not None:
            logger.warning(
                "key file %s is not encrypted at rest although a passphrase is configured; "
                "rotate the ring to replace it",
                path,
            )
        spec = SUPPORTED_ALGORITHMS[entry.alg]
        parameters: KeyParameters = {"kid": entry.kid, "alg": entry.alg, "use": "sig"}
        password = self._passphrase if encrypted else None
        key: AsymmetricJWK
        try:
            if spec.key_type == "EC":
                key = ECKey.import_key(data, parameters, password=password)
            elif spec.key_type == "RSA":
                key = RSAKey.import_key(data, parameters, password=password)
            else:
                key = OKPKey.import_key(data, parameters, password=password)
        except (ValueError, TypeError, JoseError):
            # The exception text is not passed on: nothing of the key may reach a log.
            reason = "wrong passphrase or damaged file" if encrypted else "not a valid private key"
            raise ConfigurationError(
                f"cannot load key file {path} ({spec.key_type} key for {entry.alg}): {reason}"
            ) from None
        _check_key_matches(key, entry, path)
        return key


# -- module helpers ----------------------------------------------------------------


def _check_alg(alg: str) -> None:
    if alg not in SUPPORTED_ALGORITHMS:
        raise ConfigurationError(
            f"unsupported signing algorithm {alg!r}; choose one of {', '.join(SUPPORTED_ALGORITHMS)}"
        )


def _generate_key(alg: str) -> AsymmetricJWK:
    spec = SUPPORTED_ALGORITHMS[alg]
    if spec.key_type == "EC":
        curve: Literal["P-256", "P-384"] = "P-384" if spec.curve == "P-384" else "P-256"
        return ECKey.generate_key(curve)
    if spec.key_type == "RSA":
        return RSAKey.generate_key(RSA_KEY_SIZE)
    return OKPKey.generate_key("Ed25519")


def _check_key_matches(key: AsymmetricJWK, entry: KeyEntry, path: Path) -> None:
    spec = SUPPORTED_ALGORITHMS[entry.alg]
    if not key.is_private:
        raise ConfigurationError(f"key file {path} holds no private key")
    if isinstance(key, RSAKey):
        size = key.public_key.key_size
        if size < RSA_MIN_KEY_SIZE:
            raise ConfigurationError(f"key file {path}: RSA key of {size} bits is too weak")
    elif key.curve_name != spec.curve:
        raise ConfigurationError(f"key file {path}: curve {key.curve_name} does not fit {entry.alg}")
    # RFC 7638: the kid is the thumbprint, so a swapped or altered file is caught here.
    if key.thumbprint() != entry.kid:
        raise ConfigurationError(f"key file {path} does not hold the key {entry.kid} (thumbprint mismatch)")


def _public_part(key: AsymmetricJWK, entry: KeyEntry) -> AsymmetricJWK:
    parameters: KeyParameters = {"kid": entry.kid, "alg": entry.alg, "use": "sig"}
    public = key.as_dict(private=False)
    if isinstance(key, ECKey):
        return ECKey.import_key(public, parameters)
    if isinstance(key, RSAKey):
        return RSAKey.import_key(public, parameters)
    return OKPKey.import_key(public, parameters)


def _pem_is_encrypted(data: bytes) -> bool:
    """True for PKCS#8 ``ENCRYPTED PRIVATE KEY`` and legacy ``Proc-Type: 4,ENCRYPTED`` PEM."""
    for line in data.splitlines():
        stripped = line.strip()
        if stripped.startswith((b"-----BEGIN ", b"Proc-Type:")) and b"ENCRYPTED" in stripped:
            return True
    return False


def _parse_metadata(raw: bytes, path: Path) -> list[KeyEntry]:
    """Validate ``keyring.json``: known format, well-formed entries, one active key, at most one next."""
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != METADATA_FORMAT:
        raise ConfigurationError(f'{path}: expected an object with "format": {METADATA_FORMAT}')
    items = document.get("keys")
    if not isinstance(items, list):
        raise ConfigurationError(f'{path}: "keys" must be a list')
    entries = [_parse_entry(item, path, index) for index, item in enumerate(items)]
    kids = [e.kid for e in entries]
    if len(set(kids)) != len(kids):
        raise ConfigurationError(f"{path}: a kid is listed twice")
    states = [e.state for e in entries]
    if states.count("active") != 1:
        raise ConfigurationError(f"{path}: expected exactly one active key, found {states.count('active')}")
    if states.count("next") > 1:
        raise ConfigurationError(f"{path}: expected at most one next key, found {states.count('next')}")
    return entries


def _parse_entry(item: object, path: Path, index: int) -> KeyEntry:
    where = f"{path}: keys[{index}]"
    if not isinstance(item, dict):
        raise ConfigurationError(f"{where} must be an object")
    kid, alg, state = item.get("kid"), item.get("alg"), item.get("state")
    if not isinstance(kid, str) or not _KID_PATTERN.fullmatch(kid):
        raise ConfigurationError(f"{where}: kid must be an RFC 7638 SHA-256 thumbprint")
    if not isinstance(alg, str) or alg not in SUPPORTED_ALGORITHMS:
        raise ConfigurationError(f"{where}: unsupported alg {alg!r}")
    if state not in _STATES:
        raise ConfigurationError(f"{where}: state must be next, active or retired")

    def timestamp(name: str, required: bool) -> float | None:
        value = item.get(name)
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigurationError(f"{where}: {name} must be a number of seconds")
        return float(value)

    created_at = timestamp("created_at", True)
    assert created_at is not None
    return KeyEntry(
        kid=kid,
        alg=alg,
        state=state,
        created_at=created_at,
        activated_at=timestamp("activated_at", state == "active"),
        retired_at=timestamp("retired_at", state == "retired"),
        publish_until=timestamp("publish_until", state == "retired"),
    )


def _file_id(info: os.stat_result) -> _FileId:
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)


def _write_file_atomically(path: Path, data: bytes) -> None:
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
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
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


class OwnTokenKeys:
    """:class:`sts.core.ports.IssuerKeys` over this service's own published keys.

    Used when one of our tokens comes back as a subject or actor token
    (re-exchange, delegation chains): it verifies against exactly the keys
    our JWKS publishes, and follows rotations done by another process.
    """

    def __init__(self, ring: KeyRing, clock: Callable[[], float] = time.time) -> None:
        self._ring = ring
        self._clock = clock
        self._cached: tuple[tuple[str, ...], StaticJWKS] | None = None

    def key_for(self, kid: str | None, alg: str) -> Key:
        self._ring.reload_if_changed(self._clock())
        jwks = self._ring.public_jwks()
        kids = tuple(sorted(k["kid"] for k in jwks["keys"]))
        cached = self._cached
        if cached is None or cached[0] != kids:
            algs = sorted({k["alg"] for k in jwks["keys"]})
            cached = (kids, StaticJWKS(jwks, algorithms=algs, source="this service's key ring"))
            self._cached = cached
        return cached[1].key_for(kid, alg)
