"""The STS's JWT access tokens as a resource server reads them (RFC 9068, RFC 8725).

:func:`verify_access_token_jwt` checks the JWT itself (header, key, signature,
claims); :func:`access_token_from_claims` turns its claims into a
:class:`VerifiedAccessToken`.  The sender constraint, revocation, scopes and
assurance are checked by :class:`~sts_client.verifier.TokenVerifier`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from joserfc.errors import ExpiredTokenError, InvalidClaimError, JoseError, MissingClaimError
from joserfc.jwt import JWTClaimsRegistry

from .compact import MalformedJWS, extract_compact_jws, validate_signature
from .errors import InvalidToken, TemporarilyUnavailable
from .jwks import ASYMMETRIC_ALGORITHMS, JWKSCache, KeysUnavailable, UnknownKey

__all__ = ["ACCESS_TOKEN_TYP", "MAX_TOKEN_BYTES", "VerifiedAccessToken"]

#: RFC 9068 §2.1.
ACCESS_TOKEN_TYP: Final = "at+jwt"
MAX_TOKEN_BYTES: Final = 16 * 1024


@dataclass(frozen=True)
class VerifiedAccessToken:
    """What a verified access token says (RFC 9068 §2.2); the token itself is not kept."""

    subject: str
    client_id: str
    audience: tuple[str, ...]
    scopes: frozenset[str]
    issued_at: int
    expires_at: int
    jti: str
    auth_time: int | None = None
    #: The RFC 7638 thumbprint of the key the token is bound to (``cnf.jkt``), if DPoP-bound.
    jkt: str | None = None
    #: RFC 8693 §4.1: the current actor (``act``), with earlier actors nested in it.
    actor: Mapping[str, Any] | None = None
    #: RFC 9470 / RFC 9068 §2.2.1: the assurance level the STS's exchange reached.
    acr: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict, repr=False)
    #: A fresher DPoP nonce for the client's next proof, to send as the ``DPoP-Nonce`` response
    #: header (RFC 9449 §9), when the verifier demands nonces and the proof's was not the current one.
    dpop_nonce: str | None = None

    @property
    def token_type(self) -> str:
        return "DPoP" if self.jkt is not None else "Bearer"

    def has_scopes(self, *scopes: str) -> bool:
        return set(scopes) <= self.scopes


def verify_access_token_jwt(
    token: str, *, keys: JWKSCache, issuer: str, audience: str, leeway: int, now: float, scheme: str
) -> dict[str, Any]:
    """RFC 9068 §4, RFC 8725: the JWT's claims once its form, header, key, signature and claims pass.

    Compact JWS of at most :data:`MAX_TOKEN_BYTES`; header ``typ`` ``at+jwt``, no ``crit``,
    ``alg`` asymmetric (and one the key declares); the key from ``keys`` by ``kid`` (never
    from the token's header); claims ``iss`` exactly ``issuer``, ``aud`` naming ``audience``,
    ``exp``/``nbf``/``iat`` with ``leeway``, and ``sub``, ``jti``, ``client_id`` present.
    Raises :class:`~sts_client.errors.InvalidToken`, or
    :class:`~sts_client.errors.TemporarilyUnavailable` when the keys cannot be had.
    """
    if len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
        raise InvalidToken("token.not_a_jws", scheme=scheme)
    try:
        extracted = extract_compact_jws(token, max_bytes=MAX_TOKEN_BYTES)
    except MalformedJWS as exc:
        raise InvalidToken("token.malformed", str(exc), scheme=scheme) from None
    compact, header, claims = extracted.compact, extracted.header, extracted.claims
    # RFC 9068 §4: typ must be at+jwt ("application/" may be omitted; case-insensitive), so an
    # ID token or an upstream workload token signed by the same keys cannot pass for one.
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower().removeprefix("application/") != ACCESS_TOKEN_TYP:
        raise InvalidToken("token.typ", scheme=scheme)
    if "crit" in header:
        raise InvalidToken("token.crit", scheme=scheme)
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS:
        raise InvalidToken("token.alg", str(alg)[:20], scheme=scheme)
    if kid is not None and not isinstance(kid, str):
        raise InvalidToken("token.kid", scheme=scheme)
    try:
        key = keys.key_for(kid, alg)
    except UnknownKey as exc:
        raise InvalidToken("token.unknown_key", str(exc), scheme=scheme) from None
    except KeysUnavailable as exc:
        raise TemporarilyUnavailable("keys.unavailable", str(exc), scheme=scheme) from None
    try:
        valid = validate_signature(compact, key, alg)
    except (JoseError, ValueError) as exc:
        raise InvalidToken("token.bad_signature", type(exc).__name__, scheme=scheme) from None
    if not valid:
        raise InvalidToken("token.bad_signature", scheme=scheme)
    claims_registry = JWTClaimsRegistry(
        now=int(now),
        leeway=leeway,
        iss={"essential": True, "value": issuer},
        aud={"essential": True, "value": audience},
        exp={"essential": True},
        iat={"essential": True},
        sub={"essential": True},
        jti={"essential": True},
        client_id={"essential": True},
    )
    try:
        claims_registry.validate(claims)
    except ExpiredTokenError:
        raise InvalidToken("token.expired", scheme=scheme) from None
    except MissingClaimError as exc:
        raise InvalidToken("token.missing_claim", str(exc), scheme=scheme) from None
    except InvalidClaimError as exc:
        raise InvalidToken("token.invalid_claim", str(exc), scheme=scheme) from None
    except JoseError as exc:
        raise InvalidToken("token.claims", type(exc).__name__, scheme=scheme) from None
    # joserfc compares iss with ==; make sure it is the exact string (RFC 8725 §3.8).
    if claims.get("iss") != issuer or not isinstance(claims.get("iss"), str):
        raise InvalidToken("token.iss", scheme=scheme)
    # RFC 7519 §2 NumericDate: a JSON 1e999 reads as infinity, and made the verifier fail with
    # OverflowError (an outside audit); an integer too large for a float (10**400) too.
    # joserfc left an ``exp`` of 10**400 (an integer) compared as it was, so such a token was
    # accepted and then failed with OverflowError (an outside audit); each time claim must be a
    # number a float holds, as at the STS.
    for name in ("exp", "iat", "nbf", "auth_time"):
        value = claims.get(name)
        if (value is not None or name in ("exp", "iat")) and not _numeric_date(value):
            raise InvalidToken("token.invalid_claim", name, scheme=scheme)
    # RFC 9068 §2.2, RFC 8693 §4.3: client_id is a string (a number was read as its text).
    if not isinstance(claims.get("client_id"), str):
        raise InvalidToken("token.invalid_claim", "client_id", scheme=scheme)
    return claims


def _numeric_date(value: object) -> bool:
    """A finite JSON number a float can hold (RFC 7519 §2 NumericDate)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def access_token_from_claims(claims: dict[str, Any], jkt: str | None) -> VerifiedAccessToken:
    """What verified ``claims`` say, with ``jkt`` the thumbprint of the key the token is bound to."""
    aud = claims["aud"]
    scope = claims.get("scope")
    auth_time = claims.get("auth_time")
    act = claims.get("act")
    acr = claims.get("acr")
    return VerifiedAccessToken(
        subject=claims["sub"],
        client_id=claims["client_id"],
        audience=(aud,) if isinstance(aud, str) else tuple(aud),
        scopes=frozenset(scope.split()) if isinstance(scope, str) else frozenset(),
        issued_at=int(claims["iat"]),
        expires_at=int(claims["exp"]),
        jti=claims["jti"],
        auth_time=int(auth_time)
        if isinstance(auth_time, int | float) and not isinstance(auth_time, bool)
        else None,
        jkt=jkt,
        actor=MappingProxyType(act) if isinstance(act, dict) else None,
        acr=acr if isinstance(acr, str) else None,
        claims=MappingProxyType(claims),
    )
