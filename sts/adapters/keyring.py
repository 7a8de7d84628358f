"""The service's own signing keys: a key ring in a directory, rotated publish-before-use.

The parts, each in its own module:

* which key signs, which keys stay published, and when a rotation may
  happen: :mod:`sts.core.key_rotation` (pure; the state diagram is there);
* the directory, its lock and crash-safe writes: :mod:`sts.adapters.keyring_files`;
* ``keyring.json``: :mod:`sts.adapters.keyring_metadata`;
* the private keys (algorithms, generation, PEM at rest, checks on loading):
  :mod:`sts.adapters.signing_keys`;
* the signer of the active key: :mod:`sts.adapters.key_signer`;
* the published JWK Set and the verifier of our own tokens:
  :mod:`sts.adapters.published_keys`.

:class:`KeyRing` ties them together.  Rotation runs in another process (the
CLI) while servers are serving; every write happens under the exclusive lock
and replaces whole files, and a running server notices the change with
:meth:`KeyRing.reload_if_changed`, which costs at most one ``stat`` per
``check_interval``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Final

from joserfc.jwk import KeySet

from sts.core.key_rotation import (
    KeyEntry,
    RotationTiming,
    in_ring_order,
    initial_entries,
    plan_rotation,
    prunable,
)
from sts.errors import ConfigurationError

from .key_signer import KeySigner
from .keyring_files import (
    CREATING_FILE,
    delete_unlisted_key_files,
    ensure_directory,
    fsync_directory,
    key_file,
    refuse_orphaned_keys,
    ring_lock,
    write_file_atomically,
)
from .keyring_metadata import METADATA_FILE, file_id, read_metadata, write_metadata
from .published_keys import RingView
from .signing_keys import DEFAULT_ALG, check_alg, generate_key, load_private_key, private_pem

# The key ring's modules log under one name, so one logging setting covers all of it.
logger = logging.getLogger("sts.adapters.keyring")

DEFAULT_CHECK_INTERVAL: Final = 5.0


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
        self._snapshot: RingView | None = None
        #: The published view of a snapshot holding retired keys past their publication (see _published).
        self._published_view: tuple[RingView, RingView] | None = None
        self._last_check = -math.inf
        self._reload_lock = threading.Lock()
        #: Why the last reload of a changed ring failed (None: it did not); see :attr:`reload_problem`.
        self._reload_problem: str | None = None

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
        check_alg(create_alg)
        ring = cls(directory, passphrase=passphrase, check_interval=check_interval)
        now = time.time() if now is None else now
        if create:
            ring.initialize(now, alg=create_alg)
        else:
            if not ring._directory.is_dir():
                raise ConfigurationError(
                    f"no key ring in {ring._directory} (no such directory); the first start creates it"
                )
            with ring_lock(ring._directory, exclusive=False, blocking=True) as locked:
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

    def public_jwks(self, now: float | None = None) -> dict[str, Any]:
        """The RFC 7517 §5 JWK Set to serve at ``jwks_uri``.

        Holds the public part of every ``next``, ``active`` and ``retired`` key, each with
        ``kid`` (RFC 7638 thumbprint), ``alg`` and ``use: "sig"`` (RFC 7517 §4.2-4.5); with
        ``now``, a retired key only until its ``publish_until`` (``sts keys prune`` deletes it
        later).  The result is a fresh copy.
        """
        return copy.deepcopy(dict(self._published(now).jwks))

    def verification_keys(self, now: float | None = None) -> KeySet:
        """The published public keys as a joserfc key set, to verify our own tokens."""
        return KeySet(list(self._published(now).public_keys))

    def _published(self, now: float | None) -> RingView:
        """The ring as published at ``now``: without retired keys past their ``publish_until``,
        which no valid token of ours was signed by (the JWK Set served, our own tokens verified).
        ``now`` None: every key the ring holds (checkpoints of the audit trail, signed long ago,
        are verified with those)."""
        view = self._current()
        if now is None or now < view.lapses_at:
            return view
        cached = self._published_view
        if cached is not None and cached[0] is view and now < cached[1].lapses_at:
            return cached[1]
        published = view.published_at(now)
        self._published_view = (view, published)
        return published

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
                current = file_id(os.stat(self.metadata_path))
            except OSError as exc:
                self._reload_problem = f"cannot stat {self.metadata_path}: {exc.strerror}"
                logger.error("cannot stat key ring metadata %s: %s", self.metadata_path, exc.strerror)
                return False
            if current == self._current().file_id:
                self._reload_problem = None
                return False
            with ring_lock(self._directory, exclusive=False, blocking=False) as locked:
                if not locked:
                    logger.info("key ring %s is being changed; reload deferred", self._directory)
                    return False
                try:
                    snapshot = self._read_snapshot()
                except ConfigurationError as exc:
                    self._reload_problem = str(exc)
                    logger.error("key ring reload failed, keeping the previous keys: %s", exc)
                    return False
            self._reload_problem = None
            self._snapshot = snapshot
            logger.info("key ring reloaded; active kid %s", snapshot.signer.kid)
            return True
        finally:
            self._reload_lock.release()

    @property
    def reload_problem(self) -> str | None:
        """Why the ring on disk, changed since it was loaded, could not be loaded again (a
        passphrase this process lacks, a damaged file, ``keyring.json`` gone), or None.  The
        previous keys keep serving, but another instance sharing the directory publishes the ring
        on disk: tokens this one signs may carry a key it no longer publishes, and its own key
        set miss the new ones.  Readiness reports ``keys`` meanwhile (an outside audit saw an
        instance stay ready for minutes while signing with a key pruned from disk)."""
        return self._reload_problem

    # -- writing -----------------------------------------------------------------

    def initialize(self, now: float, *, alg: str = DEFAULT_ALG) -> bool:
        """Create the ring's first keys (one ``active``, one ``next``) unless it has keys.

        Returns True when keys were created.  Several processes may call this at
        once: each takes the exclusive lock and re-reads ``keyring.json``, so
        only the first creates keys and the others load them.
        """
        check_alg(alg)
        ensure_directory(self._directory)
        if self.metadata_path.exists():
            # A ring there is read under the shared lock, which a read-only directory without a
            # lock file skips: a Kubernetes Secret mounted as keys_dir (read-only, root's files)
            # loaded for `sts config check` and `sts keys list`, but `sts serve` stopped at the
            # exclusive lock it took first ("Read-only file system"; an outside re-check).
            with ring_lock(self._directory, exclusive=False, blocking=True):
                if self.metadata_path.exists():
                    self._snapshot = self._read_snapshot()
                    return False
        with ring_lock(self._directory, exclusive=True, blocking=True):
            if self.metadata_path.exists():
                self._snapshot = self._read_snapshot()
                return False
            refuse_orphaned_keys(self._directory, METADATA_FILE)
            # Marked first: a start killed before keyring.json is written leaves keys that never
            # signed anything, which the next start replaces instead of refusing them as a lost ring.
            creating = self._directory / CREATING_FILE
            write_file_atomically(creating, b"")
            delete_unlisted_key_files(self._directory, ())  # such leftovers, if any
            active, upcoming = initial_entries(
                active_kid=self._create_key(alg), next_kid=self._create_key(alg), alg=alg, now=now
            )
            write_metadata(self._directory, [active, upcoming])
            creating.unlink()
            fsync_directory(self._directory)
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

        The decision is :func:`sts.core.key_rotation.plan_rotation`'s: the
        retired key stays published until ``now + max_token_lifetime + 60``;
        unless ``force``, :class:`~sts.core.key_rotation.KeyRotationRefused`
        when the ``next`` key has been published for less than
        ``min_published`` seconds or there is none (with ``force`` and no
        ``next`` key a fresh key is activated at once); the new ``next`` key
        uses ``next_alg`` (default: the promoted key's algorithm).  This
        method generates the keys the plan asks for and writes the ring.

        Returns the entry of the new active key.
        """
        timing = RotationTiming(max_token_lifetime=max_token_lifetime, min_published=min_published)
        if next_alg is not None:
            check_alg(next_alg)
        with ring_lock(self._directory, exclusive=True, blocking=True):
            # Load the ring as it is on disk now (another process may have
            # rotated); this also proves that our passphrase opens every key.
            current = self._read_snapshot()
            plan = plan_rotation(
                current.entries,
                now,
                timing,
                force=force,
                next_alg=next_alg,
                ring_name=f"the key ring in {self._directory}",
            )
            active_kid = self._create_key(plan.active_alg) if plan.promoted is None else None
            entries = plan.entries_after(next_kid=self._create_key(plan.next_alg), active_kid=active_kid)
            write_metadata(self._directory, entries)
            self._snapshot = self._read_snapshot()
        new_active, fresh = entries[0], entries[1]
        logger.info(
            "key ring rotated: active %s, next %s, retired %s published until %.0f",
            new_active.kid,
            fresh.kid,
            plan.retired.kid,
            plan.retired.publish_until,
        )
        return new_active

    def prune(self, now: float) -> list[KeyEntry]:
        """Delete the retired keys whose ``publish_until`` has passed; return them.

        ``keyring.json`` is rewritten before the PEM files are deleted, so no
        reader ever sees a listed key without its file.  PEM files that no entry
        lists (left by a crash between writing a key and recording it) are
        deleted too.
        """
        with ring_lock(self._directory, exclusive=True, blocking=True):
            current = self._read_snapshot()
            expired = prunable(current.entries, now)
            kept = [e for e in current.entries if e not in expired]
            if expired:
                write_metadata(self._directory, kept)
            delete_unlisted_key_files(self._directory, {e.kid for e in kept})
            self._snapshot = self._read_snapshot()
        for entry in expired:
            logger.info("pruned retired key %s (published until %.0f)", entry.kid, entry.publish_until)
        return expired

    # -- internals ---------------------------------------------------------------

    def _current(self) -> RingView:
        if self._snapshot is None:  # pragma: no cover - open() always loads one
            raise ConfigurationError("the key ring has not been loaded")
        return self._snapshot

    def _create_key(self, alg: str) -> str:
        """Generate a key, write its PEM (0600, atomically) and return its ``kid`` (not yet recorded)."""
        key = generate_key(alg)
        kid = key.thumbprint()
        write_file_atomically(key_file(self._directory, kid), private_pem(key, self._passphrase))
        if alg == "EdDSA":
            logger.warning("alg EdDSA is deprecated by RFC 9864; consider Ed25519")
        return kid

    def _read_snapshot(self) -> RingView:
        """Read ``keyring.json`` and parse every PEM it lists (the caller holds a lock)."""
        entries, identity = read_metadata(self._directory)
        entries = in_ring_order(entries)
        keys = [
            load_private_key(
                key_file(self._directory, e.kid), kid=e.kid, alg=e.alg, passphrase=self._passphrase
            )
            for e in entries
        ]
        return RingView.build(entries, keys, identity)
