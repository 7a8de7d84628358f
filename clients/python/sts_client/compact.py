"""Reading a compact JWS (RFC 7515 §7.1): its header and payload as UTF-8 JSON objects.

The one parser for what a resource server reads: access tokens
(:mod:`sts_client.verifier`) and DPoP proofs (:mod:`sts_client.dpop`).

RFC 7515 §5.2 and RFC 7519 §7.2: the protected header and the claims set are
the UTF-8 representation of a JSON object.  Python's ``json.loads(bytes)``
also reads UTF-16 and UTF-32 (it guesses the encoding), and joserfc parses
the header that way; so both are decoded here strictly as UTF-8 first.  A
UTF-8 byte-order mark is refused too (RFC 8259 §8.1: a sender MUST NOT add
one), as the STS itself does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jws import CompactSignature, JWSRegistry
from joserfc.util import urlsafe_b64decode

__all__ = ["CompactJWS", "MalformedJWS", "extract_compact_jws", "validate_signature"]


class MalformedJWS(ValueError):
    """Not a compact JWS whose header and payload are JSON objects in UTF-8; the message says why."""


@dataclass(frozen=True)
class CompactJWS:
    """A parsed compact JWS, not yet verified."""

    compact: CompactSignature
    header: dict[str, Any]
    claims: dict[str, Any]


def _not_json(constant: str) -> Any:
    """``NaN``, ``Infinity`` and ``-Infinity`` are not JSON (RFC 8259 §6); Python reads them."""
    raise ValueError(f"{constant} is not a JSON number")


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose member names repeat is refused (RFC 7515 §5.2, RFC 7519 §4), as by the STS:
    which of two values counts would be the parser's choice."""
    value = dict(pairs)
    if len(value) != len(pairs):
        raise ValueError("a member name repeats")
    return value


def _json_object(segment: bytes, part: str) -> dict[str, Any]:
    try:
        text = segment.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedJWS(f"{part} is not UTF-8") from None
    if text.startswith("\ufeff"):
        raise MalformedJWS(f"{part} starts with a byte-order mark")
    if "\x00" in text:
        # No NUL byte can occur in UTF-8 JSON text: this is UTF-16 or UTF-32 without a byte-order mark.
        raise MalformedJWS(f"{part} is not UTF-8 (NUL byte)")
    try:
        value = json.loads(text, parse_constant=_not_json, object_pairs_hook=_unique_members)
    except (ValueError, RecursionError) as exc:
        raise MalformedJWS(f"{part}: {type(exc).__name__}") from None
    if not isinstance(value, dict):
        raise MalformedJWS(f"{part} is not a JSON object")
    return value


def extract_compact_jws(token: str, *, max_bytes: int, registry: JWSRegistry | None = None) -> CompactJWS:
    """Split ``token`` and parse its header and payload; verify nothing.  Raises :class:`MalformedJWS`."""
    if len(token) > max_bytes or token.count(".") != 2:
        raise MalformedJWS("not a compact JWS")
    try:
        compact = jws.extract_compact(token.encode("ascii"), registry=registry)
        header_bytes = urlsafe_b64decode(compact.segments["header"])
    except (JoseError, ValueError, UnicodeError, RecursionError) as exc:
        raise MalformedJWS(type(exc).__name__) from None
    header = _json_object(header_bytes, "header")
    cty = header.get("cty")
    if cty is not None and (not isinstance(cty, str) or cty.lower() in ("jwt", "application/jwt")):
        # RFC 7519 §5.2, §7.2 step 8: the payload would be another JWT; none is nested here.
        raise MalformedJWS("a nested JWT (cty)")
    return CompactJWS(compact, header, _json_object(compact.payload, "payload"))


#: Ed25519 (RFC 9864 §2.2), the scheme RFC 8037's ``EdDSA`` names on an Ed25519 key.
_ED25519 = JWSRegistry(algorithms=["Ed25519"], strict_check_header=False).get_alg("Ed25519")
_REGISTRIES: dict[str, JWSRegistry] = {}


def validate_signature(compact: CompactSignature, key: Any, alg: str) -> bool:
    """Whether ``compact``'s signature verifies with ``key`` under ``alg`` (and only ``alg``).

    ``EdDSA`` (RFC 8037) is checked as ``Ed25519`` (RFC 9864), the same signature on the Ed25519
    keys :func:`~sts_client.jwks.key_fits` lets it use: joserfc warns on every use of the deprecated
    name, which the service still issues and accepts in DPoP proofs (an outside interop check
    found such tokens and proofs refused here).  Raises joserfc's errors as ``jws.validate_compact``.
    """
    if alg == "EdDSA":
        signing_input = compact.segments["header"] + b"." + compact.segments["payload"]
        try:
            signature = urlsafe_b64decode(compact.segments["signature"])
        except (TypeError, ValueError):
            return False
        return bool(_ED25519.verify(signing_input, signature, key))
    registry = _REGISTRIES.get(alg)
    if registry is None:
        registry = _REGISTRIES.setdefault(alg, JWSRegistry(algorithms=[alg], strict_check_header=False))
    return bool(jws.validate_compact(compact, key, registry=registry))
