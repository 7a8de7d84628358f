"""The ``attest`` stage: who the exchange is for (the subject) and who acts for it (the actor).

Both tokens are verified against the trusted issuers (:func:`sts.core.attest.verify_token`);
a token of ours must not have been revoked; a Kubernetes token's pod must still exist
(TokenReview); the actor must be one the subject allows (RFC 8693 §4.4 ``may_act``); and
the ``act`` chain of the token to issue is built (RFC 8693 §4.1).  None of this grants
anything: the ``policy`` stage decides.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, NamedTuple

from ...errors import InvalidRequest, TemporarilyUnavailable
from ...protocol.token_exchange import TokenExchangeRequest
from ..attest import IssuerDirectory, VerifiedToken, verify_token
from ..audit import AuditRecord
from ..delegation import SELF_ISSUER, act_chain, attestation_time, check_may_act, may_act_of, workload_issuer
from ..introspection import MAX_CHAIN_ACTORS, chain_actor_identities, revocation, token_identities
from ..ports import RevokedTokens, StoreUnavailable, SubjectStateStore, TokenReviewer, TokenReviewUnavailable
from ..rate_limit import RateLimiter
from ..risk import RISK_LEVEL_WEIGHT
from ..subject_state import ANY_ISSUER, SubjectState, identity_key, merge

#: Said to a workload whose actor a security event has blocked (fixed texts, never from input).
ACTOR_BLOCKED = "A security event has blocked the actor; it cannot act for anyone until the block ends."
#: Said when a security event asks the actor to attest again.
ACTOR_REATTEST = (
    "The actor token was issued before a security event concerning the actor; obtain a fresh actor "
    "token and exchange again."
)


class Parties(NamedTuple):
    """The attested parties of one exchange."""

    subject: VerifiedToken
    actor: VerifiedToken | None
    #: The ``act`` claim of the token to issue (RFC 8693 §4.1), and the number of actors in it.
    act: dict[str, Any] | None
    depth: int
    #: A live review of the subject token passed (posture evidence for the assurance levels).
    live_review: bool
    #: The risk level a security event asserted of the actor (``medium``...), if any.
    actor_risk_level: str | None = None


class Attestation:
    """The ``attest`` stage, with the ports it reads wired in once at start."""

    def __init__(
        self,
        issuers: IssuerDirectory,
        *,
        leeway: int,
        limits: RateLimiter,
        token_reviewers: Mapping[str, TokenReviewer],
        subject_states: SubjectStateStore | None,
        revoked_tokens: RevokedTokens | None,
    ) -> None:
        self.issuers = issuers
        self.leeway = leeway
        self.limits = limits
        self.token_reviewers = token_reviewers
        self.subject_states = subject_states
        self.revoked_tokens = revoked_tokens

    def attest(
        self,
        request: TokenExchangeRequest,
        record: AuditRecord,
        now: float,
        *,
        subject_sha256: str | None = None,
        verified: Callable[[VerifiedToken], None] | None = None,
    ) -> Parties:
        """Verify the subject (and actor) token; who they are, and the delegation, go into ``record``.
        ``subject_sha256``: the subject token's hash, when the caller has it already; ``verified``
        is told the subject as soon as its token verifies (what is refused after that counts
        towards its recent_failures)."""
        subject = verify_token(
            request.subject_token,
            request.subject_token_type,
            self.issuers,
            now=now,
            leeway=self.leeway,
            sha256=subject_sha256,
        )
        record.issuer = subject.issuer_name
        record.subject = subject.subject[:500]
        if verified is not None:
            verified(subject)
        record.subject_token_jti = subject.jti
        record.subject_token_iat = subject.issued_at
        self.limits.for_identity("token", workload_issuer(subject), subject.subject, now, record)
        self._check_not_revoked(subject, "subject_token")
        live_review = self._check_liveness(subject, request.subject_token)
        may_act_of(subject)  # a malformed one is refused with or without an actor
        actor: VerifiedToken | None = None
        actor_risk_level: str | None = None
        if request.actor_token is not None:
            actor = verify_token(
                request.actor_token,
                request.actor_token_type or "",
                self.issuers,
                now=now,
                leeway=self.leeway,
                role="actor_token",
            )
            record.actor_issuer, record.actor_subject = actor.issuer_name, actor.subject[:500]
            self._check_not_revoked(actor, "actor_token")
            # The actor's pod too: a token a deleted pod left behind must not act for anyone (an
            # outside audit: only the subject's was reviewed, though the setting says every token).
            self._check_liveness(actor, request.actor_token, role="actor_token")
            actor_risk_level = self._check_actor_state(actor, now)
            if actor_risk_level is not None:  # on record whatever refuses it next (a review)
                record.details["actor_risk_level"] = actor_risk_level[:20]
            check_may_act(subject, actor)
            check_actor_is_another(request, subject, actor)
            check_actor_audience(actor)
        trusted = self.issuers.by_name(subject.issuer_name)
        trusted_delegation = trusted is not None and trusted.policy.trusted_delegation
        if subject.issuer_name == SELF_ISSUER or trusted_delegation:
            # The actors the subject token names (its ``act`` chain, ours or one a trusted issuer
            # asserts) take part in the exchange too: what a transmitter asserted of them counts as
            # of an actor presented (an outside review re-exchanged a token naming an actor declared
            # critical, again and again; a later one had it carried from a trusted issuer's token).
            actor_risk_level = higher_level(actor_risk_level, self._chain_actor_level(subject))
        if subject.issuer_name != SELF_ISSUER and subject.claims.get("act") is not None:
            # An upstream act claim is that issuer's assertion: carried or refused, and recorded which.
            record.details["upstream_act"] = "carried" if trusted_delegation else "refused"
        if actor_risk_level is not None:
            record.details["actor_risk_level"] = actor_risk_level[:20]
        act, depth = act_chain(subject, actor, trusted_delegation=trusted_delegation)
        record.details["delegation_depth"] = depth
        return Parties(subject, actor, act, depth, live_review, actor_risk_level)

    def _check_not_revoked(self, token: VerifiedToken, role: str) -> None:
        """A token of ours, presented as subject or actor token, must not have been revoked: by
        ``jti`` (RFC 7009 ``POST /revoke``) or for its subject (a security event such as CAEP
        ``session-revoked``, or ``sts revoke subject``).  The same answer as introspection gives,
        read from the store every instance shares; a store that cannot answer refuses (fail closed).
        """
        if token.issuer_name != SELF_ISSUER:
            return
        if self.subject_states is None or self.revoked_tokens is None:
            raise TemporarilyUnavailable("store.unavailable", "no revocation store")
        try:
            cause = revocation(
                token.claims,
                self.issuers.names(),
                self.subject_states,
                self.revoked_tokens,
                self.issuers.names_by_iss,
            )
        except StoreUnavailable as exc:
            raise TemporarilyUnavailable("store.unavailable", str(exc)) from None
        if cause is not None:
            raise InvalidRequest(f"{role}.revoked", cause)

    def _check_actor_state(self, actor: VerifiedToken, now: float) -> str | None:
        """The actor is a party to the exchange (RFC 8693 §4.1: the one exercising the token), so
        what a security event says of it holds for its actor tokens as for its own exchanges: while
        it is blocked it acts for nobody, and after an event that asks it to attest again only an
        actor token attested since then is taken.  (Its revocation is :meth:`_check_not_revoked`'s,
        and the tokens of ours that name it are revoked with it, see
        :func:`~sts.core.introspection.revocation`.)  Returns the risk level an event asserted of
        it, which the exchange is judged by too (:func:`raised_by_actor`)."""
        if self.subject_states is None:
            return None
        keys = token_identities(actor.issuer_name, actor.subject, actor.claims, self.issuers.names())
        try:
            state = merge(self.subject_states.get(keys))
        except StoreUnavailable as exc:
            raise TemporarilyUnavailable("store.unavailable", str(exc)) from None
        if state.blocked_until is not None and now < state.blocked_until:
            raise InvalidRequest(
                "actor_token.blocked", ",".join(state.events[-3:]), description=ACTOR_BLOCKED
            )
        attested_at = attestation_time(actor)
        if state.reauth_after is not None and (attested_at is None or attested_at < state.reauth_after):
            raise InvalidRequest(
                "actor_token.attestation_predates_security_event",
                ",".join(state.events[-3:]),
                description=ACTOR_REATTEST,
            )
        return state.risk_level.lower() if state.risk_level else None

    def _chain_actor_level(self, subject: VerifiedToken) -> str | None:
        """The highest risk level asserted of an actor ``subject`` names in its ``act`` chain; None
        without a chain.  A token of ours: :func:`~sts.core.introspection.chain_actor_identities`
        (an old entry that names no issuer is looked up under every one).  A trusted issuer's:
        :func:`upstream_chain_identities` (the same ``sub`` under another issuer is another workload:
        a review had one cluster's event refuse a peer's ``system:serviceaccount:default:default``)."""
        act = subject.claims.get("act")
        if not isinstance(act, Mapping) or self.subject_states is None:
            return None
        keys = (
            chain_actor_identities(act, self.issuers.names(), self.issuers.names_by_iss)
            if subject.issuer_name == SELF_ISSUER
            else upstream_chain_identities(act, subject.issuer_name, self.issuers.names_by_iss)
        )
        try:
            state = merge(self.subject_states.get(keys)) if keys else None
        except StoreUnavailable as exc:
            raise TemporarilyUnavailable("store.unavailable", str(exc)) from None
        return state.risk_level.lower() if state is not None and state.risk_level else None

    def _check_liveness(self, token: VerifiedToken, raw: str, role: str = "subject_token") -> bool:
        """Kubernetes: ask the cluster whether the token's pod still exists (TokenReview).

        True when a live review passed (posture evidence for the assurance levels)."""
        reviewer = self.token_reviewers.get(token.issuer_name)
        if reviewer is None:
            return False
        try:
            # Ask the API server to check the audience we require, not whatever the token says.
            trusted = self.issuers.by_name(token.issuer_name)
            ours = trusted.policy.audiences if trusted else frozenset()
            username = reviewer.review(raw, tuple(a for a in token.audiences if a in ours))
        except TokenReviewUnavailable as exc:
            raise TemporarilyUnavailable(f"{role}.token_review_unavailable", str(exc)) from None
        if username != token.subject:
            raise InvalidRequest(f"{role}.kubernetes.not_live")
        return True


def check_actor_is_another(
    request: TokenExchangeRequest, subject: VerifiedToken, actor: VerifiedToken
) -> None:
    """Delegation is one party acting for another (RFC 8693 §1.1): an actor token that is the
    subject token, or names the same workload, would meet ``require_actor`` with one credential
    (an outside audit had one token in both seats)."""
    if request.actor_token == request.subject_token or _workload(actor) == _workload(subject):
        raise InvalidRequest("actor_token.is_subject")


def _workload(token: VerifiedToken) -> tuple[str, str]:
    """Who a token names: its issuer and ``sub``; for a token of ours, the issuer it came from
    (``upstream_issuer``), since the same ``sub`` under two issuers is two workloads."""
    if token.issuer_name == SELF_ISSUER:
        upstream = token.claims.get("upstream_issuer")
        if isinstance(upstream, str) and upstream:
            return upstream, token.subject
    return token.issuer_name, token.subject


def check_actor_audience(actor: VerifiedToken) -> None:
    """A token of ours in the actor's seat is the actor's credential to this service, so it must
    name this service in ``aud`` (RFC 8725 §3.9), unless it is sender-constrained (``cnf.jkt`` or
    ``cnf.x5t#S256``, whose key or certificate the request must then prove, see
    :func:`~sts.core.exchange.binding.check_binding` and
    :func:`~sts.core.exchange.binding.check_certificate_binding`).  Otherwise whoever a bearer
    token of ours was issued to (an API it was meant for, or anyone who captured it there) could act
    as the actor it names (an outside audit).  Upstream actor tokens are held to their issuer's
    audiences when verified."""
    if actor.issuer_name != SELF_ISSUER or actor.issuer in actor.audiences:
        return
    cnf = actor.claims.get("cnf")
    if isinstance(cnf, Mapping) and ("jkt" in cnf or "x5t#S256" in cnf):
        return
    raise InvalidRequest("actor_token.audience_not_this_service")


def upstream_chain_identities(
    act: Mapping[str, Any], asserted_by: str, names_by_iss: Mapping[str, str]
) -> list[str]:
    """The identity keys of the actors of an upstream token's ``act`` chain, which ``asserted_by``
    (a ``trusted_delegation`` issuer) signed: an entry's own ``iss`` when it is an issuer configured
    here, else none for an ``iss`` that is not, and ``asserted_by`` for an entry without one; the
    any-issuer key always.  At most :data:`~sts.core.introspection.MAX_CHAIN_ACTORS` entries."""
    keys: list[str] = []
    entry: Any = act
    for _ in range(MAX_CHAIN_ACTORS):
        if not isinstance(entry, Mapping):
            break
        sub, iss = entry.get("sub"), entry.get("iss")
        if isinstance(sub, str):
            name = asserted_by if iss is None else names_by_iss.get(iss) if isinstance(iss, str) else None
            for key in ([identity_key(name, sub)] if name else []) + [identity_key(ANY_ISSUER, sub)]:
                if key not in keys:
                    keys.append(key)
        entry = entry.get("act")
    return keys


def higher_level(first: str | None, second: str | None) -> str | None:
    """The higher of two asserted risk levels (None: none asserted)."""
    if first is None or second is None:
        return first or second
    return first if RISK_LEVEL_WEIGHT.get(first, 0) >= RISK_LEVEL_WEIGHT.get(second, 0) else second


def raised_by_actor(state: SubjectState, actor_level: str | None) -> SubjectState:
    """The subject's ``state``, its asserted risk level raised to the actor's where that is higher:
    the ``shared_signal`` then weighs the actor's too.  An actor a transmitter declared critical
    was refused its own exchanges but acted for others at once (an outside red team)."""
    if actor_level is None:
        return state
    if RISK_LEVEL_WEIGHT.get(actor_level, 0) <= RISK_LEVEL_WEIGHT.get((state.risk_level or "").lower(), 0):
        return state
    return replace(state, risk_level=actor_level)
