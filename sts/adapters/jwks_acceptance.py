"""Which keys of a JWK Set (RFC 7517 §5) are accepted, and the ``(kid, alg)`` index to choose one.

Every key set, given in the configuration, read from a file or fetched
(:mod:`sts.adapters.jwks`, :mod:`sts.adapters.jwks_cache`), goes through
:func:`index_key_set`.  Only public, asymmetric signature keys are kept: a
JWK Set published by an issuer must not hold private or symmetric keys, RSA
keys must have at least 2048 bits (RFC 7518 §3.3, §3.5) and the public
exponent 65537 (NIST SP 800-56B; see :func:`sts.core.jose.rsa_key_problem`),
Ed25519 and Ed448 keys must not be of small order (:mod:`sts.core.okp_keys`),
and a key whose ``use`` is not ``sig`` (RFC 7517 §4.2) or whose ``key_ops``
lacks ``verify`` (RFC 7517 §4.3) is not a verification key.  A skipped key is
logged by ``kid``, never by its material.

Keys are chosen only by ``kid`` and the algorithm the caller has already
allow-listed, never from the token's own ``jwk``/``jku``/``x5u``/``x5c``
headers (RFC 8725 §3.1, §3.10); the algorithm must fit the key type and any
``alg`` the JWK declares (RFC 7517 §4.4).  The index is built once per loaded
set, so choosing a key is one dictionary lookup.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from joserfc.errors import InvalidKeyTypeError, JoseError
from joserfc.jwk import ECKey, JWKRegistry, Key, OKPKey

from sts.core.jose import PRIVATE_JWK_MEMBERS, rsa_key_problem
from sts.core.okp_keys import okp_key_problem
from sts.core.ports import UnknownKeyId
from sts.errors import ConfigurationError

# The JWKS modules log under one name, so one logging setting covers all of them.
logger = logging.getLogger("sts.adapters.jwks")

#: JWS algorithms (RFC 7518 §3.1, RFC 8037 §3.1, RFC 9864) this module can
#: match to a key, with the key type and curve each one needs.  ``HS*`` and
#: ``none`` are deliberately absent: an issuer's keys are public.
_ALGORITHM_KEYS: Final[Mapping[str, tuple[str, str | None]]] = MappingProxyType(
    {
        "RS256": ("RSA", None),
        "RS384": ("RSA", None),
        "RS512": ("RSA", None),
        "PS256": ("RSA", None),
        "PS384": ("RSA", None),
        "PS512": ("RSA", None),
        "ES256": ("EC", "P-256"),
        "ES384": ("EC", "P-384"),
        "ES512": ("EC", "P-521"),
        "EdDSA": ("OKP", "Ed25519"),
        "Ed25519": ("OKP", "Ed25519"),
    }
)


_SHOWN_CHARS: Final = 64

#: ``use`` values of a signature key: RFC 7517's ``sig``, and SPIFFE's ``jwt-svid``.
SIGNING_USES = frozenset({"sig", "jwt-svid"})


def quote_untrusted(value: object) -> str:
    """A short, quoted rendering of an untrusted value (a ``kid`` or ``alg``) for logs."""
    if value is None:
        return "(none)"  # No kid at all: not the name of a type.
    text = value if isinstance(value, str) else str(type(value).__name__)
    return repr(text[:_SHOWN_CHARS] + ("..." if len(text) > _SHOWN_CHARS else ""))


def allowed_algorithms(algorithms: Collection[str], source: str) -> frozenset[str]:
    """Validate the configured allow-list (RFC 8725 §3.1, §3.2: an explicit list, never ``none``)."""
    if isinstance(algorithms, str):
        raise ConfigurationError(
            f"{source}: algorithms must be a collection of names, not the string {algorithms!r}"
        )
    allowed = frozenset(algorithms)
    if not allowed:
        raise ConfigurationError(f"{source}: no JWS algorithms allowed")
    unsupported = sorted(str(alg) for alg in allowed if alg not in _ALGORITHM_KEYS)
    if unsupported:
        raise ConfigurationError(
            f"{source}: unsupported JWS algorithms {unsupported}; supported: {sorted(_ALGORITHM_KEYS)}"
        )
    return allowed


def check_request(kid: object, alg: object, allowed: frozenset[str]) -> None:
    """Refuse an algorithm outside the allow-list, or a non-string ``kid``/``alg``, before any lookup."""
    if not isinstance(alg, str) or alg not in allowed:
        raise UnknownKeyId(f"algorithm {quote_untrusted(alg)} is not allowed for this issuer")
    if kid is not None and not isinstance(kid, str):
        raise UnknownKeyId(f"kid of type {type(kid).__name__} is not a string")


class BadKeySet(ValueError):
    """The document is not a JWK Set at all."""


@dataclass(frozen=True, slots=True)
class KeyIndex:
    """An immutable lookup table built once per loaded key set.

    ``keys`` maps ``(kid, alg)`` to the one key usable for it; ``(None, alg)``
    is present only when exactly one key in the set fits ``alg``.  Looking a
    key up is therefore a single dictionary access.
    """

    keys: Mapping[tuple[str | None, str], Key]
    usable: int


def _skip(source: str, position: int, kid: object, reason: str) -> None:
    logger.warning("JWKS %s: skipping key #%d (kid %s): %s", source, position, quote_untrusted(kid), reason)


def _import_public_key(entry: object, position: int, set_size: int, source: str) -> Key | None:
    """Import one JWK if it is a well-formed public signature key, else log why and return None.

    The checks on the raw member names run before anything is parsed, so a
    private key is never even imported.
    """
    if not isinstance(entry, dict):
        _skip(source, position, None, "not a JSON object")
        return None
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        _skip(source, position, kid, "kid is not a string")
        return None
    kty = entry.get("kty")
    if kty == "oct":
        _skip(source, position, kid, "symmetric key (kty 'oct'); a JWK Set must hold only public keys")
        return None
    private = sorted(PRIVATE_JWK_MEMBERS.intersection(entry))
    if private:
        _skip(source, position, kid, f"private key members {private}; a JWK Set must hold only public keys")
        return None
    use = entry.get("use")
    # SPIFFE bundles mark JWT-SVID signing keys ``use: jwt-svid`` (SPIFFE Trust Domain and
    # Bundle, §4.2.2); ``x509-svid`` and ``enc`` keys never verify a JWT here.
    if use is not None and (not isinstance(use, str) or use not in SIGNING_USES):
        _skip(source, position, kid, f"use is {quote_untrusted(use)}, not 'sig' (RFC 7517 §4.2)")
        return None
    key_ops = entry.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        _skip(source, position, kid, "key_ops does not include 'verify' (RFC 7517 §4.3)")
        return None
    if kid is None and set_size != 1:
        _skip(source, position, kid, f"no kid, in a set of {set_size} keys")
        return None
    if kty == "RSA":
        # Measured before import: joserfc only warns about short RSA keys, and accepts any exponent.
        problem = rsa_key_problem(entry)
        if problem is not None:
            _skip(source, position, kid, problem)
            return None
    if kty == "OKP":
        problem = okp_key_problem(entry)
        if problem is not None:
            _skip(source, position, kid, problem)
            return None
    if use == "jwt-svid":
        # joserfc knows only the RFC 7517 values of ``use``; a JWT-SVID key is a signature key.
        entry = {**entry, "use": "sig"}
    try:
        key = JWKRegistry.import_key(entry)
    except InvalidKeyTypeError:
        # RFC 7517 §5: a key of a type we do not understand is ignored.
        _skip(source, position, kid, f"unsupported kty {quote_untrusted(kty)}")
        return None
    except (JoseError, ValueError, TypeError, KeyError, UnsupportedAlgorithm) as exc:
        _skip(source, position, kid, f"malformed ({type(exc).__name__})")
        return None
    if key.is_private:  # Belt and braces: the member check above should make this unreachable.
        _skip(source, position, kid, "private key")
        return None
    return key


def _fits(key: Key, alg: str) -> bool:
    """Whether ``alg`` can be used with ``key`` (key type, curve, and the JWK's own ``alg``)."""
    key_type, curve = _ALGORITHM_KEYS[alg]
    if key.key_type != key_type:
        return False
    if curve is not None and not (isinstance(key, ECKey | OKPKey) and key.curve_name == curve):
        return False
    declared = key.alg
    return declared is None or declared == alg


def index_key_set(document: object, algorithms: frozenset[str], source: str) -> KeyIndex:
    """Build the lookup table for a parsed JWK Set (RFC 7517 §5).

    Raises :class:`BadKeySet` when ``document`` is not an object with a
    ``keys`` array; individual bad keys are skipped with a warning.
    """
    if not isinstance(document, dict):
        raise BadKeySet("not a JSON object")
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise BadKeySet("no 'keys' array")
    keys = [
        key
        for position, entry in enumerate(entries)
        if (key := _import_public_key(entry, position, len(entries), source)) is not None
    ]

    table: dict[tuple[str | None, str], Key] = {}
    ambiguous: set[tuple[str | None, str]] = set()
    for alg in sorted(algorithms):
        fitting = [key for key in keys if _fits(key, alg)]
        if len(fitting) == 1:
            table[(None, alg)] = fitting[0]
        for key in fitting:
            if key.kid is None:
                continue
            slot: tuple[str | None, str] = (key.kid, alg)
            if slot in table or slot in ambiguous:
                # RFC 7517 §4.5: keys SHOULD have distinct kids.  Two keys that
                # both fit would make the choice arbitrary, so neither is used.
                ambiguous.add(slot)
                table.pop(slot, None)
            else:
                table[slot] = key
    for kid, alg in sorted(ambiguous, key=str):
        logger.warning(
            "JWKS %s: kid %s names several %s keys; none of them is used", source, quote_untrusted(kid), alg
        )

    usable = sum(1 for key in keys if any(_fits(key, alg) for alg in algorithms))
    return KeyIndex(keys=MappingProxyType(table), usable=usable)


def parse_key_set(body: bytes, algorithms: frozenset[str], source: str) -> KeyIndex:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadKeySet(f"not valid JSON ({type(exc).__name__})") from exc
    return index_key_set(document, algorithms, source)
