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
