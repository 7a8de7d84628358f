"""JWS verification shared by every token this service reads.

RFC 8725 §3: the algorithm allow-list is per key and issuer and never
includes ``none`` or a symmetric algorithm; the key comes from the issuer's
configured key set, never from the token's own header (``jwk``, ``jku``,
``x5u``, ``x5c`` are ignored for key selection); a ``crit`` header is refused
because this service understands no JWS extension (RFC 7515 §4.1.11).
:func:`parse_compact` is the one parser: header and claims are read as UTF-8
JSON objects only (RFC 7515 §5.2, RFC 7519 §7.2), and as I-JSON (RFC 7493:
no duplicate member names, no unpaired surrogates; no ``NaN``).  :func:`rsa_key_problem` is
the one rule for RSA keys (2048 to 16384 bits, public exponent 65537).  The
claims themselves are checked by :mod:`.claims`.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ec import ECDSA
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, Key, RSAKey
from joserfc.jws import CompactSignature, JWSRegistry
from joserfc.util import urlsafe_b64decode

MAX_JWT_BYTES = 16 * 1024

_REGISTRIES: dict[str, JWSRegistry] = {}

#: RFC 7518 §3.3, §3.5: RSA keys under 2048 bits MUST NOT be used.  The upper bound keeps a hostile
#: key (an upstream JWKS, a DPoP proof's ``jwk``) from making each verification slow.
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 16384
#: The only RSA public exponent accepted: F4, ``"e": "AQAB"``.  NIST SP 800-56B Rev. 2 §6.2.1 and
#: FIPS 186-5 §A.1.1 require an odd e with 2**16 < e < 2**256; 65537 is the smallest such value and
#: the one every mainstream issuer and library uses.  A small exponent such as 3 invites the
#: Bleichenbacher'06 forgery of PKCS #1 v1.5 signatures against lax verifiers; other values in the
#: NIST range are not seen in practice, so they are refused too rather than carried as an untested case.
RSA_PUBLIC_EXPONENT = 65537
#: joserfc's default limits (a header of 512 base64url characters, a signature of 1024) refuse what
#: this service accepts: the signature of an RSA key of :data:`MAX_RSA_BITS` bits is 2,731
#: characters, and a header with an ``x5c`` chain (ignored: keys only come from the key set) or a
#: DPoP proof's RSA ``jwk`` passes 512.  The whole token is bounded by :data:`MAX_JWT_BYTES`.
MAX_HEADER_CHARS = 8192
MAX_SIGNATURE_CHARS = 4 * -(-(MAX_RSA_BITS // 8) // 3)

#: Parses every JWS (no algorithm allowed: signatures are verified with :func:`registry_for`).
_PARSER = JWSRegistry(algorithms=[], strict_check_header=False)
_PARSER.max_header_length = MAX_HEADER_CHARS
_PARSER.max_signature_length = MAX_SIGNATURE_CHARS


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


class _DuplicateMember(ValueError):
    """A JSON object names one member twice."""


class _NotJsonConstant(ValueError):
    """``NaN``, ``Infinity`` or ``-Infinity``: Python's extension, not JSON."""


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: an object whose member names are unique, else :class:`_DuplicateMember`
    (naming the first repeated member)."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _DuplicateMember(name)
            seen.add(name)
    return value


def _refuse_constant(name: str) -> Any:
    raise _NotJsonConstant(name)


#: The strict reader of :func:`_json_object`, built once (``json.loads`` with these hooks builds a
#: new decoder on every call).
_STRICT_JSON = json.JSONDecoder(object_pairs_hook=_unique_members, parse_constant=_refuse_constant)


#: A UTF-16 surrogate code point: in a Python string only from a ``\uD800``-style escape with no
#: partner, as strict UTF-8 decoding refuses encoded surrogates.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _json_object(segment: bytes, part: str) -> dict[str, Any]:
    """A base64url-decoded JWS header or JWT claims set, as a JSON object in UTF-8.

    RFC 7515 §5.2 (steps 3-4) and RFC 7519 §7.2 (step 10): both are the
    UTF-8 representation of a JSON object.  Python's ``json.loads(bytes)``
    would also read UTF-16 and UTF-32 (it guesses the encoding, RFC 4627
    §3), so the bytes are decoded as UTF-8 here, strictly, first.  A UTF-8
    byte-order mark is refused too: RFC 8259 §8.1 says a sender MUST NOT
    add one, and no issuer this service talks to does.  A NUL byte cannot
    occur in UTF-8 JSON text (control characters are escaped inside
    strings), so one marks UTF-16 or UTF-32 without a byte-order mark.

    The text must also be I-JSON (RFC 7493), which is what every issuer
    sends, so that no two readers can see different claims in one token:

    * member names are unique (RFC 7493 §2.3).  RFC 7515 §5.2 and RFC 7519
      §4 allow either refusing duplicates or keeping the last; refusing is
      the choice that leaves no room for ``{"alg": "none", "alg": "RS256"}``
      or two ``sub`` values read differently by this service and by a
      library downstream (``jws.duplicate_member``);
    * ``NaN``, ``Infinity`` and ``-Infinity``, which Python's parser
      accepts, are not JSON (RFC 8259 §6; ``jws.malformed``);
    * a string holds no unpaired surrogate (``"\\ud800"``, RFC 7493 §2.1,
      RFC 8259 §8.2): it has no UTF-8 form (``jws.not_utf8``).
    """
    try:
        text = segment.decode("utf-8")
    except UnicodeDecodeError:
        raise JWSInvalid("jws.not_utf8", f"{part} is not UTF-8") from None
    if text.startswith("\ufeff"):
        raise JWSInvalid("jws.not_utf8", f"{part} starts with a byte-order mark")
    if "\x00" in text:
        raise JWSInvalid("jws.not_utf8", f"{part} holds a NUL byte (UTF-16 or UTF-32)")
    try:
        value = _STRICT_JSON.decode(text)
    except _DuplicateMember as exc:
        raise JWSInvalid("jws.duplicate_member", f"{part} repeats member {str(exc)[:40]!r}") from None
    except _NotJsonConstant as exc:
        raise JWSInvalid("jws.malformed", f"{part} holds {exc}, which is not JSON") from None
    except (ValueError, RecursionError) as exc:
        # RecursionError: JSON nested deeper than the parser's limit fits well inside MAX_JWT_BYTES.
        raise JWSInvalid("jws.malformed", type(exc).__name__) from None
    if not isinstance(value, dict):
        raise JWSInvalid("jws.malformed", f"{part} is not a JSON object")
    if "\\u" in text:
        # Only an escape can produce a surrogate; every string, member names included, is checked.
        try:
            lone = _LONE_SURROGATE.search(json.dumps(value, ensure_ascii=False)) is not None
        except RecursionError:
            raise JWSInvalid("jws.malformed", "RecursionError") from None
        if lone:
            raise JWSInvalid("jws.not_utf8", f"{part} holds an unpaired surrogate")
    return value


def parse_compact(token: str, *, parser: JWSRegistry | None = None) -> UnverifiedJWS:
    """Split a compact JWS (RFC 7515 §7.1) and parse header and payload, verifying nothing.

    The one parser for every JWS this service reads (upstream tokens, client
    assertions, SETs, our own tokens, DPoP proofs).  ``parser`` sets
    joserfc's size limits (default: :data:`MAX_HEADER_CHARS`, :data:`MAX_SIGNATURE_CHARS`).
    Raises :class:`JWSInvalid`: ``jws.too_large``, ``jws.not_compact_jws``
    (a JWE, an unsecured or detached JWS), ``jws.not_utf8``, ``jws.malformed``,
    ``jws.crit_not_understood`` (RFC 7515 §4.1.11: no extension is
    understood here), ``jws.missing_alg``, ``jws.nested_jwt`` (a ``cty`` of ``JWT``: RFC 7519
    §5.2; or one not a string).
    """
    if len(token) > MAX_JWT_BYTES:
        raise JWSInvalid("jws.too_large")
    if token.count(".") != 2:
        # Five segments would be a JWE; unsigned or detached forms are refused too.
        raise JWSInvalid("jws.not_compact_jws")
    registry = parser or _PARSER
    parsed = _parse_plain_compact(token, registry)
    if parsed is not None:
        return parsed
    try:
        obj = jws.extract_compact(token.encode("ascii"), registry=registry)
        # joserfc has parsed the header with json.loads(bytes) already; parse it again, strictly.
        header_bytes = urlsafe_b64decode(obj.segments["header"])
    except (JoseError, ValueError, UnicodeError, RecursionError) as exc:
        raise JWSInvalid("jws.malformed", type(exc).__name__) from None
    header = _json_object(header_bytes, "header")
    claims = _json_object(obj.payload, "payload")
    if "crit" in header:
        raise JWSInvalid("jws.crit_not_understood")
    if not isinstance(header.get("alg"), str):
        raise JWSInvalid("jws.missing_alg")
    cty = header.get("cty")
    if cty is not None and (not isinstance(cty, str) or cty.lower() in _NESTED):
        # RFC 7519 §5.2, §7.2 step 8: the payload would be another JWT, to be verified in turn;
        # read as claims, it was this token's (an outside audit).  No token here is nested.
        raise JWSInvalid("jws.nested_jwt", "cty")
    return UnverifiedJWS(header=header, claims=claims, compact=obj)


#: ``cty`` values that say the payload is itself a JWT (RFC 7519 §5.2: ``JWT``; the media type).
_NESTED = frozenset({"jwt", "application/jwt"})


def _parse_plain_compact(token: str, registry: JWSRegistry) -> UnverifiedJWS | None:
    """:func:`parse_compact` of a well-formed token with a plain (base64url) payload, decoding each
    segment once; None for anything else, which :func:`parse_compact` then reads the long way
    (through :func:`joserfc.jws.extract_compact`), to refuse it with the same reason as ever.

    It applies the size limits of ``registry`` as ``extract_compact`` does, and builds the same
    :class:`~joserfc.jws.CompactSignature` (header, decoded payload, the three segments), so the
    signature is verified by joserfc exactly as before.  A header naming ``b64`` (RFC 7797),
    ``crit`` or ``cty``, or without a string ``alg``, takes the long way.
    """
    try:
        value = token.encode("ascii")
        registry.validate_compact_value_size(value)
        header_segment, payload_segment, signature_segment = value.split(b".")
        registry.validate_header_size(header_segment)
        registry.validate_signature_size(signature_segment)
        registry.validate_payload_size(payload_segment)
        if not payload_segment:
            return None
        header = _plain_header(header_segment)
        if header is None:
            return None
        payload = urlsafe_b64decode(payload_segment)
        claims = _json_object(payload, "payload")
    except (JWSInvalid, JoseError, ValueError, UnicodeError, RecursionError):
        return None
    obj = CompactSignature(header, payload)
    obj.segments.update(
        {"header": header_segment, "payload": payload_segment, "signature": signature_segment}
    )
    return UnverifiedJWS(header=header, claims=claims, compact=obj)


#: How many protected headers keep their parsed form (:func:`_plain_header`).  An issuer signs every
#: token with one header per key, and a workload every DPoP proof with one header (its key); a
#: hostile client can only churn the cache, each entry at most a header's size.
HEADER_CACHE = 256


#: RFC 7517 §4, RFC 7518 §6.2.2, §6.3.2, §6.4: the members of a JWK that hold private or secret key
#: material.
PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class _NotKept(Exception):
    """A header :func:`_parsed_header` gives but must not remember (raised: ``lru_cache`` keeps no
    call that raises)."""

    def __init__(self, header: dict[str, Any]) -> None:
        super().__init__("not kept")
        self.header = header


@functools.lru_cache(maxsize=HEADER_CACHE)
def _parsed_header(segment: bytes) -> dict[str, Any] | None:
    """The header of the segment, parsed strictly (:func:`_json_object`), when it is one
    :func:`_parse_plain_compact` reads; None for one it leaves to the long way.  A segment that is
    no header at all raises each time (a refusal is not kept), and so does a header whose ``jwk``
    holds private key material (:class:`_NotKept`): a client's secret, sent by mistake in a DPoP
    proof (which is refused, RFC 9449 §4.3), is not kept in memory."""
    header = _json_object(urlsafe_b64decode(segment), "header")
    if "b64" in header or "crit" in header or "cty" in header or not isinstance(header.get("alg"), str):
        return None
    jwk = header.get("jwk")
    if isinstance(jwk, dict) and not PRIVATE_JWK_MEMBERS.isdisjoint(jwk):
        raise _NotKept(header)
    return header


def _plain_header(segment: bytes) -> dict[str, Any] | None:
    """:func:`_parsed_header`, remembered by the segment's exact bytes: decoding and parsing are a
    function of those bytes alone, so a remembered header is the one parsing would give.  Each
    caller gets a dict of its own (the members' values are shared and never changed)."""
    try:
        header = _parsed_header(segment)
    except _NotKept as not_kept:
        return not_kept.header
    return None if header is None else dict(header)


def peek(token: str) -> UnverifiedJWS:
    """:func:`parse_compact` for a token whose key is chosen by ``kid`` from an issuer's set.

    Used to route the token to its issuer's keys; everything read here is
    checked again after the signature verifies.
    """
    peeked = parse_compact(token)
    kid = peeked.header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise JWSInvalid("jws.malformed_kid")
    return peeked


def rsa_key_problem(jwk: Mapping[str, Any]) -> str | None:
    """Why an RSA JWK (RFC 7518 §6.3.1) must not be used, or None when it may.

    Measured on the raw members, before the key is imported (joserfc only
    warns about short keys): the modulus ``n`` is :data:`MIN_RSA_BITS` to
    :data:`MAX_RSA_BITS` bits and the exponent ``e`` is :data:`RSA_PUBLIC_EXPONENT`.
    Used for every RSA key this service verifies with: issuers', clients' and
    transmitters' key sets (:mod:`sts.adapters.jwks_acceptance`) and DPoP proof keys.
    """
    modulus, exponent = _base64url_uint(jwk.get("n")), _base64url_uint(jwk.get("e"))
    if not modulus:
        return "malformed RSA modulus"
    bits = modulus.bit_length()
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        return f"RSA modulus of {bits} bits (allowed: {MIN_RSA_BITS}-{MAX_RSA_BITS})"
    if exponent != RSA_PUBLIC_EXPONENT:
        shown = "malformed" if exponent is None else str(exponent) if exponent < 2**32 else "huge"
        return f"RSA public exponent {shown} (only {RSA_PUBLIC_EXPONENT} is accepted)"
    return None


def _base64url_uint(value: object) -> int | None:
    """RFC 7518 §2 Base64urlUInt, or None when it is not base64url."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return int.from_bytes(urlsafe_b64decode(value.encode("ascii")), "big")
    except (ValueError, UnicodeError):
        return None


#: RFC 7518 §3.4 (ECDSA) and §3.3 (RSASSA-PKCS1-v1_5): the algorithms whose signature
#: :func:`verify_compact_signature` checks with the key's ``cryptography`` object directly.
_ECDSA: Mapping[str, ECDSA] = {
    "ES256": ECDSA(hashes.SHA256()),
    "ES384": ECDSA(hashes.SHA384()),
    "ES512": ECDSA(hashes.SHA512()),
}
_PKCS1: Mapping[str, hashes.HashAlgorithm] = {
    "RS256": hashes.SHA256(),
    "RS384": hashes.SHA384(),
    "RS512": hashes.SHA512(),
}
_PKCS1_PADDING = PKCS1v15()


def verify_compact_signature(compact: CompactSignature, key: Key, alg: str) -> bool:
    """Whether the signature of ``compact`` (from :func:`parse_compact`) verifies with ``key`` under
    ``alg``, the one algorithm allowed: :func:`joserfc.jws.validate_compact` with
    :func:`registry_for` ``(alg)``, step for step.

    joserfc checks the header (RFC 7515 §4.1) and allows only ``alg`` (its registry), and checks
    the key: its ``use``, type, ``alg`` and curve (``check_key``), and that its ``key_ops`` allow
    ``verify`` (``get_op_key``), which gives the key's parsed ``cryptography`` object.  For ECDSA
    and RSASSA-PKCS1-v1_5 the signature is then checked with that object directly, as joserfc's
    algorithm would check it (an ECDSA signature is R || S of exactly twice the curve's octet
    length, RFC 7518 §3.4), without its per-call wrappers.  Any other algorithm or key goes to
    ``validate_compact``.
    """
    registry = registry_for(alg)
    kind = type(key)
    if not ((kind is ECKey and alg in _ECDSA) or (kind is RSAKey and alg in _PKCS1)):
        return jws.validate_compact(compact, key, registry=registry)
    header = compact.headers()
    registry.check_header(header)
    registry.get_alg(header["alg"]).check_key(key)
    try:
        signature = urlsafe_b64decode(compact.segments["signature"])
    except (TypeError, ValueError):
        return False
    signing_input = compact.segments["header"] + b"." + compact.segments["payload"]
    # In joserfc's order: a signature of the wrong length is refused before the key's operations
    # are looked at.
    try:
        if isinstance(key, ECKey):
            length = (key.curve_key_size + 7) // 8
            if len(signature) != 2 * length:
                return False
            der = encode_dss_signature(
                int.from_bytes(signature[:length], "big"), int.from_bytes(signature[length:], "big")
            )
            key.get_op_key("verify").verify(der, signing_input, _ECDSA[alg])
        else:
            rsa_public = cast(RSAPublicKey, key.get_op_key("verify"))
            rsa_public.verify(signature, signing_input, _PKCS1_PADDING, _PKCS1[alg])
    except InvalidSignature:
        return False
    return True


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
            valid = verify_compact_signature(peeked.compact, key, alg)
        else:
            jws.deserialize_compact(token, key, algorithms=[alg], registry=registry_for(alg))
            valid = True
    except (JoseError, ValueError) as exc:
        raise JWSInvalid("jws.bad_signature", type(exc).__name__) from None
    if not valid:
        raise JWSInvalid("jws.bad_signature", "BadSignatureError")
