"""The risk stage computes what it computed before it was made cheaper, over varied inputs.

``risk_reference.py`` keeps the earlier code verbatim.  Each test draws a few hundred seeded
random cases (baselines learning and learned, with pending values, confirmations and earlier
keys; facts, claims, addresses, scopes, security events, posture; rule settings) and compares
the current result with the reference: the values, their types, and the text and key order of
what goes into the audit record and the store.
"""

from __future__ import annotations

import ipaddress
import json
import random
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest

from sts.core import baseline as baseline_module
from sts.core import drift, risk
from sts.core.assurance import Requirement
from sts.core.attest import VerifiedToken
from sts.core.audit import AuditRecord
from sts.core.baseline import Baseline, PendingFact, _bounded, observe
from sts.core.delegation import SELF_ISSUER
from sts.core.dpop import VerifiedProof
from sts.core.drift import DRIFT_FIELDS, DriftSettings
from sts.core.exchange.attestation import Parties
from sts.core.exchange.risk_and_assurance import RiskAndAssurance
from sts.core.policy.rules import Grant
from sts.core.risk import DEFAULT_STABLE_FACTS, RiskContext, RiskSettings
from sts.core.stepup import decide
from sts.core.subject_state import SubjectState
from sts.protocol.token_exchange import TokenExchangeRequest
from sts.protocol.wire import WireRequest
from tests.support.typed import typed as _typed

from . import risk_reference as ref

NOW = 1_800_000_000.0
CASES = 400
FACTS = ("runner_environment", "repository_id", "node", "image_digest", "cnf_jkt", "cnf_x5t", "uid")
VALUES: tuple[Any, ...] = ("a", "b", "github-hosted", "self-hosted", 7, True, "k1", "k2", "k3")
NETWORKS = ("10.1.2.0/24", "127.0.0.0/24", "2001:db8:1:2::/64", "192.168.7.0/24")
ADDRESSES = (
    None,
    "",
    "10.1.2.3",
    "10.1.3.4",
    "192.168.7.7",
    "127.0.0.1",
    "2001:db8:1:2::5",
    "::ffff:10.1.2.3",
    "fe80::1%eth0",
    "not-an-address",
)
AUDIENCES = ("https://deploy.example.com", "https://reports.example.com", "payments")
SCOPES = ("deploy:read", "deploy:write", "admin", "read")
EVIDENCE = ("pop_key_continuity", "posture_token")


def _some(rng: random.Random, items: tuple[Any, ...], most: int | None = None) -> tuple[Any, ...]:
    return tuple(rng.sample(items, rng.randint(0, len(items) if most is None else most)))


def _time(rng: random.Random) -> float:
    return NOW - rng.choice((0, 5, 59, 61, 300, 3599, 3601, 86400))


def random_baseline(rng: random.Random, *, plain: bool = True) -> Baseline:
    if rng.random() < 0.08:
        return Baseline()
    facts = {name: rng.choice(VALUES) for name in _some(rng, FACTS, 5)}
    pending = {
        name: PendingFact(
            rng.choice((*VALUES, None)),
            _time(rng),
            _time(rng),
            rng.randint(0, 4),
            rng.choice((None, _time(rng))),
        )
        for name in _some(rng, FACTS, 3)
    }
    confirmed = {
        name: {"how": rng.choice(("first_seen", "probation", "operator_accept")), "at": _time(rng)}
        for name in facts
        if rng.random() < 0.7
    }
    other_keys = {
        name: _some(rng, ("k1", "k2", "k3", "k4"), 3) for name in ("cnf_jkt", "cnf_x5t") if rng.random() < 0.3
    }
    baseline = Baseline(
        first_seen=rng.choice((None, _time(rng))),
        last_seen=rng.choice((None, _time(rng))),
        count=rng.choice((0, 1, 4, 5, 6, 300)),
        networks=_some(rng, NETWORKS),
        facts=facts,
        audiences=_some(rng, AUDIENCES),
        scopes=_some(rng, SCOPES),
        max_depth=rng.randint(0, 2),
        failures=tuple(sorted(_time(rng) for _ in range(rng.randint(0, 5)))),
        window_start=_time(rng),
        window_count=rng.randint(0, 400),
        usual_rate=rng.choice((0.0, 1.5, 35.2, 0.25)),
        pending=pending,
        confirmed=confirmed,
        other_keys=other_keys,
    )
    if plain:
        return baseline
    # Values JSON does not give back as they were (written, never remembered as they are).
    oddity = rng.choice(
        (
            {"first_seen": 5, "failures": (1,)},
            {"facts": {**facts, "list": ("a", "b")}},
            {"facts": {**facts, "path": Path("/x")}},
            {"pending": {"node": PendingFact(1.5, NOW, NOW)}},
            {"confirmed": {"node": {"how": "op", "at": [1]}}},
            {"networks": ["10.1.2.0/24"]},
            {"other_keys": {"cnf_jkt": ["k1"]}},
            {"count": True},
        )
    )
    return Baseline(**{**{f.name: getattr(baseline, f.name) for f in fields(Baseline)}, **oddity})


def random_settings(rng: random.Random) -> RiskSettings:
    return RiskSettings(
        mode=rng.choice(("enforce", "observe")),
        networks=tuple(
            ipaddress.ip_network(n) for n in _some(rng, ("10.0.0.0/8", "127.0.0.0/8", "2001:db8::/32"), 2)
        ),
        privileged_scopes=frozenset(_some(rng, SCOPES, 2)),
        stable_facts=rng.choice((DEFAULT_STABLE_FACTS, _some(rng, FACTS), ())),
        posture_fact=rng.choice((None, "posture")),
        posture_max_age=rng.choice((None, 60, 3600)),
        max_failures=rng.randint(1, 4),
        failure_window=rng.choice((60, 600)),
        burst_factor=rng.choice((10.0, 0.5)),
        intent_claim=rng.choice((None, "intent")),
        weights=rng.choice(({}, {"unusual_network": 7, "attestation_drift": 100, "shared_signal": 1})),
        narrow_at=rng.choice((10, 30)),
        step_up_at=rng.choice((60, 45)),
        deny_at=rng.choice((100, 90)),
        drift=DriftSettings(
            probation_exchanges=rng.randint(1, 3),
            probation_period=rng.choice((0, 60, 3600)),
            evidence=frozenset(_some(rng, EVIDENCE)),
        ),
    )


def random_state(rng: random.Random) -> SubjectState:
    return rng.choice(
        (
            SubjectState(),
            SubjectState(),
            SubjectState(blocked_until=NOW + 60, events=("session-revoked",)),
            SubjectState(blocked_until=NOW - 60),
            SubjectState(reauth_after=NOW - 50, events=("credential-change",)),
            SubjectState(risk_level=rng.choice(("low", "medium", "HIGH", "critical", "weird"))),
            SubjectState(posture=rng.choice(("compliant", "not-compliant"))),
        )
    )


def random_facts(rng: random.Random) -> dict[str, Any]:
    return {name: rng.choice((*VALUES, None)) for name in _some(rng, FACTS, 6)}


def random_claims(rng: random.Random) -> dict[str, Any]:
    claims: dict[str, Any] = {name: rng.choice((*VALUES, None, ["x", 1])) for name in _some(rng, FACTS, 4)}
    if rng.random() < 0.5:
        claims["intent"] = rng.choice(("payments", ["payments", "https://deploy.example.com"], 5))
    if rng.random() < 0.3:
        claims["posture"] = rng.choice(("compliant", "bad", True, False))
    return claims


def random_context(rng: random.Random, cfg: RiskSettings) -> RiskContext:
    return RiskContext(
        identity=rng.choice(("", "github|repo:acme/app:ref:refs/heads/main")),
        facts=random_facts(rng),
        claims=random_claims(rng),
        source_ip=rng.choice(ADDRESSES),
        audiences=_some(rng, AUDIENCES),
        scopes=_some(rng, SCOPES),
        delegation_depth=rng.randint(0, 3),
        attested_at=rng.choice((None, _time(rng))),
        now=NOW,
        baseline=random_baseline(rng),
        state=random_state(rng),
        posture_claims=rng.choice((None, {"posture": "compliant"}, {"posture": False}, {})),
        posture_problem=rng.choice((None, None, "expired")),
        evidence_shown=frozenset(_some(rng, EVIDENCE)),
        evidence_presentable=frozenset(_some(rng, EVIDENCE)),
    )


def _text(value: Any) -> str:
    """The JSON text, in the order the keys were inserted."""
    return json.dumps(value, default=str)


def _signals(assessment: risk.Assessment) -> str:
    return _text([s.as_dict() for s in assessment.signals])


@pytest.mark.parametrize("seed", range(4))
def test_assessment_is_what_it_was(seed: int) -> None:
    rng = random.Random(seed)
    fired = 0
    for _ in range(CASES):
        cfg = random_settings(rng)
        ctx = random_context(rng, cfg)
        for new, old in ((risk.assess(ctx, cfg), ref.assess(ctx, cfg)),
                         (risk.assess_events(ctx, cfg), ref.assess_events(ctx, cfg))):  # fmt: skip
            assert new == old
            assert _signals(new) == _signals(old)
            assert _typed(new.drift.baseline) == _typed(old.drift.baseline)
            assert [s.name for s in new.fired] == [s.name for s in old.fired]
            assert decide(new, cfg, ctx.scopes) == decide(old, cfg, ctx.scopes)
            assert _text(decide(new, cfg, ctx.scopes).as_dict()) == _text(
                decide(old, cfg, ctx.scopes).as_dict()
            )
            fired += len(new.fired)
        watched = rng.choice((cfg.stable_facts, _some(rng, FACTS)))
        fresh = rng.random() < 0.5
        assert risk.review_drift(ctx, cfg, watched=watched, fresh=fresh) == ref.review_drift(
            ctx, cfg, watched=watched, fresh=fresh
        )
    assert fired > CASES  # the cases fire signals, not only quiet ones


@pytest.mark.parametrize("seed", range(4))
def test_baseline_summary_is_what_it_was(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(CASES):
        baseline = random_baseline(rng)
        watched = rng.choice(((), DEFAULT_STABLE_FACTS, _some(rng, FACTS), ("node", "node", "uid")))
        assert _text(drift.session_summary(baseline, watched)) == _text(
            ref.session_summary(baseline, watched)
        )


@pytest.mark.parametrize("seed", range(4))
def test_learning_is_what_it_was(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(CASES):
        baseline = random_baseline(rng)
        audiences, scopes = _some(rng, AUDIENCES), _some(rng, SCOPES)
        kwargs: dict[str, Any] = {
            "now": rng.choice((NOW, NOW + 30, NOW + 61, 1_800_000_100)),
            "source_ip": rng.choice(ADDRESSES),
            "stable_facts": rng.choice(({}, {"node": "n1"}, {"runner_environment": "self-hosted"})),
            "depth": rng.randint(0, 3),
            "rebaseline": rng.random() < 0.2,
        }
        as_iterators = rng.random() < 0.3
        new = observe(
            baseline,
            audiences=iter(audiences) if as_iterators else audiences,
            scopes=iter(scopes) if as_iterators else scopes,
            **kwargs,
        )
        old = ref.observe(baseline, audiences=audiences, scopes=scopes, **kwargs)
        assert _typed(new) == _typed(old)


@pytest.mark.parametrize("seed", range(4))
def test_reading_back_as_itself_is_carried_over_only_when_true(seed: int) -> None:
    """``observe`` marks the baseline it derives as reading back as itself only when the full check
    says so (:func:`_reads_back_as_itself`, which decides what is remembered when written)."""
    rng = random.Random(seed)
    carried = 0
    for _ in range(CASES):
        baseline = random_baseline(rng, plain=rng.random() < 0.7)
        if rng.random() < 0.8:
            assert baseline.reads_back_as_itself == baseline_module._reads_back_as_itself(baseline)
        updated = observe(
            baseline,
            now=rng.choice((NOW, NOW + 61, 1_800_000_100)),
            source_ip=rng.choice(ADDRESSES),
            stable_facts=rng.choice(({}, {"node": "n1"}, {"node": ("a",)}, {"uid": 7}, {"path": Path("/x")})),
            audiences=_some(rng, AUDIENCES) if rng.random() < 0.8 else ("https://deploy.example.com", 5),
            scopes=_some(rng, SCOPES),
            depth=rng.choice((0, 1, 2, 0, 1, 2, 1.0, True)),
            rebaseline=rng.random() < 0.5,
        )
        if "reads_back_as_itself" in updated.__dict__:
            carried += 1
            assert updated.reads_back_as_itself is baseline_module._reads_back_as_itself(updated) is True
        assert updated.to_json() == ref.baseline_json(updated)
    assert carried > CASES // 10


@pytest.mark.parametrize("seed", range(4))
def test_bounded_is_what_it_was(seed: int) -> None:
    rng = random.Random(seed)
    items = ("a", "b", "c", "d", "e")
    for _ in range(CASES * 4):
        existing = tuple(rng.choice(items) for _ in range(rng.randint(0, 6)))
        new = [rng.choice(items) for _ in range(rng.randint(0, 3))]
        limit = rng.randint(1, 7)
        assert _typed(_bounded(existing, list(new), limit)) == _typed(
            ref._bounded(existing, list(new), limit)
        )
        assert _typed(_bounded(list(existing), iter(new), limit)) == _typed(
            ref._bounded(existing, new, limit)
        )


@pytest.mark.parametrize("seed", range(4))
def test_stored_text_is_what_it_was(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(CASES):
        plain = rng.random() < 0.7
        baseline = random_baseline(rng, plain=plain)
        text = baseline.to_json()
        assert text == ref.baseline_json(baseline)
        read_back = Baseline.from_json(text)
        saved = baseline_module._WRITTEN.entries.copy()
        baseline_module._WRITTEN.entries.clear()
        try:
            parsed = Baseline.from_json(text)
        finally:
            baseline_module._WRITTEN.entries.update(saved)
        assert _typed(read_back) == _typed(parsed)
        if plain:
            assert read_back is baseline  # remembered as it was written


# -- the whole stage, with the stores it reads -------------------------------------------------


class _Baselines:
    def __init__(self, baseline: Baseline | None) -> None:
        self.baseline = baseline

    def load(self, identity: str) -> Baseline:
        return self.baseline or Baseline()

    def save(self, identity: str, baseline: Baseline, ttl: int, *, drift: bool = True) -> None:
        raise AssertionError("assess and learn save nothing")

    def update_drift(self, identity: str, change: Any, ttl: int) -> None:
        raise AssertionError("assess and learn save nothing")

    def save_failures(self, identity: str, failures: tuple[float, ...], ttl: int) -> None:
        raise AssertionError("assess and learn save nothing")

    def add_failure(self, identity: str, at: float, ttl: int) -> None:
        raise AssertionError("assess and learn save nothing")


class _States:
    def __init__(self, states: dict[str, SubjectState]) -> None:
        self.states = states

    def get(self, identities: Any) -> list[SubjectState]:
        return [self.states.get(i, SubjectState()) for i in identities]


class _Issuers:
    def names(self) -> frozenset[str]:
        return frozenset({"github", "gitlab"})


def _subject(rng: random.Random) -> VerifiedToken:
    issuer = rng.choice(("github", SELF_ISSUER))
    claims = random_claims(rng)
    if issuer == SELF_ISSUER:
        claims["acr"] = rng.choice(("urn:workload-sts:acr:pop", "urn:workload-sts:acr:attested", 5, "other"))
        # Bound to one of the proofs' keys, the certificate, both, or none (a bearer token of ours).
        cnf = rng.choice(
            (None, {"jkt": "k1"}, {"jkt": "k2"}, {"x5t#S256": "t1"}, {"jkt": "k1", "x5t#S256": "t1"})
        )
        if cnf is not None:
            claims["cnf"] = cnf
    return VerifiedToken(
        issuer_name=issuer,
        issuer="https://issuer.example",
        subject="repo:acme/app:ref:refs/heads/main",
        claims=claims,
        token_type="urn:ietf:params:oauth:token-type:jwt",
        issued_at=NOW - 5,
        expires_at=NOW + 300,
        not_before=None,
        jti="j1",
        sha256="00",
        typ="JWT",
        facts=random_facts(rng),
    )


@pytest.mark.parametrize("seed", range(4))
def test_exchange_risk_and_record_are_what_they_were(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(CASES // 2):
        subject = _subject(rng)
        cfg = random_settings(rng)
        stage = RiskAndAssurance(
            _Issuers(),  # type: ignore[arg-type]
            leeway=30,
            subject_states=rng.choice((None, _States({f"github|{subject.subject}": random_state(rng)}))),
            baselines=rng.choice((None, _Baselines(random_baseline(rng)), _Baselines(None))),
        )
        wire = WireRequest(
            form={},
            query={},
            content_type=None,
            authorization=None,
            request_id="r1",
            source_ip=rng.choice(ADDRESSES),
            client_cert_thumbprint=rng.choice((None, "t1")),
        )
        request = TokenExchangeRequest(
            subject_token="x.y.z",
            subject_token_type="urn:ietf:params:oauth:token-type:jwt",
            actor_token=None,
            actor_token_type=None,
            audiences=(),
            resources=(),
            scopes=None,
            requested_token_type=None,
            requested_lifetime=None,
        )
        parties = Parties(subject, None, None, rng.randint(0, 2), rng.random() < 0.3)
        proof = rng.choice((None, VerifiedProof(rng.choice(("k1", "k2", "k3")), "p1", NOW)))
        grant = Grant(
            "rule",
            _some(rng, AUDIENCES),
            _some(rng, SCOPES),
            300,
            False,
            risk=rng.choice((None, cfg)),
            assurance=rng.choice(((), (Requirement(acr="urn:workload-sts:acr:pop"),))),
        )
        scopes = _some(rng, SCOPES)
        attested_at = rng.choice((None, _time(rng)))
        records = [AuditRecord("e1", NOW, "r1", "token"), AuditRecord("e1", NOW, "r1", "token")]
        new = stage.assess(wire, request, parties, proof, grant, scopes, attested_at, records[0], NOW)
        old = ref.assess_exchange(
            stage, wire, request, parties, proof, grant, scopes, attested_at, records[1], NOW
        )
        assert new == old
        assert _text(records[0].details) == _text(records[1].details)
        args = (wire.source_ip, grant.audiences, scopes, parties.depth, NOW + 1)
        learned, learned_before = stage.learn(new, *args), ref.learn_exchange(stage, old, *args)
        if learned is not None and learned_before is not None:
            # Newer than the reference: whether the grant changed the drift state it read, which
            # the store writes only then (revision 0012_baseline_drift).
            changed = any(getattr(learned.baseline, f) != getattr(new.baseline, f) for f in DRIFT_FIELDS)
            assert learned.drift_changed == changed
            learned = replace(learned, drift_changed=True)
        assert learned == learned_before
        if learned is not None and learned_before is not None:
            assert _typed(learned.baseline) == _typed(learned_before.baseline)


# -- the policy's choice of rule and what it grants ----------------------------------------------

POLICY_SUBJECTS = (
    "repo:acme/app:ref:refs/heads/main",
    "repo:acme/app:ref:refs/heads/dev",
    "repo:org1/x:main",
)
POLICY_SCOPES = ("deploy:read", "deploy:write", "admin")
POLICY_TARGETS = ("https://deploy.example.com", "https://reports.example.com")


def random_rule(rng: random.Random, index: int) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": f"r{index}",
        "issuer": rng.choice(("gh", "k8s")),
        "require_client_authentication": rng.random() < 0.3,
        "grant": {
            "audiences": list(_some(rng, POLICY_TARGETS, 2)) or [POLICY_TARGETS[0]],
            "scopes": list(_some(rng, POLICY_SCOPES)) or ["deploy:read"],
        },
    }
    if rng.random() < 0.4:
        raw["grant"]["default_scopes"] = raw["grant"]["scopes"][:1]
    if rng.random() < 0.2:
        raw["grant"]["resources"] = ["urn:resource:db"]
    kind = rng.random()
    if kind < 0.4:
        raw["subject"] = rng.choice(POLICY_SUBJECTS)
    elif kind < 0.7:
        raw["subject_pattern"] = rng.choice(("repo:acme/app:.*", "repo:org1/.*", "repo:.*:main"))
    else:
        raw["claims"] = {"env": rng.choice(("prod", "dev"))}
    if raw["require_client_authentication"] and rng.random() < 0.5:
        raw["clients"] = ["gateway"]
    return raw


@pytest.mark.parametrize("seed", range(4))
def test_policy_decision_is_what_it_was(seed: int) -> None:
    from sts.core.policy.compile import compile_policy
    from sts.core.policy.evaluate import evaluate
    from sts.core.policy.rules import PolicyRequest
    from sts.errors import OAuthError

    rng = random.Random(seed)
    granted = 0
    for _ in range(20):
        policy = compile_policy(
            [("random.yaml", {"rules": [random_rule(rng, i) for i in range(rng.randint(1, 8))]})],
            issuers=frozenset({"gh", "k8s"}),
            clients=frozenset({"gateway", "other"}),
            max_lifetime=3600,
        )
        for _ in range(CASES // 10):
            subject = rng.choice(POLICY_SUBJECTS)
            token = VerifiedToken(
                issuer_name=rng.choice(("gh", "k8s", "none")),
                issuer="https://issuer.example",
                subject=subject,
                claims={"sub": subject, "env": rng.choice(("prod", "dev", 1))},
                token_type="urn:ietf:params:oauth:token-type:jwt",
                issued_at=NOW,
                expires_at=NOW + 300,
                not_before=None,
                jti=None,
                sha256="0" * 64,
                typ="jwt",
            )
            request = PolicyRequest(
                _some(rng, POLICY_TARGETS, 2),
                rng.choice(((), ("urn:resource:db",))),
                rng.choice((None, _some(rng, (*POLICY_SCOPES, "unknown")))),
                rng.choice((None, "gateway", "other")),
            )
            # Each request twice: the second one is answered from what the first remembered.
            for _ in range(2):
                outcomes = []
                for decide_with in (evaluate, ref.evaluate_policy):
                    try:
                        outcomes.append(decide_with(policy, token, request))
                    except OAuthError as exc:
                        outcomes.append((type(exc), exc.reason, exc.detail))
                assert outcomes[0] == outcomes[1]
                granted += isinstance(outcomes[0], Grant)
    assert granted > CASES // 4  # the cases grant, not only refuse
