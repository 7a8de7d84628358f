"""Attestation: a verified upstream token becomes normalised facts.

Verification grants nothing; the facts go to the policy, which decides.
Every check in RFC 8725 §3 and RFC 7519 §4.1 is applied (STANDARDS.md "JWT
handling"): exact ``iss``, required ``exp`` and ``aud``, ``nbf``/``iat`` with a
small leeway, a maximum token age, the issuer's ``typ`` and algorithm
allow-lists, and keys only from the issuer's own key set.  The claims are
checked by :mod:`.claims`, as for every other kind of token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidRequest, TemporarilyUnavailable
from .audit import token_hash
from .claims import ClaimInvalid, ClaimRules, check_claims, normalise_typ, numeric_date_value, string_claim
from .jose import JWSInvalid, peek, verify_signature
from .ports import IssuerKeys, KeysUnavailable, UnknownKeyId
from .profiles import ProfileOptions, ProfileViolation, get_profile
from .profiles.spiffe import parse_spiffe_id


@dataclass(frozen=True)
class IssuerPolicy:
    """What this service requires of tokens from one trusted issuer."""

    name: str
    issuer: str
    audiences: frozenset[str]
    algorithms: frozenset[str]
    token_types: frozenset[str]
    typ: frozenset[str | None]
    max_token_age: int | None = None
    max_token_lifetime: int | None = None
    require_jti: bool = False
    profile: str = "generic"
    profile_options: ProfileOptions = field(default_factory=ProfileOptions)
    #: False only for this service's own tokens, whose ``aud`` names downstream services.
    check_audience: bool = True
    #: Trusted to assert delegation (RFC 8693 §4.1 ``act``) in its tokens; see :mod:`.delegation`.
    trusted_delegation: bool = False


@dataclass(frozen=True)
class TrustedIssuer:
    policy: IssuerPolicy
    keys: IssuerKeys


@dataclass(frozen=True)
class VerifiedToken:
    """Normalised facts about a verified subject or actor token."""

    issuer_name: str
    issuer: str
    subject: str
    claims: Mapping[str, Any]
    token_type: str
    issued_at: float | None
    expires_at: float
    not_before: float | None
    jti: str | None
    sha256: str
    typ: str | None
    audiences: tuple[str, ...] = field(default=())
    #: Normalised facts from the issuer's attestation profile (repository_id, namespace, ...).
    facts: Mapping[str, Any] = field(default_factory=dict)
    profile: str = "generic"
    #: The latest moment a token derived from this one may live to: ``exp``, or earlier when
    #: the issuer says so (Kubernetes ``warnafter``: the expiry the pod asked for).
    valid_until: float | None = None

    @property
    def lifetime_end(self) -> float:
        return self.expires_at if self.valid_until is None else min(self.expires_at, self.valid_until)


class IssuerDirectory:
    """The trusted issuers, looked up by exact ``iss`` value.

    SPIFFE JWT-SVIDs may carry no ``iss``; they are routed by the trust domain
    of their SPIFFE ID to the issuer configured for that trust domain.
    """

    def __init__(self, issuers: list[TrustedIssuer]) -> None:
        self._by_iss = {i.policy.issuer: i for i in issuers}
        self._by_name = {i.policy.name: i for i in issuers}
        self._by_trust_domain = {
            i.policy.profile_options.trust_domain: i
            for i in issuers
            if i.policy.profile == "spiffe" and i.policy.profile_options.trust_domain
        }
        #: Each issuer's name by its ``iss`` (whose state applies to the actor an ``act`` names).
        self.names_by_iss: dict[str, str] = {iss: i.policy.name for iss, i in self._by_iss.items()}

    def by_iss(self, iss: str) -> TrustedIssuer | None:
        return self._by_iss.get(iss)

    def by_name(self, name: str) -> TrustedIssuer | None:
        return self._by_name.get(name)

    def by_spiffe_subject(self, sub: object) -> TrustedIssuer | None:
        if not isinstance(sub, str):
            return None
        try:
            trust_domain, _ = parse_spiffe_id(sub)
        except ValueError:
            return None
        return self._by_trust_domain.get(trust_domain)

    def names(self) -> frozenset[str]:
        return frozenset(self._by_name)


def verify_token(
    token: str,
    token_type: str,
    issuers: IssuerDirectory,
    *,
    now: float,
    leeway: int,
    role: str = "subject_token",
    sha256: str | None = None,
) -> VerifiedToken:
    """Verify an upstream JWT and return its facts, or raise the OAuth error.

    ``sha256`` is the token's :func:`~sts.core.audit.token_hash` when the caller has it already.

    RFC 8693 §2.2.2: a subject or actor token that fails validation is
    ``invalid_request``.  An issuer whose keys cannot be had is
    ``temporarily_unavailable`` (nothing is issued; the client may retry).
    """
    try:
        peeked = peek(token)
    except JWSInvalid as exc:
        raise InvalidRequest(f"{role}.{exc.reason}", exc.detail) from None
    try:
        iss = string_claim(peeked.claims, "iss", required=False)
    except ClaimInvalid as exc:
        raise InvalidRequest(f"{role}.{exc.reason}", exc.detail) from None
    if iss is None:
        trusted = issuers.by_spiffe_subject(peeked.claims.get("sub"))
        if trusted is None:
            raise InvalidRequest(f"{role}.missing_iss")
    else:
        trusted = issuers.by_iss(iss)
        if trusted is None:
            raise InvalidRequest(f"{role}.untrusted_issuer", iss[:200])
    policy = trusted.policy

    if token_type not in policy.token_types:
        raise InvalidRequest(f"{role}.token_type_not_accepted", token_type)
    typ = normalise_typ(peeked.header.get("typ"))
    if typ not in policy.typ:
        # RFC 8725 §3.11: explicit typing keeps one kind of JWT from passing as another.
        raise InvalidRequest(f"{role}.typ_not_accepted", str(peeked.header.get("typ"))[:40])

    try:
        verify_signature(token, peeked, policy.algorithms, trusted.keys.key_for)
    except JWSInvalid as exc:
        raise InvalidRequest(f"{role}.{exc.reason}", exc.detail) from None
    except UnknownKeyId:
        raise InvalidRequest(f"{role}.unknown_kid") from None
    except KeysUnavailable as exc:
        raise TemporarilyUnavailable(f"{role}.issuer_keys_unavailable", str(exc)) from None

    claims = peeked.claims
    rules = ClaimRules(
        leeway=leeway,
        issuer=iss,
        accepted_audiences=policy.audiences if policy.check_audience else None,
        # RFC 8725 §3.9 and README: the issuer's max_token_age allows the clock skew too.
        max_age=None if policy.max_token_age is None else policy.max_token_age + leeway,
        max_lifetime=policy.max_token_lifetime,
        require_jti=policy.require_jti,
    )
    try:
        checked = check_claims(claims, rules, now=now)
    except ClaimInvalid as exc:
        raise InvalidRequest(f"{role}.{exc.reason}", exc.detail) from None
    sub, exp = checked.sub, checked.exp
    if sub is None or exp is None:  # Required by the rules; this keeps the types honest.
        raise InvalidRequest(f"{role}.missing_sub" if sub is None else f"{role}.missing_exp")

    try:
        facts = get_profile(policy.profile).facts(sub, claims, policy.profile_options)
    except ProfileViolation as exc:
        raise InvalidRequest(f"{role}.{exc.reason}", exc.detail) from None
    valid_until = numeric_date_value(facts.get("warnafter"))
    if valid_until is not None and now >= valid_until:
        # The expiry its issuer intended (Kubernetes ``warnafter``: the pod asked for no longer)
        # has passed: refused as expired, as subject and as actor alike (an actor token past it
        # was taken, for up to max_token_age more; an outside audit).
        raise InvalidRequest(f"{role}.expired", "past warnafter")

    return VerifiedToken(
        issuer_name=policy.name,
        issuer=iss if isinstance(iss, str) else policy.issuer,
        subject=sub,
        claims=claims,
        token_type=token_type,
        issued_at=checked.iat,
        expires_at=exp,
        not_before=checked.nbf,
        jti=checked.jti,
        sha256=token_hash(token) if sha256 is None else sha256,
        typ=typ,
        audiences=checked.audiences,
        facts=facts,
        profile=policy.profile,
        valid_until=valid_until,
    )
