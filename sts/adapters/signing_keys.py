"""The key ring's private keys: algorithms, generation, PEM at rest, and the checks on loading.

Every ``kid`` is the RFC 7638 JWK thumbprint (SHA-256, base64url) of the
public key, computed by joserfc, so a ``kid`` names exactly one key and is
re-checked whenever a PEM file is loaded.  A key file is PKCS#8 PEM, optionally
encrypted with the passphrase (``STS_KEY_PASSPHRASE``).  Keys are parsed once,
when the ring is loaded; nothing here runs per request.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, TypeAlias

from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    KeySerializationEncryption,
    NoEncryption,
    PrivateFormat,
)
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeyParameters, OKPKey, RSAKey

from sts.errors import ConfigurationError

from .keyring_files import check_owner

# The key ring's modules log under one name, so one logging setting covers all of it.
logger = logging.getLogger("sts.adapters.keyring")

AsymmetricJWK: TypeAlias = ECKey | RSAKey | OKPKey

DEFAULT_ALG: Final = "ES256"
RSA_KEY_SIZE: Final = 3072
#: RFC 8725 §3.5 / NIST SP 800-131A: refuse to load weaker RSA keys.
RSA_MIN_KEY_SIZE: Final = 2048


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


def check_alg(alg: str) -> None:
    """Raise :class:`ConfigurationError` unless a key of the ring may use ``alg``."""
    if alg not in SUPPORTED_ALGORITHMS:
        raise ConfigurationError(
            f"unsupported signing algorithm {alg!r}; choose one of {', '.join(SUPPORTED_ALGORITHMS)}"
        )


def generate_key(alg: str) -> AsymmetricJWK:
    """A fresh private key for ``alg`` (P-256/P-384, RSA 3072 or Ed25519)."""
    spec = SUPPORTED_ALGORITHMS[alg]
    if spec.key_type == "EC":
        curve: Literal["P-256", "P-384"] = "P-384" if spec.curve == "P-384" else "P-256"
        return ECKey.generate_key(curve)
    if spec.key_type == "RSA":
        return RSAKey.generate_key(RSA_KEY_SIZE)
    return OKPKey.generate_key("Ed25519")


def private_pem(key: AsymmetricJWK, passphrase: bytes | None) -> bytes:
    """``key`` as PKCS#8 PEM, encrypted with ``passphrase`` when one is given."""
    encryption: KeySerializationEncryption = (
        BestAvailableEncryption(passphrase) if passphrase is not None else NoEncryption()
    )
    private_key = key.private_key
    if private_key is None:  # pragma: no cover - generate_key makes private keys
        raise ConfigurationError("key generation returned no private key")
    return private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, encryption)


def load_private_key(path: Path, *, kid: str, alg: str, passphrase: bytes | None) -> AsymmetricJWK:
    """Parse the PEM file ``path`` and check it holds the key ``kid`` for ``alg`` (type, curve, size)."""
    try:
        # The mode of the file read, not of a symbolic link to it (whose own mode is 777: an
        # outside audit had a link to a world-readable copy pass without a word).
        with path.open("rb") as file:
            info = os.fstat(file.fileno())
            data = file.read()
    except FileNotFoundError:
        raise ConfigurationError(f"key file {path} listed in keyring.json is missing") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read key file {path}: {exc.strerror}") from None
    check_owner(path, info, "key file")  # its owner could put a key of theirs in it
    if stat.S_IMODE(info.st_mode) & 0o077:
        logger.warning(
            "key file %s is readable by group or others (mode %o); it should be 600",
            path,
            stat.S_IMODE(info.st_mode),
        )

    encrypted = pem_is_encrypted(data)
    if encrypted and passphrase is None:
        raise ConfigurationError(
            f"key file {path} is encrypted but no passphrase is configured (set STS_KEY_PASSPHRASE)"
        )
    if not encrypted and passphrase is not None:
        logger.warning(
            "key file %s is not encrypted at rest although a passphrase is configured; "
            "rotate the ring to replace it",
            path,
        )
    spec = SUPPORTED_ALGORITHMS[alg]
    parameters: KeyParameters = {"kid": kid, "alg": alg, "use": "sig"}
    password = passphrase if encrypted else None
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
            f"cannot load key file {path} ({spec.key_type} key for {alg}): {reason}"
        ) from None
    _check_key_matches(key, kid, alg, path)
    return key


def public_part(key: AsymmetricJWK, *, kid: str, alg: str) -> AsymmetricJWK:
    """The public half of ``key``, carrying ``kid``, ``alg`` and ``use: sig``."""
    parameters: KeyParameters = {"kid": kid, "alg": alg, "use": "sig"}
    public = key.as_dict(private=False)
    if isinstance(key, ECKey):
        return ECKey.import_key(public, parameters)
    if isinstance(key, RSAKey):
        return RSAKey.import_key(public, parameters)
    return OKPKey.import_key(public, parameters)


def pem_is_encrypted(data: bytes) -> bool:
    """True for PKCS#8 ``ENCRYPTED PRIVATE KEY`` and legacy ``Proc-Type: 4,ENCRYPTED`` PEM."""
    for line in data.splitlines():
        stripped = line.strip()
        if stripped.startswith((b"-----BEGIN ", b"Proc-Type:")) and b"ENCRYPTED" in stripped:
            return True
    return False


def _check_key_matches(key: AsymmetricJWK, kid: str, alg: str, path: Path) -> None:
    spec = SUPPORTED_ALGORITHMS[alg]
    if not key.is_private:
        raise ConfigurationError(f"key file {path} holds no private key")
    if isinstance(key, RSAKey):
        size = key.public_key.key_size
        if size < RSA_MIN_KEY_SIZE:
            raise ConfigurationError(f"key file {path}: RSA key of {size} bits is too weak")
    elif key.curve_name != spec.curve:
        raise ConfigurationError(f"key file {path}: curve {key.curve_name} does not fit {alg}")
    # RFC 7638: the kid is the thumbprint, so a swapped or altered file is caught here.
    if key.thumbprint() != kid:
        raise ConfigurationError(f"key file {path} does not hold the key {kid} (thumbprint mismatch)")
