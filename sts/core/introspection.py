"""Token introspection (RFC 7662) and revocation (RFC 7009) for the tokens this service issues.

Introspection answers only authenticated callers, and a token is active *to
that caller* only when its audience includes one the caller is registered
for (``clients[].audiences``): a resource server learns nothing about tokens
meant for others.  An inactive token reveals nothing but ``{"active": false}``
(RFC 7662 §2.2).  A token is inactive when it is not ours, does not verify,
has expired or is not yet valid, was revoked by ``jti`` (RFC 7009), was
issued to a subject, or through an actor of its delegation chain, before its
``revoked_before`` (a security event such as CAEP ``session-revoked``, or
``sts revoke subject``), or holds the posture level (``acr``) while a security
event declares the subject's posture bad.  The token endpoint asks
:func:`revocation` the same question of a token of ours presented again.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from joserfc.jwk import Key

from .assurance import ACR_POSTURE
from .claims import ClaimInvalid, ClaimRules, check_claims, normalise_typ, numeric_date_value
from .delegation import SELF_ISSUER, UPSTREAM_ISSUER_CLAIM
from .jose import JWSInvalid, peek, verify_signature
from .ports import KeysUnavailable, RevokedTokens, StoreUnavailable, SubjectStateStore, UnknownKeyId
from .risk import RiskSettings
from .subject_state import ANY_ISSUER, SubjectState, identity_key, is_revoked, merge

INACTIVE: dict[str, Any] = {"active": False}
#: Postures a security event may declare that still count as posture evidence (the default of a
#: rule's ``risk.posture_good``; CAEP ``device-compliance-change`` says ``compliant`` or not).
GOOD_POSTURES = RiskSettings().posture_good
#: How many actors of a delegation chain (``act`` nested in ``act``) are looked up: tokens of ours
#: nest no deeper than a rule's ``delegation.max_depth`` allows, far below this.
MAX_CHAIN_ACTORS = 16
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
    # Our own tokens: exact iss, exp, sub and jti required; aud (downstream services) checked for shape.
    rules = ClaimRules(leeway=verifier.leeway, issuer=verifier.issuer, require_aud=False, require_jti=True)
    try:
        check_claims(claims, rules, now=now)
    except ClaimInvalid:
        return None
    return claims


def audiences_of(claims: Mapping[str, Any]) -> tuple[str, ...]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list):
        return tuple(a for a in aud if isinstance(a, str))
    return ()


#: The claim of our tokens naming the configured upstream issuer whose token began the chain (the
#: name ``issuers[].name``); carried over when one of our tokens is exchanged again.
UPSTREAM_CLAIM = UPSTREAM_ISSUER_CLAIM


def upstream_issuer(claims: Mapping[str, Any], issuer_names: Collection[str]) -> str | None:
    """The configured issuer a token of ours came from (:data:`UPSTREAM_CLAIM`), if it names one."""
    name = claims.get(UPSTREAM_CLAIM)
    return name if isinstance(name, str) and name in issuer_names and name != ANY_ISSUER else None


def own_token_identities(
    subject: str, issuer_names: Collection[str], upstream: str | None = None
) -> list[str]:
    """The identity keys whose state applies to a token of ours issued to ``subject``.

    Our token's ``sub`` is the subject of the upstream token it came from, so a security event
    or an operator may name that subject under the issuer it came from (``upstream``, the token's
    :data:`UPSTREAM_CLAIM`), under this service itself (``self``: a SET whose ``iss_sub`` names
    our own issuer, ``sts revoke subject self ...``), or under every issuer (``*``).  Not under
    another issuer: the same ``sub`` there is another workload (``system:serviceaccount:ns:sa``
    in two clusters), and a transmitter allowed to speak for that issuer only must not reach it.
    A token without the claim (issued before it existed) is checked under every issuer.
    """
    named = {upstream} if upstream is not None else set(issuer_names)
    names = sorted({*named, SELF_ISSUER} - {ANY_ISSUER})
    return [identity_key(name, subject) for name in names] + [identity_key(ANY_ISSUER, subject)]


def actor_identities(act: Any, issuer_names: Collection[str], issuer_of: Mapping[str, str]) -> list[str]:
    """The identity keys whose state applies to the current actor a token of ours names (its
    top-level ``act``, RFC 8693 §4.1: the party exercising the token).  See
    :func:`chain_actor_identities` for every actor of the chain.

    The actor's issuer is found by the ``iss`` it was verified under (``issuer_of``: issuer URL to
    configured name).  An actor that was a token of ours (``iss`` is ours) is looked up under the
    ``upstream_issuer`` its entry carries; one whose entry carries none (issued before entries did),
    or whose issuer is no longer configured, under every issuer.
    """
    if not isinstance(act, Mapping) or not isinstance(act.get("sub"), str):
        return []
    iss = act.get("iss")
    name = issuer_of.get(iss) if isinstance(iss, str) else None
    if name is None or name == SELF_ISSUER:
        # An actor that was a token of ours: the issuer it came from, when the entry names it.
        name = upstream_issuer(act, issuer_names)
    known = name is not None and name in issuer_names
    return own_token_identities(act["sub"], issuer_names, name if known else None)


def chain_actor_identities(
    act: Any, issuer_names: Collection[str], issuer_of: Mapping[str, str]
) -> list[str]:
    """:func:`actor_identities` of every actor of a token's delegation chain: the current one and
    the earlier ones nested in its ``act`` (RFC 8693 §4.1), up to :data:`MAX_CHAIN_ACTORS`.

    For access control §4.1 counts only the current actor; for revocation every actor counts: a
    token derived through a delegation an actor exercised came from that actor's session, and a
    security event that ends the session (CAEP ``session-revoked``) reaches what was derived
    from it, as it reaches what was derived from a revoked subject (an outside audit: a token
    re-exchanged with a second actor kept the first actor's revoked delegation alive, and could
    be exchanged again for new tokens naming it).
    """
    keys: list[str] = []
    for _ in range(MAX_CHAIN_ACTORS):
        if not isinstance(act, Mapping):
            break
        keys += [key for key in actor_identities(act, issuer_names, issuer_of) if key not in keys]
        act = act.get("act")
    return keys


def token_identities(
    token_issuer: str, subject: str, claims: Mapping[str, Any], issuer_names: Collection[str]
) -> list[str]:
    """The identity keys whose state applies to a verified token's subject: the upstream
    identity's own and the any-issuer one; for a token of ours, see :func:`own_token_identities`."""
    if token_issuer == SELF_ISSUER:
        return own_token_identities(subject, issuer_names, upstream_issuer(claims, issuer_names))
    return [identity_key(token_issuer, subject), identity_key(ANY_ISSUER, subject)]


def revocation(
    claims: Mapping[str, Any],
    issuer_names: Collection[str],
    states: SubjectStateStore,
    tokens: RevokedTokens,
    issuer_of: Mapping[str, str] | None = None,
) -> str | None:
    """Why a token of ours is revoked: ``"jti"`` (RFC 7009, ``POST /revoke``), ``"subject"`` (issued
    before its subject's ``revoked_before``: a security event or ``sts revoke subject``), ``"actor"``
    (issued before that of an actor of its delegation chain, with ``issuer_of``: see
    :func:`chain_actor_identities`), ``"posture"`` (its ``acr`` is the posture level, and a security
    event, CAEP ``device-compliance-change``, has since declared the subject's posture bad: the
    evidence its level rested on is withdrawn, see :func:`posture_withdrawn`), or None.

    Every instance sharing the store sees the same answer.  Raises :class:`StoreUnavailable` when the
    store cannot answer; callers fail closed (introspection says inactive, the exchange refuses).
    """
    if tokens.revoked(str(claims["jti"])):
        return "jti"
    keys = own_token_identities(str(claims["sub"]), issuer_names, upstream_issuer(claims, issuer_names))
    act = claims.get("act")
    actor_keys = chain_actor_identities(act, issuer_names, issuer_of) if issuer_of is not None else []
    found = states.get([*keys, *actor_keys])  # One read for both.
    issued_at = numeric_date_value(claims.get("iat"))
    subject_state = merge(found[: len(keys)])
    if is_revoked(subject_state, issued_at):
        return "subject"
    if actor_keys and is_revoked(merge(found[len(keys) :]), issued_at):
        return "actor"
    if claims.get("acr") == ACR_POSTURE and posture_withdrawn(subject_state):
        return "posture"
    return None


def posture_withdrawn(state: SubjectState) -> bool:
    """Whether a security event declares the subject's posture outside :data:`GOOD_POSTURES`: a
    posture-level token issued on earlier evidence no longer holds that level.  Inactive at
    introspection (RFC 7662 §2.2 answers for the token's state now), so a resource server that
    demands the level stops granting it at once rather than at the token's ``exp``, and refused
    when presented again: the workload renews from its own credential, at the level it reaches.
    (The exchange refuses the level as long as the event stands: see the risk stage.)"""
    return state.posture is not None and state.posture not in GOOD_POSTURES


def revoked(
    claims: Mapping[str, Any],
    issuer_names: Collection[str],
    states: SubjectStateStore,
    tokens: RevokedTokens,
    issuer_of: Mapping[str, str] | None = None,
) -> bool:
    """Revoked by jti, or issued before a security event revoked its subject or its actor.  Store
    errors propagate."""
    return revocation(claims, issuer_names, states, tokens, issuer_of) is not None


def introspect(
    token: str,
    caller_audiences: Collection[str],
    verifier: OwnTokenVerifier,
    issuer_names: Collection[str],
    states: SubjectStateStore,
    tokens: RevokedTokens,
    now: float,
    issuer_of: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """RFC 7662 §2.2 response for ``token`` as seen by a caller serving ``caller_audiences``
    (``issuer_of``: issuer URL to configured name, see :func:`revocation`)."""
    claims = verify_own_token(token, verifier, now)
    if claims is None or not set(audiences_of(claims)) & set(caller_audiences):
        return dict(INACTIVE)
    expires_at = numeric_date_value(claims.get("exp"))
    if expires_at is None or expires_at <= now:
        # RFC 7662 §2.2: active only while unexpired.  The leeway that covers other parties' clocks
        # does not apply to our own expiry, which our clock decides (as at the token endpoint).
        return dict(INACTIVE)
    try:
        if revoked(claims, issuer_names, states, tokens, issuer_of):
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
