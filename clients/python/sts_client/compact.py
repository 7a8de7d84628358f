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

__all__ = ["CompactJWS", "MalformedJWS", "extract_compact_jws"]


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
    return CompactJWS(compact, _json_object(header_bytes, "header"), _json_object(compact.payload, "payload"))
