"""The dev issuer's signing keys: RS256 (RSA 2048) or ES256 (EC P-256), in memory or in a PEM file.

``kid`` is the key's RFC 7638 thumbprint.  A persisted key lives in
``<key_dir>/signing-key-<alg>.pem`` (mode 0600), created atomically so that
two processes starting together end up with the same key.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from joserfc.jwk import ECKey, Key, KeyParameters, OctKey, RSAKey

#: Signing algorithms a dev issuer key may use, and the key each needs.
SUPPORTED_ALGORITHMS: Final[Mapping[str, str]] = {"RS256": "RSA 2048", "ES256": "EC P-256"}

_RSA_KEY_BITS: Final = 2048

SigningKey = RSAKey | ECKey


def key_id(key: Key) -> str:
    """The key's ``kid``, else its RFC 7638 thumbprint."""
    return key.kid or key.thumbprint()


def algorithm_key_type(alg: str) -> type[SigningKey]:
    """The key class ``alg`` needs; ``ValueError`` for an algorithm the dev issuer does not sign with."""
    if alg == "RS256":
        return RSAKey
    if alg == "ES256":
        return ECKey
    raise ValueError(f"unsupported dev issuer algorithm {alg!r}; use one of {sorted(SUPPORTED_ALGORITHMS)}")


def generate_key(alg: str) -> SigningKey:
    if algorithm_key_type(alg) is RSAKey:
        return RSAKey.generate_key(_RSA_KEY_BITS)
    return ECKey.generate_key("P-256")


def default_algorithm(key: Key) -> str:
    """The natural JWS algorithm for ``key`` (also for keys the issuer would not sign with)."""
    if isinstance(key, RSAKey):
        return "RS256"
    if isinstance(key, ECKey):
        by_curve = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
        if key.curve_name in by_curve:
            return by_curve[key.curve_name]
    if isinstance(key, OctKey):
        return "HS256"
    raise ValueError("cannot infer the algorithm for this key; pass alg=...")


def check_signing_key(key: SigningKey, alg: str) -> None:
    """``ValueError`` unless ``key`` is a private key of the right type and strength for ``alg``."""
    if not isinstance(key, algorithm_key_type(alg)):
        raise ValueError(f"{alg} needs a {SUPPORTED_ALGORITHMS[alg]} key")
    if not key.is_private:
        raise ValueError("the dev issuer needs a private key")
    if isinstance(key, RSAKey) and key.raw_value.key_size < _RSA_KEY_BITS:
        raise ValueError(f"RSA keys under {_RSA_KEY_BITS} bits are refused (RFC 8725 §3.5)")
    if isinstance(key, ECKey) and key.curve_name != "P-256":
        raise ValueError("ES256 needs a P-256 key")


def with_jwk_parameters(key: SigningKey, alg: str) -> SigningKey:
    """A copy of ``key`` carrying ``alg``, ``use: sig`` and ``kid`` = RFC 7638 thumbprint."""
    parameters: KeyParameters = {"alg": alg, "use": "sig", "kid": key.thumbprint()}
    pem = key.as_pem(private=True)
    copy: SigningKey = (
        RSAKey.import_key(pem, parameters) if isinstance(key, RSAKey) else ECKey.import_key(pem, parameters)
    )
    return copy


def load_or_create_key(key_dir: Path, alg: str) -> SigningKey:
    """The private key in ``key_dir/signing-key-<alg>.pem``, created on first use."""
    algorithm_key_type(alg)
    path = key_dir / f"signing-key-{alg.lower()}.pem"
    if not path.exists():
        key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_new_private_file(path, generate_key(alg).as_pem(private=True))
    return _load_private_key(path, alg)


def _load_private_key(path: Path, alg: str) -> SigningKey:
    pem = path.read_bytes()
    key_type = algorithm_key_type(alg)
    try:
        key: SigningKey = key_type.import_key(pem)
    except ValueError as error:
        raise ValueError(f"{path} does not hold a {SUPPORTED_ALGORITHMS[alg]} private key") from error
    if not key.is_private:
        raise ValueError(f"{path} holds a public key; the dev issuer needs the private key")
    return key


def _write_new_private_file(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 holding ``data``, unless it already exists.

    The data goes to a private temporary file first and is hard-linked into
    place, which fails if another process got there first; either way the
    final file is complete when it appears.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        # The umask may have narrowed the mode; make it exactly owner read/write.
        os.fchmod(handle.fileno(), 0o600)
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
