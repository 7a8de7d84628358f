"""Assurance levels, drift confirmation and their decisions, as pure functions of data and ``now``;
the policy section that writes them down; the resource-server challenge that asks for them.

End to end over HTTP: ``tests/e2e/test_stepup_e2e.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from sts_client.assurance import satisfies
from sts_client.errors import InsufficientUserAuthentication
from sts_client.verifier import TokenVerifier

from sts.adapters.policy_files import load_policies
from sts.adapters.redis.key_value import RedisBaselineStore
from sts.adapters.sql.engines import make_engine
from sts.adapters.sql.key_value import SqlBaselineStore
from sts.core.assurance import (
    ACR_ATTESTED,
    ACR_POP,
    ACR_POSTURE,
    KEY_CHANGED,
    KEY_CONTINUES,
    KEY_FIRST,
    KEY_NONE,
    Evidence,
    Need,
    Requirement,
    at_least,
    key_state,
    needed,
    posture_describes,
    posture_is_good,
    reached,
    shortfall,
)
from sts.core.baseline import BASELINE_TTL, Baseline, accept_pending
from sts.core.drift import EVIDENCE_ISSUED, DriftSettings, progress, review
from sts.core.risk import RiskContext, RiskSettings, assess
from sts.core.stepup import DENY, NARROW, STEP_UP, decide
from sts.errors import ConfigurationError, RiskRefused, StepUpRequired
from sts.migrations import upgrade
from tests.support.clients_support import AUDIENCE, FakeAuthorizationServer

NOW = 1_800_000_000.0
DEPLOY = "https://deploy.example.com"
WATCHED = ("runner_environment",)
CONFIRMED = Baseline(count=5, facts={"runner_environment": "github-hosted"})
PROBATION = DriftSettings(probation_exchanges=3, probation_period=3600)


# -- levels ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("evidence", "level"),
    [
        pytest.param(Evidence(), ACR_ATTESTED, id="bearer"),
        pytest.param(Evidence(key=KEY_FIRST), ACR_POP, id="first-key-becomes-the-identity's"),
        pytest.param(Evidence(key=KEY_CONTINUES), ACR_POP, id="key-continues"),
        pytest.param(Evidence(key=KEY_CHANGED), ACR_ATTESTED, id="changed-key-is-no-continuity"),
        pytest.param(
            Evidence(key=KEY_CONTINUES, posture_token=True), ACR_POSTURE, id="pop-and-posture-token"
        ),
        pytest.param(Evidence(key=KEY_FIRST, live_review=True), ACR_POSTURE, id="pop-and-live-review"),
        pytest.param(Evidence(posture_token=True, live_review=True), ACR_ATTESTED, id="posture-without-pop"),
        pytest.param(Evidence(key=KEY_CHANGED, posture_token=True), ACR_ATTESTED, id="posture-changed-key"),
        pytest.param(
            Evidence(key=KEY_CONTINUES, live_review=True, carried=ACR_POP), ACR_POP, id="re-exchange-caps"
        ),
        pytest.param(Evidence(key=KEY_CONTINUES, carried=""), ACR_ATTESTED, id="re-exchange-without-acr"),
        pytest.param(Evidence(carried=ACR_POSTURE), ACR_ATTESTED, id="re-exchange-never-raises"),
    ],
)
def test_reached_level(evidence: Evidence, level: str) -> None:
    assert reached(evidence) == level


def test_key_state_against_the_confirmed_keys() -> None:
    assert key_state({}, {"cnf_jkt": ("a",)}) == KEY_NONE
    assert key_state({"cnf_jkt": "a"}, {}) == KEY_FIRST
    assert key_state({"cnf_jkt": "a"}, {"cnf_jkt": ("a",)}) == KEY_CONTINUES
    assert key_state({"cnf_jkt": "b"}, {"cnf_jkt": ("a",)}) == KEY_CHANGED
    assert key_state({"cnf_jkt": "b"}, {"cnf_jkt": ("a", "b")}) == KEY_CONTINUES  # another replica's key
    assert key_state({"cnf_jkt": "a", "cnf_x5t": "c"}, {"cnf_jkt": ("a",)}) == KEY_CONTINUES
    assert key_state({"cnf_jkt": "a", "cnf_x5t": "c"}, {"cnf_jkt": ("a",), "cnf_x5t": ("d",)}) == KEY_CHANGED
    # A first key of one kind beside a confirmed key of the other, not proven too, is a new key: a
    # copied token with a fresh DPoP key must not reach pop where the workload's key is its client
    # certificate, nor a new certificate where it is a DPoP key (an outside audit).
    assert key_state({"cnf_jkt": "new"}, {"cnf_x5t": ("cert",)}) == KEY_CHANGED
    assert key_state({"cnf_x5t": "new"}, {"cnf_jkt": ("a",)}) == KEY_CHANGED
    assert key_state({"cnf_jkt": "new", "cnf_x5t": "cert"}, {"cnf_x5t": ("cert",)}) == KEY_CONTINUES


def test_requirements_combine_the_highest_level_and_the_smallest_age() -> None:
    requirements = (
        Requirement(acr=ACR_POP, max_attestation_age=300, scopes=frozenset({"secrets:read"})),
        Requirement(max_attestation_age=60, audiences=frozenset({"https://vault.example.com"})),
        Requirement(acr=ACR_ATTESTED),
    )
    assert needed(requirements, (DEPLOY,), ("deploy:read",)) == Need(ACR_ATTESTED, None, ("rule",))
    assert needed(requirements, (DEPLOY,), ("secrets:read",)) == Need(
        ACR_POP, 300, ("scope secrets:read", "rule")
    )
    both = needed(requirements, ("https://vault.example.com",), ("secrets:read",))
    assert (both.acr, both.max_age) == (ACR_POP, 60)
    asked = needed((), (DEPLOY,), (), requested=("urn:other", ACR_POSTURE, ACR_POP))
    assert asked == Need(ACR_POP, None, ("request acr_values",))  # the least demanding known one
    assert needed((), (DEPLOY,), (), requested=("urn:other",)) == Need()


def test_shortfall_and_acceptable_levels() -> None:
    need = Need(ACR_POP, 60)
    assert shortfall(need, ACR_ATTESTED, NOW - 5, NOW) == (True, False)
    assert shortfall(need, ACR_POSTURE, NOW - 61, NOW) == (False, True)
    assert shortfall(need, ACR_POP, None, NOW) == (False, True)
    assert shortfall(Need(), ACR_ATTESTED, None, NOW) == (False, False)
    assert at_least(ACR_POP) == (ACR_POP, ACR_POSTURE)
    assert posture_is_good({"p": "compliant"}, "p", {"compliant"})
    assert posture_is_good({"p": True}, "p", {"true"})
    assert not posture_is_good({"p": "compliant"}, None, {"compliant"})
    assert not posture_is_good({"p": 1}, "p", {"1"})


def test_the_client_library_orders_levels_the_same_way() -> None:
    assert satisfies(ACR_POSTURE, (ACR_POP,))
    assert not satisfies(ACR_ATTESTED, (ACR_POP, ACR_POSTURE))
    assert not satisfies(None, (ACR_ATTESTED,))
    assert satisfies("urn:custom", ("urn:custom",)) and not satisfies("urn:custom", (ACR_ATTESTED,))
    assert satisfies(None, ())


# -- drift confirmation ----------------------------------------------------------------------------


def drift(baseline: Baseline, value: Any, now: float, *, fresh: bool = True, **kwargs: Any) -> Any:
    current = {} if value is None else {"runner_environment": value}
    kwargs.setdefault("settings", PROBATION)
    return review(baseline, current, watched=WATCHED, now=now, fresh=fresh, **kwargs)


def test_fresh_attestation_does_not_confirm_a_change() -> None:
    result = drift(CONFIRMED, "self-hosted", NOW)
    assert result.changed == {"runner_environment": {"was": "github-hosted", "now": "self-hosted"}}
    assert result.baseline.facts == {"runner_environment": "github-hosted"}
    pending = result.baseline.pending["runner_environment"]
    assert (pending.value, pending.fresh_count, pending.fresh_since) == ("self-hosted", 1, NOW)
    assert result.clears == (
        {"by": "operator_accept"},
        {"by": "probation", "exchanges_left": 2, "not_before": int(NOW) + 3600, "max_age": 60},
    )


def test_probation_needs_n_fresh_exchanges_spread_over_t() -> None:
    baseline = CONFIRMED
    for moved, fresh, left in ((0, True, 2), (100, False, 2), (1800, True, 1), (1801, True, 1)):
        result = drift(baseline, "self-hosted", NOW + moved, fresh=fresh)
        assert result.changed, moved
        assert result.clears[1]["exchanges_left"] == left, moved
        baseline = result.baseline
    assert baseline.pending["runner_environment"].fresh_count == 3  # the stale one did not count
    result = drift(baseline, "self-hosted", NOW + 3600)
    assert not result.changed
    assert result.confirmed_now == {"runner_environment": "probation"}
    assert result.baseline.facts == {"runner_environment": "self-hosted"}
    assert result.baseline.pending == {}
    assert result.baseline.confirmed["runner_environment"] == {"how": "probation", "at": NOW + 3600}


def test_probation_is_completed_only_by_a_fresh_exchange() -> None:
    """N fresh exchanges at the start, then a stale token (a replayed old one) once the period has
    passed: not confirmed; the next fresh exchange confirms it."""
    baseline = CONFIRMED
    for moved in (0, 1, 2):
        baseline = drift(baseline, "self-hosted", NOW + moved).baseline
    stale = drift(baseline, "self-hosted", NOW + 3601, fresh=False)
    assert stale.changed and not stale.confirmed_now
    assert stale.clears[1]["exchanges_left"] == 1
    fresh = drift(stale.baseline, "self-hosted", NOW + 3602)
    assert fresh.confirmed_now == {"runner_environment": "probation"}


def test_a_token_presented_again_counts_once_for_probation() -> None:
    """Replaying one fresh token is not several attestations: three presentations of one token
    (one iat), then one new token after the period, is two fresh exchanges, not four."""
    baseline = CONFIRMED
    for moved in (0, 1, 2):
        baseline = drift(baseline, "self-hosted", NOW + moved, attested_at=NOW).baseline
    assert baseline.pending["runner_environment"].fresh_count == 1
    later = drift(baseline, "self-hosted", NOW + 3600, attested_at=NOW + 3599)
    assert later.changed and not later.confirmed_now
    assert later.clears[1]["exchanges_left"] == 1


def test_one_token_alone_cannot_complete_a_short_probation() -> None:
    """With ``probation_period`` within ``step_up_max_age`` one token stays fresh for the whole
    period: presented again and again, it is still one attestation."""
    settings = replace(PROBATION, probation_period=40)
    baseline = CONFIRMED
    for moved in (0, 20, 41, 42):
        result = drift(baseline, "self-hosted", NOW + moved, attested_at=NOW, settings=settings)
        assert result.changed, moved
        baseline = result.baseline
    assert baseline.pending["runner_environment"].fresh_count == 1


def test_a_stale_token_with_another_value_leaves_the_probation_under_way() -> None:
    baseline = CONFIRMED
    for moved in (0, 1):
        baseline = drift(baseline, "self-hosted", NOW + moved, attested_at=NOW + moved).baseline
    stale = drift(baseline, "another-runner", NOW + 5, fresh=False)
    assert stale.changed  # refused all the same
    pending = stale.baseline.pending["runner_environment"]
    assert (pending.value, pending.fresh_count) == ("self-hosted", 2)


def test_another_new_value_restarts_the_probation() -> None:
    first = drift(CONFIRMED, "self-hosted", NOW).baseline
    other = drift(first, "another-runner", NOW + 10)
    assert other.baseline.pending["runner_environment"].value == "another-runner"
    assert other.baseline.pending["runner_environment"].fresh_count == 1


def test_evidence_the_rule_names_confirms_at_once_and_a_gone_fact_too() -> None:
    settings = replace(PROBATION, evidence=frozenset({"posture_token"}))
    shown = drift(CONFIRMED, None, NOW, settings=settings, shown=frozenset({"posture_token"}))
    assert shown.confirmed_now == {"runner_environment": "posture_token"}
    assert "runner_environment" not in shown.baseline.facts
    offered = drift(
        CONFIRMED, "self-hosted", NOW, settings=settings, presentable=frozenset({"posture_token"})
    )
    assert offered.remedies == ("posture_token",) and offered.acr_values == (ACR_POSTURE,)
    assert offered.clears[-1] == {"by": "posture_token", "acr_values": [ACR_POSTURE]}
    # Evidence the rule does not name is none.
    assert drift(CONFIRMED, "self-hosted", NOW, presentable=frozenset({"posture_token"})).remedies == ()


def test_a_new_key_cannot_vouch_for_itself() -> None:
    baseline = Baseline(count=5, facts={"cnf_jkt": "old", "runner_environment": "github-hosted"})
    settings = replace(PROBATION, evidence=frozenset({"pop_key_continuity"}))
    result = review(
        baseline,
        {"cnf_jkt": "new", "runner_environment": "self-hosted"},
        watched=(*WATCHED, "cnf_jkt"),
        now=NOW,
        fresh=True,
        settings=settings,
        shown=frozenset({"pop_key_continuity"}),
        presentable=frozenset({"pop_key_continuity"}),
    )
    assert set(result.changed) == {"cnf_jkt"}  # the runner is confirmed by the evidence...
    assert result.confirmed_now == {"runner_environment": "pop_key_continuity"}
    assert result.remedies == ()  # ...but nothing the workload can present confirms a new key


def test_a_key_issued_at_pop_confirms_only_the_keys_presented() -> None:
    """``issued_at_pop`` confirms the keys a re-exchanged token of ours is bound to and presents, at
    once; a watched key the request does not present stays the identity's (a review: a token bound
    to a certificate alone, re-exchanged, wiped the identity's confirmed DPoP key)."""
    baseline = Baseline(count=5, facts={"cnf_jkt": "k1"})
    result = review(
        baseline,
        {"cnf_x5t": "t1"},
        watched=(*WATCHED, "cnf_jkt"),
        now=NOW,
        fresh=True,
        settings=PROBATION,
        shown=frozenset({EVIDENCE_ISSUED}),
    )
    assert result.baseline.facts["cnf_jkt"] == "k1"
    assert "cnf_jkt" not in result.confirmed_now
    # A presented key of the token of ours is confirmed at once, the earlier one kept beside it.
    moved = review(
        baseline, {"cnf_jkt": "k2"}, watched=WATCHED, now=NOW, fresh=False, settings=PROBATION,
        shown=frozenset({EVIDENCE_ISSUED}),
    )  # fmt: skip
    assert moved.confirmed_now == {"cnf_jkt": EVIDENCE_ISSUED} and not moved.changed
    assert moved.baseline.confirmed_values("cnf_jkt") == ("k2", "k1")


def test_keys_are_kept_for_the_levels_even_when_not_watched() -> None:
    first = review(Baseline(), {"cnf_jkt": "k1"}, watched=(), now=NOW, fresh=True, settings=PROBATION)
    assert first.baseline.facts == {"cnf_jkt": "k1"} and not first.changed
    changed = review(first.baseline, {"cnf_jkt": "k2"}, watched=(), now=NOW, fresh=True, settings=PROBATION)
    assert not changed.changed  # not watched: no drift signal, but the new key waits for confirmation
    assert changed.baseline.facts == {"cnf_jkt": "k1"} and changed.baseline.pending["cnf_jkt"].value == "k2"
    bearer = review(first.baseline, {}, watched=(), now=NOW, fresh=True, settings=PROBATION)
    assert bearer.baseline == first.baseline  # a bearer request leaves the key alone


def test_a_key_of_the_other_kind_is_not_confirmed_on_sight() -> None:
    """The identity's key is its client certificate: a DPoP key alone is a new key, which waits for
    confirmation like a changed one (else the next request with it would be continuity, and pop);
    shown beside the confirmed certificate, it is the same holder's, confirmed at once."""
    certified = review(Baseline(), {"cnf_x5t": "cert"}, watched=(), now=NOW, fresh=True, settings=PROBATION)
    alone = review(
        certified.baseline, {"cnf_jkt": "k"}, watched=("cnf_jkt",), now=NOW, fresh=True, settings=PROBATION
    )
    assert "cnf_jkt" not in alone.baseline.facts and alone.baseline.pending["cnf_jkt"].value == "k"
    assert alone.changed == {"cnf_jkt": {"was": None, "now": "k"}}
    both = {"cnf_x5t": "cert", "cnf_jkt": "k"}
    together = review(certified.baseline, both, watched=("cnf_jkt",), now=NOW, fresh=True, settings=PROBATION)
    assert together.baseline.facts["cnf_jkt"] == "k" and not together.changed


def test_a_confirmed_new_key_joins_the_identitys_keys() -> None:
    """Replicas keep their own keys: confirming a new one keeps the earlier ones (bounded)."""
    baseline = Baseline(count=5, facts={"cnf_jkt": "k1"})
    for i in range(2, 12):
        seen = review(baseline, {"cnf_jkt": f"k{i}"}, watched=(), now=NOW, fresh=True, settings=PROBATION)
        baseline = accept_pending(seen.baseline, NOW)
    assert baseline.facts["cnf_jkt"] == "k11"
    assert baseline.other_keys["cnf_jkt"] == tuple(f"k{i}" for i in range(3, 11))  # the 8 most recent
    assert baseline.confirmed_keys() == {"cnf_jkt": ("k11", *(f"k{i}" for i in range(3, 11)))}
    again = review(baseline, {"cnf_jkt": "k5"}, watched=("cnf_jkt",), now=NOW, fresh=True, settings=PROBATION)
    assert not again.changed and again.baseline == baseline
    assert Baseline.from_json(baseline.to_json()) == baseline
    # Other facts keep one confirmed value: the old runner is drift once the new one is confirmed.
    runner = accept_pending(drift(CONFIRMED, "self-hosted", NOW).baseline, NOW)
    assert runner.other_keys == {} and drift(runner, "github-hosted", NOW).changed


def test_a_refusal_keeps_probation_progress_but_not_first_sightings() -> None:
    reviewed = review(
        CONFIRMED,
        {"runner_environment": "self-hosted", "node": "n1"},
        watched=(*WATCHED, "node"),
        now=NOW,
        fresh=True,
        settings=PROBATION,
    )
    kept = progress(CONFIRMED, reviewed)
    assert kept.facts == CONFIRMED.facts and "node" not in kept.facts
    assert kept.pending["runner_environment"].fresh_count == 1


def test_operator_accept_confirms_pending_values() -> None:
    pending = drift(CONFIRMED, "self-hosted", NOW).baseline
    accepted = accept_pending(pending, NOW + 5)
    assert accepted.facts == {"runner_environment": "self-hosted"} and accepted.pending == {}
    assert accepted.confirmed["runner_environment"] == {"how": "operator_accept", "at": NOW + 5}
    assert accept_pending(pending, NOW, ["other"]) == pending


def test_baselines_stored_before_confirmation_existed_still_read() -> None:
    old = (
        '{"first_seen": 1.0, "last_seen": 2.0, "count": 7, "facts": {"runner_environment": "github-hosted"}}'
    )
    baseline = Baseline.from_json(old)
    assert (baseline.count, baseline.facts, baseline.pending, baseline.confirmed) == (
        7,
        {"runner_environment": "github-hosted"},
        {},
        {},
    )
    pending = drift(baseline, "self-hosted", NOW).baseline
    assert Baseline.from_json(pending.to_json()) == pending
    broken = json.loads(pending.to_json())
    broken["pending"]["runner_environment"] = {"value": ["a list"], "first_seen": 1}
    assert Baseline.from_json(json.dumps(broken)) == Baseline()  # corrupt: a new (learning) one


@pytest.fixture
def redis_client(fresh_redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(fresh_redis_url, socket_timeout=2)
    yield client
    client.close()


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_pending_facts_survive_both_stores(
    store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if store == "redis":
        backend: Any = RedisBaselineStore(request.getfixturevalue("redis_client"))
    else:
        engine = make_engine(f"sqlite:///{tmp_path / 'b.sqlite'}")
        upgrade(engine)
        backend = SqlBaselineStore(engine, clock=time.time)
    baseline = replace(
        drift(CONFIRMED, "self-hosted", NOW).baseline,
        confirmed={"runner_environment": {"how": "first_seen", "at": NOW - 9}},
    )
    backend.save("upstream|sub", baseline, BASELINE_TTL)
    assert backend.load("upstream|sub") == baseline


# -- decisions -------------------------------------------------------------------------------------


def risk_context(**changes: Any) -> RiskContext:
    base = RiskContext(
        identity="upstream|sub",
        facts={"runner_environment": "self-hosted"},
        claims={},
        source_ip="10.1.2.3",
        audiences=(DEPLOY,),
        scopes=("deploy:read",),
        delegation_depth=0,
        attested_at=NOW - 5,
        now=NOW,
        baseline=replace(CONFIRMED, networks=("10.1.2.0/24",), audiences=(DEPLOY,), scopes=("deploy:read",)),
    )
    return replace(base, **changes)


CFG = RiskSettings(stable_facts=WATCHED)


@pytest.mark.parametrize(
    ("changes", "settings", "action", "acr_values"),
    [
        pytest.param({}, {}, DENY, (), id="fresh-drift-nothing-presentable-deny"),
        pytest.param({"attested_at": NOW - 600}, {}, DENY, (), id="stale-drift-renewing-would-not-help"),
        pytest.param(
            {"evidence_presentable": frozenset({"pop_key_continuity"})},
            {"drift": DriftSettings(evidence=frozenset({"pop_key_continuity"}))},
            STEP_UP,
            (ACR_POP, ACR_POSTURE),
            id="evidence-the-workload-can-present-step-up",
        ),
        pytest.param({}, {"weights": {"attestation_drift": 40}}, NARROW, (), id="drift-in-the-narrow-band"),
        pytest.param({}, {"mode": "observe"}, DENY, (), id="observe-records-the-deny"),
    ],
)
def test_unconfirmed_drift_decisions(
    changes: dict[str, Any], settings: dict[str, Any], action: str, acr_values: tuple[str, ...]
) -> None:
    cfg = replace(CFG, **settings)
    decision = decide(assess(risk_context(**changes), cfg), cfg, ("deploy:read",))
    assert decision.action == action
    assert decision.acr_values == acr_values
    assert decision.enforced is (cfg.mode == "enforce")
    assert [c["by"] for c in decision.clears][:2] == ["operator_accept", "probation"]
    assert decision.clears[0] == {"by": "operator_accept", "identity": "upstream|sub"}
    assert decision.as_dict()["clears"] == [dict(c) for c in decision.clears]


def test_refusals_carry_what_clears_them() -> None:
    clears = ({"by": "operator_accept"},)
    assert RiskRefused("risk.denied", signals=("attestation_drift",), clears=clears).body()["risk"] == {
        "decision": "deny",
        "signals": ["attestation_drift"],
        "clears": [{"by": "operator_accept"}],
    }
    body = StepUpRequired("assurance.level_too_low", max_age=None, acr_values=(ACR_POP, ACR_POSTURE)).body()
    assert body == {
        "error": "insufficient_user_authentication",
        "error_description": "A higher assurance level is required: present what acr_values names and "
        "exchange again.",
        "acr_values": f"{ACR_POP} {ACR_POSTURE}",
        "step_up": {"required": "assurance_level", "acr_values": [ACR_POP, ACR_POSTURE], "signals": []},
    }


# -- policy ----------------------------------------------------------------------------------------

RULE = {
    "name": "deploy",
    "issuer": "upstream",
    "subject": "repo:acme/app:ref:refs/heads/main",
    "require_client_authentication": False,
    "grant": {"audiences": [DEPLOY], "scopes": ["deploy:read", "secrets:read"]},
}


def load(tmp_path: Path, **extra: Any) -> Any:
    path = tmp_path / "levels.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "rules": [{**RULE, **extra}]}, sort_keys=False))
    return load_policies([path], issuers=frozenset({"upstream"}), clients=frozenset(), max_lifetime=3600)


def test_assurance_and_drift_settings_compile(tmp_path: Path) -> None:
    rule = load(
        tmp_path,
        assurance=[
            {"scopes": ["secrets:read"], "acr": ACR_POP, "max_attestation_age": 60},
            {"acr": ACR_ATTESTED},
        ],
        risk={"posture_fact": "p", "drift_evidence": ["posture_token"], "probation_exchanges": 5,
              "probation_period": 86400},
    ).rules[0]  # fmt: skip
    assert rule.assurance == (
        Requirement(ACR_POP, 60, frozenset({"secrets:read"})),
        Requirement(ACR_ATTESTED),
    )
    assert rule.risk.drift == DriftSettings(5, 86400, frozenset({"posture_token"}))
    assert load(tmp_path, risk={}).rules[0].risk.drift == DriftSettings(3, 3600, frozenset())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"assurance": [{"acr": "urn:other"}]}, "acr"),
        ({"assurance": [{"scopes": ["secrets:read"]}]}, "assurance"),
        ({"assurance": [{"acr": ACR_POP, "scopes": ["admin"]}]}, "scopes not in grant.scopes: admin"),
        ({"assurance": [{"acr": ACR_POP, "audiences": ["https://x"]}]}, "audiences not granted"),
        ({"risk": {"drift_evidence": ["posture_token"]}}, "needs risk.posture_fact"),
        ({"risk": {"drift_evidence": ["a_hunch"]}}, "drift_evidence"),
        ({"risk": {"probation_exchanges": 0}}, "probation_exchanges"),
    ],
)
def test_assurance_and_drift_mistakes_are_refused_at_load(
    tmp_path: Path, extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        load(tmp_path, **extra)
    assert message in str(info.value)


# -- the resource server's challenge ---------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeAuthorizationServer]:
    server = FakeAuthorizationServer()
    yield server
    server.stop()


def test_a_route_requiring_a_level_answers_rfc_9470_style(fake: FakeAuthorizationServer) -> None:
    verifier = TokenVerifier(fake.issuer, AUDIENCE)
    url = AUDIENCE + "/secrets"
    now = time.time()
    bearer = fake.mint(now=now, acr=ACR_ATTESTED)
    with pytest.raises(InsufficientUserAuthentication) as info:
        verifier.verify(
            "GET", url, {"Authorization": f"Bearer {bearer}"}, acr_values=ACR_POP, max_age=60, now=now
        )
    assert info.value.reason == "acr.too_low"
    assert [value for name, value in info.value.headers() if name == "WWW-Authenticate"] == [
        'Bearer error="insufficient_user_authentication", '
        'error_description="A higher assurance level is required.", '
        f'acr_values="{ACR_POP} {ACR_POSTURE}", max_age="60"'
    ]
    assert info.value.body() == {
        "error": "insufficient_user_authentication",
        "error_description": "A higher assurance level is required.",
        "acr_values": f"{ACR_POP} {ACR_POSTURE}",
        "max_age": 60,
    }
    # A higher level than the least one named will do; no acr at all will not.
    posture = fake.mint(now=now, acr=ACR_POSTURE)
    assert verifier.verify("GET", url, {"Authorization": f"Bearer {posture}"}, acr_values=[ACR_POP]).acr == (
        ACR_POSTURE
    )
    with pytest.raises(InsufficientUserAuthentication) as info:
        verifier.verify("GET", url, {"Authorization": f"Bearer {fake.mint(now=now)}"}, acr_values=ACR_POP)
    assert info.value.reason == "acr.missing"
    # Old attestation at the right level: the challenge still names the level, with max_age.
    old = fake.mint(now=now, acr=ACR_POP, auth_time=int(now) - 600)
    with pytest.raises(InsufficientUserAuthentication) as info:
        verifier.verify(
            "GET", url, {"Authorization": f"Bearer {old}"}, acr_values=ACR_POP, max_age=60, now=now
        )
    assert (info.value.reason, info.value.max_age, info.value.acr_values) == (
        "auth_time.too_old",
        60,
        (ACR_POP, ACR_POSTURE),
    )
    # ... but says what fell short: the attestation's age, not the level (an outside audit).
    assert info.value.body()["error_description"] == "More recent attestation is required."


# -- the token endpoint ----------------------------------------------------------------------------


def test_the_request_can_ask_for_a_level_and_the_token_says_which_it_reached(
    client: Any, upstream: Any, app: Any
) -> None:
    from joserfc import jwt as jose_jwt
    from joserfc.jwk import KeySet

    from tests.conftest import STS_ISSUER, exchange_form

    def exchange(**params: Any) -> Any:
        token = upstream.issuer.github_actions_token(audience=STS_ISSUER)
        return client.post("/token", data=exchange_form(token, audience=DEPLOY, **params))

    granted = exchange(acr_values=f"urn:other {ACR_ATTESTED}")
    assert granted.status_code == 200, granted.get_json()
    keys = KeySet.import_key_set(client.get("/.well-known/jwks.json").get_json())
    claims = jose_jwt.decode(granted.get_json()["access_token"], keys, algorithms=["ES256"])
    assert claims.claims["acr"] == ACR_ATTESTED and isinstance(claims.claims["auth_time"], int)

    refused = exchange(acr_values=ACR_POP)
    assert refused.status_code == 400 and refused.headers["Cache-Control"] == "no-store"
    assert refused.get_json() == {
        "error": "insufficient_user_authentication",
        "error_description": "A higher assurance level is required: present what acr_values names and "
        "exchange again.",
        "acr_values": f"{ACR_POP} {ACR_POSTURE}",
        "step_up": {"required": "assurance_level", "acr_values": [ACR_POP, ACR_POSTURE], "signals": []},
    }
    record = app.extensions["sts"].audit.recent(1)[0]
    assert record["reasons"][-1] == "assurance.level_too_low"
    assert record["details"]["assurance"]["because"] == ["request acr_values"]

    for bad, reason in (
        ("urn:other", "request.unsupported_acr_values"),
        (f"{ACR_POP}  x", "request.malformed"),
    ):
        resp = exchange(acr_values=bad)
        assert resp.get_json()["error"] == "invalid_request", bad
        assert app.extensions["sts"].audit.recent(1)[0]["reasons"][-1].startswith(reason)


def test_a_posture_token_is_about_this_instance_where_it_names_a_stable_fact() -> None:
    """Each stable fact a posture token names, the subject token must show with the same value,
    compared as JSON values (reviews: the text ``"null"`` matched a fact the subject does not show,
    and numbers nested in a fact were compared as written)."""
    names = ("runner_environment", "node")
    assert posture_describes({"runner_environment": "a"}, {"runner_environment": "a"}, names)
    assert not posture_describes({"runner_environment": "a"}, {"runner_environment": "b"}, names)
    assert not posture_describes({"runner_environment": "null"}, {}, names)
    assert not posture_describes({"runner_environment": "a"}, {"node": "n"}, names)
    assert posture_describes({"runner_environment": None}, {"runner_environment": "a"}, names)
    assert posture_describes({"device": "x"}, {}, names)
    assert posture_describes({"node": 7.0}, {"node": "7"}, names)
    assert posture_describes(
        {"node": {"id": 123456.0, "z": [1.0]}}, {"node": {"z": [1], "id": 123456}}, names
    )
    assert not posture_describes({"node": True}, {"node": "True"}, names)
