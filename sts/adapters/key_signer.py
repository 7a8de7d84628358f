"""The signer on the hot path: one compact JWS per issued token, with the ring's active key.

An ECDSA key (``ES256``, ``ES384``, the default) signs through a lean path: the
protected header is checked by joserfc's registry and base64url-encoded once per
distinct header, the claims are serialised as :func:`joserfc.jwt.encode` serialises
them, and the signing input
(RFC 7515 §5.1) is signed with the ``cryptography`` key parsed when the ring was
loaded.  The signature is R || S as fixed-width big-endian integers (RFC 7518
§3.4), which is what joserfc writes too.  Every other key type signs through
:func:`joserfc.jwt.encode`.  Both give the same header and payload bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ec import ECDSA, EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from joserfc import jwt
from joserfc.jwk import ECKey
from joserfc.jws import JWSRegistry
from joserfc.util import json_b64encode, urlsafe_b64encode

from .signing_keys import AsymmetricJWK

#: RFC 7518 §3.4: the hash each ECDSA algorithm signs with.
_ECDSA_HASHES: Mapping[str, type[hashes.HashAlgorithm]] = {
    "ES256": hashes.SHA256,
    "ES384": hashes.SHA384,
    "ES512": hashes.SHA512,
}
#: Header parameters that change how the payload is encoded or must be understood (RFC 7797 ``b64``
#: with ``crit``, RFC 7515 §4.1.11): left to joserfc.  The minter never sets them.
_UNENCODED_PAYLOAD = frozenset({"b64", "crit"})
#: The claims as :func:`joserfc.jwt.encode` serialises them (``convert_claims``: UTF-8 JSON, no
#: ASCII escaping, no whitespace), with one encoder built once.  The minter's claims are plain
#: JSON values (``exp``, ``iat`` and ``nbf`` integers, never the datetimes joserfc also converts).
_CLAIMS_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
#: How many distinct protected headers keep their encoded form (the minter uses one).
_HEADER_CACHE = 16


def ecdsa_signature(der: bytes, key_size: int) -> bytes:
    """RFC 7518 §3.4: the JWS form of a DER ECDSA signature, R || S, each as a big-endian integer
    of exactly ``ceil(key_size / 8)`` octets (leading zeros kept)."""
    r, s = decode_dss_signature(der)
    length = (key_size + 7) // 8
    return r.to_bytes(length, "big") + s.to_bytes(length, "big")


class KeySigner:
    """Signs with the active key; satisfies :class:`sts.core.ports.Signer`.

    The private key was parsed when the ring was loaded; signing never touches
    the disk.  ``repr`` shows the ``kid`` only.
    """

    __slots__ = ("_alg", "_ecdsa", "_headers", "_key", "_key_size", "_kid", "_private", "_registry")

    def __init__(self, key: AsymmetricJWK, kid: str, alg: str) -> None:
        self._key = key
        self._kid = kid
        self._alg = alg
        self._registry = JWSRegistry(algorithms=[alg])
        self._headers: dict[tuple[tuple[str, str], ...], bytes] = {}
        self._private: EllipticCurvePrivateKey | None = None
        self._ecdsa: ECDSA | None = None
        self._key_size = 0
        hash_type = _ECDSA_HASHES.get(alg)
        if hash_type is not None and isinstance(key, ECKey):
            # joserfc's own check that the key suits the algorithm (the curve), made once.
            self._registry.get_alg(alg).check_key(key)
            private = key.private_key
            if private is not None:
                self._private = private
                self._ecdsa = ECDSA(hash_type())
                self._key_size = private.curve.key_size

    @property
    def alg(self) -> str:
        return self._alg

    @property
    def kid(self) -> str:
        return self._kid

    def sign(self, header: Mapping[str, Any], claims: Mapping[str, Any]) -> str:
        """Return the compact JWS (RFC 7515 §7.1) of ``claims``.

        ``alg`` and ``kid`` are set here, overriding any value in ``header``;
        the caller supplies the rest (``typ: at+jwt`` for RFC 9068 tokens).
        No ``typ`` is added when the caller gives none.
        """
        protected = {**header, "alg": self._alg, "kid": self._kid}
        if self._private is None or self._ecdsa is None or _UNENCODED_PAYLOAD & protected.keys():
            return self._encode(protected, claims)
        try:
            payload = _CLAIMS_JSON.encode(claims)
        except TypeError:
            # Not plain JSON (a datetime, which joserfc converts, or something it refuses too).
            return self._encode(protected, claims)
        payload_segment = urlsafe_b64encode(payload.encode("utf-8"))
        signing_input = self._header_segment(protected) + b"." + payload_segment
        der = self._private.sign(signing_input, self._ecdsa)
        signature = urlsafe_b64encode(ecdsa_signature(der, self._key_size))
        return (signing_input + b"." + signature).decode("ascii")

    def _encode(self, protected: dict[str, Any], claims: Mapping[str, Any]) -> str:
        return jwt.encode(protected, dict(claims), self._key, algorithms=[self._alg], default_type=None)

    def _header_segment(self, protected: dict[str, Any]) -> bytes:
        """BASE64URL(UTF8(JWS Protected Header)), checked by joserfc's registry (RFC 7515 §4.1)
        as :func:`joserfc.jws.serialize_compact` checks it; remembered per header of plain strings."""
        if not all(type(value) is str for value in protected.values()):
            self._registry.check_header(protected)
            return json_b64encode(protected)
        cache_key = tuple(protected.items())
        segment = self._headers.get(cache_key)
        if segment is None:
            self._registry.check_header(protected)
            segment = json_b64encode(protected)
            if len(self._headers) < _HEADER_CACHE:
                self._headers[cache_key] = segment
        return segment

    def __repr__(self) -> str:
        return f"KeySigner(kid={self._kid!r}, alg={self._alg!r})"
