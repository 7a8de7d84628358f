"""Secrets kept beside the signing keys, shared by every instance that shares the directory."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from ..adapters.keyring_files import check_owner
from ..errors import ConfigurationError


def dpop_nonce_secret(keys_dir: Path) -> bytes:
    """The secret behind stateless DPoP nonces (RFC 9449 §8), shared by every instance that shares
    the key directory; created on first use, mode 0600."""
    return secret_file(keys_dir / "dpop-nonce.secret", what="DPoP nonce secret")


def secret_file(path: Path, *, what: str = "secret") -> bytes:
    """32 random bytes kept in ``path`` (mode 0600), created on first use; shared by every
    instance that shares the directory."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        # A read-only keys_dir (a Kubernetes Secret) without the file: one line, not a traceback
        # at start (an outside re-check); the file is then to be put in the Secret.
        raise ConfigurationError(
            f"{path}: {what} cannot be created ({exc.strerror}); create it (32 random bytes, mode "
            "0600) where the keys are, e.g. in the Secret mounted as keys_dir"
        ) from None
    else:
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(32))
    return read_secret(path, what=what)


def read_secret(path: Path, *, what: str = "secret") -> bytes:
    """The secret kept in ``path``: a regular file of this service's user or root's, of at least 32
    bytes; else :class:`ConfigurationError`, one line."""
    try:
        with open(path, "rb") as existing:
            info = os.fstat(existing.fileno())
            # The file read, not a link to it (a Kubernetes Secret's files are links into ``..data``,
            # owned by root).  Another user's file could hold a secret they know: they could then
            # forge the nonces or the review page's sessions (an outside audit).
            check_owner(path, info, what, risk=f"its owner could know the {what}")
            if not stat.S_ISREG(info.st_mode):
                raise ConfigurationError(f"{path}: {what} is not a regular file")
            data = existing.read(4096)
    except OSError as exc:
        raise ConfigurationError(f"{path}: {what} cannot be read ({exc.strerror})") from None
    if len(data) < 32:
        raise ConfigurationError(f"{path}: {what} is truncated; delete it to create a new one")
    return data
