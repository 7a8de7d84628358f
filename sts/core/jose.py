"""JWS verification shared by every token this service reads.

RFC 8725 §3: the algorithm allow-list is per key and issuer and never
includes ``none`` or a symmetric algorithm; the key comes from the issuer's
configured key set, never from the token's own header (``jwk``, ``jku``,
``x5u``, ``x5c`` are ignored for key selection); a ``crit`` header is refused
because this service understands no JWS extension (RFC 7515 §4.1.11).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import Key
from joserfc.jws import JWSRegistry

MAX_JWT_BYTES = 16 * 1024

_REGISTRIES: dict[str, JWSRegistry] = {}


def registry_for(alg: str) -> JWSRegistry:
    """A registry allowing exactly ``alg``.

    Unknown, non-critical header parameters are ignored as RFC 7515 §4
    requires, rather than refused; ``crit`` is refused in :func:`peek`.
    """
    registry = _REGISTRIES.get(alg)
    if registry is None:
        registry = _REGISTRIES.setdefault(alg, JWSRegistry(algorithms=[alg], strict_check_header=False))
    return registry


class JWSInvalid(Exception):
    """The compact JWS is malformed or its signature does not verify.

    ``reason`` is a machine-readable tag for the audit record.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class UnverifiedJWS:
    """The header and claims of a compact JWS, before its signature is checked."""

    header: dict[str, Any]
    claims: dict[str, Any]
    #: The parsed compact serialization, verified later without parsing it again.
    compact: Any = None


def peek(token: str) -> UnverifiedJWS:
    """Split a compact JWS and parse header and payload, verifying nothing.

    Used to route the token to its issuer's keys; everything read here is
    checked again after the signature verifies.
    """
    if len(token) > MAX_JWT_BYTES:
        raise JWSInvalid("jws.too_large")
    if token.count(".") != 2:
        # Five segments would be a JWE; unsigned or detached forms are refused too.
        raise JWSInvalid("jws.not_compact_jws")
    try:
        obj = jws.extract_compact(token.encode("ascii"))
        header = obj.headers()
        claims = json.loads(obj.payload)
    except (JoseError, ValueError, UnicodeError, RecursionError) as exc:
        # RecursionError: JSON nested deeper than the parser's limit fits well inside MAX_JWT_BYTES.
        raise JWSInvalid("jws.malformed", type(exc).__name__) from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise JWSInvalid("jws.malformed", "header or payload is not a JSON object")
    if "crit" in header:
        raise JWSInvalid("jws.crit_not_understood")
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise JWSInvalid("jws.missing_alg")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise JWSInvalid("jws.malformed_kid")
    return UnverifiedJWS(header=header, claims=claims, compact=obj)


def normalise_typ(value: object) -> str | None:
    """RFC 7515 §4.1.9: ``typ`` is a media type; ``application/`` may be omitted; case-insensitive."""
    if value is None:
        return None
    if not isinstance(value, str):
        return "\x00invalid"
    lowered = value.lower()
    return lowered.removeprefix("application/")


def verify_signature(
    token: str,
    peeked: UnverifiedJWS,
    algorithms: Collection[str],
    resolve_key: Callable[[str | None, str], Key],
) -> None:
    """Verify the signature with a key chosen from the issuer's set by ``kid`` and ``alg``.

    Raises :class:`JWSInvalid`; exceptions from ``resolve_key`` (unknown key,
    keys unavailable) propagate for the caller to map.
    """
    alg = peeked.header["alg"]
    if alg not in algorithms:
        raise JWSInvalid("jws.algorithm_not_allowed", str(alg)[:20])
    key = resolve_key(peeked.header.get("kid"), alg)
    try:
        if peeked.compact is not None:
            valid = jws.validate_compact(peeked.compact, key, registry=registry_for(alg))
        else:
            jws.deserialize_compact(token, key, algorithms=[alg], registry=registry_for(alg))
            valid = True
    except (JoseError, ValueError) as exc:
        raise JWSInvalid("jws.bad_signature", type(exc).__name__) from None
    if not valid:
        raise JWSInvalid("jws.bad_signature", "BadSignatureError")
