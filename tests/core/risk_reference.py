"""The risk stage (and the policy's choice of rule) as it was computed before it was made cheaper (main at ba30187), kept verbatim
as the reference that ``test_risk_equivalence.py`` holds the current code to: over varied inputs,
the same signals, scores, reviews, summaries, baselines, stored text and audit details.

Only the computation is copied; the values (``SignalResult``, ``Baseline``...) are the current
ones.  The old :meth:`Baseline.to_json` is :func:`baseline_json` (what ``dataclasses.asdict``
gave, the form the stored text has always had).
"""

# ruff: noqa
# mypy: ignore-errors

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any
import json

from sts.core.assurance import (
    KEY_CHANGED,
    KEY_CONTINUES,
    KEY_FACTS,
    Evidence,
    key_state,
    posture_is_good,
    reached,
)
from sts.core.attest import VerifiedToken
from sts.core.audit import AuditRecord, token_hash
from sts.core.baseline import (
    MAX_AUDIENCES,
    MAX_NETWORKS,
    MAX_SCOPES,
    RATE_WINDOW,
    BASELINE_TTL,
    Baseline,
    PendingFact,
    network_of,
)
from sts.core.delegation import SELF_ISSUER
from sts.core.drift import (
    EVIDENCE_ISSUED,
    EVIDENCE_POP,
    EVIDENCE_POSTURE,
    DriftReview,
    DriftSettings,
    _clears,
    _probation_done,
)
from sts.core.exchange.binding import presented_keys, subject_keys
from sts.core.exchange.risk_and_assurance import EVENTS_ONLY, ExchangeRisk
from sts.core.ports import BaselineUpdate, StoreUnavailable
from sts.core.risk import (
    RISK_LEVEL_WEIGHT,
    Assessment,
    RiskContext,
    RiskSettings,
    SignalResult,
    _address,
)
from sts.core.stepup import decide
from sts.core.subject_state import SubjectState, identity_key, merge
from sts.core.policy.evaluate import _actor_mismatch, _client_mismatch, _identity_mismatch, _targets
from sts.core.policy.index import PolicySet
from sts.core.policy.rules import Grant, PolicyRequest, Rule
from sts.errors import (
    InvalidClient,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    TemporarilyUnavailable,
    UnauthorizedClient,
)


def baseline_json(b: Baseline) -> str:
    """The stored form of a baseline as it was first defined: ``dataclasses.asdict``, tuples as arrays."""
    data = asdict(b)
    data["facts"] = dict(b.facts)
    data["pending"] = {name: asdict(p) for name, p in b.pending.items()}
    data["confirmed"] = {name: dict(how) for name, how in b.confirmed.items()}
    data["other_keys"] = {name: list(keys) for name, keys in b.other_keys.items()}
    return json.dumps(data, separators=(",", ":"), default=str)


def _no(name: str, reason: str, **evidence: Any) -> SignalResult:
    return SignalResult(name, False, 0, reason, evidence)


def _yes(name: str, weight: int, reason: str, **evidence: Any) -> SignalResult:
    return SignalResult(name, True, weight, reason, evidence)


def unusual_network(ctx: RiskContext, cfg: RiskSettings) -> SignalResult:
    name = "unusual_network"
    address = _address(ctx.source_ip)
    if address is None:
        return _yes(name, cfg.weight(name), "source address unknown", source=ctx.source_ip)
    if cfg.networks and not any(address in net for net in cfg.networks):
        return _yes(name, cfg.weight(name), "source outside the rule's networks", source=str(address))
    net = network_of(str(address))
    if ctx.baseline.learning:
        return _no(name, "learning: networks are being recorded", network=net)
    if net not in ctx.baseline.networks:
        return _yes(name, cfg.weight(name) // 2 or 1, "network never seen for this identity", network=net)
    return _no(name, "known network", network=net)


def attestation_drift(ctx: RiskContext, cfg: RiskSettings, drift: DriftReview) -> SignalResult:
    name = "attestation_drift"
    if not ctx.baseline.facts:
        return _no(name, "no baseline yet")
    if drift.changed:
        return _yes(
            name,
            cfg.weight(name),
            "stable facts changed since the baseline and not confirmed",
            changed={fact: dict(change) for fact, change in drift.changed.items()},
            clears=[dict(c) for c in drift.clears],
        )
    if drift.confirmed_now:
        return _no(name, "changed facts confirmed", confirmed=dict(drift.confirmed_now))
    return _no(name, "stable facts unchanged")


def review_drift(
    ctx: RiskContext, cfg: RiskSettings, *, watched: tuple[str, ...], fresh: bool
) -> DriftReview:
    """The watched facts (and the presented proof-of-possession keys) against the baseline.

    Key facts come from what the pipeline observed (the DPoP proof, the client
    certificate), never from a token's claims.
    """
    current = stable_values(ctx.facts, ctx.claims, tuple(f for f in watched if f not in KEY_FACTS))
    current.update({f: ctx.facts[f] for f in KEY_FACTS if ctx.facts.get(f) is not None})
    return drift_review(
        ctx.baseline,
        current,
        watched=watched,
        now=ctx.now,
        fresh=fresh,
        settings=cfg.drift,
        shown=ctx.evidence_shown,
        presentable=ctx.evidence_presentable,
        max_age=cfg.step_up_max_age,
        identity=ctx.identity,
        attested_at=ctx.attested_at,
    )


def stable_values(
    facts: Mapping[str, Any], claims: Mapping[str, Any], names: Sequence[str]
) -> dict[str, Any]:
    """The watched values: a profile fact when there is one, else the claim of that name."""
    out: dict[str, Any] = {}
    for name in names:
        value = facts.get(name, claims.get(name))
        if value is not None:
            out[name] = value if isinstance(value, str | int | bool) else str(value)
    return out


def stale_posture(ctx: RiskContext, cfg: RiskSettings) -> SignalResult:
    name = "stale_posture"
    if ctx.attested_at is None:
        return _yes(name, cfg.weight(name), "attestation time unknown")
    age = ctx.now - ctx.attested_at
    if cfg.posture_max_age is not None and age > cfg.posture_max_age:
        return _yes(name, cfg.weight(name), "attestation older than allowed", age=int(age))
    if ctx.posture_problem is not None:
        return _yes(name, cfg.weight(name), "posture token unusable", problem=ctx.posture_problem)
    if cfg.posture_fact is not None:
        posture = ctx.state.posture or _posture(ctx, cfg.posture_fact)
        if posture is None:
            return _yes(name, cfg.weight(name), "posture evidence missing", fact=cfg.posture_fact)
        if posture not in cfg.posture_good:
            return _yes(name, cfg.weight(name), "posture negative", posture=posture)
    return _no(name, "attestation and posture current", age=int(age))


def _posture(ctx: RiskContext, fact: str) -> str | None:
    """A posture token's claim first, then the subject's fact or claim of that name."""
    if ctx.posture_claims is not None and fact in ctx.posture_claims:
        value = ctx.posture_claims[fact]
    else:
        value = ctx.facts.get(fact, ctx.claims.get(fact))
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else None


def recent_failures(ctx: RiskContext, cfg: RiskSettings) -> SignalResult:
    name = "recent_failures"
    recent = [t for t in ctx.baseline.failures if ctx.now - t <= cfg.failure_window]
    if len(recent) >= cfg.max_failures:
        return _yes(name, cfg.weight(name), "refusals within the window", count=len(recent),
                    window=cfg.failure_window)  # fmt: skip
    return _no(name, "few recent refusals", count=len(recent))


def elevated_privilege(ctx: RiskContext, cfg: RiskSettings) -> SignalResult:
    name = "elevated_privilege"
    privileged = sorted(set(ctx.scopes) & cfg.privileged_scopes)
    if privileged:
        return _yes(name, cfg.weight(name), "privileged scopes requested", scopes=privileged)
    if not ctx.baseline.learning:
        unusual = sorted(set(ctx.scopes) - set(ctx.baseline.scopes))
        if unusual:
            return _yes(name, cfg.weight(name) // 2 or 1, "scopes never asked for before", scopes=unusual)
    return _no(name, "usual scopes")


def unexpected_s2s(ctx: RiskContext, cfg: RiskSettings) -> SignalResult:
    name = "unexpected_s2s"
    weight = cfg.weight(name)
    intent = ctx.claims.get(cfg.intent_claim) if cfg.intent_claim else None
    if isinstance(intent, str):
        # A single declared audience, as ``aud`` may be (RFC 7519 §4.1.3); never ignored.
        intent = [intent]
    if isinstance(intent, list):
        outside = sorted(set(ctx.audiences) - {str(i) for i in intent})
        if outside:
            return _yes(name, weight, "audiences outside the declared intent", audiences=outside)
    if ctx.baseline.learning:
        return _no(name, "learning: edges and rate are being recorded")
    new_edges = sorted(set(ctx.audiences) - set(ctx.baseline.audiences))
    if new_edges:
        return _yes(name, weight, "subject-to-audience edge never seen", audiences=new_edges)
    if ctx.delegation_depth > ctx.baseline.max_depth:
        return _yes(name, weight, "delegation chain deeper than usual", depth=ctx.delegation_depth,
                    usual=ctx.baseline.max_depth)  # fmt: skip
    rate, usual = ctx.baseline.current_rate(ctx.now), ctx.baseline.usual_rate
    if usual > 0 and rate > usual * cfg.burst_factor and rate >= 10:
        return _yes(name, weight, "burst far above the usual rate", per_minute=round(rate, 1),
                    usual=round(usual, 2))  # fmt: skip
    return _no(name, "usual edges, depth and rate")


def shared_signal(ctx: RiskContext, cfg: RiskSettings) -> SignalResult:
    name = "shared_signal"
    state = ctx.state
    if state.blocked_until is not None and ctx.now < state.blocked_until:
        return _yes(name, cfg.deny_at, "subject blocked by a security event", until=state.blocked_until,
                    events=list(state.events))  # fmt: skip
    if state.reauth_after is not None and (ctx.attested_at is None or ctx.attested_at < state.reauth_after):
        return _yes(name, cfg.step_up_at, "attestation predates a security event", after=state.reauth_after,
                    events=list(state.events))  # fmt: skip
    level = (state.risk_level or "").lower()
    if RISK_LEVEL_WEIGHT.get(level, 0):
        return _yes(name, RISK_LEVEL_WEIGHT[level], "risk level raised by a security event", level=level)
    return _no(name, "no security events in force")


def is_fresh(ctx: RiskContext, cfg: RiskSettings) -> bool:
    """Attestation that satisfies a step-up: no older than ``step_up_max_age``, and not
    older than a security event's ``reauth_after`` (renewing is exactly what that event asks)."""
    if ctx.attested_at is None or ctx.now - ctx.attested_at > cfg.step_up_max_age:
        return False
    return ctx.state.reauth_after is None or ctx.attested_at >= ctx.state.reauth_after


def assess(ctx: RiskContext, cfg: RiskSettings) -> Assessment:
    """Evaluate every signal (fired or not, all are recorded) and add up the score."""
    fresh = is_fresh(ctx, cfg)
    drift = review_drift(ctx, cfg, watched=cfg.stable_facts, fresh=fresh)
    signals: Sequence[SignalResult] = (
        unusual_network(ctx, cfg),
        attestation_drift(ctx, cfg, drift),
        stale_posture(ctx, cfg),
        recent_failures(ctx, cfg),
        elevated_privilege(ctx, cfg),
        unexpected_s2s(ctx, cfg),
        shared_signal(ctx, cfg),
    )
    return Assessment(
        score=sum(s.weight for s in signals if s.fired), signals=tuple(signals), fresh=fresh, drift=drift
    )


def assess_events(ctx: RiskContext, cfg: RiskSettings) -> Assessment:
    """Only what security events from other systems say (rules without a ``risk`` section)."""
    fresh = is_fresh(ctx, cfg)
    signal = shared_signal(ctx, cfg)
    # No watched facts: only the proof-of-possession keys are kept, for the assurance levels.
    drift = review_drift(ctx, cfg, watched=(), fresh=fresh)
    return Assessment(score=signal.weight if signal.fired else 0, signals=(signal,), fresh=fresh, drift=drift)


def drift_review(
    baseline: Baseline,
    current: Mapping[str, Any],
    *,
    watched: tuple[str, ...],
    now: float,
    fresh: bool,
    settings: DriftSettings,
    shown: frozenset[str] = frozenset(),
    presentable: frozenset[str] = frozenset(),
    max_age: int = 60,
    identity: str = "",
    attested_at: float | None = None,
) -> DriftReview:
    """Compare ``current`` (the watched facts and presented key facts) with the baseline.

    ``shown`` is the evidence this request shows; ``presentable`` the evidence
    the workload could show that it has not (both only count when the rule
    names them in ``settings.evidence``).  ``max_age`` is how fresh an
    exchange must be to count for probation.
    """
    updated = baseline
    changed: dict[str, dict[str, Any]] = {}
    confirmed_now: dict[str, str] = {}
    evidence = settings.evidence & shown
    tracked = tuple(dict.fromkeys((*watched, *KEY_FACTS)))
    for name in tracked:
        value = current.get(name)
        if name not in watched and value is None:
            # A key fact only the levels look at: a bearer request leaves the identity's key alone.
            continue
        if name not in updated.facts:
            if value is None:
                continue
            # Changed after an outside audit (December 2026), as in sts/core/drift.py: a first key of
            # one kind beside a confirmed key of the other kind, not proven in the same request, is
            # a new key (pending), not confirmed on sight.
            others = [f for f in KEY_FACTS if f != name and f in updated.facts]
            unproven = bool(others) and not any(
                current.get(f) is not None and current[f] in updated.confirmed_values(f) for f in others
            )
            if not (name in KEY_FACTS and unproven):
                updated = updated.with_confirmed(name, value, "first_seen", now)
                continue
        elif value in updated.confirmed_values(name):
            continue
        entry = updated.pending.get(name)
        if entry is not None and entry.value != value and not fresh:
            # A stale token with another value leaves the probation under way alone (refused).
            if name in watched:
                changed[name] = {"was": baseline.facts.get(name), "now": value}
            continue
        if entry is None or entry.value != value:
            entry = PendingFact(value=value, first_seen=now, last_seen=now)
        entry = replace(entry, last_seen=now)
        # Once per attestation: a token presented again is no new evidence.
        counted = fresh and (
            entry.fresh_attested is None or attested_at is None or attested_at > entry.fresh_attested
        )
        if counted:
            entry = replace(
                entry,
                fresh_count=entry.fresh_count + 1,
                fresh_since=entry.fresh_since if entry.fresh_since is not None else now,
                fresh_attested=attested_at,
            )
        how: str | None = None
        if evidence and name not in KEY_FACTS:
            how = sorted(evidence)[0]
        elif (
            name in KEY_FACTS and value is not None and EVIDENCE_ISSUED in shown
        ):  # Later, on purpose: see sts/core/drift.py.
            how = EVIDENCE_ISSUED
        elif counted and _probation_done(entry, settings):  # Only a counted fresh exchange completes it.
            how = "probation"
        if how is not None:
            updated = updated.with_confirmed(name, value, how, now)
            confirmed_now[name] = how
            continue
        updated = replace(updated, pending={**updated.pending, name: entry})
        if name in watched:
            changed[name] = {"was": baseline.facts.get(name), "now": value}
    if not changed:
        return DriftReview(baseline=updated, confirmed_now=confirmed_now)
    remedies: tuple[str, ...] = ()
    if not any(name in KEY_FACTS for name in changed):
        remedies = tuple(sorted((settings.evidence & presentable) - shown))
    return DriftReview(
        changed=changed,
        confirmed_now=confirmed_now,
        baseline=updated,
        clears=_clears(updated, tuple(changed), settings, remedies, max_age, now, identity),
        remedies=remedies,
    )


def session_summary(baseline: Baseline, watched: tuple[str, ...]) -> dict[str, Any]:
    """The baseline as the audit record and ``sts baseline show`` present it: each fact's value,
    whether it is confirmed (and how), and what is pending with its probation progress."""
    facts: dict[str, Any] = {}
    for name in dict.fromkeys((*watched, *baseline.facts)):
        if name not in baseline.facts and name not in baseline.pending:
            continue
        entry: dict[str, Any] = {
            "value": baseline.facts.get(name),
            "confirmed": name not in baseline.pending,
            "how": dict(baseline.confirmed.get(name, {})).get("how", "first_seen"),
        }
        if name in baseline.pending:
            p = baseline.pending[name]
            entry["pending"] = {"value": p.value, "fresh_exchanges": p.fresh_count, "since": p.fresh_since}
        if baseline.other_keys.get(name):
            entry["also"] = list(baseline.other_keys[name])
        facts[name] = entry
    return {"count": baseline.count, "learning": baseline.learning, "facts": facts}


def _bounded(existing: Iterable[str], new: Iterable[str], limit: int) -> tuple[str, ...]:
    """Most recent last; oldest dropped beyond ``limit``."""
    fresh = list(dict.fromkeys(new))  # read once: ``new`` may be an iterator
    seen = set(fresh)
    items = [x for x in existing if x not in seen] + fresh
    return tuple(items[-limit:])


def observe(
    baseline: Baseline,
    *,
    now: float,
    source_ip: str | None,
    stable_facts: Mapping[str, Any],
    audiences: Iterable[str],
    scopes: Iterable[str],
    depth: int,
    rebaseline: bool,
) -> Baseline:
    """The baseline after a granted exchange.

    Stable facts are set on first sight and replaced only by ``rebaseline``;
    the pipeline confirms changed facts beforehand (:func:`sts.core.drift.review`),
    so fresh attestation alone never replaces one and drift keeps firing.
    """
    facts = dict(baseline.facts)
    for name, value in stable_facts.items():
        if rebaseline or name not in facts:
            facts[name] = value
    if now - baseline.window_start > RATE_WINDOW:
        usual = baseline.usual_rate * 0.8 + baseline.window_count * 0.2 if baseline.count else 0.0
        window_start, window_count = now, 1
    else:
        usual, window_start, window_count = (
            baseline.usual_rate,
            baseline.window_start,
            baseline.window_count + 1,
        )
    return replace(
        baseline,
        first_seen=baseline.first_seen if baseline.first_seen is not None else now,
        last_seen=now,
        count=baseline.count + 1,
        networks=_bounded(baseline.networks, [network_of(source_ip)] if source_ip else [], MAX_NETWORKS),
        facts=facts,
        audiences=_bounded(baseline.audiences, audiences, MAX_AUDIENCES),
        scopes=_bounded(baseline.scopes, scopes, MAX_SCOPES),
        max_depth=max(baseline.max_depth, depth),
        window_start=window_start,
        window_count=window_count,
        usual_rate=usual,
    )


def assess_exchange(
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
    # The proof-of-possession key is a fact too: a workload whose key changes has drifted.
    keys = presented_keys(proof, wire.client_cert_thumbprint)
    if keys and subject.issuer_name == SELF_ISSUER:
        # A later change of behaviour, not of speed: a token of ours shows only the key it is bound
        # to, issued at pop (see sts.core.exchange.binding.subject_keys).
        acr = subject.claims.get("acr")
        keys = subject_keys(keys, subject, actor=False, carried=acr if isinstance(acr, str) else "")
    observed = replace(subject, facts={**subject.facts, **keys}) if keys else subject
    posture = None
    if request.posture_token:
        record.details["posture_token_sha256"] = token_hash(request.posture_token)
        posture = self._posture(request.posture_token, subject, now)
    # The baseline is kept where it is judged: by the rule's risk signals, or by the assurance
    # levels (whose proof-of-possession level needs the identity's key), and whenever a key
    # is presented, so the identity's first key is remembered.
    keeps_baseline = bool(grant.risk or grant.assurance or keys)
    try:
        state = merge(self.subject_states.get(self._identity_keys(observed))) if self.subject_states else None
        baseline_key = (
            identity_key(observed.issuer_name, observed.subject)
            if keeps_baseline and self.baselines
            else None
        )
        baseline = self.baselines.load(baseline_key) if baseline_key and self.baselines else Baseline()
    except StoreUnavailable as exc:
        raise TemporarilyUnavailable("store.unavailable", str(exc)) from None
    state = state or SubjectState()
    cfg = grant.risk or EVENTS_ONLY
    posture_claims = posture[0] if posture else None
    # Changed since the copy, on purpose (an outside audit): a posture a security event declared
    # bad outweighs a posture token's and a live review, as in the stale_posture signal.
    declared_bad = state.posture is not None and state.posture not in cfg.posture_good
    posture_ok = not declared_bad and posture_is_good(posture_claims, cfg.posture_fact, cfg.posture_good)
    presented_key = key_state(keys, baseline.confirmed_keys())
    shown = frozenset(
        ([EVIDENCE_POP] if presented_key == KEY_CONTINUES else [])
        + ([EVIDENCE_POSTURE] if posture_ok else [])
    )
    if keys and subject.issuer_name == SELF_ISSUER:  # Later, on purpose: bound, issued at pop.
        shown |= {EVIDENCE_ISSUED}
    presentable = frozenset(
        ([EVIDENCE_POP] if any(baseline.facts.get(f) is not None for f in KEY_FACTS) else [])
        + ([EVIDENCE_POSTURE] if cfg.posture_fact is not None else [])
    )
    ctx = RiskContext(
        identity=identity_key(observed.issuer_name, observed.subject),
        facts=observed.facts,
        claims=observed.claims,
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
    )
    assessment = assess(ctx, cfg) if grant.risk else assess_events(ctx, cfg)
    decision = decide(assessment, cfg, scopes)
    if presented_key == KEY_CHANGED and all(
        v in assessment.drift.baseline.confirmed_values(f) for f, v in keys.items()
    ):
        # The new key completed its probation with this exchange: it is the identity's key now.
        presented_key = KEY_CONTINUES
    carried = None
    if observed.issuer_name == SELF_ISSUER:
        acr = observed.claims.get("acr")
        carried = acr if isinstance(acr, str) else ""
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
        "learning": baseline.learning if grant.risk else None,
        # The session state behind the decision: each watched fact, confirmed or pending.
        "baseline": session_summary(assessment.drift.baseline, cfg.stable_facts if grant.risk else ())
        if baseline_key
        else None,
    }
    risk = ExchangeRisk(
        decision,
        assessment,
        cfg,
        baseline,
        baseline_key,
        details,
        level=reached(evidence),
        evidence=evidence,
    )
    record.details["risk"] = risk.record
    record.details["assurance"] = {"presented": risk.level, "evidence": risk.evidence.as_dict()}
    return risk


def learn_exchange(
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
    if updated == risk.baseline:
        return None
    return BaselineUpdate(risk.baseline_key, updated, BASELINE_TTL)


def _candidates(policy: PolicySet, token: VerifiedToken) -> list[Rule]:
    """What ``PolicySet.candidates`` computed on every call."""
    issuer_rules = policy._index.get(token.issuer_name)
    if issuer_rules is None:
        return []
    return [policy.rules[i] for i in sorted(issuer_rules.candidates(token.subject))]


def evaluate_policy(policy: PolicySet, facts: VerifiedToken, request: PolicyRequest) -> Grant:
    """Decide what may be granted, or raise the OAuth error (see the module docstring)."""
    identity = [r for r in _candidates(policy, facts) if _identity_mismatch(r, facts, request) is None]
    if not identity:
        # RFC 8693 §2.2.2: a subject token "unacceptable based on policy" is invalid_request.
        raise InvalidRequest("policy.no_rule_for_identity")
    clients_ok = [r for r in identity if _client_mismatch(r, request.client_id) is None]
    if not clients_ok:
        if request.client_id is None:
            raise InvalidClient("policy.client_authentication_required")
        raise UnauthorizedClient("policy.client_not_allowed", request.client_id)
    actors_ok = [r for r in clients_ok if _actor_mismatch(r, request) is None]
    if not actors_ok:
        mismatches = {_actor_mismatch(r, request) for r in clients_ok}
        if mismatches == {"delegation chain too deep"}:
            raise InvalidRequest("policy.delegation_too_deep", str(request.delegation_depth))
        if request.actor is None:
            raise InvalidRequest("policy.actor_required")
        raise InvalidRequest("policy.actor_not_allowed", request.actor.subject[:200])
    for rule in actors_ok:
        targets = _targets(rule, request)
        if targets is None:
            continue
        if request.scopes is None:
            scopes, narrowed = rule.default_scopes, False
        else:
            scopes = tuple(s for s in request.scopes if s in rule.scopes)
            if not scopes:
                raise InvalidScope("policy.scope_not_allowed", rule.name)
            narrowed = len(scopes) != len(request.scopes)
        reasons = ("policy.rule_matched",) + (("policy.scope_narrowed",) if narrowed else ())
        return Grant(
            rule.name,
            targets,
            scopes,
            rule.max_lifetime,
            narrowed,
            reasons,
            single_use=rule.single_use,
            max_attestation_age=rule.max_attestation_age,
            risk=rule.risk,
            require_dpop=rule.require_dpop,
            actor_may_bind_key=rule.actor_may_bind_key,
            assurance=rule.assurance,
            rate_limit=rule.rate_limit,
        )
    # Changed on purpose since ba30187 (an outside client saw invalid_target where a rule covering
    # the target needs client authentication): the client is what to change.
    for rule in identity:
        if (
            _client_mismatch(rule, request.client_id) is not None
            and _actor_mismatch(rule, request) is None
            and _targets(rule, request) is not None
        ):
            if request.client_id is None:
                raise InvalidClient("policy.client_authentication_required")
            raise UnauthorizedClient("policy.client_not_allowed", request.client_id)
    # Nor one that needs an actor token, which the request lacks: the actor token is what is
    # missing (RFC 8693 §2.2.2, invalid_request), not the target.
    if request.actor is None and any(
        _actor_mismatch(rule, request) is not None and _targets(rule, request) is not None
        for rule in clients_ok
    ):
        raise InvalidRequest("policy.actor_required")
    raise InvalidTarget("policy.target_not_allowed")
