"""Token introspection (RFC 7662) and revocation (RFC 7009) for the tokens this service issues.

Introspection answers only authenticated callers, and a token is active *to
that caller* only when its audience includes one the caller is registered
for (``clients[].audiences``): a resource server learns nothing about tokens
meant for others.  An inactive token reveals nothing but ``{"active": false}``
(RFC 7662 §2.2).  A token is inactive when it is not ours, does not verify,
has expired or is not yet valid, was revoked by ``jti`` (RFC 7009), or was
issued to a subject before its ``revoked_before`` (a security event such as
CAEP ``session-revoked``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from joserfc.jwk import Key

from .jose import JWSInvalid, normalise_typ, peek, verify_signature
from .ports import KeysUnavailable, RevokedTokens, StoreUnavailable, SubjectStateStore, UnknownKeyId
from .subject_state import ANY_ISSUER, identity_key, is_revoked, merge

INACTIVE: dict[str, Any] = {"active": False}
#: Claims an active introspection response may carry (RFC 7662 §2.2, RFC 8693 §4, RFC 9449 §6.2).
REPORTED = (
    "scope",
    "client_id",
    "sub",
    "aud",
    "iss",
    "exp",
    "iat",
    "nbf",
    "jti",
    "act",
    "cnf",
    "auth_time",
    "acr",
)


@dataclass(frozen=True)
class OwnTokenVerifier:
    issuer: str
    algorithms: Collection[str]
    keys: Callable[[str | None, str], Key]
    leeway: int


def verify_own_token(token: str, verifier: OwnTokenVerifier, now: float) -> dict[str, Any] | None:
    """The claims of a valid, unexpired access token of ours; None for anything else."""
    try:
        peeked = peek(token)
        if normalise_typ(peeked.header.get("typ")) != "at+jwt":
            return None
        verify_signature(token, peeked, verifier.algorithms, verifier.keys)
    except (JWSInvalid, UnknownKeyId, KeysUnavailable):
        return None
    claims = peeked.claims
    if claims.get("iss") != verifier.issuer:
        return None
    exp, nbf = _as_float(claims.get("exp")), claims.get("nbf")
    if exp is None or now >= exp + verifier.leeway:
        return None
    if nbf is not None and ((start := _as_float(nbf)) is None or now + verifier.leeway < start):
        return None
    if not isinstance(claims.get("jti"), str) or not isinstance(claims.get("sub"), str):
        return None
    return claims


def _as_float(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            return None
        return number if math.isfinite(number) else None
    return None


def audiences_of(claims: Mapping[str, Any]) -> tuple[str, ...]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list):
        return tuple(a for a in aud if isinstance(a, str))
    return ()


def revoked(
    claims: Mapping[str, Any], issuer_names: Collection[str], states: SubjectStateStore, tokens: RevokedTokens
) -> bool:
    """Revoked by jti, or issued before a security event revoked its subject.  Store errors propagate."""
    if tokens.revoked(str(claims["jti"])):
        return True
    subject = str(claims["sub"])
    keys = [identity_key(name, subject) for name in sorted(issuer_names)] + [
        identity_key(ANY_ISSUER, subject)
    ]
    return is_revoked(merge(states.get(keys)), _as_float(claims.get("iat")))


def introspect(
    token: str,
    caller_audiences: Collection[str],
    verifier: OwnTokenVerifier,
    issuer_names: Collection[str],
    states: SubjectStateStore,
    tokens: RevokedTokens,
    now: float,
) -> dict[str, Any]:
    """RFC 7662 §2.2 response for ``token`` as seen by a caller serving ``caller_audiences``."""
    claims = verify_own_token(token, verifier, now)
    if claims is None or not set(audiences_of(claims)) & set(caller_audiences):
        return dict(INACTIVE)
    try:
        if revoked(claims, issuer_names, states, tokens):
            return dict(INACTIVE)
    except StoreUnavailable:
        # Cannot tell whether it was revoked: say inactive (fail closed).
        return dict(INACTIVE)
    cnf = claims.get("cnf")
    dpop_bound = isinstance(cnf, Mapping) and "jkt" in cnf
    # RFC 9449 §6.2: DPoP only for a key-bound token; a certificate-bound one (RFC 8705) is Bearer.
    response: dict[str, Any] = {"active": True, "token_type": "DPoP" if dpop_bound else "Bearer"}
    response.update({name: claims[name] for name in REPORTED if name in claims})
    return response
