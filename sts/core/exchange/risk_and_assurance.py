"""The ``risk`` stage: what other systems said about the subject, the rule's own risk signals,
and the assurance level the request reaches (RFC 9470).

* :meth:`RiskAndAssurance.assess` reads the subject's state (security events) and
  behaviour baseline, weighs the signals (:mod:`sts.core.risk`) and decides
  (:mod:`sts.core.stepup`); the decision and the level reached go into the record.
* :meth:`RiskAndAssurance.enforce` applies an enforced decision: refuse, ask for a
  step-up, or narrow the scopes.
* :meth:`RiskAndAssurance.check_assurance` refuses, with a step-up challenge, what
  the rule's ``assurance`` requirements (and the request's ``acr_values``) need
  and this request does not reach.

The baseline learns after a grant (:meth:`~RiskAndAssurance.learn`: saved with the
grant's record, :meth:`sts.core.ports.SingleUseLedger.commit`), a refusal
counts towards ``recent_failures`` (:meth:`~RiskAndAssurance.record_failure`),
and a refused exchange still counts for the probation of a changed fact (best effort).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ...errors import InvalidRequest, RiskRefused, StepUpRequired, TemporarilyUnavailable
from ...protocol.token_exchange import TOKEN_TYPE_JWT, TokenExchangeRequest
from ...protocol.wire import WireRequest
from ..assurance import (
    ACR_POSTURE,
    KEY_CHANGED,
    KEY_CONTINUES,
    KEY_FACTS,
    KEY_NONE,
    Evidence,
    at_least,
    key_state,
    needed,
    posture_describes,
    posture_is_good,
    rank,
    reached,
    shortfall,
)
from ..attest import IssuerDirectory, VerifiedToken, verify_token
from ..audit import AuditRecord, token_hash
from ..baseline import BASELINE_TTL, Baseline, observe
from ..delegation import SELF_ISSUER, workload_issuer
from ..dpop import VerifiedProof
from ..drift import EVIDENCE_ISSUED, EVIDENCE_POP, EVIDENCE_POSTURE, progress, same_drift, session_summary
from ..history import joined, upstream_identity
from ..introspection import token_identities, upstream_issuer
from ..policy.rules import Grant
from ..ports import BaselineStore, BaselineUpdate, StoreUnavailable, SubjectStateStore
from ..risk import Assessment, RiskContext, RiskSettings, assess, assess_events, review_drift
from ..stepup import DENY, STEP_UP, RiskDecision, decide
from ..subject_state import SubjectState, identity_key, merge
from .attestation import Parties, raised_by_actor
from .binding import carried_level, presented_keys, subject_keys

#: The signal a changed fact fires (:func:`sts.core.risk.assess`).
DRIFT_SIGNAL = "attestation_drift"

log = logging.getLogger(__name__)

#: The signals a posture declared by a security event fires, in the order a refusal names them.
_POSTURE_SIGNALS = ("shared_signal", "stale_posture")

#: Rules without a ``risk`` section still obey security events, with these thresholds.
EVENTS_ONLY = RiskSettings()

#: The evidence a request shows (or could show), by (proof-of-possession key continuity, posture
#: token): the four sets, built once.
_EVIDENCE: Mapping[tuple[bool, bool], frozenset[str]] = {
    (pop, posture): frozenset(([EVIDENCE_POP] if pop else []) + ([EVIDENCE_POSTURE] if posture else []))
    for pop in (False, True)
    for posture in (False, True)
}


def _evidence(pop: bool, posture: bool) -> frozenset[str]:
    return _EVIDENCE[pop, posture]


@dataclass(frozen=True)
class ExchangeRisk:
    """The risk of one exchange: the decision, what it was decided on, and the level reached."""

    decision: RiskDecision
    assessment: Assessment
    cfg: RiskSettings
    baseline: Baseline
    baseline_key: str | None
    #: The record's ``details.risk``.
    record: dict[str, Any]
    #: The assurance level this request reaches (sts.core.assurance), and what it showed for it.
    level: str
    evidence: Evidence
    #: A security event (device-compliance-change) declared the subject's posture outside the rule's
    #: ``posture_good``: no posture evidence counts while it stands.  Not compared: it is read from
    #: the subject's state, which the rest was decided on.
    posture_declared_bad: bool = field(default=False, compare=False)
    #: What the risk was assessed on: a refusal's probation step is reviewed again on the baseline
    #: stored when it is saved (:meth:`RiskAndAssurance._save_progress`).  Not compared: it is what
    #: the rest was decided on.
    context: RiskContext | None = field(default=None, compare=False)


class RiskAndAssurance:
    """The ``risk`` stage, with the stores it reads and updates wired in once at start."""

    def __init__(
        self,
        issuers: IssuerDirectory,
        *,
        leeway: int,
        subject_states: SubjectStateStore | None,
        baselines: BaselineStore | None,
    ) -> None:
        self.issuers = issuers
        self.leeway = leeway
        self.subject_states = subject_states
        self.baselines = baselines

    def assess(
        self,
        wire: WireRequest,
        request: TokenExchangeRequest,
        parties: Parties,
        proof: VerifiedProof | None,
        grant: Grant,
        scopes: tuple[str, ...],
        attested_at: float | None,
        record: AuditRecord,
        now: float,
    ) -> ExchangeRisk:
        """Assess the risk of granting ``scopes``; the assessment and the level go into ``record``."""
        subject = parties.subject
        # The proof-of-possession key is a fact too: a workload whose key changes has drifted.  (Only
        # the facts differ from the subject's: its issuer, subject and claims are read from it.)
        keys = presented_keys(proof, wire.client_cert_thumbprint)
        carried = carried_level(subject)
        if keys:
            keys = subject_keys(keys, subject, actor=parties.actor is not None, carried=carried)
        facts = {**subject.facts, **keys} if keys else subject.facts
        identity = identity_key(workload_issuer(subject), subject.subject)
        posture = None
        if request.posture_token:
            record.details["posture_token_sha256"] = token_hash(request.posture_token)
            if not _separate(request.posture_token, request.subject_token, request.actor_token):
                # The subject token's own claims are not separate evidence of its posture.
                raise InvalidRequest("posture_token.not_separate")
            posture = self._posture(request.posture_token, subject, grant.risk, now)
        # The baseline is kept where it is judged: by the rule's risk signals, or by the assurance
        # levels (whose proof-of-possession level needs the identity's key), and whenever a key
        # is presented, so the identity's first key is remembered.
        keeps_baseline = bool(grant.risk or grant.assurance or keys)
        try:
            state = (
                merge(self.subject_states.get(self._identity_keys(subject))) if self.subject_states else None
            )
            baseline_key = identity if keeps_baseline and self.baselines else None
            baseline = self.baselines.load(baseline_key) if baseline_key and self.baselines else Baseline()
            upstream = (
                upstream_identity(subject, self.issuers.names()) if baseline_key and grant.risk else None
            )
            history = joined(baseline, self.baselines.load(upstream)) if upstream and self.baselines else None
        except StoreUnavailable as exc:
            raise TemporarilyUnavailable("store.unavailable", str(exc)) from None
        state = raised_by_actor(state or SubjectState(), parties.actor_risk_level)
        cfg = grant.risk or EVENTS_ONLY
        posture_claims = posture[0] if posture else None
        # A posture asserted by a security event (device-compliance-change) takes precedence over a
        # posture token's, as in the stale_posture signal, and over a live review: a workload its
        # EDR declared not compliant shows no posture evidence, so no posture-level ``acr`` (it
        # was issued one on a compliant posture token older than the event; an outside audit).
        declared_bad = state.posture is not None and state.posture not in cfg.posture_good
        posture_ok = not declared_bad and posture_is_good(posture_claims, cfg.posture_fact, cfg.posture_good)
        presented_key = key_state(keys, baseline.confirmed_keys()) if keys else KEY_NONE
        shown = _evidence(presented_key == KEY_CONTINUES, posture_ok)
        if carried is not None and keys:  # a token of ours bound to them, issued at pop (subject_keys)
            shown |= {EVIDENCE_ISSUED}
        presentable = _evidence(
            any(baseline.facts.get(f) is not None for f in KEY_FACTS), cfg.posture_fact is not None
        )
        ctx = RiskContext(
            identity=identity,
            facts=facts,
            claims=subject.claims,
            source_ip=wire.source_ip,
            audiences=grant.audiences,
            scopes=scopes,
            delegation_depth=parties.depth,
            attested_at=attested_at,
            now=now,
            baseline=baseline,
            state=state,
            posture_claims=posture_claims,
            posture_problem=posture[1] if posture else None,
            evidence_shown=shown,
            evidence_presentable=presentable,
            history=history,
        )
        assessment = assess(ctx, cfg) if grant.risk else assess_events(ctx, cfg)
        decision = decide(assessment, cfg, scopes)
        if presented_key == KEY_CHANGED and all(
            v in assessment.drift.baseline.confirmed_values(f) for f, v in keys.items()
        ):
            # The new key completed its probation with this exchange: it is the identity's key now.
            presented_key = KEY_CONTINUES
        evidence = Evidence(
            key=presented_key,
            posture_token=posture_ok,
            live_review=parties.live_review and not declared_bad,
            carried=carried,
        )
        details = {
            "mode": cfg.mode if grant.risk else "events",
            "score": assessment.score,
            "decision": decision.as_dict(),
            "signals": [s.as_dict() for s in assessment.signals],
            "learning": (history or baseline).learning if grant.risk else None,
            # The session state behind the decision: each watched fact, confirmed or pending.
            "baseline": session_summary(assessment.drift.baseline, cfg.stable_facts if grant.risk else ())
            if baseline_key
            else None,
        }
        if upstream and history:  # a re-exchange: the upstream identity it was judged with, as ``learning``
            details["history"] = {"joined_with": upstream[:600], "count": history.count}
        risk = ExchangeRisk(
            decision,
            assessment,
            cfg,
            baseline,
            baseline_key,
            details,
            level=reached(evidence),
            evidence=evidence,
            posture_declared_bad=declared_bad,
            context=ctx,
        )
        record.details["risk"] = risk.record
        record.details["assurance"] = {"presented": risk.level, "evidence": risk.evidence.as_dict()}
        return risk

    def enforce(self, risk: ExchangeRisk, scopes: tuple[str, ...], record: AuditRecord) -> tuple[str, ...]:
        """The scopes left after an enforced risk decision; or refuse, or ask for a step-up."""
        decision = risk.decision
        if not decision.enforced:
            return scopes
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
        return narrowed

    def check_assurance(
        self,
        risk: ExchangeRisk,
        grant: Grant,
        scopes: tuple[str, ...],
        requested: tuple[str, ...],
        attested_at: float | None,
        record: AuditRecord,
        now: float,
    ) -> None:
        """RFC 9470 §3 at the token endpoint: refuse, naming ``acr_values`` and ``max_age``, what the
        rule's ``assurance`` requirements (and the request's ``acr_values``) need and this request
        does not reach: the level reached and the attestation age, for these scopes and audiences."""
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
        if low and risk.posture_declared_bad and rank(need.acr) >= rank(ACR_POSTURE):
            # No renewal reaches the posture level while the event stands: a step-up would send the
            # workload round with evidence that cannot count, so this is a refusal for risk, naming
            # the signals behind it (an outside audit; docs/policies.md "Refusals and renewing").
            self._save_progress(risk)
            fired = {s.name for s in risk.assessment.fired}
            raise RiskRefused(
                "assurance.posture_declared_bad",
                ", ".join(need.because),
                signals=tuple(s for s in _POSTURE_SIGNALS if s in fired) or ("shared_signal",),
            )
        if low or old:
            self._save_progress(risk)
            raise StepUpRequired(
                "assurance.level_too_low" if low else "assurance.attestation_too_old",
                ", ".join(need.because),
                max_age=need.max_age,
                acr_values=at_least(need.acr) if low and need.acr else (),
            )

    def learn(
        self,
        risk: ExchangeRisk,
        source_ip: str | None,
        audiences: tuple[str, ...],
        scopes: tuple[str, ...],
        depth: int,
        now: float,
    ) -> BaselineUpdate | None:
        """The behaviour baseline after a grant, to save with its record (in its transaction on SQL,
        else best effort: a lost update only delays learning); None when there is none to keep or
        it did not change."""
        if self.baselines is None or risk.baseline_key is None:
            return None
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
        # ``observe`` counts the exchange, so the baseline always changed (compared as before, but
        # count first: it decides without comparing every field).
        if updated.count == risk.baseline.count and updated == risk.baseline:
            return None
        # A grant that left the drift state as it read it (most: the confirmed values) leaves the
        # stored one alone, which a refused exchange may have moved on meanwhile (an outside audit).
        changed = not same_drift(risk.assessment.drift.baseline, risk.baseline)
        return BaselineUpdate(risk.baseline_key, updated, BASELINE_TTL, drift_changed=changed)

    def record_failure(self, key: str, now: float) -> None:
        """A refusal for a verified identity (``key``, its whole subject: the record's is cut to 500
        characters, and failures counted under it were never read) counts towards its
        recent_failures signal.  Saved apart from the baseline, which a grant decided meanwhile
        writes back as it read it (last writer wins: refusals sent with grants were lost, and
        stayed under ``max_failures``; an outside audit)."""
        if self.baselines is None:
            return
        try:
            self.baselines.add_failure(key, now, BASELINE_TTL)
        except StoreUnavailable:
            log.warning("failure not recorded in baseline: store unavailable")

    def _save_progress(self, risk: ExchangeRisk) -> None:
        """A refused exchange still counts for the probation of a changed fact (best effort), when
        the drift is all that fired: one refused for anything else as well (a block by a security
        event, an unusual network, recent failures, ...) is no evidence for the new value.  Else a
        workload refused while its session is revoked, or from outside its networks, completed
        its own probation, and was granted as the identity's usual self once the block lapsed,
        while the real workload was then the drift (an outside audit: baseline poisoning).

        The step is reviewed again on the drift state stored when it is saved, and saved only if
        that is still the state (:meth:`~sts.core.ports.BaselineStore.update_drift`): it was
        saved with the whole baseline read before, so that a grant in flight wrote it back over
        the step, and so did another refusal (an outside audit: a drifted workload whose identity
        was granted on other instances at the same moment never completed its probation)."""
        if self.baselines is None or risk.baseline_key is None or risk.context is None:
            return
        if any(signal.name != DRIFT_SIGNAL for signal in risk.assessment.fired):
            return
        if same_drift(progress(risk.baseline, risk.assessment.drift), risk.baseline):
            return
        ctx, cfg, fresh = risk.context, risk.cfg, risk.assessment.fresh
        # What :meth:`assess` reviewed: a rule without ``risk`` (EVENTS_ONLY) watches keys alone.
        watched = cfg.stable_facts if cfg is not EVENTS_ONLY else ()

        def step(stored: Baseline) -> Baseline:
            """This exchange's probation step, on the drift state ``stored``."""
            again = review_drift(replace(ctx, baseline=stored), cfg, watched=watched, fresh=fresh)
            return progress(stored, again)

        try:
            self.baselines.update_drift(risk.baseline_key, step, BASELINE_TTL)
        except StoreUnavailable:
            log.warning("drift probation progress not saved: store unavailable")

    def _posture(
        self, token: str, subject: VerifiedToken, risk: RiskSettings | None, now: float
    ) -> tuple[Mapping[str, Any] | None, str | None]:
        """A posture token (extension parameter): verified like any upstream token, from an issuer
        that speaks for the subject's posture, about the same subject.  Expired or otherwise
        unusable, it is evidence for the stale_posture signal; one from another issuer, or about
        another subject, is refused outright (it would be someone else's evidence: the same ``sub``
        under another issuer is another workload).

        Which issuers speak for it: the rule's ``risk.posture_issuers``, else the subject token's own
        issuer (for a token of ours, the issuer it first came from).  Never this service itself."""
        try:
            posture = verify_token(
                token, TOKEN_TYPE_JWT, self.issuers, now=now, leeway=self.leeway, role="posture_token"
            )
        except InvalidRequest as exc:
            return None, exc.reason.removeprefix("posture_token.")
        allowed = risk.posture_issuers if risk is not None and risk.posture_issuers else None
        if allowed is None:
            own = subject.issuer_name
            if own == SELF_ISSUER:
                own = upstream_issuer(subject.claims, self.issuers.names()) or SELF_ISSUER
            allowed = frozenset({own})
        if posture.issuer_name == SELF_ISSUER or posture.issuer_name not in allowed:
            raise InvalidRequest("posture_token.issuer_not_allowed", posture.issuer_name)
        if posture.subject != subject.subject:
            raise InvalidRequest("posture_token.subject_mismatch")
        if posture.jti is not None and (posture.issuer_name, posture.jti) == (
            subject.issuer_name,
            subject.jti,
        ):
            raise InvalidRequest("posture_token.not_separate")  # The subject token, signed anew.
        # The profile's facts over raw claims of the same name, as for the subject token (the
        # raw claim won here: a look-alike top-level claim outvoted the checked fact; an outside audit).
        claims = {**posture.claims, **posture.facts}
        if not posture_describes(
            claims, {**subject.claims, **subject.facts}, (risk or EVENTS_ONLY).stable_facts
        ):
            return None, "another_instance"  # Unusable: about another pod, node or runner of this ``sub``.
        return claims, None

    def _identity_keys(self, subject: VerifiedToken) -> tuple[str, ...]:
        # Our own token: events may name the subject under the issuer it first came from.
        return tuple(
            token_identities(subject.issuer_name, subject.subject, subject.claims, self.issuers.names())
        )


def _separate(posture: str, *tokens: str | None) -> bool:
    """Whether the posture token is another token than ``tokens``: not one of them, nor one of them
    with another signature (a high-S ECDSA copy, re-encoded base64): its signed part differs."""
    signed = posture.rpartition(".")[0]
    return all(token is None or token.rpartition(".")[0] != signed for token in tokens)
