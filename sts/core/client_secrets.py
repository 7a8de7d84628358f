"""Client secrets are stored hashed and compared in constant time (RFC 6749 §2.3.1, §10.3).

Two formats:

``sha256$<salt>$<digest>``
    A salted SHA-256.  Used for secrets this service generates
    (``sts clients secret``): 256 random bits cannot be guessed, so a slow hash
    would only cost every request time without adding safety.
``pbkdf2-sha256$<iterations>$<salt>$<digest>``
    For secrets an operator chose; slow on purpose.

Salts and digests are unpadded base64url.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

PBKDF2_ITERATIONS = 600_000
_DUMMY = "sha256$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def generate_secret() -> str:
    """A new client secret with 256 bits of entropy."""
    return secrets.token_urlsafe(32)


def hash_secret(secret: str, *, slow: bool = False) -> str:
    salt = secrets.token_bytes(16)
    if slow:
        digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, PBKDF2_ITERATIONS)
        return f"pbkdf2-sha256${PBKDF2_ITERATIONS}${_b64(salt)}${_b64(digest)}"
    return f"sha256${_b64(salt)}${_b64(hashlib.sha256(salt + secret.encode()).digest())}"


def dummy_hash_like(stored: Sequence[str]) -> str:
    """A hash no secret matches that costs to check what the dearest of ``stored`` costs: what a
    name that is no user's is checked against, so that it takes as long as the slowest user's (its
    digest is random bytes: checking it needs the work, making it none).  It was a new PBKDF2 hash
    of the default cost, made at the first unknown name: a user with another count (or a fast hash,
    beside PBKDF2 ones) was told apart by time, and so was that first attempt (an outside audit)."""
    rounds = [int(h.split("$")[1]) for h in stored if h.startswith("pbkdf2-sha256$") and check_hash_format(h)]
    salt, digest = _b64(secrets.token_bytes(16)), _b64(secrets.token_bytes(32))
    return f"pbkdf2-sha256${max(rounds)}${salt}${digest}" if rounds else f"sha256${salt}${digest}"


def check_hash_format(stored: str) -> bool:
    parts = stored.split("$")
    try:
        if parts[0] == "sha256" and len(parts) == 3:
            return len(_unb64(parts[1])) >= 16 and len(_unb64(parts[2])) == 32
        if parts[0] == "pbkdf2-sha256" and len(parts) == 4:
            return int(parts[1]) >= 100_000 and len(_unb64(parts[2])) >= 16 and len(_unb64(parts[3])) == 32
    except ValueError:
        return False
    return False


def verify_secret(secret: str, stored: str | None) -> bool:
    """Constant-time comparison against the stored hash; an unknown client costs the same."""
    parts = (stored or _DUMMY).split("$")
    candidate = secret.encode("utf-8", "surrogateescape")
    if parts[0] == "pbkdf2-sha256":
        salt, expected = _unb64(parts[2]), _unb64(parts[3])
        digest = hashlib.pbkdf2_hmac("sha256", candidate, salt, int(parts[1]))
    else:
        salt, expected = _unb64(parts[1]), _unb64(parts[2])
        digest = hashlib.sha256(salt + candidate).digest()
    return hmac.compare_digest(digest, expected) and stored is not None


#: Seconds after a secret failed against a slow (PBKDF2) hash during which that hash checks no
#: secret it has not verified before (:func:`check_secrets`).
FAILURE_PAUSE = 2.0
#: Slow hashes whose last verified secret is remembered, at most.
REMEMBERED = 1024


class SecretChecksPaused(Exception):
    """A secret was not checked: the client's slow hash refused another one a moment ago."""


class _SlowHashes:
    """What the process knows of its slow (PBKDF2) hashes: for each, a keyed digest of the last
    secret that verified against it (the key is random, in memory only: no secret is kept), and
    when a secret last failed against it."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._known: OrderedDict[str, bytes] = OrderedDict()
        self._failed_at: dict[str, float] = {}
        self.clock = time.monotonic

    def _tag(self, secret: str, stored: str) -> bytes:
        message = stored.encode() + b"\0" + secret.encode("utf-8", "surrogateescape")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def known(self, secret: str, stored: str) -> bool:
        with self._lock:
            tag = self._known.get(stored)
        return tag is not None and hmac.compare_digest(tag, self._tag(secret, stored))

    def admit(self, stored: str) -> None:
        with self._lock:
            failed = self._failed_at.get(stored)
        if failed is not None and self.clock() - failed < FAILURE_PAUSE:
            raise SecretChecksPaused(stored.split("$", 1)[0])

    def verified(self, secret: str, stored: str) -> None:
        tag = self._tag(secret, stored)
        with self._lock:
            self._known[stored] = tag
            self._known.move_to_end(stored)
            while len(self._known) > REMEMBERED:
                self._known.popitem(last=False)
            self._failed_at.pop(stored, None)

    def failed(self, stored: str) -> None:
        now = self.clock()
        with self._lock:
            if len(self._failed_at) >= REMEMBERED:
                self._failed_at = {k: t for k, t in self._failed_at.items() if now - t < FAILURE_PAUSE}
            self._failed_at[stored] = now


_SLOW = _SlowHashes()


def check_secrets(candidates: Sequence[str], stored: str | None) -> bool:
    """Whether any of ``candidates`` (one secret, as sent and as decoded) verifies against ``stored``,
    each checked by :func:`verify_secret`.

    A slow hash (PBKDF2, 600,000 iterations: 0.2 to 0.3 s of CPU) checked every request of its
    client, and any request naming its ``client_id`` with a wrong secret, before any rate limit
    that counts by client (an outside audit: one client id and a network's request rate kept
    the CPU busy, and the check's time told which clients have one).  So a secret that verified
    once is recognised by a keyed digest afterwards (microseconds), and for :data:`FAILURE_PAUSE`
    seconds after a failure such a hash checks no other secret (:class:`SecretChecksPaused`:
    the caller answers ``503``, to retry): at most one slow check per hash and pause.  A client
    with a slow hash still shows (the first wrong secret's time, then the pause's ``503``) where an
    unregistered ``client_id`` answers ``401`` at once: checking unknown ids slowly too would give
    anyone unbounded PBKDF2 work.  Client ids are not secret (RFC 6749 §2.2); generated secrets
    (``sha256$``) cost a known and an unknown id the same (docs/configuration.md)."""
    slow = stored is not None and stored.startswith("pbkdf2-sha256$")
    if not slow or stored is None:
        ok = False
        for candidate in candidates:
            ok = verify_secret(candidate, stored) or ok
        return ok
    if any(_SLOW.known(candidate, stored) for candidate in candidates):
        return True
    _SLOW.admit(stored)
    for candidate in candidates:
        if verify_secret(candidate, stored):
            _SLOW.verified(candidate, stored)
            return True
    _SLOW.failed(stored)
    return False
