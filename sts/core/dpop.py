"""DPoP proofs at the token endpoint (RFC 9449).

A client proves possession of a key by sending, with the token request, a
JWT signed by that key (RFC 9449 §4)::

    POST /token
    DPoP: <JWS: header {"typ": "dpop+jwt", "alg": "ES256", "jwk": {...public key...}}
               claims {"jti": "...", "htm": "POST", "htu": "https://sts.example.com/token",
                       "iat": 1700000000, "nonce": "..."}>

The issued token then carries ``cnf.jkt``, the RFC 7638 thumbprint of that
key, and is ``token_type: DPoP`` (§5, §6).  Every check of §4.3 is made here:
exactly one proof; ``typ: dpop+jwt``; an asymmetric algorithm from the
allow-list; a public ``jwk`` in the header that verifies the signature and
holds no private part; ``htm`` and ``htu`` matching this request (``htu``
compared without query and fragment); ``iat`` within a short window; a
``jti`` not seen before in that window (§11.1); and, when the server demands
one, a ``nonce`` it issued (§8).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry, Key

from ..errors import InvalidDPoPProof, OAuthError, TemporarilyUnavailable, UseDPoPNonce
from .claims import ClaimInvalid, ClaimRules, check_claims, normalise_typ
from .jose import (
    PRIVATE_JWK_MEMBERS,
    JWSInvalid,
    UnverifiedJWS,
    parse_compact,
    rsa_key_problem,
    verify_compact_signature,
)
from .okp_keys import okp_key_problem
from .ports import ReplayCache, ReplayWindowLost, StoreUnavailable

DPOP_ALGORITHMS = ("ES256", "ES384", "ES512", "RS256", "PS256", "Ed25519", "EdDSA")
_KEY_TYPES = {"ES": "EC", "RS": "RSA", "PS": "RSA", "Ed": "OKP"}


@dataclass(frozen=True)
class DPoPConfig:
    algorithms: frozenset[str]
    max_age: int
    leeway: int
    #: Secret for stateless server nonces (§8); None: nonces are not demanded.
    nonce_secret: bytes | None
    nonce_lifetime: int = 300


@dataclass(frozen=True)
class VerifiedProof:
    jkt: str
    jti: str
    iat: float


_DEFAULT_PORTS = {"http": 80, "https": 443}
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
#: The characters a URI is written with (RFC 3986 §2: unreserved, reserved, percent-encodings).
#: ``urlsplit`` drops tabs and line breaks anywhere and strips leading controls and spaces: a
#: text holding any of those, or any other character, is not a URI and names nothing.
_URI_TEXT = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})+")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _normalise_percent(match: re.Match[str]) -> str:
    # RFC 3986 §6.2.2.1-2: hex digits upper-case; an encoded unreserved character decoded.
    char = unquote(match.group(0))
    return char if char in _UNRESERVED else match.group(0).upper()


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 / §6.2.2.3: ``/a/./b/../c`` is ``/a/c``."""
    segments = path.split("/")
    kept: list[str] = []
    for position, segment in enumerate(segments):
        last = position == len(segments) - 1
        if segment in (".", ".."):
            if segment == ".." and len(kept) > 1:
                kept.pop()
            if last:
                kept.append("")
            continue
        kept.append(segment)
    return "/".join(kept)


def normalise_htu(url: str) -> str:
    """RFC 9449 §4.3: the URI compared, after syntax- and scheme-based normalisation (RFC 3986 §6.2.2,
    §6.2.3), without query or fragment.

    Scheme and host lower-cased; the default (or an empty) port dropped; percent-encodings
    normalised; dot segments removed; an empty path made ``/``.  A URI with user information is
    refused (``ValueError``): an ``http(s)`` URI never carries it (RFC 9110 §4.2.4); so is a text
    that is not a URI at all (a space, a control character, a bare ``%``, see :data:`_URI_TEXT`).
    """
    if not _URI_TEXT.fullmatch(url):
        raise ValueError("not a URI")
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise ValueError("user information in the URI")
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    netloc = host if port is None or _DEFAULT_PORTS.get(scheme) == port else f"{host}:{port}"
    path = _remove_dot_segments(_PERCENT.sub(_normalise_percent, parts.path)) or "/"
    return urlunsplit((scheme, netloc, path, "", ""))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def issue_nonce(secret: bytes, now: float) -> str:
    """A stateless nonce any instance sharing ``secret`` can check: time || HMAC(time)."""
    stamp = struct.pack(">Q", int(now))
    return _b64(stamp + hmac.new(secret, stamp, hashlib.sha256).digest()[:16])


def nonce_valid(secret: bytes, nonce: object, now: float, lifetime: int) -> bool:
    return nonce_issued_at(secret, nonce, now, lifetime) is not None


def nonce_issued_at(secret: bytes, nonce: object, now: float, lifetime: int) -> int | None:
    """When a valid nonce of ours was issued (whole seconds, rounded down); None if it is not valid."""
    if not isinstance(nonce, str) or len(nonce) > 64:
        return None
    try:
        raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
    except ValueError:
        return None
    if len(raw) != 24 or _b64(raw) != nonce:
        # Exactly the text we issued (RFC 9449 §8): the lenient decoder also takes padding,
        # whitespace, other characters and the ``+/`` alphabet for the same bytes.
        return None
    stamp, mac = raw[:8], raw[8:]
    if not hmac.compare_digest(mac, hmac.new(secret, stamp, hashlib.sha256).digest()[:16]):
        return None
    issued = int(struct.unpack(">Q", stamp)[0])
    return issued if issued <= now + 5 and now - issued <= lifetime else None


#: Said to a client whose DPoP proof the replay store can no longer vouch for.
REPLAY_WINDOW_LOST = (
    "The DPoP proof predates a loss of the server's replay records; send a freshly made proof."
)


def window_lost(config: DPoPConfig, exc: ReplayWindowLost, now: float) -> OAuthError:
    """The refusal of a proof the replay store's lost records may have seen.  A fresh proof fixes
    it: with nonces, one carrying a nonce issued now (which RFC 9449 §8 clients send on their
    own); without, one made after the loss (and the leeway) has passed."""
    if config.nonce_secret is not None:
        nonce = issue_nonce(config.nonce_secret, max(now, exc.lost_at))
        return UseDPoPNonce(nonce, "dpop.replay_window_lost", str(exc))
    return InvalidDPoPProof("dpop.replay_window_lost", str(exc), description=REPLAY_WINDOW_LOST)


def _refuse(reason: str, detail: str = "") -> InvalidDPoPProof:
    return InvalidDPoPProof(f"dpop.{reason}", detail)


#: How many proof keys keep their parsed form (:func:`_imported_key`): one per workload replica
#: that exchanges often.  A hostile client can only churn the cache, each entry a few kilobytes.
PROOF_KEY_CACHE = 256


def _public_key(jwk: Any, alg: str) -> tuple[Key, str]:
    """The proof's public key and its RFC 7638 thumbprint (``jkt``), refused unless it is a public
    key of the type ``alg`` names."""
    if not isinstance(jwk, dict):
        raise _refuse("missing_jwk")
    if not PRIVATE_JWK_MEMBERS.isdisjoint(jwk):
        raise _refuse("private_jwk")
    expected = _KEY_TYPES.get(alg[:2])
    if expected is None or jwk.get("kty") != expected:
        raise _refuse("jwk_alg_mismatch")
    if all(type(value) is str for value in jwk.values()):
        # The same key signs every proof of a workload: it is parsed (and its thumbprint taken)
        # once per exact set of members, which is also all a key import reads.
        return _imported_key(tuple(sorted(jwk.items())), expected)
    return _import_key(jwk, expected)


@functools.lru_cache(maxsize=PROOF_KEY_CACHE)
def _imported_key(members: tuple[tuple[str, str], ...], kty: str) -> tuple[Key, str]:
    """:func:`_import_key`, remembered (a refusal raises again each time, and is not kept)."""
    return _import_key(dict(members), kty)


def _import_key(jwk: dict[str, Any], kty: str) -> tuple[Key, str]:
    # Before the import: a short key or an exponent other than 65537 is refused whatever joserfc
    # would say (it only warns about short keys).
    if kty == "RSA" and (problem := rsa_key_problem(jwk)) is not None:
        raise _refuse("weak_key", problem)
    if (problem := _encoding_problem(jwk, kty)) is not None:
        raise _refuse("malformed_jwk", problem)
    if kty == "OKP" and (problem := okp_key_problem(jwk)) is not None:
        raise _refuse("weak_key", problem)
    try:
        key = JWKRegistry.import_key(dict(jwk))
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        # KeyError: joserfc looks an unknown "crv" up in a table.
        raise _refuse("malformed_jwk", type(exc).__name__) from None
    if key.is_private:
        raise _refuse("private_jwk")
    if "x5c" in jwk and not _certificate_holds(jwk["x5c"], key):
        raise _refuse("malformed_jwk", "x5c does not hold this key")
    return key, key.thumbprint()


#: Octets of an EC coordinate (RFC 7518 §6.2.1.2) and of an OKP public key (RFC 8037 §2), by curve.
_KEY_OCTETS = {"P-256": 32, "P-384": 48, "P-521": 66, "secp256k1": 32, "Ed25519": 32, "Ed448": 57}
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


def _encoding_problem(jwk: Mapping[str, Any], kty: str) -> str | None:
    """Why the key members of a proof's ``jwk`` are not written the one way they may be, or None.

    The thumbprint (RFC 7638) is taken over the members as written, so a key written two ways
    would be two ``jkt`` values: the token would be bound to a text, not to a key, and a
    resource server that reads the key and takes its thumbprint would refuse the holder.  Hence:
    base64url without padding whose last character carries no extra bits (RFC 7515 §2, RFC 4648
    §3.5); an RSA ``n`` and ``e`` in the fewest octets (Base64urlUInt, RFC 7518 §2); EC
    coordinates of the curve's full size (RFC 7518 §6.2.1.2, §6.2.1.3) and an OKP key of its
    curve's size (RFC 8037 §2).
    """
    names = ("n", "e") if kty == "RSA" else ("x", "y") if kty == "EC" else ("x",)
    for name in names:
        value = jwk.get(name)
        if not isinstance(value, str) or not _BASE64URL.fullmatch(value):
            return f"{name} is not base64url"
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        except ValueError:  # a length no octets have (one character past a multiple of four)
            return f"{name} is not base64url"
        if _b64(raw) != value:
            return f"{name} is not base64url as written by its octets"
        if kty == "RSA":
            if raw[0] == 0:
                return f"{name} has a leading zero octet"
        elif len(raw) != _KEY_OCTETS.get(str(jwk.get("crv")), len(raw)):
            return f"{name} is not {_KEY_OCTETS[str(jwk.get('crv'))]} octets"
    return None


def _certificate_holds(chain: Any, key: Key) -> bool:
    """Whether the first certificate of an ``x5c`` chain (RFC 7517 §4.7: it MUST hold the key)
    holds ``key``.  The chain is not otherwise trusted or checked: the proof key is the client's own."""
    if not isinstance(chain, list) or not chain or not isinstance(chain[0], str):
        return False
    public = key.public_key
    if isinstance(public, bytes):  # a symmetric key: never a proof key
        return False
    try:
        certificate = x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
        held = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # UnsupportedAlgorithm: a key type or curve the library does not know (it was a 500; a review).
        return False
    return held == public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


@functools.lru_cache(maxsize=256)
def _same_uri(htu: str, url: str) -> bool:
    """Whether ``htu`` names ``url`` (remembered: a client sends the same ``htu`` every time)."""
    try:
        return normalise_htu(htu) == normalise_htu(url)
    except ValueError:
        # urlsplit refuses some authorities (an unclosed IPv6 bracket): not this endpoint.
        return False


def _parse(proof: str) -> UnverifiedJWS:
    """Header and claims of the proof, verifying nothing (:func:`.jose.parse_compact`, room for a key)."""
    try:
        return parse_compact(proof)
    except JWSInvalid as exc:
        raise _refuse(exc.reason.removeprefix("jws."), exc.detail) from None


def verify_proof(
    headers: Sequence[str],
    *,
    method: str,
    url: str,
    config: DPoPConfig,
    replay: ReplayCache,
    now: float,
    access_token_hash: str | None = None,
) -> VerifiedProof:
    """Check one DPoP proof (RFC 9449 §4.3); raise ``invalid_dpop_proof`` or ``use_dpop_nonce``."""
    if len(headers) != 1:
        raise _refuse("not_exactly_one_proof", str(len(headers)))
    peeked = _parse(headers[0].strip())
    header, claims = peeked.header, peeked.claims
    if normalise_typ(header.get("typ")) != "dpop+jwt":
        raise _refuse("wrong_typ")
    alg = header["alg"]
    if alg not in config.algorithms:
        raise _refuse("algorithm_not_allowed", str(alg)[:20])
    key, jkt = _public_key(header.get("jwk"), alg)
    if "x5c" in header and not _certificate_holds(header["x5c"], key):
        # RFC 7515 §4.1.6: its first certificate MUST hold the signing key (as in the ``jwk``'s own).
        raise _refuse("malformed_jwk", "the header's x5c does not hold the proof's key")
    try:
        valid = verify_compact_signature(peeked.compact, key, alg)
    except (JoseError, ValueError) as exc:
        raise _refuse("bad_signature", type(exc).__name__) from None
    if not valid:
        raise _refuse("bad_signature")
    try:
        checked = check_claims(claims, _proof_rules(config), now=now)
    except ClaimInvalid as exc:
        raise _refuse(exc.reason, exc.detail) from None
    htm, htu = claims.get("htm"), claims.get("htu")
    if htm != method:
        raise _refuse("htm_mismatch")
    # §4.3 (9): "ignoring any query and fragment parts" (normalise_htu drops them); a proof whose
    # htu has them is off §4.2, which leaves them out, but still names this endpoint.
    if not isinstance(htu, str) or not _same_uri(htu, url):
        raise _refuse("htu_mismatch")
    if access_token_hash is not None and claims.get("ath") != access_token_hash:
        raise _refuse("ath_mismatch")
    jti, iat = checked.jti, checked.iat
    if jti is None or iat is None:  # Required by the rules; this keeps the types honest.
        raise _refuse("missing_jti" if jti is None else "missing_iat")
    # The earliest time the proof could have been accepted: a nonce of ours dates it on our own
    # clock; else its iat, less the leeway given to a client clock ahead of ours.
    valid_from: float = iat - config.leeway
    if config.nonce_secret is not None:
        nonce_time = nonce_issued_at(config.nonce_secret, claims.get("nonce"), now, config.nonce_lifetime)
        if nonce_time is None:
            raise UseDPoPNonce(issue_nonce(config.nonce_secret, now))
        valid_from = max(valid_from, nonce_time)
    try:
        first = replay.first_use(
            f"dpop:{jkt}", jti, iat + config.max_age + config.leeway, now, valid_from=valid_from
        )
    except StoreUnavailable as exc:
        raise TemporarilyUnavailable("store.unavailable", str(exc)) from None
    except ReplayWindowLost as exc:
        raise window_lost(config, exc, now) from None
    if not first:
        raise _refuse("replayed_jti")
    return VerifiedProof(jkt=jkt, jti=jti, iat=iat)


#: The proof's claims (§4.2): ``jti`` of at least 8 characters (enough entropy to be unique, §11.1)
#: and ``iat`` in the window ``[now - max_age, now + leeway]``; no ``aud``, ``exp`` or ``sub``.
@functools.lru_cache(maxsize=8)
def _proof_rules(config: DPoPConfig) -> ClaimRules:
    return ClaimRules(
        leeway=config.leeway,
        require_aud=False,
        require_exp=False,
        require_iat=True,
        max_age=config.max_age,
        require_sub=False,
        require_jti=True,
        min_jti_length=8,
        max_jti_length=256,
    )


def allowed_algorithms(configured: Collection[str]) -> frozenset[str]:
    return frozenset(a for a in configured if a in DPOP_ALGORITHMS)
