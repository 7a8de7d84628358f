"""Risk signals: each a small, named, pure function of facts, request context, behaviour and ``now``.

A signal returns whether it fired, its weight and a human-readable reason
with the evidence.  Signals decide nothing; :func:`assess` adds them up and
:mod:`sts.core.stepup` turns the score into a decision the policy allows.

The signals (issue "Risk signals and step-up"):

1. ``unusual_network``: the source address is outside the networks the rule
   declares, or (after learning) in a network never seen for this identity.
2. ``attestation_drift``: facts that should be stable for an identity
   (runner environment, node, image digest, proof-of-possession key...)
   changed since its baseline and the new value is not confirmed.  Fresh
   attestation does not confirm it (:mod:`sts.core.drift`).
3. ``stale_posture``: attestation older than the rule allows without step-up;
   posture evidence missing, negative or expired.
4. ``recent_failures``: refusals for this identity within a window.
5. ``elevated_privilege``: privileged scopes, or scopes never asked before.
6. ``unexpected_s2s``: a subject-to-audience edge never seen, a burst far
   above the usual rate, a deeper delegation chain than usual, an agent
   asking for audiences outside its declared intent.
7. ``shared_signal``: what other systems said about this subject (CAEP).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .assurance import KEY_FACTS
from .baseline import Baseline, network_of
from .drift import DriftReview, DriftSettings, review
from .subject_state import SubjectState

NetworkLike = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class SignalResult:
    name: str
    fired: bool
    weight: int
    reason: str
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fired": self.fired,
            "weight": self.weight if self.fired else 0,
            "reason": self.reason,
            "evidence": dict(self.evidence),
        }


@dataclass(frozen=True)
class RiskSettings:
    """A rule's risk configuration, compiled (see docs/policies.md, ``risk``)."""

    mode: str = "enforce"  # or "observe"
    networks: tuple[NetworkLike, ...] = ()
    privileged_scopes: frozenset[str] = frozenset()
    stable_facts: tuple[str, ...] = ()
    posture_fact: str | None = None
    posture_good: frozenset[str] = frozenset({"compliant", "healthy", "true"})
    posture_issuers: frozenset[str] = frozenset()  # Empty: the subject's own issuer speaks for it.
    posture_max_age: int | None = None
    max_failures: int = 3
    failure_window: int = 600
    burst_factor: float = 10.0
    intent_claim: str | None = None
    weights: Mapping[str, int] = field(default_factory=dict)
    narrow_at: int = 30
    step_up_at: int = 60
    deny_at: int = 100
    step_up_max_age: int = 60
    min_lifetime_factor: float = 0.2
    drift: DriftSettings = field(default_factory=DriftSettings)

    def weight(self, name: str) -> int:
        return int(self.weights.get(name, DEFAULT_WEIGHTS[name]))

    # What the signals derive from the settings on every exchange, derived once per rule instead
    # (``cached_property`` writes the instance dict directly, so it works on a frozen dataclass).

    @functools.cached_property
    def signal_weights(self) -> Mapping[str, int]:
        """:meth:`weight` of every signal."""
        return {name: self.weight(name) for name in DEFAULT_WEIGHTS}

    @functools.cached_property
    def watched_plain(self) -> tuple[str, ...]:
        """The watched facts other than the proof-of-possession keys (those come from the pipeline)."""
        return tuple(f for f in self.stable_facts if f not in KEY_FACTS)

    @functools.cached_property
    def network_masks(self) -> tuple[tuple[int, int, int], ...]:
        """``networks`` as (IP version, network address, netmask) integers: an address is in a
        network when its integer masked is the network's (what ``address in network`` computes)."""
        return tuple((n.version, int(n.network_address), int(n.netmask)) for n in self.networks)

    def admits(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Whether ``address`` is in one of ``networks`` (``any(address in n for n in networks)``)."""
        version, value = address.version, int(address)
        return any(v == version and value & mask == net for v, net, mask in self.network_masks)


#: Facts watched for drift when a rule names none: the ones each profile knows to be stable.
DEFAULT_STABLE_FACTS: tuple[str, ...] = (
    "runner_environment",  # GitHub Actions, GitLab CI: github-hosted / self-hosted
    "repository_id",
    "project_id",
    "node",  # Kubernetes: the node the pod runs on
    "service_account_uid",
    "trust_domain",
    "image_digest",
    "cnf_jkt",  # the proof-of-possession key, once DPoP-bound
)

DEFAULT_WEIGHTS: Mapping[str, int] = {
    "unusual_network": 30,
    "attestation_drift": 60,
    "stale_posture": 40,
    "recent_failures": 30,
    "elevated_privilege": 30,
    "unexpected_s2s": 30,
    "shared_signal": 60,
}


@dataclass(frozen=True)
class RiskContext:
    """Everything the signals look at; built by the pipeline, pure data."""

    identity: str
    facts: Mapping[str, Any]
    claims: Mapping[str, Any]
    source_ip: str | None
    audiences: tuple[str, ...]
    scopes: tuple[str, ...]
    delegation_depth: int
    attested_at: float | None
    now: float
    baseline: Baseline
    state: SubjectState = field(default_factory=SubjectState)
    is_agent: bool = False
    #: Claims of a separately presented posture token (verified, same subject); None without one.
    posture_claims: Mapping[str, Any] | None = None
    #: Why a presented posture token could not be used (``expired``...), for the signal's evidence.
    posture_problem: str | None = None
    #: Independent evidence this request shows (``pop_key_continuity``, ``posture_token``).
    evidence_shown: frozenset[str] = frozenset()
    #: Evidence the workload could present that this request does not show.
    evidence_presentable: frozenset[str] = frozenset()
    #: What the novelty signals judge by, if not ``baseline`` (:func:`sts.core.history.joined`).
    history: Baseline | None = None


@dataclass(frozen=True)
class Assessment:
    score: int
    signals: tuple[SignalResult, ...]
    fresh: bool
    #: The stable facts reviewed against the baseline (confirmations, unconfirmed changes).
    drift: DriftReview = field(default_factory=DriftReview)

    @functools.cached_property
    def fired(self) -> tuple[SignalResult, ...]:
        # Read several times per decision (sts.core.stepup); cached_property writes the instance
        # dict directly, so it works on a frozen dataclass.
        return tuple(s for s in self.signals if s.fired)


def _quiet(name: str, reason: str) -> SignalResult:
    """A signal that did not fire and shows no evidence: the same value on every exchange, so it is
    built once (its evidence read-only: it is shared)."""
    return SignalResult(name, False, 0, reason, MappingProxyType({}))


_NO_BASELINE_YET = _quiet("attestation_drift", "no baseline yet")
_FACTS_UNCHANGED = _quiet("attestation_drift", "stable facts unchanged")
_USUAL_SCOPES = _quiet("elevated_privilege", "usual scopes")
_S2S_LEARNING = _quiet("unexpected_s2s", "learning: edges and rate are being recorded")
_USUAL_S2S = _quiet("unexpected_s2s", "usual edges, depth and rate")
_NO_EVENTS = _quiet("shared_signal", "no security events in force")


def _yes(name: str, weight: int, reason: str, **evidence: Any) -> SignalResult:
    return SignalResult(name, True, weight, reason, evidence)


@functools.lru_cache(maxsize=4096)
def _address(value: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The source address, parsed (remembered for the most recent ones: addresses are immutable, and
    parsing one costs more than the signal that reads it)."""
    if not value:
        return None
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    # An IPv4-mapped address (RFC 4291 §2.5.5.2) counts as its IPv4 address.
    return getattr(address, "ipv4_mapped", None) or address


@functools.lru_cache(maxsize=4096)
def _source(value: str | None) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, str, str] | None:
    """The source address parsed, written back (``str``: normalised) and its network
    (:func:`~sts.core.baseline.network_of`); None when it is missing or not an address.  Remembered
    like :func:`_address`: writing an address back costs more than the signal that reads it."""
    address = _address(value)
    if address is None:
        return None
    text = str(address)
    return address, text, network_of(text)


def unusual_network(ctx: RiskContext, cfg: RiskSettings) -> SignalResult:
    name = "unusual_network"
    source = _source(ctx.source_ip)
    if source is None:
        return SignalResult(
            name, True, cfg.signal_weights[name], "source address unknown", {"source": ctx.source_ip}
        )
    address, text, net = source
    if cfg.networks and not cfg.admits(address):
        return SignalResult(
            name, True, cfg.signal_weights[name], "source outside the rule's networks", {"source": text}
        )
    if (seen := ctx.history or ctx.baseline).learning:
        return SignalResult(name, False, 0, "learning: networks are being recorded", {"network": net})
    if net not in seen.networks:
        return SignalResult(
            name,
            True,
            cfg.signal_weights[name] // 2 or 1,
            "network never seen for this identity",
            {"network": net},
        )
    return SignalResult(name, False, 0, "known network", {"network": net})


def attestation_drift(ctx: RiskContext, cfg: RiskSettings, drift: DriftReview) -> SignalResult:
    name = "attestation_drift"
    if not ctx.baseline.facts:
        return _NO_BASELINE_YET
    if drift.changed:
        return SignalResult(
            name,
            True,
            cfg.signal_weights[name],
            "stable facts changed since the baseline and not confirmed",
            {
                "changed": {fact: dict(change) for fact, change in drift.changed.items()},
                "clears": [dict(c) for c in drift.clears],
            },
        )
    if drift.confirmed_now:
        return SignalResult(
            name, False, 0, "changed facts confirmed", {"confirmed": dict(drift.confirmed_now)}
        )
    return _FACTS_UNCHANGED


def review_drift(
    ctx: RiskContext, cfg: RiskSettings, *, watched: tuple[str, ...], fresh: bool
) -> DriftReview:
    """The watched facts (and the presented proof-of-possession keys) against the baseline.

    Key facts come from what the pipeline observed (the DPoP proof, the client certificate), never
    from a token's claims."""
    facts = ctx.facts
    plain = (
        cfg.watched_plain if watched is cfg.stable_facts else tuple(f for f in watched if f not in KEY_FACTS)
    )
    current = stable_values(facts, ctx.claims, plain)
    for f in KEY_FACTS:
        value = facts.get(f)
        if value is not None:
            current[f] = value
    return review(
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


#: Tells a fact that is absent from one that is None (:func:`stable_values`).
_ABSENT: Any = object()


def stable_values(
    facts: Mapping[str, Any], claims: Mapping[str, Any], names: Sequence[str]
) -> dict[str, Any]:
    """The watched values: a profile fact when there is one, else the claim of that name."""
    out: dict[str, Any] = {}
    for name in names:
        value = facts.get(name, _ABSENT)
        if value is _ABSENT:
            value = claims.get(name)
        if value is not None:
            # (str, int) holds bool too.
            out[name] = value if isinstance(value, (str, int)) else str(value)
    return out


def stale_posture(ctx: RiskContext, cfg: RiskSettings) -> SignalResult:
    name = "stale_posture"
    if ctx.attested_at is None:
        return _yes(name, cfg.signal_weights[name], "attestation time unknown")
    age = ctx.now - ctx.attested_at
    if cfg.posture_max_age is not None and age > cfg.posture_max_age:
        return _yes(name, cfg.signal_weights[name], "attestation older than allowed", age=int(age))
    if ctx.posture_problem is not None:
        return _yes(name, cfg.signal_weights[name], "posture token unusable", problem=ctx.posture_problem)
    if cfg.posture_fact is not None:
        posture = ctx.state.posture or _posture(ctx, cfg.posture_fact)
        if posture is None:
            return _yes(name, cfg.signal_weights[name], "posture evidence missing", fact=cfg.posture_fact)
        if posture not in cfg.posture_good:
            return _yes(name, cfg.signal_weights[name], "posture negative", posture=posture)
    return SignalResult(name, False, 0, "attestation and posture current", {"age": int(age)})


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
    now, window = ctx.now, cfg.failure_window
    recent = [t for t in ctx.baseline.failures if now - t <= window]
    if len(recent) >= cfg.max_failures:
        return _yes(name, cfg.signal_weights[name], "refusals within the window", count=len(recent),
                    window=cfg.failure_window)  # fmt: skip
    return SignalResult(name, False, 0, "few recent refusals", {"count": len(recent)})


def elevated_privilege(ctx: RiskContext, cfg: RiskSettings) -> SignalResult:
    name = "elevated_privilege"
    privileged = sorted(cfg.privileged_scopes.intersection(ctx.scopes)) if cfg.privileged_scopes else None
    if privileged:
        return _yes(name, cfg.signal_weights[name], "privileged scopes requested", scopes=privileged)
    if not (seen := ctx.history or ctx.baseline).learning:
        unusual = sorted(set(ctx.scopes).difference(seen.scopes))
        if unusual:
            return _yes(
                name, cfg.signal_weights[name] // 2 or 1, "scopes never asked for before", scopes=unusual
            )
    return _USUAL_SCOPES


def unexpected_s2s(ctx: RiskContext, cfg: RiskSettings) -> SignalResult:
    name = "unexpected_s2s"
    weight = cfg.signal_weights[name]
    intent = ctx.claims.get(cfg.intent_claim) if cfg.intent_claim else None
    if isinstance(intent, str):
        # A single declared audience, as ``aud`` may be (RFC 7519 §4.1.3); never ignored.
        intent = [intent]
    if isinstance(intent, list):
        outside = sorted(set(ctx.audiences) - {str(i) for i in intent})
        if outside:
            return _yes(name, weight, "audiences outside the declared intent", audiences=outside)
    if (seen := ctx.history or ctx.baseline).learning:
        return _S2S_LEARNING
    new_edges = sorted(set(ctx.audiences).difference(seen.audiences))
    if new_edges:
        return _yes(name, weight, "subject-to-audience edge never seen", audiences=new_edges)
    if ctx.delegation_depth > seen.max_depth:
        return _yes(name, weight, "delegation chain deeper than usual", depth=ctx.delegation_depth,
                    usual=seen.max_depth)  # fmt: skip
    rate, usual = seen.current_rate(ctx.now), seen.usual_rate
    if usual > 0 and rate > usual * cfg.burst_factor and rate >= 10:
        return _yes(name, weight, "burst far above the usual rate", per_minute=round(rate, 1),
                    usual=round(usual, 2))  # fmt: skip
    return _USUAL_S2S


RISK_LEVEL_WEIGHT = {"low": 0, "medium": 30, "high": 60, "critical": 100}


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
    return _NO_EVENTS


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
