"""The ``mint`` stage: the lifetime of the token, the token (RFC 9068), and the record of the grant.

The issued token is an ``at+jwt`` for the rule's audiences and the scopes left
after policy and risk, bound to the keys the request proved (``cnf``, RFC 7800),
carrying the delegation (``act``, ``may_act``; RFC 8693 §4) and the assurance
level reached (``acr``, ``auth_time``; RFC 9470 §4, RFC 9068 §2.2.1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ...errors import InvalidRequest
from ...protocol.token_exchange import TokenExchangeRequest
from ..attest import VerifiedToken
from ..audit import AuditRecord
from ..clients import AuthenticatedClient
from ..delegation import SELF_ISSUER
from ..dpop import VerifiedProof
from ..introspection import UPSTREAM_CLAIM
from ..mint import IssuedToken, mint_access_token
from ..policy.rules import Grant
from ..ports import Signer
from ..stepup import RiskDecision
from .attestation import Parties
from .binding import confirmation


def token_lifetime(
    subject: VerifiedToken,
    grant: Grant,
    request: TokenExchangeRequest,
    decision: RiskDecision,
    now: float,
    *,
    actor: VerifiedToken | None = None,
) -> int:
    """The smallest of the rule's maximum, what was asked and what is left of the subject token and
    of the actor token (or of what their issuers intended, e.g. ``warnafter``: a delegated token
    never outlives the actor's credential either), shrunk as risk grows so the token expires with
    its risk context; ``invalid_request`` when nothing is left."""
    remaining = math.floor(subject.lifetime_end - now)
    if actor is not None:
        actor_remaining = math.floor(actor.lifetime_end - now)
        if actor_remaining < 1:
            raise InvalidRequest("actor_token.expired")
        remaining = min(remaining, actor_remaining)
    lifetime = min(grant.max_lifetime, request.requested_lifetime or grant.max_lifetime, remaining)
    # Before the narrowing, which lifts what it shrinks to at least a second: a token past what its
    # issuer intended (``warnafter``) was granted a second when risk narrowed it (an outside audit).
    if lifetime < 1:
        raise InvalidRequest("subject_token.expired")
    if decision.enforced and decision.lifetime_factor < 1:
        lifetime = max(1, math.floor(lifetime * decision.lifetime_factor))
    return lifetime


def mint_exchanged_token(
    signer: Signer,
    issuer: str,
    *,
    client: AuthenticatedClient | None,
    parties: Parties,
    proof: VerifiedProof | None,
    certificate: str | None,
    grant: Grant,
    scopes: tuple[str, ...],
    lifetime: int,
    attested_at: float | None,
    acr: str,
    now: float,
) -> IssuedToken:
    """The access token: bound to the DPoP key and/or client ``certificate`` thumbprint presented,
    carrying the delegation and the assurance level this exchange reached (``acr``)."""
    subject = parties.subject
    return mint_access_token(
        signer,
        issuer=issuer,
        subject=subject.subject,
        audiences=grant.audiences,
        scopes=scopes,
        client_id=client.client_id if client else subject.subject,
        lifetime=lifetime,
        now=now,
        auth_time=attested_at,
        extra={
            **(carried_claims(subject, parties.act) or {}),
            **upstream_claim(subject),
            **confirmation(proof, certificate),
            "acr": acr,
        },
    )


def record_grant(
    record: AuditRecord, grant: Grant, scopes: tuple[str, ...], lifetime: int, issued: IssuedToken
) -> None:
    """The ``mint`` stage's part of the record: what was granted and the token issued."""
    record.outcome = "granted"
    record.granted_audience = list(grant.audiences)
    record.granted_scope = list(scopes)
    record.granted_lifetime = lifetime
    record.issued_jti, record.issued_exp, record.issued_kid = issued.jti, issued.expires_at, issued.kid


def upstream_claim(subject: VerifiedToken) -> dict[str, str]:
    """:data:`~sts.core.introspection.UPSTREAM_CLAIM`: the configured issuer the subject token came
    from, or, for one of our own tokens, the one it carries (none if it carries none), so that a
    security event about that issuer's subject reaches the token and one about another's does not."""
    if subject.issuer_name != SELF_ISSUER:
        return {UPSTREAM_CLAIM: subject.issuer_name}
    carried = subject.claims.get(UPSTREAM_CLAIM)
    return {UPSTREAM_CLAIM: carried} if isinstance(carried, str) and carried != SELF_ISSUER else {}


def carried_claims(subject: VerifiedToken, act: dict[str, Any] | None) -> dict[str, Any] | None:
    """``act`` (the chain) and the subject's ``may_act`` (RFC 8693 §4.4) travel with the token,
    so a later re-exchange is bound by who the subject allowed to act for it."""
    extra: dict[str, Any] = {}
    if act is not None:
        extra["act"] = act
    may_act = subject.claims.get("may_act")
    if isinstance(may_act, Mapping):
        # Only what is enforced (``sub``, ``iss``: check_may_act), checked by may_act_of; whatever
        # else an upstream issuer put there is not this service's to sign for.
        extra["may_act"] = {claim: may_act[claim] for claim in ("sub", "iss") if claim in may_act}
    return extra or None
