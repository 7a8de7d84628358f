"""DPoP proofs (RFC 9449): making them (workloads) and checking them (resource servers).

A proof is a JWT signed with the client's own key, whose public half travels
in the header; the access token is bound to that key by its thumbprint
(``cnf.jkt``, RFC 7638)::

    GET /deployments HTTP/1.1
    Host: deploy.example.com
    Authorization: DPoP eyJ0eXAiOiJhdCtqd3Qi...
    DPoP: eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6Ik...

    header  {"typ": "dpop+jwt", "alg": "ES256", "jwk": {"kty": "EC", "crv": "P-256", "x": "...", "y": "..."}}
    claims  {"jti": "e1j3V_bKic8-LAEB", "htm": "GET", "htu": "https://deploy.example.com/deployments",
             "iat": 1700000000, "ath": "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"}

:class:`DPoPKey` makes proofs.  :func:`check_proof` does the checks of RFC
9449 §4.3 that need nothing but the proof and the request; the verifier adds
the binding to ``cnf.jkt`` (§7.1) and the ``jti`` replay check (§11.1) with a
:class:`ReplayCache`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, Key
from joserfc.jws import JWSRegistry
from joserfc.util import to_str, urlsafe_b64encode

from .compact import MalformedJWS, extract_compact_jws, validate_signature
from .errors import InvalidDPoPProof
from .jwks import ASYMMETRIC_ALGORITHMS, MAX_RSA_BITS, import_public_key, key_fits

__all__ = [
    "DEFAULT_DPOP_ALGORITHMS",
    "CheckedProof",
    "DPoPKey",
    "InMemoryReplayCache",
    "ReplayCache",
    "ReplayCacheFull",
    "ReplayCacheUnavailable",
    "access_token_hash",
    "check_proof",
    "normalise_htu",
    "proof_replay_key",
]

#: What a resource server accepts by default (announced as ``algs``).  No ``none``, no ``HS*``:
#: a proof must be verifiable with the public key it carries (RFC 9449 §4.2).
DEFAULT_DPOP_ALGORITHMS: Final = (
    "ES256",
    "ES384",
    "ES512",
    "PS256",
    "PS384",
    "PS512",
    "RS256",
    "Ed25519",
    "EdDSA",
)

DPOP_TYP: Final = "dpop+jwt"
MAX_PROOF_BYTES: Final = 8 * 1024
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
#: A URI or IRI as written: no space, no control character (RFC 3986 §2, RFC 3987 §2.2).
_PRINTABLE_URI = re.compile(r"[^\x00-\x20\x7f-\x9f]+")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def access_token_hash(access_token: str) -> str:
    """RFC 9449 §4.2 ``ath``: base64url (no padding) of the SHA-256 of the token's ASCII bytes."""
    return to_str(urlsafe_b64encode(hashlib.sha256(access_token.encode("ascii")).digest()))


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
    """The URI a proof's ``htu`` is compared with: no query or fragment, normalised (RFC 9449 §4.3).

    Syntax- and scheme-based normalisation (RFC 3986 §6.2.2, §6.2.3): scheme
    and host lower-cased, the default (or an empty) port dropped, an empty
    path made ``/``, percent-encodings normalised, dot segments removed.  A URI
    with user information raises ``ValueError``: an ``http(s)`` URI never
    carries it (RFC 9110 §4.2.4).
    """
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise ValueError("user information in the URI")
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port  # A port that is not a number in range raises ValueError: no match.
    netloc = host if port is None or _DEFAULT_PORTS.get(scheme) == port else f"{host}:{port}"
    # An IRI's characters beyond ASCII as their UTF-8 percent-encodings (RFC 3987 §3.1), as the
    # client wrote them: a server's decoded ``/api/€`` is the client's ``/api/%E2%82%AC``.
    path = parts.path if parts.path.isascii() else quote(parts.path, safe=_PATH_SAFE)
    path = _remove_dot_segments(_PERCENT.sub(_normalise_percent, path)) or "/"
    return urlunsplit((scheme, netloc, path, "", ""))


#: Every ASCII character a path may hold as it is (so only the others are encoded).
_PATH_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))


def request_target_url(base_url: str, environ: Mapping[str, Any], decoded_path: str) -> str | None:
    """``base_url`` (scheme and authority, as the request is served) with the request's path as the
    client sent it: the server's ``RAW_URI`` or ``REQUEST_URI`` (gunicorn, uWSGI, Werkzeug, granian),
    in which ``%2F`` and ``%25`` are still what they were (a decoded ``PATH_INFO`` has lost them).
    None when the server gives neither, or when it names another path than ``decoded_path`` (the
    application's whole path, decoded): a proxy's prefix (``X-Forwarded-Prefix``) is then part of
    the URL the client used, and the raw path the server saw lacks it."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if not isinstance(raw, str) or not raw.startswith("/"):
        return None
    path = raw.partition("?")[0].partition("#")[0]
    if unquote(path) != decoded_path:
        return None
    return base_url.rstrip("/") + path


class DPoPKey:
    """A DPoP key pair (ES256 by default) that lives in this process only.

    The private half is never written anywhere: a workload generates one at
    start (:class:`~sts_client.workload.StsAuth` does), so a token bound to
    it is useless to anyone who copies the token but not the process.
    """

    def __init__(self, key: Key | None = None, alg: str = "ES256") -> None:
        key = key if key is not None else ECKey.generate_key("P-256")
        if not key.is_private:
            raise ValueError("a DPoP key must hold its private part")
        if not key_fits(key, alg):
            raise ValueError(f"the key does not fit {alg}")
        self._key = key
        self.alg = alg
        self._public_jwk: dict[str, Any] = dict(key.as_dict(private=False))
        for member in ("kid", "alg", "use", "key_ops"):
            self._public_jwk.pop(member, None)
        self.jkt = key.thumbprint()

    def __repr__(self) -> str:
        return f"DPoPKey(alg={self.alg!r}, jkt={self.jkt!r})"

    @property
    def public_jwk(self) -> dict[str, Any]:
        return dict(self._public_jwk)

    def proof(
        self,
        method: str,
        url: str,
        *,
        access_token: str | None = None,
        nonce: str | None = None,
        now: float | None = None,
    ) -> str:
        """A fresh proof for one request (RFC 9449 §4.2): new ``jti``, ``htu`` without query or fragment."""
        parts = urlsplit(url)
        # Without user information (``https://alice:secret@host/``, which requests keeps in the
        # URL when an ``auth=`` is given): an http(s) target URI never carries it (RFC 9110
        # §4.2.4), and in the proof it would send the password on in a header (an outside audit).
        netloc = parts.netloc.rpartition("@")[2]
        claims: dict[str, Any] = {
            "jti": secrets.token_urlsafe(16),
            "htm": method.upper(),
            "htu": urlunsplit((parts.scheme, netloc, parts.path or "/", "", "")),
            "iat": int(time.time() if now is None else now),
        }
        if access_token is not None:
            claims["ath"] = access_token_hash(access_token)
        if nonce is not None:
            claims["nonce"] = nonce
        header = {"typ": DPOP_TYP, "alg": self.alg, "jwk": self._public_jwk}
        return jwt.encode(header, claims, self._key, algorithms=[self.alg])


# -- checking proofs (resource servers) -----------------------------------------------------------


@dataclass(frozen=True)
class CheckedProof:
    """A proof whose signature and request binding held; ``jkt`` is its key's RFC 7638 thumbprint."""

    jkt: str
    jti: str
    iat: int
    nonce: str | None


#: Parses proofs only.  joserfc's default registry refuses a protected header over 512 characters
#: and a signature over 1024, but a proof's header carries the whole public key (§4.2): with an
#: RSA-2048 ``jwk`` it is about 550.  These limits hold a proof by any RSA key the key rules allow
#: (up to ``MAX_RSA_BITS``: a header of about 3,700 characters, a signature of 2,731), as the STS's.
_PROOF_PARSER = JWSRegistry(strict_check_header=False)
_PROOF_PARSER.max_header_length = 8192
_PROOF_PARSER.max_signature_length = 4 * -(-(MAX_RSA_BITS // 8) // 3)


def check_proof(
    proof: str,
    *,
    method: str,
    url: str,
    access_token: str | None,
    algorithms: Collection[str],
    now: float,
    max_age: float,
    leeway: float,
) -> CheckedProof:
    """RFC 9449 §4.3 steps 2-11 for one proof (the caller has made sure there is exactly one).

    Raises :class:`~sts_client.errors.InvalidDPoPProof` with a ``reason``
    naming the failed check.  The ``jti`` replay check and the comparison
    with ``cnf.jkt`` are the caller's (they need state and the token).
    """
    try:
        parsed = extract_compact_jws(proof, max_bytes=MAX_PROOF_BYTES, registry=_PROOF_PARSER)
    except MalformedJWS as exc:
        raise InvalidDPoPProof("dpop.malformed", str(exc)) from None
    extracted, header, claims = parsed.compact, parsed.header, parsed.claims
    # §4.3 (4): typ is exactly dpop+jwt (media types compare case-insensitively).
    # RFC 7515 §4.1.9: a typ without "/" means "application/<typ>", so the two spellings are one.
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower().removeprefix("application/") != DPOP_TYP:
        raise InvalidDPoPProof("dpop.typ")
    if "crit" in header:
        raise InvalidDPoPProof("dpop.crit")
    # §4.3 (5): an asymmetric algorithm we accept; never none or a MAC.
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in algorithms or alg not in ASYMMETRIC_ALGORITHMS:
        raise InvalidDPoPProof("dpop.alg", str(alg)[:20])
    # §4.3 (7): the jwk is a public key.  The members are looked at before anything is imported.
    jwk = header.get("jwk")
    if not isinstance(jwk, dict):
        raise InvalidDPoPProof("dpop.jwk_missing")
    key, why = import_public_key(jwk)
    if key is None:
        raise InvalidDPoPProof("dpop.jwk_not_public", why)
    if not key_fits(key, alg):
        raise InvalidDPoPProof("dpop.jwk_alg_mismatch")
    for chain in (jwk.get("x5c"), header.get("x5c")):
        # RFC 7517 §4.7, RFC 7515 §4.1.6: a certificate chain's first certificate holds the key.
        if chain is not None and not _certificate_holds(chain, key):
            raise InvalidDPoPProof("dpop.x5c_mismatch", "x5c does not hold the proof's key")
    # §4.3 (6): the signature verifies with that key.
    try:
        valid = validate_signature(extracted, key, alg)
    except (JoseError, ValueError) as exc:
        raise InvalidDPoPProof("dpop.bad_signature", type(exc).__name__) from None
    if not valid:
        raise InvalidDPoPProof("dpop.bad_signature")
    # §4.3 (3): the claims a resource server needs.
    jti, htm, htu, iat = claims.get("jti"), claims.get("htm"), claims.get("htu"), claims.get("iat")
    if not isinstance(jti, str) or not jti or len(jti) > 256:
        raise InvalidDPoPProof("dpop.jti")
    if not isinstance(htm, str) or not isinstance(htu, str):
        raise InvalidDPoPProof("dpop.htm_htu_missing")
    if isinstance(iat, bool) or not isinstance(iat, int | float):
        raise InvalidDPoPProof("dpop.iat_missing")
    # §4.3 (8): htm matches the method.
    if htm != method.upper():
        raise InvalidDPoPProof("dpop.htm_mismatch")
    # §4.3 (9): htu matches the request URI "ignoring any query and fragment parts" (of both:
    # normalise_htu drops them), though §4.2 has a client leave them out of htu.
    try:
        # A space or a control character makes it no URI (RFC 3986 §2), though urlsplit drops tabs
        # and line breaks and strips leading ones: such an htu names nothing.
        same = _PRINTABLE_URI.fullmatch(htu) is not None and normalise_htu(htu) == normalise_htu(url)
    except ValueError:
        same = False
    if not same:
        raise InvalidDPoPProof("dpop.htu_mismatch")
    # §4.3 (11): iat inside the acceptance window (§11.1).
    if iat > now + leeway:
        raise InvalidDPoPProof("dpop.iat_future")
    if iat < now - max_age:
        raise InvalidDPoPProof("dpop.iat_stale")
    # RFC 7519 §4.1.4-5: a proof that sets exp or nbf is not accepted outside them (a client that
    # shortens its proofs' life keeps that protection; the STS refuses them too: an outside audit).
    for name in ("exp", "nbf"):
        if name not in claims:
            continue
        value = claims[name]
        # A NumericDate (RFC 7519 §2): a finite number a float holds; null, NaN, 1e999 and 10**400
        # are refused, as the STS refuses them (an outside re-check).
        if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
            raise InvalidDPoPProof(f"dpop.{name}")
        if (name == "exp" and value <= now - leeway) or (name == "nbf" and value > now + leeway):
            raise InvalidDPoPProof(f"dpop.{name}")
    # §4.3 (12) / §7.1: ath binds the proof to this access token.
    if access_token is not None:
        ath = claims.get("ath")
        # (compare_digest refuses str with other than ASCII: such an ath is no hash of ours anyway.)
        if (
            not isinstance(ath, str)
            or not ath.isascii()
            or not secrets.compare_digest(ath, access_token_hash(access_token))
        ):
            raise InvalidDPoPProof("dpop.ath_mismatch")
    nonce = claims.get("nonce")
    # Rounded up: the proof is accepted while ``iat >= now - max_age``, so its jti is remembered
    # until at least ``iat + max_age`` (truncated, a fractional iat outlived its replay entry by up
    # to a second, and with leeway 0 was accepted twice: an outside audit).
    return CheckedProof(
        jkt=key.thumbprint(), jti=jti, iat=math.ceil(iat), nonce=nonce if isinstance(nonce, str) else None
    )


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer no float holds
        return False


# -- jti replay cache ------------------------------------------------------------------------------


class ReplayCacheUnavailable(Exception):
    """The cache cannot say whether a ``jti`` was seen (a shared cache unreachable): the caller
    fails closed, with ``503`` and ``Retry-After``, since the client did nothing wrong."""


class ReplayCacheFull(ReplayCacheUnavailable):
    """The cache holds its maximum of unexpired entries; the caller fails closed."""


class ReplayCache(Protocol):
    """Where proof ``jti`` values are remembered (RFC 9449 §11.1).

    Several resource-server processes behind one load balancer should share
    one: :class:`sts_client.redis_replay.RedisReplayCache`, or anything with this method.
    """

    def first_use(self, key: str, expires_at: float, now: float) -> bool:
        """Record ``key`` until at least ``expires_at``; True if it was not recorded already
        (atomically).  Raises :class:`ReplayCacheUnavailable` when it cannot tell."""
        ...


class InMemoryReplayCache:
    """A bounded, thread-safe, per-process :class:`ReplayCache`.

    When ``max_entries`` unexpired entries are held, a new one is refused
    (:class:`ReplayCacheFull`) rather than evicting one early, which would
    let that ``jti`` be replayed.
    """

    def __init__(self, max_entries: int = 200_000) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def first_use(self, key: str, expires_at: float, now: float) -> bool:
        with self._lock:
            seen = self._entries.get(key)
            if seen is not None and seen > now:
                return False
            if seen is None and len(self._entries) >= self._max_entries:
                self._purge(now)
                if len(self._entries) >= self._max_entries:
                    raise ReplayCacheFull("too many DPoP proofs inside the window")
            self._entries[key] = expires_at
            self._entries.move_to_end(key)
            return True

    def _purge(self, now: float) -> None:
        # Entries are kept in insertion order; windows are of equal length, so expiry is nearly ordered.
        expired = [key for key, expires_at in self._entries.items() if expires_at <= now]
        for key in expired:
            del self._entries[key]


def proof_replay_key(checked: CheckedProof) -> str:
    """The cache key: ``jti`` per proof key, hashed so the cache holds no client data."""
    return hashlib.sha256(json.dumps([checked.jkt, checked.jti]).encode()).hexdigest()


def _certificate_holds(chain: Any, key: Key) -> bool:
    """Whether the first certificate of an ``x5c`` chain holds ``key`` (the chain is not trusted
    otherwise: the proof key is the client's own)."""
    if not isinstance(chain, list) or not chain or not isinstance(chain[0], str):
        return False
    public = key.public_key
    if isinstance(public, bytes):
        return False
    try:
        certificate = x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
        held = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return bool(held == public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))
