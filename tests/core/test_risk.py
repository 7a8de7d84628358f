"""Risk signals, step-up decisions and behaviour baselines, as pure functions of data and ``now``.

Every signal is shown firing and not firing from a table of cases; each case
builds a :class:`RiskContext` (facts, claims, source, request, baseline,
subject state, time) and runs :func:`assess`, so the signal is checked the way
the pipeline calls it.  No HTTP here: see ``tests/e2e/test_risk_e2e.py`` for that.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from sts.adapters.policy_files import load_policies
from sts.core.baseline import (
    LEARNING_EXCHANGES,
    MAX_AUDIENCES,
    MAX_FAILURES,
    MAX_NETWORKS,
    MAX_SCOPES,
    RATE_WINDOW,
    Baseline,
    PendingFact,
    appended_failure,
    network_of,
    observe,
)
from sts.core.drift import DriftSettings
from sts.core.risk import (
    DEFAULT_STABLE_FACTS,
    DEFAULT_WEIGHTS,
    Assessment,
    RiskContext,
    RiskSettings,
    SignalResult,
    assess,
    assess_events,
    is_fresh,
)
from sts.core.stepup import DENY, GRANT, NARROW, STEP_UP, decide
from sts.core.subject_state import SubjectState
from sts.errors import ConfigurationError
from tests.support.typed import typed as _typed

NOW = 1_800_000_000.0
DEPLOY = "https://deploy.example.com"
REPORTS = "https://reports.example.com"
SIGNAL_NAMES = (
    "unusual_network",
    "attestation_drift",
    "stale_posture",
    "recent_failures",
    "elevated_privilege",
    "unexpected_s2s",
    "shared_signal",
)

#: An identity past learning: one known network, audience, scope and runner environment.
LEARNED = Baseline(
    first_seen=NOW - 86400,
    last_seen=NOW - 3600,
    count=LEARNING_EXCHANGES,
    networks=("10.1.2.0/24", "2001:db8:1:2::/64"),
    facts={"runner_environment": "github-hosted", "repository_id": "123456"},
    audiences=(DEPLOY,),
    scopes=("deploy:read",),
    max_depth=0,
)
#: A new identity, still learning (it has been seen, so it has facts).
LEARNING = replace(LEARNED, count=LEARNING_EXCHANGES - 1)

#: What compile_risk gives a rule with ``risk: {}`` except that the watched facts are named.
CFG = RiskSettings(stable_facts=DEFAULT_STABLE_FACTS)


def context(**changes: Any) -> RiskContext:
    """A quiet exchange (nothing fires): known network, fresh attestation; changed by ``changes``."""
    base = RiskContext(
        identity="upstream|repo:acme/app:ref:refs/heads/main",
        facts={"runner_environment": "github-hosted", "repository_id": "123456"},
        claims={},
        source_ip="10.1.2.3",
        audiences=(DEPLOY,),
        scopes=("deploy:read",),
        delegation_depth=0,
        attested_at=NOW - 5,
        now=NOW,
        baseline=LEARNED,
    )
    return replace(base, **changes)


def signal(name: str, ctx: RiskContext, cfg: RiskSettings) -> SignalResult:
    """One signal, evaluated by :func:`assess` (all seven run; this picks one)."""
    by_name = {s.name: s for s in assess(ctx, cfg).signals}
    assert tuple(by_name) == SIGNAL_NAMES
    return by_name[name]


# -- the quiet case ------------------------------------------------------------------------------


def test_quiet_exchange_fires_nothing_and_records_every_signal() -> None:
    result = assess(context(), CFG)
    assert result.score == 0
    assert result.fired == ()
    assert result.fresh
    assert [s.as_dict()["name"] for s in result.signals] == list(SIGNAL_NAMES)
    assert all(s.as_dict()["weight"] == 0 and s.reason for s in result.signals)


# -- the signal table ----------------------------------------------------------------------------

#: (id, signal, context changes, settings changes, fired, weight, reason fragment, evidence subset)
SIGNAL_CASES: list[tuple[str, str, dict[str, Any], dict[str, Any], bool, int, str, dict[str, Any]]] = [
    # 1. unusual_network
    (
        "network-outside-declared",
        "unusual_network",
        {"source_ip": "192.168.7.7"},
        {"networks": (ipaddress.ip_network("10.0.0.0/8"),)},
        True,
        30,
        "outside the rule's networks",
        {"source": "192.168.7.7"},
    ),
    (
        "network-outside-declared-fires-while-learning",
        "unusual_network",
        {"source_ip": "192.168.7.7", "baseline": Baseline()},
        {"networks": (ipaddress.ip_network("10.0.0.0/8"),)},
        True,
        30,
        "outside the rule's networks",
        {},
    ),
    (
        "network-inside-declared-and-known",
        "unusual_network",
        {},
        {"networks": (ipaddress.ip_network("10.0.0.0/8"),)},
        False,
        0,
        "known network",
        {"network": "10.1.2.0/24"},
    ),
    (
        # A dual-stack listener's IPv4-mapped address is the IPv4 address: inside, and known.
        "network-ipv4-mapped-inside-declared-and-known",
        "unusual_network",
        {"source_ip": "::ffff:10.1.2.9"},
        {"networks": (ipaddress.ip_network("10.0.0.0/8"),)},
        False,
        0,
        "known network",
        {"network": "10.1.2.0/24"},
    ),
    (
        # ... and another IPv4 network, mapped, is as unknown as it is unmapped.
        "network-ipv4-mapped-never-seen",
        "unusual_network",
        {"source_ip": "::ffff:192.168.5.5"},
        {},
        True,
        15,
        "never seen",
        {"network": "192.168.5.0/24"},
    ),
    ("network-source-missing", "unusual_network", {"source_ip": None}, {}, True, 30, "unknown", {}),
    (
        "network-source-unparsable",
        "unusual_network",
        {"source_ip": "not-an-address"},
        {},
        True,
        30,
        "unknown",
        {"source": "not-an-address"},
    ),
    (
        "network-new-while-learning-is-recorded-not-fired",
        "unusual_network",
        {"source_ip": "172.16.9.9", "baseline": LEARNING},
        {},
        False,
        0,
        "learning",
        {"network": "172.16.9.0/24"},
    ),
    (
        "network-new-slash24-after-learning-half-weight",
        "unusual_network",
        {"source_ip": "10.1.3.3"},
        {},
        True,
        15,
        "never seen",
        {"network": "10.1.3.0/24"},
    ),
    (
        "network-half-of-configured-weight",
        "unusual_network",
        {"source_ip": "10.1.3.3"},
        {"weights": {"unusual_network": 50}},
        True,
        25,
        "never seen",
        {},
    ),
    (
        "network-half-weight-never-zero",
        "unusual_network",
        {"source_ip": "10.1.3.3"},
        {"weights": {"unusual_network": 1}},
        True,
        1,
        "never seen",
        {},
    ),
    (
        "network-other-host-same-slash24",
        "unusual_network",
        {"source_ip": "10.1.2.254"},
        {},
        False,
        0,
        "known network",
        {},
    ),
    (
        "network-ipv6-same-slash64",
        "unusual_network",
        {"source_ip": "2001:db8:1:2:ffff:ffff:ffff:1"},
        {},
        False,
        0,
        "known network",
        {"network": "2001:db8:1:2::/64"},
    ),
    (
        "network-ipv6-new-slash64",
        "unusual_network",
        {"source_ip": "2001:db8:1:3::1"},
        {},
        True,
        15,
        "never seen",
        {"network": "2001:db8:1:3::/64"},
    ),
    # 2. attestation_drift
    (
        "drift-stable-fact-changed-on-old-attestation",
        "attestation_drift",
        {"facts": {"runner_environment": "self-hosted", "repository_id": "123456"}, "attested_at": NOW - 600},
        {},
        True,
        60,
        "changed since the baseline",
        {"changed": {"runner_environment": {"was": "github-hosted", "now": "self-hosted"}}},
    ),
    (
        # Issue 10: a CI token is always fresh, so freshness must not launder a changed fact.
        "drift-fires-with-fresh-attestation-too",
        "attestation_drift",
        {"facts": {"runner_environment": "self-hosted", "repository_id": "123456"}, "attested_at": NOW - 5},
        {},
        True,
        60,
        "not confirmed",
        {
            "changed": {"runner_environment": {"was": "github-hosted", "now": "self-hosted"}},
            "clears": [
                {"by": "operator_accept", "identity": "upstream|repo:acme/app:ref:refs/heads/main"},
                {"by": "probation", "exchanges_left": 2, "not_before": int(NOW) + 3600, "max_age": 60},
            ],
        },
    ),
    (
        "drift-confirmed-by-evidence-the-rule-names",
        "attestation_drift",
        {
            "facts": {"runner_environment": "self-hosted", "repository_id": "123456"},
            "evidence_shown": frozenset({"pop_key_continuity"}),
        },
        {"drift": DriftSettings(evidence=frozenset({"pop_key_continuity"}))},
        False,
        0,
        "confirmed",
        {"confirmed": {"runner_environment": "pop_key_continuity"}},
    ),
    (
        "drift-evidence-the-rule-does-not-name-confirms-nothing",
        "attestation_drift",
        {
            "facts": {"runner_environment": "self-hosted", "repository_id": "123456"},
            "evidence_shown": frozenset({"pop_key_continuity"}),
        },
        {},
        True,
        60,
        "not confirmed",
        {},
    ),
    (
        "drift-fresh-but-older-than-a-reauth-event-is-not-accepted",
        "attestation_drift",
        {
            "facts": {"runner_environment": "self-hosted", "repository_id": "123456"},
            "attested_at": NOW - 5,
            "state": SubjectState(reauth_after=NOW - 2),
        },
        {},
        True,
        60,
        "changed since the baseline",
        {},
    ),
    (
        "drift-no-baseline",
        "attestation_drift",
        {"facts": {"runner_environment": "self-hosted"}, "attested_at": NOW - 600, "baseline": Baseline()},
        {},
        False,
        0,
        "no baseline",
        {},
    ),
    (
        "drift-unchanged",
        "attestation_drift",
        {"attested_at": NOW - 600},
        {},
        False,
        0,
        "unchanged",
        {},
    ),
    (
        "drift-from-claim-when-no-profile-fact",
        "attestation_drift",
        {
            "facts": {"repository_id": "123456"},
            "claims": {"runner_environment": "self-hosted"},
            "attested_at": NOW - 600,
        },
        {},
        True,
        60,
        "changed",
        {"changed": {"runner_environment": {"was": "github-hosted", "now": "self-hosted"}}},
    ),
    (
        "drift-claim-agrees-when-no-profile-fact",
        "attestation_drift",
        {
            "facts": {"repository_id": "123456"},
            "claims": {"runner_environment": "github-hosted"},
            "attested_at": NOW - 600,
        },
        {},
        False,
        0,
        "unchanged",
        {},
    ),
    (
        "drift-profile-fact-wins-over-claim",
        "attestation_drift",
        {
            "claims": {"runner_environment": "self-hosted"},
            "attested_at": NOW - 600,
        },
        {},
        False,
        0,
        "unchanged",
        {},
    ),
    (
        "drift-stable-fact-gone",
        "attestation_drift",
        {"facts": {"repository_id": "123456"}, "attested_at": NOW - 600},
        {},
        True,
        60,
        "changed",
        {"changed": {"runner_environment": {"was": "github-hosted", "now": None}}},
    ),
    (
        "drift-only-watched-facts-count",
        "attestation_drift",
        {"facts": {"runner_environment": "self-hosted", "repository_id": "123456"}, "attested_at": NOW - 600},
        {"stable_facts": ("repository_id",)},
        False,
        0,
        "unchanged",
        {},
    ),
    # 3. stale_posture
    (
        "posture-attestation-time-unknown",
        "stale_posture",
        {"attested_at": None},
        {},
        True,
        40,
        "unknown",
        {},
    ),
    (
        "posture-attestation-older-than-allowed",
        "stale_posture",
        {"attested_at": NOW - 301},
        {"posture_max_age": 300},
        True,
        40,
        "older than allowed",
        {"age": 301},
    ),
    (
        "posture-attestation-just-within-age",
        "stale_posture",
        {"attested_at": NOW - 300},
        {"posture_max_age": 300},
        False,
        0,
        "current",
        {"age": 300},
    ),
    (
        "posture-any-age-without-posture-max-age",
        "stale_posture",
        {"attested_at": NOW - 86400},
        {},
        False,
        0,
        "current",
        {},
    ),
    (
        "posture-fact-missing",
        "stale_posture",
        {},
        {"posture_fact": "device_posture"},
        True,
        40,
        "missing",
        {"fact": "device_posture"},
    ),
    (
        "posture-fact-negative",
        "stale_posture",
        {"claims": {"device_posture": "not-compliant"}},
        {"posture_fact": "device_posture"},
        True,
        40,
        "negative",
        {"posture": "not-compliant"},
    ),
    (
        "posture-fact-good",
        "stale_posture",
        {"claims": {"device_posture": "compliant"}},
        {"posture_fact": "device_posture"},
        False,
        0,
        "current",
        {},
    ),
    (
        "posture-boolean-true-is-good",
        "stale_posture",
        {"facts": {"hardened": True}},
        {"posture_fact": "hardened"},
        False,
        0,
        "current",
        {},
    ),
    (
        "posture-boolean-false-is-negative",
        "stale_posture",
        {"facts": {"hardened": False}},
        {"posture_fact": "hardened"},
        True,
        40,
        "negative",
        {"posture": "false"},
    ),
    (
        "posture-custom-good-values",
        "stale_posture",
        {"claims": {"device_posture": "compliant"}},
        {"posture_fact": "device_posture", "posture_good": frozenset({"attested"})},
        True,
        40,
        "negative",
        {},
    ),
    (
        "posture-security-event-overrides-good-claim",
        "stale_posture",
        {"claims": {"device_posture": "compliant"}, "state": SubjectState(posture="not-compliant")},
        {"posture_fact": "device_posture"},
        True,
        40,
        "negative",
        {"posture": "not-compliant"},
    ),
    (
        "posture-security-event-overrides-negative-claim",
        "stale_posture",
        {"claims": {"device_posture": "not-compliant"}, "state": SubjectState(posture="compliant")},
        {"posture_fact": "device_posture"},
        False,
        0,
        "current",
        {},
    ),
    # 4. recent_failures
    (
        "failures-within-window",
        "recent_failures",
        {"baseline": replace(LEARNED, failures=(NOW - 599, NOW - 300, NOW - 1))},
        {},
        True,
        30,
        "within the window",
        {"count": 3, "window": 600},
    ),
    (
        "failures-on-window-edge-count",
        "recent_failures",
        {"baseline": replace(LEARNED, failures=(NOW - 600, NOW - 300, NOW - 1))},
        {},
        True,
        30,
        "within the window",
        {"count": 3},
    ),
    (
        "failures-outside-window-do-not-count",
        "recent_failures",
        {"baseline": replace(LEARNED, failures=(NOW - 4000, NOW - 900, NOW - 601, NOW - 10, NOW - 1))},
        {},
        False,
        0,
        "few recent",
        {"count": 2},
    ),
    (
        "failures-custom-threshold-and-window",
        "recent_failures",
        {"baseline": replace(LEARNED, failures=(NOW - 50,))},
        {"max_failures": 1, "failure_window": 60},
        True,
        30,
        "within the window",
        {"count": 1, "window": 60},
    ),
    # 5. elevated_privilege
    (
        "privilege-privileged-scope",
        "elevated_privilege",
        {"scopes": ("deploy:read", "deploy:write")},
        {"privileged_scopes": frozenset({"deploy:write", "deploy:admin"})},
        True,
        30,
        "privileged",
        {"scopes": ["deploy:write"]},
    ),
    (
        "privilege-privileged-scope-fires-while-learning",
        "elevated_privilege",
        {"scopes": ("deploy:write",), "baseline": Baseline()},
        {"privileged_scopes": frozenset({"deploy:write"})},
        True,
        30,
        "privileged",
        {},
    ),
    (
        "privilege-never-asked-after-learning-half-weight",
        "elevated_privilege",
        {"scopes": ("deploy:read", "deploy:logs")},
        {},
        True,
        15,
        "never asked",
        {"scopes": ["deploy:logs"]},
    ),
    (
        "privilege-never-asked-while-learning",
        "elevated_privilege",
        {"scopes": ("deploy:logs",), "baseline": LEARNING},
        {},
        False,
        0,
        "usual",
        {},
    ),
    ("privilege-usual-scopes", "elevated_privilege", {}, {}, False, 0, "usual", {}),
    # 6. unexpected_s2s
    (
        "s2s-audience-outside-declared-intent",
        "unexpected_s2s",
        {"claims": {"intent": [DEPLOY]}, "audiences": (DEPLOY, REPORTS)},
        {"intent_claim": "intent"},
        True,
        30,
        "declared intent",
        {"audiences": [REPORTS]},
    ),
    (
        "s2s-intent-checked-while-learning",
        "unexpected_s2s",
        {"claims": {"intent": [DEPLOY]}, "audiences": (REPORTS,), "baseline": Baseline()},
        {"intent_claim": "intent"},
        True,
        30,
        "declared intent",
        {},
    ),
    (
        "s2s-intent-as-one-string",
        "unexpected_s2s",
        {"claims": {"intent": DEPLOY}, "audiences": (REPORTS,), "baseline": Baseline()},
        {"intent_claim": "intent"},
        True,
        30,
        "declared intent",
        {"audiences": [REPORTS]},
    ),
    (
        "s2s-audiences-within-intent",
        "unexpected_s2s",
        {"claims": {"intent": [DEPLOY, REPORTS]}},
        {"intent_claim": "intent"},
        False,
        0,
        "usual",
        {},
    ),
    (
        "s2s-new-edge-while-learning",
        "unexpected_s2s",
        {"audiences": (REPORTS,), "baseline": LEARNING},
        {},
        False,
        0,
        "learning",
        {},
    ),
    (
        "s2s-new-edge-after-learning",
        "unexpected_s2s",
        {"audiences": (DEPLOY, REPORTS)},
        {},
        True,
        30,
        "never seen",
        {"audiences": [REPORTS]},
    ),
    (
        "s2s-delegation-deeper-than-usual",
        "unexpected_s2s",
        {"delegation_depth": 2, "baseline": replace(LEARNED, max_depth=1)},
        {},
        True,
        30,
        "deeper",
        {"depth": 2, "usual": 1},
    ),
    (
        "s2s-delegation-as-deep-as-usual",
        "unexpected_s2s",
        {"delegation_depth": 1, "baseline": replace(LEARNED, max_depth=1)},
        {},
        False,
        0,
        "usual",
        {},
    ),
    (
        "s2s-burst-above-usual-rate",
        "unexpected_s2s",
        {"baseline": replace(LEARNED, usual_rate=1.0, window_start=NOW - 10, window_count=20)},
        {},
        True,
        30,
        "burst",
        {"per_minute": 21.0, "usual": 1.0},
    ),
    (
        "s2s-busy-but-within-burst-factor",
        "unexpected_s2s",
        {"baseline": replace(LEARNED, usual_rate=3.0, window_start=NOW - 10, window_count=20)},
        {},
        False,
        0,
        "usual",
        {},
    ),
    (
        "s2s-burst-factor-configurable",
        "unexpected_s2s",
        {"baseline": replace(LEARNED, usual_rate=3.0, window_start=NOW - 10, window_count=20)},
        {"burst_factor": 5.0},
        True,
        30,
        "burst",
        {},
    ),
    (
        "s2s-few-requests-are-never-a-burst",
        "unexpected_s2s",
        {"baseline": replace(LEARNED, usual_rate=0.5, window_start=NOW - 10, window_count=8)},
        {},
        False,
        0,
        "usual",
        {},
    ),
    (
        "s2s-rate-window-over",
        "unexpected_s2s",
        {"baseline": replace(LEARNED, usual_rate=1.0, window_start=NOW - RATE_WINDOW - 1, window_count=50)},
        {},
        False,
        0,
        "usual",
        {},
    ),
    # 7. shared_signal
    (
        "events-blocked-in-force",
        "shared_signal",
        {"state": SubjectState(blocked_until=NOW + 1, events=("session-revoked",))},
        {},
        True,
        100,
        "blocked",
        {"until": NOW + 1, "events": ["session-revoked"]},
    ),
    (
        "events-block-weight-is-deny-at",
        "shared_signal",
        {"state": SubjectState(blocked_until=NOW + 1)},
        {"deny_at": 250, "step_up_at": 200, "narrow_at": 100},
        True,
        250,
        "blocked",
        {},
    ),
    (
        "events-block-expired",
        "shared_signal",
        {"state": SubjectState(blocked_until=NOW)},
        {},
        False,
        0,
        "no security events",
        {},
    ),
    (
        "events-reauth-after-attestation",
        "shared_signal",
        {"state": SubjectState(reauth_after=NOW - 4), "attested_at": NOW - 5},
        {},
        True,
        60,
        "predates",
        {"after": NOW - 4},
    ),
    (
        "events-reauth-time-unknown-attestation",
        "shared_signal",
        {"state": SubjectState(reauth_after=NOW - 4), "attested_at": None},
        {},
        True,
        60,
        "predates",
        {},
    ),
    (
        "events-reauth-satisfied-by-later-attestation",
        "shared_signal",
        {"state": SubjectState(reauth_after=NOW - 5), "attested_at": NOW - 5},
        {},
        False,
        0,
        "no security events",
        {},
    ),
    (
        "events-risk-low",
        "shared_signal",
        {"state": SubjectState(risk_level="low")},
        {},
        False,
        0,
        "no security events",
        {},
    ),
    (
        "events-risk-medium",
        "shared_signal",
        {"state": SubjectState(risk_level="medium")},
        {},
        True,
        30,
        "risk level",
        {"level": "medium"},
    ),
    (
        "events-risk-high",
        "shared_signal",
        {"state": SubjectState(risk_level="HIGH")},
        {},
        True,
        60,
        "risk level",
        {"level": "high"},
    ),
    (
        "events-risk-critical",
        "shared_signal",
        {"state": SubjectState(risk_level="critical")},
        {},
        True,
        100,
        "risk level",
        {"level": "critical"},
    ),
    (
        "events-risk-unknown-level",
        "shared_signal",
        {"state": SubjectState(risk_level="severe")},
        {},
        False,
        0,
        "no security events",
        {},
    ),
]


@pytest.mark.parametrize(
    ("name", "changes", "settings", "fired", "weight", "reason", "evidence"),
    [pytest.param(*case[1:], id=case[0]) for case in SIGNAL_CASES],
)
def test_signal(
    name: str,
    changes: dict[str, Any],
    settings: dict[str, Any],
    fired: bool,
    weight: int,
    reason: str,
    evidence: dict[str, Any],
) -> None:
    cfg = replace(CFG, **settings)
    result = signal(name, context(**changes), cfg)
    assert (result.fired, result.weight) == (fired, weight), result
    assert reason in result.reason
    for key, value in evidence.items():
        assert result.evidence[key] == value, (key, result.evidence)
    assert result.as_dict()["weight"] == weight


def test_every_signal_has_a_firing_and_a_quiet_case() -> None:
    seen = {(case[1], case[4]) for case in SIGNAL_CASES}
    assert seen == {(n, fired) for n in SIGNAL_NAMES for fired in (True, False)}


def test_score_adds_the_fired_weights() -> None:
    ctx = context(
        source_ip="10.1.3.3",  # 15: new network
        scopes=("deploy:read", "deploy:write"),  # 30: privileged
        facts={"runner_environment": "self-hosted", "repository_id": "123456"},  # 60: drift
        attested_at=NOW - 600,
    )
    result = assess(ctx, replace(CFG, privileged_scopes=frozenset({"deploy:write"})))
    assert [s.name for s in result.fired] == ["unusual_network", "attestation_drift", "elevated_privilege"]
    assert result.score == 15 + 60 + 30
    assert not result.fresh


def test_weights_override_only_the_named_signal() -> None:
    cfg = replace(CFG, weights={"elevated_privilege": 5})
    assert cfg.weight("elevated_privilege") == 5
    assert cfg.weight("attestation_drift") == DEFAULT_WEIGHTS["attestation_drift"] == 60


def test_events_only_assessment_looks_at_nothing_else() -> None:
    """Rules without ``risk``: a new network, drift and privilege do not count; events do."""
    ctx = context(
        source_ip=None,
        facts={"runner_environment": "self-hosted"},
        attested_at=NOW - 600,
        state=SubjectState(risk_level="medium"),
    )
    result = assess_events(ctx, RiskSettings())
    assert [s.name for s in result.signals] == ["shared_signal"]
    assert result.score == 30
    assert assess_events(context(), RiskSettings()).score == 0


@pytest.mark.parametrize(
    ("attested_at", "state", "fresh"),
    [
        pytest.param(NOW - 60, SubjectState(), True, id="as-old-as-allowed"),
        pytest.param(NOW - 61, SubjectState(), False, id="older"),
        pytest.param(None, SubjectState(), False, id="unknown"),
        pytest.param(NOW - 5, SubjectState(reauth_after=NOW - 5), True, id="at-the-reauth-event"),
        pytest.param(NOW - 5, SubjectState(reauth_after=NOW - 4), False, id="before-the-reauth-event"),
    ],
)
def test_fresh_attestation(attested_at: float | None, state: SubjectState, fresh: bool) -> None:
    ctx = context(attested_at=attested_at, state=state)
    assert is_fresh(ctx, CFG) is fresh
    assert assess(ctx, CFG).fresh is fresh
    assert assess_events(ctx, CFG).fresh is fresh


# -- decisions -----------------------------------------------------------------------------------

PRIVILEGED = RiskSettings(privileged_scopes=frozenset({"deploy:write"}))
SCOPES = ("deploy:read", "deploy:write")


def assessment(*fired: tuple[str, int], fresh: bool = False) -> Assessment:
    signals = tuple(SignalResult(name, True, weight, "test") for name, weight in fired)
    quiet = tuple(SignalResult(n, False, 0, "test") for n in SIGNAL_NAMES if n not in dict(fired))
    return Assessment(sum(w for _, w in fired), signals + quiet, fresh)


#: (id, fired signals, fresh, settings changes, action, enforced, scopes, lifetime factor)
DECISIONS: list[
    tuple[str, tuple[tuple[str, int], ...], bool, dict[str, Any], str, bool, tuple[str, ...], float]
] = [
    ("nothing-fired", (), False, {}, GRANT, True, SCOPES, 1.0),
    ("below-narrow", (("unusual_network", 15),), False, {}, GRANT, True, SCOPES, 0.85),
    ("narrow-band", (("elevated_privilege", 30),), False, {}, NARROW, True, ("deploy:read",), 0.7),
    (
        "narrow-band-top",
        (("elevated_privilege", 30), ("unusual_network", 29)),
        False,
        {},
        NARROW,
        True,
        ("deploy:read",),
        0.41,
    ),
    ("step-up-band", (("attestation_drift", 60),), False, {}, STEP_UP, True, SCOPES, 0.4),
    (
        "fresh-attestation-turns-step-up-into-narrow",
        (("attestation_drift", 60),),
        True,
        {},
        NARROW,
        True,
        ("deploy:read",),
        0.4,
    ),
    (
        "deny-band",
        (("attestation_drift", 60), ("stale_posture", 40)),
        False,
        {},
        DENY,
        True,
        SCOPES,
        0.2,
    ),
    ("deny-band-even-fresh", (("shared_signal", 100),), True, {}, DENY, True, SCOPES, 0.2),
    (
        "lifetime-factor-floor",
        (("attestation_drift", 60), ("unusual_network", 35)),
        True,
        {},
        NARROW,
        True,
        ("deploy:read",),
        0.2,
    ),
    (
        "lifetime-factor-floor-configurable",
        (("attestation_drift", 60), ("unusual_network", 35)),
        True,
        {"min_lifetime_factor": 0.5},
        NARROW,
        True,
        ("deploy:read",),
        0.5,
    ),
    (
        "custom-thresholds",
        (("unusual_network", 15),),
        False,
        {"narrow_at": 10, "step_up_at": 15, "deny_at": 50},
        STEP_UP,
        True,
        SCOPES,
        0.7,
    ),
    (
        "observe-would-narrow",
        (("elevated_privilege", 30),),
        False,
        {"mode": "observe"},
        NARROW,
        False,
        ("deploy:read",),
        0.7,
    ),
    (
        "observe-would-deny",
        (("attestation_drift", 60), ("stale_posture", 40)),
        False,
        {"mode": "observe"},
        DENY,
        False,
        SCOPES,
        0.2,
    ),
    (
        "observe-enforces-event-step-up",
        (("shared_signal", 60),),
        False,
        {"mode": "observe"},
        STEP_UP,
        True,
        SCOPES,
        0.4,
    ),
    (
        "observe-enforces-event-block",
        (("shared_signal", 100),),
        False,
        {"mode": "observe"},
        DENY,
        True,
        SCOPES,
        0.2,
    ),
    (
        "observe-enforces-only-what-the-event-demands",
        (("shared_signal", 60), ("unusual_network", 40)),
        False,
        {"mode": "observe"},
        STEP_UP,
        True,
        SCOPES,
        0.2,
    ),
    (
        "observe-event-narrowing-alone-is-not-enforced",
        (("shared_signal", 30), ("unusual_network", 30)),
        False,
        {"mode": "observe"},
        STEP_UP,
        False,
        SCOPES,
        0.4,
    ),
    (
        "observe-event-step-up-met-by-fresh-attestation",
        (("shared_signal", 60),),
        True,
        {"mode": "observe"},
        NARROW,
        False,
        ("deploy:read",),
        0.4,
    ),
]


@pytest.mark.parametrize(
    ("fired", "fresh", "settings", "action", "enforced", "scopes", "factor"),
    [pytest.param(*case[1:], id=case[0]) for case in DECISIONS],
)
def test_decide(
    fired: tuple[tuple[str, int], ...],
    fresh: bool,
    settings: dict[str, Any],
    action: str,
    enforced: bool,
    scopes: tuple[str, ...],
    factor: float,
) -> None:
    cfg = replace(PRIVILEGED, **settings)
    decision = decide(assessment(*fired, fresh=fresh), cfg, SCOPES)
    assert (decision.action, decision.enforced, decision.scopes) == (action, enforced, scopes)
    assert decision.lifetime_factor == pytest.approx(factor)
    assert decision.score == sum(w for _, w in fired)
    assert decision.step_up_max_age == cfg.step_up_max_age
    recorded = decision.as_dict()
    assert recorded["action"] == action and recorded["enforced"] == enforced
    assert recorded["lifetime_factor"] == round(factor, 3)


def test_decision_names_the_signals_that_drove_it() -> None:
    both = assessment(("attestation_drift", 60), ("unusual_network", 15))
    assert decide(both, PRIVILEGED, SCOPES).fired == ("attestation_drift", "unusual_network")
    # Observing, only the security event is enforced, so only it is named to the caller.
    observed = assessment(("shared_signal", 60), ("unusual_network", 15))
    decision = decide(observed, replace(PRIVILEGED, mode="observe"), SCOPES)
    assert (decision.action, decision.enforced, decision.fired) == (STEP_UP, True, ("shared_signal",))


def test_reauth_event_is_not_met_by_recent_attestation_older_than_the_event() -> None:
    """A token minted 10 s before the event is "fresh" by age, but predates what the event asks for."""
    ctx = context(attested_at=NOW - 10, state=SubjectState(reauth_after=NOW - 3))
    decision = decide(assess_events(ctx, RiskSettings()), RiskSettings(), ("deploy:read",))
    assert (decision.action, decision.enforced) == (STEP_UP, True)
    renewed = decide(assess_events(replace(ctx, attested_at=NOW), RiskSettings()), RiskSettings(), ())
    assert renewed.action == GRANT


# -- baselines -----------------------------------------------------------------------------------


def seen(
    baseline: Baseline,
    now: float,
    *,
    source_ip: str | None = "10.1.2.3",
    facts: dict[str, Any] | None = None,
    audiences: Any = (DEPLOY,),
    scopes: Any = ("deploy:read",),
    depth: int = 0,
    rebaseline: bool = False,
) -> Baseline:
    return observe(
        baseline,
        now=now,
        source_ip=source_ip,
        stable_facts=facts or {},
        audiences=audiences,
        scopes=scopes,
        depth=depth,
        rebaseline=rebaseline,
    )


@pytest.mark.parametrize(
    ("address", "network"),
    [
        ("10.1.2.3", "10.1.2.0/24"),
        ("10.1.2.255", "10.1.2.0/24"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("::ffff:10.1.2.3", "10.1.2.0/24"),
        ("::1", "::/64"),
        ("10.1.2", "unknown"),
        ("", "unknown"),
    ],
)
def test_network_of(address: str, network: str) -> None:
    assert network_of(address) == network


def test_new_identity_learns_for_its_first_exchanges() -> None:
    baseline = Baseline()
    for n in range(LEARNING_EXCHANGES):
        assert baseline.learning, n
        baseline = seen(baseline, NOW + n)
    assert not baseline.learning
    assert baseline.count == LEARNING_EXCHANGES
    assert (baseline.first_seen, baseline.last_seen) == (NOW, NOW + LEARNING_EXCHANGES - 1)


def test_observe_records_what_it_sees() -> None:
    baseline = seen(
        Baseline(),
        NOW,
        facts={"runner_environment": "github-hosted"},
        audiences=(DEPLOY, REPORTS),
        scopes=("deploy:read", "reports:read"),
        depth=2,
    )
    assert baseline.networks == ("10.1.2.0/24",)
    assert baseline.audiences == (DEPLOY, REPORTS)
    assert baseline.scopes == ("deploy:read", "reports:read")
    assert baseline.facts == {"runner_environment": "github-hosted"}
    assert baseline.max_depth == 2
    later = seen(baseline, NOW + 1, source_ip=None, depth=1)
    assert later.networks == ("10.1.2.0/24",)  # an unknown source is not a network
    assert later.max_depth == 2


def test_observe_takes_iterators() -> None:
    baseline = seen(LEARNED, NOW, audiences=iter([REPORTS, DEPLOY]), scopes=(s for s in ["a", "b"]))
    assert baseline.audiences == (REPORTS, DEPLOY)
    assert baseline.scopes == ("deploy:read", "a", "b")


def test_stable_facts_change_only_when_rebaselined() -> None:
    baseline = seen(Baseline(), NOW, facts={"runner_environment": "github-hosted"})
    drifted = seen(baseline, NOW + 1, facts={"runner_environment": "self-hosted", "node": "n1"})
    assert drifted.facts == {"runner_environment": "github-hosted", "node": "n1"}
    renewed = seen(drifted, NOW + 2, facts={"runner_environment": "self-hosted"}, rebaseline=True)
    assert renewed.facts == {"runner_environment": "self-hosted", "node": "n1"}


@pytest.mark.parametrize(
    ("field_name", "limit", "request_of", "stored"),
    [
        (
            "networks",
            MAX_NETWORKS,
            lambda i: {"source_ip": f"10.0.{i}.1"},
            lambda i: f"10.0.{i}.0/24",
        ),
        (
            "audiences",
            MAX_AUDIENCES,
            lambda i: {"audiences": (f"https://svc{i}.example.com",)},
            lambda i: f"https://svc{i}.example.com",
        ),
        ("scopes", MAX_SCOPES, lambda i: {"scopes": (f"s{i}",)}, lambda i: f"s{i}"),
    ],
)
def test_observe_is_bounded_keeping_the_most_recent(
    field_name: str, limit: int, request_of: Any, stored: Any
) -> None:
    baseline = Baseline()
    for i in range(limit + 10):
        baseline = seen(baseline, NOW + i, **request_of(i))
    values = getattr(baseline, field_name)
    assert values == tuple(stored(i) for i in range(10, limit + 10))
    # Seeing a kept value again moves it to the end instead of duplicating it.
    again = getattr(seen(baseline, NOW + 1000, **request_of(10)), field_name)
    assert again == (*values[1:], stored(10))


def test_rate_window_and_usual_rate() -> None:
    """Exchanges are counted per RATE_WINDOW; a closed window folds into the usual rate (EWMA 0.8/0.2)."""
    baseline = Baseline()
    assert baseline.current_rate(NOW) == 1.0
    for i in range(10):
        baseline = seen(baseline, NOW + i)
    assert (baseline.window_start, baseline.window_count, baseline.usual_rate) == (NOW, 10, 0.0)
    assert baseline.current_rate(NOW + 30) == 11.0
    assert baseline.current_rate(NOW + RATE_WINDOW + 1) == 1.0
    baseline = seen(baseline, NOW + RATE_WINDOW + 1)
    assert (baseline.window_start, baseline.window_count) == (NOW + RATE_WINDOW + 1, 1)
    assert baseline.usual_rate == pytest.approx(10 * 0.2)
    for i in range(4):
        baseline = seen(baseline, NOW + RATE_WINDOW + 2 + i)
    baseline = seen(baseline, NOW + 3 * RATE_WINDOW)
    assert baseline.usual_rate == pytest.approx(2.0 * 0.8 + 5 * 0.2)
    assert baseline.window_count == 1


def test_appended_failure_is_bounded() -> None:
    failures: tuple[float, ...] = ()
    for i in range(MAX_FAILURES + 5):
        failures = appended_failure(failures, NOW + i)
    assert len(failures) == MAX_FAILURES
    assert failures[0] == NOW + 5
    assert failures[-1] == NOW + MAX_FAILURES + 4


def test_baseline_json_round_trip() -> None:
    baseline = replace(
        seen(LEARNED, NOW, facts={"node": "n1", "immutable": True, "uid": 7}),
        failures=(NOW - 3.5, NOW - 1),
        usual_rate=2.5,
    )
    text = baseline.to_json()
    assert Baseline.from_json(text) == baseline
    assert Baseline.from_json(text.encode()) == baseline
    assert json.loads(text)["networks"] == list(baseline.networks)


def test_baseline_json_is_every_field_in_order() -> None:
    """The stored text is what ``dataclasses.asdict`` gave (the form baselines were stored in), with
    pending, confirmed and earlier keys too."""
    baseline = replace(
        seen(LEARNED, NOW, facts={"node": "n1", "cnf_jkt": "k2"}),
        failures=(NOW - 3.5,),
        pending={"node": PendingFact("n2", NOW - 10, NOW, 2, NOW - 5)},
        confirmed={"node": {"how": "first_seen", "at": NOW - 100}},
        other_keys={"cnf_jkt": ("k1",)},
    )
    data = asdict(baseline)
    data["pending"] = {"node": asdict(baseline.pending["node"])}
    data["other_keys"] = {"cnf_jkt": ["k1"]}
    assert baseline.to_json() == json.dumps(data, separators=(",", ":"), default=str)
    assert list(json.loads(baseline.to_json())) == [f.name for f in fields(Baseline)]


def _parsed_afresh(text: str) -> Baseline:
    """:meth:`Baseline.from_json` of ``text`` without the written-baselines memory."""
    from sts.core import baseline as baseline_module

    saved = baseline_module._WRITTEN.entries.copy()
    baseline_module._WRITTEN.entries.clear()
    try:
        return Baseline.from_json(text)
    finally:
        baseline_module._WRITTEN.entries.update(saved)


@pytest.mark.parametrize(
    "baseline",
    [
        pytest.param(Baseline(), id="new"),
        pytest.param(
            replace(
                seen(LEARNED, NOW, facts={"node": "n1", "immutable": True, "uid": 7, "cnf_jkt": "k2"}),
                failures=(NOW - 3.5, NOW - 1.0),
                pending={"node": PendingFact("n2", NOW - 10, NOW, 2, NOW - 5)},
                confirmed={"node": {"how": "first_seen", "at": NOW - 100}},
                other_keys={"cnf_jkt": ("k1",)},
            ),
            id="learned",
        ),
        # Values JSON does not give back as they were: parsed, never the written object.
        pytest.param(replace(LEARNED, facts={"list": ("a", "b")}), id="tuple-fact"),
        pytest.param(replace(LEARNED, first_seen=5, failures=(1,)), id="int-times"),
        pytest.param(replace(LEARNED, facts={"when": Path("/x")}), id="non-json-fact"),
        pytest.param(replace(LEARNED, pending={"node": PendingFact(1.5, NOW, NOW)}), id="unreadable-pending"),
        pytest.param(replace(LEARNED, confirmed={"node": {"how": "op", "at": [1]}}), id="list-in-confirmed"),
    ],
)
def test_baseline_read_back_is_what_parsing_gives(baseline: Baseline) -> None:
    """A baseline written by this process and read back (which may give the written object) is the
    same, type for type, as parsing the stored text afresh."""
    text = baseline.to_json()
    assert _typed(Baseline.from_json(text)) == _typed(_parsed_afresh(text))


def test_written_baselines_are_remembered_in_bounds() -> None:
    from sts.core.baseline import _WrittenBaselines

    memory = _WrittenBaselines(2)
    first, second, third = (replace(LEARNED, count=n) for n in (10, 11, 12))
    for b in (first, second, third):
        memory.remember(b.to_json(), b)
    assert memory.get(first.to_json()) is None
    assert memory.get(second.to_json()) is second and memory.get(third.to_json()) is third
    assert memory.get(third.to_json().encode()) is None  # bytes are parsed


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(None, id="none"),
        pytest.param("", id="empty"),
        pytest.param(b"", id="empty-bytes"),
        pytest.param("not json", id="not-json"),
        pytest.param("null", id="null"),
        pytest.param("[1, 2]", id="list"),
        pytest.param('{"count": "many"}', id="count-not-a-number"),
        pytest.param('{"count": Infinity}', id="count-infinite"),
        pytest.param('{"networks": 5}', id="networks-not-a-list"),
        pytest.param('{"failures": ["yesterday"]}', id="failures-not-times"),
        pytest.param('{"facts": 3}', id="facts-not-a-map"),
        pytest.param("[" * 100_000, id="nested-too-deep"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
    ],
)
def test_corrupt_baseline_is_a_new_learning_one(text: str | bytes | None) -> None:
    baseline = Baseline.from_json(text)
    assert baseline == Baseline()
    assert baseline.learning


# -- policy: the risk section --------------------------------------------------------------------

RULE = {
    "name": "deploy",
    "issuer": "upstream",
    "subject": "repo:acme/app:ref:refs/heads/main",
    "require_client_authentication": False,
    "grant": {"audiences": [DEPLOY], "scopes": ["deploy:read", "deploy:write"]},
}


def _load(tmp_path: Path, risk: dict[str, Any]) -> Any:
    path = tmp_path / "risk.yaml"
    rules = [{**RULE, "name": "first"}, {**RULE, "risk": risk}]
    path.write_text(yaml.safe_dump({"version": 1, "rules": rules}, sort_keys=False))
    return path, lambda: load_policies(
        [path], issuers=frozenset({"upstream"}), clients=frozenset(), max_lifetime=3600
    )


def test_risk_section_defaults(tmp_path: Path) -> None:
    _, load = _load(tmp_path, {})
    first, deploy = load().rules
    assert first.risk is None
    assert deploy.risk == RiskSettings(stable_facts=DEFAULT_STABLE_FACTS)


def test_risk_section_compiles(tmp_path: Path) -> None:
    _, load = _load(
        tmp_path,
        {
            "mode": "observe",
            "networks": ["10.0.0.0/8", "2001:db8::/32", "192.168.1.7"],
            "privileged_scopes": ["deploy:write"],
            "stable_facts": ["node"],
            "posture_fact": "device_posture",
            "posture_good": ["ok"],
            "posture_max_age": 900,
            "max_failures": 5,
            "failure_window": 120,
            "burst_factor": 4.5,
            "intent_claim": "intent",
            "weights": {"unusual_network": 10},
            "narrow_at": 20,
            "step_up_at": 50,
            "deny_at": 90,
            "step_up_max_age": 30,
            "min_lifetime_factor": 0.5,
        },
    )
    risk = load().rules[1].risk
    assert risk == RiskSettings(
        mode="observe",
        networks=(
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("2001:db8::/32"),
            ipaddress.ip_network("192.168.1.7/32"),
        ),
        privileged_scopes=frozenset({"deploy:write"}),
        stable_facts=("node",),
        posture_fact="device_posture",
        posture_good=frozenset({"ok"}),
        posture_max_age=900,
        max_failures=5,
        failure_window=120,
        burst_factor=4.5,
        intent_claim="intent",
        weights={"unusual_network": 10},
        narrow_at=20,
        step_up_at=50,
        deny_at=90,
        step_up_max_age=30,
        min_lifetime_factor=0.5,
    )


@pytest.mark.parametrize(
    ("risk", "reasons"),
    [
        pytest.param(
            {"networks": ["10.0.0.0/33"]}, ("risk.networks", "'10.0.0.0/33' is not a network"), id="bad-cidr"
        ),
        pytest.param({"networks": ["office"]}, ("risk.networks", "'office'"), id="not-an-address"),
        pytest.param(
            {"privileged_scopes": ["deploy:admin", "deploy:write"]},
            ("risk.privileged_scopes not in grant.scopes: deploy:admin",),
            id="privileged-scope-not-granted",
        ),
        pytest.param(
            {"narrow_at": 70},
            ("narrow_at <= step_up_at <= deny_at",),
            id="narrow-above-step-up",
        ),
        pytest.param(
            {"step_up_at": 50, "deny_at": 40},
            ("narrow_at <= step_up_at <= deny_at",),
            id="step-up-above-deny",
        ),
        pytest.param({"mode": "block"}, ("risk.mode", "'block'"), id="unknown-mode"),
        pytest.param({"weights": {"luck": 5}}, ("risk.weights", "'luck'"), id="unknown-signal-weight"),
        # Security events are not weighed: they demand a block, a re-attestation or a risk level.
        pytest.param(
            {"weights": {"shared_signal": 0}}, ("risk.weights", "'shared_signal'"), id="event-weight"
        ),
        pytest.param({"min_lifetime_factor": 0}, ("risk.min_lifetime_factor",), id="zero-lifetime-factor"),
        pytest.param({"networks": "10.0.0.0/8"}, ("risk.networks",), id="networks-not-a-list"),
    ],
)
def test_risk_compile_error_names_file_line_rule_and_reason(
    tmp_path: Path, risk: dict[str, Any], reasons: tuple[str, ...]
) -> None:
    path, load = _load(tmp_path, risk)
    with pytest.raises(ConfigurationError) as caught:
        load()
    message = str(caught.value)
    for reason in reasons:
        assert reason in message, message
    # Schema errors and compile errors alike name the file, the line the rule starts on, and the rule.
    lines = path.read_text().splitlines()
    second_rule = [i + 1 for i, text in enumerate(lines) if text.startswith("- ")][1]
    assert message.startswith(f"{path}:{second_rule}: rule 'deploy': "), message


def test_documented_example_loads_and_grants_a_privileged_scope_alone(tmp_path: Path) -> None:
    """The example in docs/policies.md, "Risk and step-up", loads, and does what its comment says."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "policies.md").read_text()
    example = docs.split("## Risk and step-up", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "example.yaml"
    path.write_text(example)
    [rule] = load_policies(
        [path], issuers=frozenset({"github"}), clients=frozenset(), max_lifetime=3600
    ).rules
    assert rule.risk is not None and rule.risk.privileged_scopes == {"deploy:write"}
    ctx = context(scopes=("deploy:write",), source_ip="10.1.2.3")
    alone = decide(assess(ctx, rule.risk), rule.risk, ctx.scopes)
    assert (alone.action, alone.scopes) == (GRANT, ("deploy:write",))
    elsewhere = replace(ctx, source_ip="10.9.9.9", scopes=("deploy:read", "deploy:write"))
    narrowed = decide(assess(elsewhere, rule.risk), rule.risk, elsewhere.scopes)
    assert (narrowed.action, narrowed.scopes) == (NARROW, ("deploy:read",))


def test_risk_networks_written_ipv4_mapped_are_the_ipv4_networks_they_map() -> None:
    """Sources are compared as IPv4 addresses (a dual-stack listener's ``::ffff:127.0.0.1`` too),
    so ``risk.networks: ["::ffff:127.0.0.0/104"]`` admitted no client at all (an outside re-check),
    where ``trusted_proxies`` written so was already read as ``127.0.0.0/8``."""
    from sts.core.policy.compile import compile_risk

    cfg = compile_risk({"networks": ["::ffff:127.0.0.0/104", "::ffff:0:0/96", "2001:db8::/32"]}, "r", ())
    assert [str(n) for n in cfg.networks] == ["127.0.0.0/8", "0.0.0.0/0", "2001:db8::/32"]
    only = replace(CFG, networks=compile_risk({"networks": ["::ffff:127.0.0.0/104"]}, "r", ()).networks)
    for source, inside in (("127.0.0.1", True), ("::ffff:127.0.0.1", True), ("10.0.0.1", False)):
        result = signal("unusual_network", context(source_ip=source, baseline=Baseline()), only)
        assert result.fired is not inside, (source, result)
