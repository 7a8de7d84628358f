"""The token-exchange pipeline (RFC 8693), in the order :meth:`TokenExchange._decide` runs it.

Each step decides one thing and fills in its own part of the audit record.  The
stages are those the pipeline reports (:mod:`sts.core.stages`: trace spans and
latency histograms); "where" names a module of this package, or this module::

    stage        step                                           where
    parse        read the request (RFC 6749 §3.2, 8693 §2.1)    request.parse_request
    client_auth  authenticate the client (RFC 6749 §2.3,        TokenExchange._authenticate_client
                 RFC 7523 §3)
    dpop         verify the DPoP proof (RFC 9449 §4.3)          binding.verify_request_proof
                 (its jti spent by binding.ProofUses: on SQL with the record)
    attest       attest the subject and the actor, build the    attestation.Attestation.attest
                 act chain (RFC 8693 §4.1, §4.4)
    policy       evaluate the policy                            TokenExchange._evaluate_policy
                 keep a bound token bound (RFC 9449 §7)         binding.check_binding
                 ... and certificate-bound (RFC 8705 §3)        binding.check_certificate_binding
                 the attestation age the rule allows            check_attestation_age
    risk         assess the risk                                risk_and_assurance.RiskAndAssurance.assess
                 enforce it: refuse, step up or narrow          RiskAndAssurance.enforce
                 the assurance level needed (RFC 9470 §3)       RiskAndAssurance.check_assurance
    mint         the lifetime                                   issue.token_lifetime
                 reserve the single use of the subject token    single_use.reserve_subject_token
                 mint the token (RFC 9068)                      issue.mint_exchanged_token
                 learn the behaviour baseline                   RiskAndAssurance.learn
                 record the grant                               issue.record_grant
    audit        commit the record (with the single uses and    TokenExchange._commit
                 the baseline: on SQL, one transaction)

Rate limits are checked where their key is known: on arrival (parse), per client
(client_auth), per identity (attest) and per rule (mint: once every check that can refuse
has passed, so that refused requests spend none of the workload's quota).  Storage and keys are
reached through :mod:`sts.core.ports`.  Whatever the outcome, the record is
written (:class:`sts.core.audited.AuditedEndpoint`: refused, failed or granted),
and a token is returned only after its record is committed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ...errors import (
    InvalidClient,
    InvalidDPoPProof,
    InvalidRequest,
    OAuthError,
    ServerError,
    TemporarilyUnavailable,
)
from ...protocol.client_auth import NONE, parse_client_credentials
from ...protocol.token_exchange import TOKEN_TYPE_ACCESS_TOKEN, TokenExchangeRequest, TokenExchangeResponse
from ...protocol.wire import WireRequest
from .. import stages as stage
from ..attest import IssuerDirectory, VerifiedToken
from ..audit import AuditRecord, log_unaudited
from ..audited import AuditedEndpoint
from ..clients import (
    AssertionAudience,
    AuthenticatedClient,
    RegisteredClient,
    authenticate_client,
    recorded_client_id,
)
from ..delegation import attestation_time, narrow_reexchange, workload_issuer
from ..dpop import DPoPConfig, window_lost
from ..policy.evaluate import evaluate
from ..policy.index import PolicySet
from ..policy.rules import Grant, PolicyRequest
from ..ports import (
    AlreadyUsed,
    AuditSink,
    AuditUnavailable,
    BaselineStore,
    BaselineUpdate,
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
    UsesNotClaimed,
)
from ..rate_limit import NO_LIMITS, RateLimiter
from ..subject_state import identity_key
from .attestation import Attestation, Parties
from .binding import ProofUses, check_binding, check_certificate_binding, verify_request_proof
from .issue import mint_exchanged_token, record_grant, token_lifetime
from .request import hashed_subject_token, parse_request, presented_subject_token_hash, start_record
from .risk_and_assurance import RiskAndAssurance
from .single_use import REPLAY_WINDOW_LOST as TOKEN_WINDOW_LOST
from .single_use import refuse_if_used, reserve_subject_token, withdraw_grant

log = logging.getLogger(__name__)


@dataclass
class PendingWrites:
    """What a grant writes with its audit record (:meth:`~sts.core.ports.SingleUseLedger.commit`):
    the DPoP proof's deferred use, the subject token's reserved use and the baseline update."""

    proofs: ProofUses
    uses: list[SingleUse] = field(default_factory=list)
    baseline: BaselineUpdate | None = None
    #: The verified subject, whose identity a refusal counts towards (recent_failures).
    subject: VerifiedToken | None = None

    def verified(self, subject: VerifiedToken) -> None:
        self.subject = subject


@dataclass(frozen=True)
class ExchangeConfig:
    issuer: str
    token_endpoint: str
    leeway: int
    max_assertion_lifetime: int
    dpop: DPoPConfig | None = None


class TokenExchange(AuditedEndpoint[OAuthError]):
    """The pipeline, with its ports wired in once at start."""

    refusal = OAuthError
    logger = log
    decision_name = "token exchange"

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
        self.clients = clients
        self.issuers = issuers
        self.policy = policy
        self.replay = replay
        self.ledger = ledger
        self.signer = signer
        self.audit = audit
        self.clock = clock
        self.assertion_audience = AssertionAudience(config.issuer, config.token_endpoint)
        self.attestation = Attestation(
            issuers,
            leeway=config.leeway,
            limits=limits,
            token_reviewers=dict(token_reviewers or {}),
            subject_states=subject_states,
            revoked_tokens=revoked_tokens,
        )
        self.risk = RiskAndAssurance(
            issuers, leeway=config.leeway, subject_states=subject_states, baselines=baselines
        )

    def handle(self, wire: WireRequest) -> TokenExchangeResponse:
        """Run the pipeline; return the response or raise the :class:`OAuthError` to send."""
        now = self.clock()
        record = start_record(wire, now)
        pending = PendingWrites(ProofUses(self.ledger, self.replay))
        return self.decide_and_record(
            record,
            lambda: self._decide(wire, record, now, pending),
            lambda _response: self._commit(record, pending, now),
            abandon=lambda: self._abandon(pending, now),
            refused=lambda exc: self._count_failure(pending, exc, now),
        )

    def _abandon(self, pending: PendingWrites, now: float) -> None:
        """A refused (or failed) request: give back the reservations; a verified proof stays spent."""
        self.ledger.cancel(pending.uses)
        pending.proofs.spend_now(now)

    def refuse_early(self, wire: WireRequest, exc: OAuthError) -> None:
        """Record a request refused before the pipeline could read it (body too large, unparseable)."""
        record = start_record(wire, self.clock())
        record.subject_token_sha256 = presented_subject_token_hash(wire)
        self.record_refusal(record, exc)

    def _decide(
        self, wire: WireRequest, record: AuditRecord, now: float, pending: PendingWrites
    ) -> TokenExchangeResponse:
        """The stages of the module docstring, in order: the response, with ``record`` filled in
        (committed by :meth:`_commit`) and what to commit with it in ``pending``."""
        # The hash goes into the record even when the request is refused before it is parsed.
        record.subject_token_sha256 = presented_subject_token_hash(wire)
        self.stages.enter(stage.PARSE)
        # Global and per-network limits, before any work is done for the request.
        self.limits.on_arrival("token", wire.source_ip, now, record)
        request = parse_request(wire, record)

        self.stages.enter(stage.CLIENT_AUTH)
        client = self._authenticate_client(wire, record, now)

        self.stages.enter(stage.DPOP)
        proof = verify_request_proof(
            wire,
            self.config.dpop,
            url=self.config.token_endpoint,
            replay=pending.proofs,
            record=record,
            now=now,
        )

        self.stages.enter(stage.ATTEST)
        parties = self.attestation.attest(
            request,
            record,
            now,
            subject_sha256=hashed_subject_token(wire, request, record),
            verified=pending.verified,
        )

        self.stages.enter(stage.POLICY)
        grant, scopes = self._evaluate_policy(request, client, parties, record, now)
        if client is None and parties.subject.subject in self.clients:
            # An anonymous token's client_id is its subject (RFC 9068 §2.2 requires one): one naming
            # a registered client would read, to resource servers and to /revoke, as that client's
            # (an outside audit had a registered client revoke a token it never asked for).
            raise InvalidRequest("client.subject_names_a_client", parties.subject.subject[:100])
        check_binding(parties.subject, parties.actor, grant, proof)
        check_certificate_binding(parties.subject, parties.actor, wire.client_cert_thumbprint)
        attested_at = check_attestation_age(parties.subject, grant, now)

        self.stages.enter(stage.RISK)
        risk = self.risk.assess(wire, request, parties, proof, grant, scopes, attested_at, record, now)
        scopes = self.risk.enforce(risk, scopes, record)
        self.risk.check_assurance(risk, grant, scopes, request.acr_values, attested_at, record, now)

        self.stages.enter(stage.MINT)
        if grant.rate_limit is not None:
            # The rule's quota, once every check that can refuse has passed (a used single-use token
            # too): a refused request spends none of the workload's (an outside audit drained it so).
            subject, leeway = parties.subject, self.config.leeway
            if grant.single_use:
                refuse_if_used(self.ledger, subject, request.subject_token, leeway=leeway, now=now)
            self.limits.for_rule(
                grant.rule, grant.rate_limit, workload_issuer(subject), subject.subject, now, record
            )
        lifetime = token_lifetime(parties.subject, grant, request, risk.decision, now, actor=parties.actor)
        if grant.single_use:
            # Reserved last of all, so that a refusal does not burn the token.
            pending.uses.append(
                reserve_subject_token(
                    self.ledger, parties.subject, request.subject_token, leeway=self.config.leeway, now=now
                )
            )
        issued = mint_exchanged_token(
            self.signer(),
            self.config.issuer,
            client=client,
            parties=parties,
            proof=proof,
            certificate=wire.client_cert_thumbprint,
            grant=grant,
            scopes=scopes,
            lifetime=lifetime,
            attested_at=attested_at,
            acr=risk.level,
            now=now,
        )
        pending.baseline = self.risk.learn(risk, wire.source_ip, grant.audiences, scopes, parties.depth, now)
        record_grant(record, grant, scopes, lifetime, issued)
        return TokenExchangeResponse(
            access_token=issued.token,
            issued_token_type=request.requested_token_type or TOKEN_TYPE_ACCESS_TOKEN,
            # RFC 9449 §5: a DPoP-bound token is token_type DPoP.
            token_type="DPoP" if proof else "Bearer",
            expires_in=lifetime,
            scope=scopes,
        )

    def _authenticate_client(
        self, wire: WireRequest, record: AuditRecord, now: float
    ) -> AuthenticatedClient | None:
        """The client (RFC 6749 §2.3, RFC 7523 §3), in the record; None when it presents no credentials
        and some rule accepts the subject token as the only credential."""
        creds = parse_client_credentials(wire.form, wire.authorization)
        record.client_auth_method = creds.method
        record.client_id = recorded_client_id(self.clients, creds.client_id)
        client = authenticate_client(
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
        # A public client's id stays in the record, with the method "none": named, not authenticated
        # (also when its id came in Basic with an empty password).
        record.client_id = client.client_id if client else recorded_client_id(self.clients, creds.client_id)
        if client is None:
            record.client_auth_method = NONE
        if client is not None:
            self.limits.for_client("token", client.client_id, now, record)
        return client

    def _evaluate_policy(
        self,
        request: TokenExchangeRequest,
        client: AuthenticatedClient | None,
        parties: Parties,
        record: AuditRecord,
        now: float,
    ) -> tuple[Grant, tuple[str, ...]]:
        """The rule's grant and the scopes it allows; the rule and its reasons go into the record."""
        subject = parties.subject
        grant = evaluate(
            self.policy,
            subject,
            PolicyRequest(
                request.audiences,
                request.resources,
                request.scopes,
                client.client_id if client else None,
                actor=parties.actor,
                delegation_depth=parties.depth,
            ),
        )
        record.rule = grant.rule
        record.reasons.extend(grant.reasons)
        # A re-exchanged token of ours can only be narrowed.
        scopes = narrow_reexchange(subject, grant.audiences, grant.scopes)
        if len(scopes) != len(grant.scopes):
            record.reasons.append("reexchange.scope_narrowed")
        return grant, scopes

    def _commit(self, record: AuditRecord, pending: PendingWrites, now: float) -> None:
        """Commit the grant's record; with it the uses of the DPoP proof and the subject token and
        the baseline update (on SQL all in one transaction)."""
        proofs = pending.proofs.pending
        uses = [*proofs, *pending.uses]
        try:
            # Two-phase single use: the subject token is used up only together with (Redis: right
            # after) the commit of this record, so a failure here leaves it usable for the retry.
            if uses or pending.baseline is not None:
                self.ledger.commit(record, uses, now, pending.baseline)
            else:
                self.audit.write(record)
        except AlreadyUsed as exc:
            # The proof or the token was used already: by an earlier request (the stores decide
            # single use at the commit, not before) or by a concurrent one committed first, in
            # any worker or instance.  The proof was verified, so it is spent, whichever it was.
            withdraw_grant(record)
            replayed: OAuthError
            if exc.use is not None and exc.use in proofs:
                replayed = InvalidDPoPProof("dpop.replayed_jti", "found used at commit")
            else:
                replayed = InvalidRequest("subject_token.replayed", "found used at commit")
                pending.proofs.spend_now(now)
            self.record_refusal(record, replayed)
            self._count_failure(pending, replayed, now)
            raise replayed from None
        except ReplayWindowLost as exc:
            # The replay store lost its records since the proof (or token) was checked: nothing
            # committed; the answer is the loss's own, as when it is found before.
            withdraw_grant(record)
            lost: OAuthError
            if exc.use is not None and exc.use in proofs and self.config.dpop is not None:
                lost = window_lost(self.config.dpop, exc, now)
            else:
                lost = InvalidRequest(
                    "subject_token.replay_window_lost", str(exc), description=TOKEN_WINDOW_LOST
                )
            self.record_refusal(record, lost)
            raise lost from None
        except UsesNotClaimed as exc:
            # Nothing committed (Redis could not claim the uses before the record): refused, on record.
            withdraw_grant(record)
            unavailable = (
                TemporarilyUnavailable("store.unavailable", str(exc))
                if exc.retry_after is None
                else TemporarilyUnavailable(
                    "store.unavailable", str(exc), retry_after=max(1, math.ceil(exc.retry_after))
                )
            )
            pending.proofs.spend_now(now)
            self.record_refusal(record, unavailable)
            raise unavailable from None
        except AuditUnavailable as exc:
            log.error(
                "audit write failed; token %s withheld (request %s): %s",
                record.issued_jti,
                record.request_id,
                exc,
            )
            log_unaudited(log, record, str(exc), outcome="withheld")
            raise TemporarilyUnavailable("audit.unavailable", str(exc)) from None
        except StoreUnavailable as exc:
            log.error(
                "single use of the subject token not confirmed after its audit record was committed; "
                "token %s withheld (request %s): %s",
                record.issued_jti,
                record.request_id,
                exc,
            )
            raise TemporarilyUnavailable("store.unavailable", str(exc)) from None

    def _count_failure(self, pending: PendingWrites, exc: OAuthError, now: float) -> None:
        """A refusal (not a service failure) counts towards the identity's recent_failures, when it
        has a baseline (the store's :meth:`~sts.core.ports.BaselineStore.add_failure` decides)."""
        if not isinstance(exc, TemporarilyUnavailable) and (s := pending.subject) is not None:
            self.risk.record_failure(identity_key(workload_issuer(s), s.subject), now)

    # -- how this endpoint's refusals are recorded (sts.core.audited) ---------------------------------

    def refusal_fields(self, exc: OAuthError) -> tuple[str, str, str]:
        return exc.error, exc.reason, exc.detail

    def unexpected_failure(self, reason: str) -> OAuthError:
        return ServerError(reason)

    def entering_audit(self) -> None:
        self.stages.enter(stage.AUDIT)


def check_attestation_age(subject: VerifiedToken, grant: Grant, now: float) -> float | None:
    """When the workload last proved itself (:func:`~sts.core.delegation.attestation_time`); refused
    when that is longer ago than the rule's ``max_attestation_age`` allows."""
    attested_at = attestation_time(subject)
    if grant.max_attestation_age is not None and (
        attested_at is None or now - attested_at > grant.max_attestation_age
    ):
        raise InvalidRequest("policy.attestation_too_old")
    return attested_at
