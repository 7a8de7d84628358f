"""The token-exchange pipeline (RFC 8693), top to bottom::

    parse request -> authenticate client -> attest subject (and actor)
      -> evaluate policy -> mint token (or refuse) -> record the decision

Every step is a plain function call on plain values; storage and keys are
reached through :mod:`sts.core.ports`.  The audit record is filled in along
the way and written whatever the outcome; a token is returned only after its
record is committed.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..errors import (
    InvalidClient,
    InvalidDPoPProof,
    InvalidRequest,
    OAuthError,
    RiskRefused,
    ServerError,
    StepUpRequired,
    TemporarilyUnavailable,
)
from ..protocol.client_auth import parse_client_credentials
from ..protocol.token_exchange import (
    TOKEN_TYPE_ACCESS_TOKEN,
    TOKEN_TYPE_JWT,
    TokenExchangeResponse,
    parse_grant_type,
    parse_token_exchange,
)
from ..protocol.wire import WireRequest, check_content_type
from . import stages as stage
from .assurance import (
    KEY_CHANGED,
    KEY_CONTINUES,
    KEY_FACTS,
    Evidence,
    at_least,
    key_state,
    lowest_known,
    needed,
    posture_is_good,
    reached,
    shortfall,
)
from .attest import IssuerDirectory, VerifiedToken, verify_token
from .audit import AuditRecord, log_unaudited, token_hash
from .baseline import BASELINE_TTL, Baseline, observe, record_failure
from .clients import AssertionAudience, AuthenticatedClient, RegisteredClient, authenticate_client
from .delegation import SELF_ISSUER, act_chain, attestation_time, check_may_act, narrow_reexchange
from .dpop import DPoPConfig, VerifiedProof, verify_proof
from .drift import EVIDENCE_POP, EVIDENCE_POSTURE, progress, session_summary
from .introspection import own_token_identities, revocation
from .mint import mint_access_token
from .policy.evaluate import evaluate
from .policy.index import PolicySet
from .policy.rules import Grant, PolicyRequest
from .ports import (
    AlreadyUsed,
    AuditSink,
    AuditUnavailable,
    BaselineStore,
    PipelineStages,
    ReplayCache,
    ReplayWindowLost,
    RevokedTokens,
    Signer,
    SingleUse,
    SingleUseLedger,
    StoreUnavailable,
    SubjectStateStore,
    TokenReviewer,
    TokenReviewUnavailable,
)
from .rate_limit import NO_LIMITS, RateLimiter
from .risk import Assessment, RiskContext, RiskSettings, assess, assess_events
from .stepup import DENY, STEP_UP, RiskDecision, decide
from .subject_state import SubjectState, identity_key, identity_keys, merge

log = logging.getLogger(__name__)

#: Said to a workload whose single-use token the replay store can no longer vouch for.
REPLAY_WINDOW_LOST = (
    "The subject token was issued before the replay store lost its records, so its single use cannot "
    "be checked; obtain a fresh subject token and exchange it."
)


#: Rules without a ``risk`` section still obey security events, with these thresholds.
EVENTS_ONLY = RiskSettings()


@dataclass(frozen=True)
class _Risk:
    decision: RiskDecision
    assessment: Assessment
    cfg: RiskSettings
    baseline: Baseline
    baseline_key: str | None
    record: dict[str, Any]
    #: The assurance level this request reaches (sts.core.assurance), and what it showed for it.
    level: str
    evidence: Evidence


@dataclass(frozen=True)
class ExchangeConfig:
    issuer: str
    token_endpoint: str
    leeway: int
    max_assertion_lifetime: int
    dpop: DPoPConfig | None = None


class TokenExchange:
    """The pipeline, with its ports wired in once at start."""

    def __init__(
        self,
        config: ExchangeConfig,
        *,
        clients: Mapping[str, RegisteredClient],
        issuers: IssuerDirectory,
        policy: PolicySet,
        replay: ReplayCache,
        ledger: SingleUseLedger,
        signer: Callable[[], Signer],
        audit: AuditSink,
        clock: Callable[[], float],
        token_reviewers: Mapping[str, TokenReviewer] | None = None,
        subject_states: SubjectStateStore | None = None,
        baselines: BaselineStore | None = None,
        revoked_tokens: RevokedTokens | None = None,
        limits: RateLimiter = NO_LIMITS,
        stages: PipelineStages = stage.NO_STAGES,
    ) -> None:
        self.config = config
        self.limits = limits
        self.stages = stages
        self.token_reviewers = dict(token_reviewers or {})
        self.subject_states = subject_states
        self.revoked_tokens = revoked_tokens
        self.baselines = baselines
        self.clients = clients
        self.issuers = issuers
        self.policy = policy
        self.replay = replay
        self.ledger = ledger
        self.signer = signer
        self.audit = audit
        self.clock = clock
        self.assertion_audience = AssertionAudience(config.issuer, config.token_endpoint)

    def handle(self, wire: WireRequest) -> TokenExchangeResponse:
        """Run the pipeline; return the response or raise the :class:`OAuthError` to send."""
        now = self.clock()
        record = AuditRecord(
            event_id=str(uuid.uuid4()),
            time=now,
            request_id=wire.request_id,
            endpoint="token",
            source_ip=wire.source_ip,
            user_agent=(wire.user_agent or "")[:200] or None,
            details=trace_details(wire),
        )
        uses: list[SingleUse] = []
        try:
            response = self._decide(wire, record, now, uses)
        except OAuthError as exc:
            self.ledger.cancel(uses)
            self._refuse(record, exc, now)
            raise
        except Exception as exc:
            # A bug must never become a grant: refuse, record, and say nothing of the cause.
            self.ledger.cancel(uses)
            log.exception("token exchange failed unexpectedly (request %s)", wire.request_id)
            record.outcome = "error"
            record.error = "server_error"
            record.reasons.append(f"internal.{type(exc).__name__}")
            self._record_refusal(record)
            raise ServerError("internal.unexpected") from None
        self.stages.enter(stage.AUDIT)
        try:
            # Two-phase single use: the subject token is used up only together with (Redis: right
            # after) the commit of this record, so a failure here leaves it usable for the retry.
            if uses:
                self.ledger.commit(record, uses, now)
            else:
                self.audit.write(record)
        except AlreadyUsed:
            # A concurrent request with the same token committed first (another worker or instance).
            _withdraw_grant(record)
            replayed = InvalidRequest("subject_token.replayed", "used by a concurrent request")
            self._refuse(record, replayed, now)
            raise replayed from None
        except AuditUnavailable as exc:
            log.error(
                "audit write failed; token %s withheld (request %s): %s",
                record.issued_jti,
                wire.request_id,
                exc,
            )
            log_unaudited(log, record, str(exc), outcome="withheld")
            raise TemporarilyUnavailable("audit.unavailable", str(exc)) from None
        except StoreUnavailable as exc:
            log.error(
                "single use of the subject token not confirmed after its audit record was committed; "
                "token %s withheld (request %s): %s",
                record.issued_jti,
                wire.request_id,
                exc,
            )
            raise TemporarilyUnavailable("store.unavailable", str(exc)) from None
        return response

    def _refuse(self, record: AuditRecord, exc: OAuthError, now: float) -> None:
        record.refuse(exc.error, exc.reason, exc.detail)
        self._record_refusal(record)
        if not isinstance(exc, TemporarilyUnavailable):
            self.record_failure(record, now)

    def refuse_early(self, wire: WireRequest, exc: OAuthError) -> None:
        """Record a request refused before the pipeline could read it (body too large, unparseable)."""
        record = AuditRecord(
            event_id=str(uuid.uuid4()),
            time=self.clock(),
            request_id=wire.request_id,
            endpoint="token",
            source_ip=wire.source_ip,
            user_agent=(wire.user_agent or "")[:200] or None,
            details=trace_details(wire),
        )
        record.subject_token_sha256 = presented_subject_token_hash(wire)
        record.refuse(exc.error, exc.reason, exc.detail)
        self._record_refusal(record)

    def _record_refusal(self, record: AuditRecord) -> None:
        self.stages.enter(stage.AUDIT)
        try:
            self.audit.write(record)
        except AuditUnavailable as exc:
            # The refusal stands either way; the decision goes to the log instead.
            log_unaudited(log, record, str(exc))

    def _decide(
        self, wire: WireRequest, record: AuditRecord, now: float, uses: list[SingleUse]
    ) -> TokenExchangeResponse:
        # 1. Parse: RFC 6749 §3.2 (form POST, no credentials in the query), RFC 8693 §2.1.
        #    The hash of a presented subject token goes into the record even when the
        #    request is refused before it is parsed, so a reviewer can match the token.
        record.subject_token_sha256 = presented_subject_token_hash(wire)
        self.stages.enter(stage.PARSE)
        # Global and per-network limits, before any work is done for the request.
        self.limits.on_arrival("token", wire.source_ip, now, record)
        if wire.query:
            raise InvalidRequest("request.query_parameters")
        check_content_type(wire.content_type)
        parse_grant_type(wire.form)
        request = parse_token_exchange(wire.form)
        record.subject_token_type = request.subject_token_type
        record.requested_audience = list(request.audiences)
        record.requested_resource = list(request.resources)
        record.requested_scope = list(request.scopes) if request.scopes is not None else None
        record.requested_lifetime = request.requested_lifetime
        record.requested_token_type = request.requested_token_type
        if request.actor_token is not None:
            record.actor_token_sha256 = token_hash(request.actor_token)
        if request.acr_values and lowest_known(request.acr_values) is None:
            # RFC 9470 levels are named by this service's metadata (acr_values_supported).
            raise InvalidRequest("request.unsupported_acr_values", " ".join(request.acr_values)[:200])

        # 2. Authenticate the client (RFC 6749 §2.3, RFC 7523 §3).
        self.stages.enter(stage.CLIENT_AUTH)
        creds = parse_client_credentials(wire.form, wire.authorization)
        record.client_auth_method = creds.method
        record.client_id = creds.client_id
        client: AuthenticatedClient | None = authenticate_client(
            creds,
            self.clients,
            self.replay,
            self.assertion_audience,
            now=now,
            leeway=self.config.leeway,
            max_assertion_lifetime=self.config.max_assertion_lifetime,
        )
        if client is None and not self.policy.allows_anonymous:
            # No rule accepts the subject token as the only credential: stop before any work.
            raise InvalidClient("client.authentication_required")
        record.client_id = client.client_id if client else None
        if client is not None:
            self.limits.for_client("token", client.client_id, now, record)

        # 2b. Proof of possession (RFC 9449): the key the issued token will be bound to.
        self.stages.enter(stage.DPOP)
        proof: VerifiedProof | None = None
        if wire.dpop:
            if self.config.dpop is None:
                raise InvalidDPoPProof("dpop.not_supported")
            proof = verify_proof(
                wire.dpop,
                method="POST",
                url=self.config.token_endpoint,
                config=self.config.dpop,
                replay=self.replay,
                now=now,
            )
            record.details["dpop_jkt"] = proof.jkt

        # 3. Attest the subject (and actor).
        self.stages.enter(stage.ATTEST)
        subject = verify_token(
            request.subject_token,
            request.subject_token_type,
            self.issuers,
            now=now,
            leeway=self.config.leeway,
        )
        _record_subject(record, subject)
        self.limits.for_identity("token", subject.issuer_name, subject.subject, now, record)
        self._check_not_revoked(subject, "subject_token")
        live_review = self._check_liveness(subject, request.subject_token)
        actor: VerifiedToken | None = None
        if request.actor_token is not None:
            actor = verify_token(
                request.actor_token,
                request.actor_token_type or "",
                self.issuers,
                now=now,
                leeway=self.config.leeway,
                role="actor_token",
            )
            record.actor_issuer, record.actor_subject = actor.issuer_name, actor.subject[:500]
            self._check_not_revoked(actor, "actor_token")
            check_may_act(subject, actor)
        trusted_delegation = self._trusted_delegation(subject)
        if subject.issuer_name != SELF_ISSUER and subject.claims.get("act") is not None:
            # An upstream act claim is that issuer's assertion: carried or refused, and recorded which.
            record.details["upstream_act"] = "carried" if trusted_delegation else "refused"
        act, depth = act_chain(subject, actor, trusted_delegation=trusted_delegation)
        record.details["delegation_depth"] = depth

        # 4. Policy decides.
        self.stages.enter(stage.POLICY)
        grant = evaluate(
            self.policy,
            subject,
            PolicyRequest(
                request.audiences,
                request.resources,
                request.scopes,
                client.client_id if client else None,
                actor=actor,
                delegation_depth=depth,
            ),
        )
        record.rule = grant.rule
        record.reasons.extend(grant.reasons)
        if grant.rate_limit is not None:
            self.limits.for_rule(
                grant.rule, grant.rate_limit, subject.issuer_name, subject.subject, now, record
            )
        scopes = narrow_reexchange(subject, grant.audiences, grant.scopes, request.scopes)
        if len(scopes) != len(grant.scopes):
            record.reasons.append("reexchange.scope_narrowed")
        self._check_binding(subject, actor, grant, proof)
        self._check_certificate_binding(subject, wire.client_cert_thumbprint)
        attested_at = attestation_time(subject)
        if grant.max_attestation_age is not None and (
            attested_at is None or now - attested_at > grant.max_attestation_age
        ):
            raise InvalidRequest("policy.attestation_too_old")

        # 5. Risk: what other systems said about the subject (always), then the rule's own
        #    signals; the decision may narrow, shorten, ask for fresh attestation or refuse.
        self.stages.enter(stage.RISK)
        # The proof-of-possession key is a fact too: a workload whose key changes has drifted.
        keys = presented_keys(proof, wire.client_cert_thumbprint)
        observed = replace(subject, facts={**subject.facts, **keys}) if keys else subject
        posture = None
        if request.posture_token:
            record.details["posture_token_sha256"] = token_hash(request.posture_token)
            posture = self._posture(request.posture_token, subject, now)
        risk = self._assess_risk(
            wire,
            observed,
            grant,
            scopes,
            depth,
            attested_at,
            now,
            posture,
            keys=keys,
            live_review=live_review,
        )
        record.details["risk"] = risk.record
        record.details["assurance"] = {"presented": risk.level, "evidence": risk.evidence.as_dict()}
        if risk.decision.enforced:
            decision = risk.decision
            if decision.action == DENY:
                self._save_progress(risk)
                raise RiskRefused("risk.denied", signals=decision.fired, clears=decision.clears)
            narrowed = decision.scopes
            if scopes and not narrowed and risk.assessment.fresh:
                # Nothing is left, and the attestation is already fresh: renewing it would
                # change nothing, so asking for a step-up would send the workload round forever.
                self._save_progress(risk)
                raise RiskRefused("risk.narrowed_to_nothing", signals=decision.fired, clears=decision.clears)
            if decision.action == STEP_UP or (scopes and not narrowed):
                self._save_progress(risk)
                raise StepUpRequired(
                    "risk.step_up",
                    max_age=decision.step_up_max_age,
                    signals=decision.fired,
                    acr_values=decision.acr_values if decision.action == STEP_UP else (),
                    clears=decision.clears,
                )
            if len(narrowed) != len(scopes):
                record.reasons.append("risk.scope_narrowed")
            scopes = narrowed

        # 5b. Assurance: the level reached and the attestation age, against what the rule's
        #     requirements for these scopes and audiences (and the request's acr_values) need.
        self._check_assurance(record, risk, grant, scopes, request.acr_values, attested_at, now)

        # 6. Lifetime: the smallest of the rule's maximum, what was asked and what is
        #    left of the subject token (or of what its issuer intended, e.g. warnafter),
        #    shrunk as risk grows so the token expires with its risk context.
        self.stages.enter(stage.MINT)
        remaining = math.floor(subject.lifetime_end - now)
        lifetime = min(grant.max_lifetime, request.requested_lifetime or grant.max_lifetime, remaining)
        if risk.decision.enforced and risk.decision.lifetime_factor < 1:
            lifetime = max(1, math.floor(lifetime * risk.decision.lifetime_factor))
        if lifetime < 1:
            raise InvalidRequest("subject_token.expired")

        # 6. Single use: reserve the subject token (a used one is refused here); the use is
        #    recorded with the audit record, so of two concurrent exchanges exactly one succeeds.
        #    Done last, so a refusal does not burn it.
        if grant.single_use:
            uses.append(self._reserve(subject, request.subject_token, now))

        # 6. Mint.
        signer = self.signer()
        issued = mint_access_token(
            signer,
            issuer=self.config.issuer,
            subject=subject.subject,
            audiences=grant.audiences,
            scopes=scopes,
            client_id=client.client_id if client else subject.subject,
            lifetime=lifetime,
            now=now,
            auth_time=attested_at,
            extra={
                **(carried_claims(subject, act) or {}),
                **confirmation(proof, wire.client_cert_thumbprint),
                # RFC 9470 §4 / RFC 9068 §2.2.1: the assurance level this exchange reached.
                "acr": risk.level,
            },
        )
        if risk.baseline_key is not None:
            self._learn(risk, observed, wire.source_ip, grant.audiences, scopes, depth, now)
        record.outcome = "granted"
        record.granted_audience = list(grant.audiences)
        record.granted_scope = list(scopes)
        record.granted_lifetime = lifetime
        record.issued_jti, record.issued_exp, record.issued_kid = issued.jti, issued.expires_at, issued.kid
        return TokenExchangeResponse(
            access_token=issued.token,
            issued_token_type=request.requested_token_type or TOKEN_TYPE_ACCESS_TOKEN,
            # RFC 9449 §5: a DPoP-bound token is token_type DPoP.
            token_type="DPoP" if proof else "Bearer",
            expires_in=lifetime,
            scope=scopes,
        )

    @staticmethod
    def _check_binding(
        subject: VerifiedToken, actor: VerifiedToken | None, grant: Grant, proof: VerifiedProof | None
    ) -> None:
        """DPoP required by the rule; a bound token of ours stays bound to its key on re-exchange.

        A bound token of ours presented as the actor token is a credential too: whoever
        presents it proves its key (RFC 9449 §7), else a stolen bound token would act as a
        bearer token.  The one proof then binds the new token to the actor's key, so the
        subject's own binding yields only where the rule lets the actor bind its key.
        """
        if grant.require_dpop and proof is None:
            raise InvalidDPoPProof("dpop.required")
        actor_bound = _bound_key(actor) if actor is not None else None
        if actor_bound is not None:
            if proof is None:
                raise InvalidDPoPProof("dpop.bound_actor_token_needs_proof")
            if proof.jkt != actor_bound:
                raise InvalidDPoPProof("dpop.key_differs_from_bound_actor_token")
        bound = _bound_key(subject)
        if bound is None:
            return
        if proof is None:
            raise InvalidDPoPProof("dpop.bound_token_needs_proof")
        if proof.jkt != bound and not (actor is not None and grant.actor_may_bind_key):
            raise InvalidDPoPProof("dpop.key_differs_from_bound_token")

    @staticmethod
    def _check_certificate_binding(subject: VerifiedToken, thumbprint: str | None) -> None:
        """RFC 8705 §3: a certificate-bound token of ours is re-exchanged over the same certificate."""
        cnf = subject.claims.get("cnf")
        bound = cnf.get("x5t#S256") if isinstance(cnf, Mapping) else None
        if subject.issuer_name == SELF_ISSUER and bound is not None and bound != thumbprint:
            raise InvalidRequest("subject_token.certificate_binding_mismatch")

    def _posture(
        self, token: str, subject: VerifiedToken, now: float
    ) -> tuple[Mapping[str, Any] | None, str | None]:
        """A posture token (extension parameter): verified like any upstream token, about the same
        subject.  Expired or otherwise unusable, it is evidence for the stale_posture signal; one
        about another subject is refused outright (it would be someone else's evidence)."""
        try:
            posture = verify_token(
                token, TOKEN_TYPE_JWT, self.issuers, now=now, leeway=self.config.leeway, role="posture_token"
            )
        except InvalidRequest as exc:
            return None, exc.reason.removeprefix("posture_token.")
        if posture.subject != subject.subject:
            raise InvalidRequest("posture_token.subject_mismatch")
        return {**posture.facts, **posture.claims}, None

    def _identity_keys(self, subject: VerifiedToken) -> tuple[str, ...]:
        if subject.issuer_name == SELF_ISSUER:
            # Our own token: events may name the subject under the issuer it first came from.
            return tuple(own_token_identities(subject.subject, self.issuers.names()))
        return identity_keys(subject.issuer_name, subject.subject)

    def _trusted_delegation(self, subject: VerifiedToken) -> bool:
        trusted = self.issuers.by_name(subject.issuer_name)
        return trusted is not None and trusted.policy.trusted_delegation

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
            cause = revocation(token.claims, self.issuers.names(), self.subject_states, self.revoked_tokens)
        except StoreUnavailable as exc:
            raise TemporarilyUnavailable("store.unavailable", str(exc)) from None
        if cause is not None:
            raise InvalidRequest(f"{role}.revoked", cause)

    def _assess_risk(
        self,
        wire: WireRequest,
        subject: VerifiedToken,
        grant: Grant,
        scopes: tuple[str, ...],
        depth: int,
        attested_at: float | None,
        now: float,
        posture: tuple[Mapping[str, Any] | None, str | None] | None = None,
        *,
        keys: Mapping[str, str] | None = None,
        live_review: bool = False,
    ) -> _Risk:
        keys = keys or {}
        # The baseline is kept where it is judged: by the rule's risk signals, or by the assurance
        # levels (whose proof-of-possession level needs the identity's key), and whenever a key
        # is presented, so the identity's first key is remembered.
        keeps_baseline = bool(grant.risk or grant.assurance or keys)
        try:
            state = (
                merge(self.subject_states.get(self._identity_keys(subject))) if self.subject_states else None
            )
            baseline_key = (
                identity_key(subject.issuer_name, subject.subject)
                if keeps_baseline and self.baselines
                else None
            )
            baseline = self.baselines.load(baseline_key) if baseline_key and self.baselines else Baseline()
        except StoreUnavailable as exc:
            raise TemporarilyUnavailable("store.unavailable", str(exc)) from None
        state = state or SubjectState()
        cfg = grant.risk or EVENTS_ONLY
        posture_claims = posture[0] if posture else None
        posture_ok = posture_is_good(posture_claims, cfg.posture_fact, cfg.posture_good)
        presented_key = key_state(keys, baseline.confirmed_keys())
        shown = frozenset(
            ([EVIDENCE_POP] if presented_key == KEY_CONTINUES else [])
            + ([EVIDENCE_POSTURE] if posture_ok else [])
        )
        presentable = frozenset(
            ([EVIDENCE_POP] if any(baseline.facts.get(f) is not None for f in KEY_FACTS) else [])
            + ([EVIDENCE_POSTURE] if cfg.posture_fact is not None else [])
        )
        ctx = RiskContext(
            identity=identity_key(subject.issuer_name, subject.subject),
            facts=subject.facts,
            claims=subject.claims,
            source_ip=wire.source_ip,
            audiences=grant.audiences,
            scopes=scopes,
            delegation_depth=depth,
            attested_at=attested_at,
            now=now,
            baseline=baseline,
            state=state,
            posture_claims=posture_claims,
            posture_problem=posture[1] if posture else None,
            evidence_shown=shown,
            evidence_presentable=presentable,
        )
        assessment = assess(ctx, cfg) if grant.risk else assess_events(ctx, cfg)
        decision = decide(assessment, cfg, scopes)
        if presented_key == KEY_CHANGED and all(
            v in assessment.drift.baseline.confirmed_values(f) for f, v in keys.items()
        ):
            # The new key completed its probation with this exchange: it is the identity's key now.
            presented_key = KEY_CONTINUES
        carried = None
        if subject.issuer_name == SELF_ISSUER:
            acr = subject.claims.get("acr")
            carried = acr if isinstance(acr, str) else ""
        evidence = Evidence(
            key=presented_key, posture_token=posture_ok, live_review=live_review, carried=carried
        )
        record = {
            "mode": cfg.mode if grant.risk else "events",
            "score": assessment.score,
            "decision": decision.as_dict(),
            "signals": [s.as_dict() for s in assessment.signals],
            "learning": baseline.learning if grant.risk else None,
            # The session state behind the decision: each watched fact, confirmed or pending.
            "baseline": session_summary(assessment.drift.baseline, cfg.stable_facts if grant.risk else ())
            if baseline_key
            else None,
        }
        return _Risk(
            decision,
            assessment,
            cfg,
            baseline,
            baseline_key,
            record,
            level=reached(evidence),
            evidence=evidence,
        )

    def _check_assurance(
        self,
        record: AuditRecord,
        risk: _Risk,
        grant: Grant,
        scopes: tuple[str, ...],
        requested: tuple[str, ...],
        attested_at: float | None,
        now: float,
    ) -> None:
        """RFC 9470 §3 at the token endpoint: refuse, naming ``acr_values`` and ``max_age``, what the
        rule's ``assurance`` requirements (and the request's ``acr_values``) need and this request
        does not reach."""
        need = needed(grant.assurance, grant.audiences, scopes, requested)
        low, old = shortfall(need, risk.level, attested_at, now)
        record.details["assurance"] = {
            "presented": risk.level,
            "required": need.acr,
            "max_age": need.max_age,
            "because": list(need.because),
            "attestation_age": int(now - attested_at) if attested_at is not None else None,
            "evidence": risk.evidence.as_dict(),
        }
        if low or old:
            self._save_progress(risk)
            raise StepUpRequired(
                "assurance.level_too_low" if low else "assurance.attestation_too_old",
                ", ".join(need.because),
                max_age=need.max_age,
                acr_values=at_least(need.acr) if low and need.acr else (),
            )

    def _save_progress(self, risk: _Risk) -> None:
        """A refused exchange still counts for the probation of a changed fact (best effort)."""
        if self.baselines is None or risk.baseline_key is None:
            return
        updated = progress(risk.baseline, risk.assessment.drift)
        if updated == risk.baseline:
            return
        try:
            self.baselines.save(risk.baseline_key, updated, BASELINE_TTL)
        except StoreUnavailable:
            log.warning("drift probation progress not saved: store unavailable")

    def _learn(
        self,
        risk: _Risk,
        subject: VerifiedToken,
        source_ip: str | None,
        audiences: tuple[str, ...],
        scopes: tuple[str, ...],
        depth: int,
        now: float,
    ) -> None:
        """Update the behaviour baseline after a grant (best effort: a lost update only delays learning)."""
        assert self.baselines is not None and risk.baseline_key is not None
        # The reviewed baseline: first-seen facts set, changed ones confirmed or left pending.
        updated = observe(
            risk.assessment.drift.baseline,
            now=now,
            source_ip=source_ip,
            stable_facts={},
            audiences=audiences,
            scopes=scopes,
            depth=depth,
            rebaseline=False,
        )
        try:
            self.baselines.save(risk.baseline_key, updated, BASELINE_TTL)
        except StoreUnavailable:
            log.warning("baseline update skipped: store unavailable")

    def record_failure(self, record: AuditRecord, now: float) -> None:
        """A refusal for a verified identity counts towards its recent_failures signal."""
        if self.baselines is None or record.issuer is None or record.subject is None:
            return
        key = identity_key(record.issuer, record.subject)
        try:
            self.baselines.save(key, record_failure(self.baselines.load(key), now), BASELINE_TTL)
        except StoreUnavailable:
            log.warning("failure not recorded in baseline: store unavailable")

    def _check_liveness(self, subject: VerifiedToken, token: str) -> bool:
        """Kubernetes: ask the cluster whether the token's pod still exists (TokenReview).

        True when a live review passed (posture evidence for the assurance levels)."""
        reviewer = self.token_reviewers.get(subject.issuer_name)
        if reviewer is None:
            return False
        try:
            # Ask the API server to check the audience we require, not whatever the token says.
            trusted = self.issuers.by_name(subject.issuer_name)
            ours = trusted.policy.audiences if trusted else frozenset()
            username = reviewer.review(token, tuple(a for a in subject.audiences if a in ours))
        except TokenReviewUnavailable as exc:
            raise TemporarilyUnavailable("subject_token.token_review_unavailable", str(exc)) from None
        if username != subject.subject:
            raise InvalidRequest("subject_token.kubernetes.not_live")
        return True

    def _reserve(self, subject: VerifiedToken, token: str, now: float) -> SingleUse:
        """Phase 1 of single use (see :class:`~sts.core.ports.SingleUseLedger`)."""
        # Keys are prefixed by purpose and issuer, so replay caches never collide.
        use = SingleUse(
            purpose=f"subject_token:{subject.issuer_name}",
            key=subject.jti if subject.jti is not None else signed_part_hash(token),
            expires_at=subject.expires_at + self.config.leeway,
            valid_from=earliest_acceptance(subject, self.config.leeway),
        )
        try:
            return self.ledger.reserve(use, now)
        except AlreadyUsed:
            raise InvalidRequest("subject_token.replayed") from None
        except ReplayWindowLost as exc:
            raise InvalidRequest(
                "subject_token.replay_window_lost", str(exc), description=REPLAY_WINDOW_LOST
            ) from None
        except StoreUnavailable as exc:
            raise TemporarilyUnavailable("store.unavailable", str(exc)) from None


def earliest_acceptance(token: VerifiedToken, leeway: float) -> float | None:
    """The earliest time (this service's clock) ``token`` could have been accepted: its ``iat``
    (else ``nbf``) less the leeway a clock ahead of ours is given (RFC 7519 §4.1.5-6); None when
    it has neither (any time)."""
    start = token.issued_at if token.issued_at is not None else token.not_before
    return None if start is None else start - leeway


def _withdraw_grant(record: AuditRecord) -> None:
    """The record of a grant whose token was minted but will not leave: it becomes a refusal."""
    record.granted_audience, record.granted_scope, record.granted_lifetime = [], [], None
    record.issued_jti = record.issued_exp = None
    record.issued_kid = None


def _bound_key(token: VerifiedToken) -> str | None:
    """``cnf.jkt`` of a DPoP-bound token of ours (RFC 9449 §6.1); None for any other token."""
    cnf = token.claims.get("cnf")
    jkt = cnf.get("jkt") if isinstance(cnf, Mapping) else None
    if token.issuer_name != SELF_ISSUER or jkt is None:
        return None
    return str(jkt)


def presented_keys(proof: VerifiedProof | None, thumbprint: str | None) -> dict[str, str]:
    """The proof-of-possession keys this request proves, as baseline facts (``cnf_jkt``, ``cnf_x5t``)."""
    keys: dict[str, str] = {}
    if proof is not None:
        keys["cnf_jkt"] = proof.jkt
    if thumbprint is not None:
        keys["cnf_x5t"] = thumbprint
    return keys


def confirmation(proof: VerifiedProof | None, thumbprint: str | None) -> dict[str, Any]:
    """``cnf`` (RFC 7800): the DPoP key (RFC 9449 §6) and/or the client certificate (RFC 8705 §3.1)."""
    cnf: dict[str, str] = {}
    if proof is not None:
        cnf["jkt"] = proof.jkt
    if thumbprint is not None:
        cnf["x5t#S256"] = thumbprint
    return {"cnf": cnf} if cnf else {}


def carried_claims(subject: VerifiedToken, act: dict[str, Any] | None) -> dict[str, Any] | None:
    """``act`` (the chain) and the subject's ``may_act`` (RFC 8693 §4.4) travel with the token,
    so a later re-exchange is bound by who the subject allowed to act for it."""
    extra: dict[str, Any] = {}
    if act is not None:
        extra["act"] = act
    may_act = subject.claims.get("may_act")
    if isinstance(may_act, Mapping):
        extra["may_act"] = dict(may_act)
    return extra or None


def signed_part_hash(token: str) -> str:
    """SHA-256 of what the signature covers (RFC 7515 §5.1 signing input: header and payload).

    Not of the whole token: an ECDSA signature ``(r, s)`` has a twin ``(r, n - s)`` that
    verifies too, so one token has several encodings; its signed part has only one.
    """
    return token_hash(token.rpartition(".")[0])


def presented_subject_token_hash(wire: WireRequest) -> str | None:
    """SHA-256 of the first ``subject_token`` in the form (else the query string), if any."""
    for source in (wire.form, wire.query):
        for value in source.get("subject_token", ()):
            if value:
                return token_hash(value)
    return None


def trace_details(wire: WireRequest) -> dict[str, Any]:
    """The record's ``details`` to start with: the W3C trace id, when the request has one."""
    return {"trace_id": wire.trace_id} if wire.trace_id else {}


def _record_subject(record: AuditRecord, subject: VerifiedToken) -> None:
    record.issuer = subject.issuer_name
    record.subject = subject.subject[:500]
    record.subject_token_jti = subject.jti
    record.subject_token_iat = subject.issued_at
