"""Risk and step-up over HTTP: the same workload, granted, narrowed, asked to step up, then renewed.

Every exchange goes through the real Flask app against a development issuer
serving its JWKS over HTTP.  The app's clock is a parameter; upstream tokens
are minted at (or before) that time, and time moves by setting the clock.
The source address of each request is set with ``environ_base``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from sts.app import create_app
from sts.core.baseline import LEARNING_EXCHANGES, Baseline
from sts.core.subject_state import STATE_TTL, SubjectState
from sts.dev.issuer import DevIssuer, RunningServer
from sts.errors import ConfigurationError
from sts.settings import Settings
from sts.wiring.runtime import Runtime
from tests.conftest import ACCESS_TOKEN_TYPE, STS_ISSUER, exchange_form, upstream_issuer
from tests.support.clock import Clock
from tests.support.postgres import PgSchema
from tests.support.redis_server import url_of

SUBJECT = "repo:acme/app:ref:refs/heads/main"
IDENTITY = f"upstream|{SUBJECT}"
DEPLOY = "https://deploy.example.com"
HOME = "10.1.2.3"
SIGNAL_NAMES = [
    "unusual_network",
    "attestation_drift",
    "stale_posture",
    "recent_failures",
    "elevated_privilege",
    "unexpected_s2s",
    "shared_signal",
]


def rule(name: str = "deploy", *, issuer: str = "upstream", **extra: Any) -> dict[str, Any]:
    """The GitHub job's rule: deploy:read by default, deploy:write when asked, 300 s at most."""
    return {
        "name": name,
        "issuer": issuer,
        "subject": SUBJECT,
        "require_client_authentication": False,
        "grant": {
            "audiences": [DEPLOY],
            "scopes": ["deploy:read", "deploy:write"],
            "default_scopes": ["deploy:read"],
            "max_lifetime": 300,
        },
        **extra,
    }


def policy(*rules: dict[str, Any]) -> dict[str, Any]:
    return {"version": 1, "rules": list(rules)}


PRIVILEGED = {"privileged_scopes": ["deploy:write"]}


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningServer]:
    """Overrides conftest's per-test issuer: one RSA key for the module keeps the file fast."""
    with DevIssuer.serve_ephemeral(alg="RS256") as server:
        yield server


@dataclass
class STS:
    app: Flask
    web: FlaskClient
    clock: Clock
    issuer: DevIssuer

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.app.extensions["sts"]
        return runtime

    def token(self, *, age: float = 0, **claims: Any) -> str:
        """A GitHub Actions token for SUBJECT issued ``age`` seconds ago, valid 600 s more."""
        return self.issuer.github_actions_token(
            audience=STS_ISSUER, now=self.clock.now - age, lifetime=int(age) + 600, **claims
        )

    def exchange(self, token: str, *, source: str = HOME, **params: Any) -> TestResponse:
        params.setdefault("audience", DEPLOY)
        return self.web.post(
            "/token", data=exchange_form(token, **params), environ_base={"REMOTE_ADDR": source}
        )

    def granted(self, token: str, **kwargs: Any) -> dict[str, Any]:
        resp = self.exchange(token, **kwargs)
        assert resp.status_code == 200, (resp.get_json(), self.last()["reasons"])
        body: dict[str, Any] = resp.get_json()
        return body

    def last(self) -> dict[str, Any]:
        record: dict[str, Any] = self.runtime.audit.recent(1)[0]
        return record

    def risk(self) -> dict[str, Any]:
        risk: dict[str, Any] = self.last()["details"]["risk"]
        return risk

    def fired(self) -> list[str]:
        return [s["name"] for s in self.risk()["signals"] if s["fired"]]

    def baseline(self) -> Baseline:
        assert self.runtime.baselines is not None
        return self.runtime.baselines.load(IDENTITY)

    def learn(self, n: int = LEARNING_EXCHANGES) -> None:
        """Finish the learning state: ``n`` ordinary exchanges from HOME."""
        for _ in range(n):
            assert self.granted(self.token(), scope="deploy:read")["expires_in"] == 300
            self.clock.now += 1


@pytest.fixture
def make_sts(make_settings: Callable[..., Settings], upstream: RunningServer) -> Callable[..., STS]:
    def build(rules: dict[str, Any], **overrides: Any) -> STS:
        clock = Clock(float(int(time.time())))
        app = create_app(make_settings(rules, **overrides), clock=clock)
        return STS(app, app.test_client(), clock, upstream.issuer)

    return build


@pytest.fixture
def redis_db(fresh_redis_url: str) -> Iterator[redis.Redis]:
    """An empty database of this run's private redis-server (see tests/support/redis_server.py)."""
    client = redis.Redis.from_url(fresh_redis_url, socket_timeout=2)
    yield client
    client.close()


@pytest.fixture(params=["embedded", "redis"])
def store(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "redis":
        db: redis.Redis = request.getfixturevalue("redis_db")
        return {"store": "redis", "redis_url": url_of(db)}
    return {}


def assert_no_store(resp: TestResponse) -> None:
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Content-Type"] == "application/json"


# -- the scenario of the issue ------------------------------------------------------------------


def test_full_then_narrowed_then_step_up_then_full_again(make_sts: Callable[..., STS]) -> None:
    sts = make_sts(policy(rule(risk=PRIVILEGED)))

    # 1. Usual behaviour: full tokens while the baseline learns.
    first = sts.granted(sts.token(), scope="deploy:read")
    assert (first["scope"], first["expires_in"]) == ("deploy:read", 300)
    assert sts.risk()["learning"] is True
    sts.learn(LEARNING_EXCHANGES - 1)
    assert not sts.baseline().learning

    # 2. A privileged request from a network never seen: issued, but narrowed and shorter.
    narrowed = sts.granted(sts.token(), source="192.0.2.77", scope="deploy:read deploy:write")
    assert narrowed["scope"] == "deploy:read"
    assert narrowed["expires_in"] == 165 < 300  # 300 * (1 - (15 + 30) / 100)
    assert sts.fired() == ["unusual_network", "elevated_privilege"]
    assert sts.risk()["decision"]["action"] == "narrow"
    record = sts.last()
    assert record["outcome"] == "granted" and "risk.scope_narrowed" in record["reasons"]
    assert record["granted_scope"] == ["deploy:read"] and record["granted_lifetime"] == 165

    # 3. Drift: a self-hosted runner. Its token is fresh (CI tokens always are), which does not
    #    confirm the change; nothing the workload can present would, so it is refused, saying what would.
    sts.clock.now += 5
    resp = sts.exchange(sts.token(runner_environment="self-hosted"), scope="deploy:read")
    assert resp.status_code == 400
    assert_no_store(resp)
    body = resp.get_json()
    assert body["error"] == "invalid_request"
    assert body["risk"]["decision"] == "deny"
    assert body["risk"]["signals"] == ["attestation_drift"]
    assert body["risk"]["clears"] == [
        {"by": "operator_accept", "identity": IDENTITY},
        {"by": "probation", "exchanges_left": 2, "not_before": int(sts.clock.now) + 3600, "max_age": 60},
    ]
    assert "self-hosted" not in resp.get_data(as_text=True)  # the evidence stays in the audit record
    drift = next(s for s in sts.risk()["signals"] if s["name"] == "attestation_drift")
    assert drift["evidence"]["changed"] == {
        "runner_environment": {"was": "github-hosted", "now": "self-hosted"}
    }
    assert sts.last()["reasons"][-1] == "risk.denied"
    assert sts.risk()["baseline"]["facts"]["runner_environment"] == {
        "value": "github-hosted",
        "confirmed": False,
        "how": "first_seen",
        "pending": {"value": "self-hosted", "fresh_exchanges": 1, "since": sts.clock.now},
    }

    # 4. Renewing changes nothing: the baseline has not moved, the new value is still pending.
    sts.clock.now += 5
    resp = sts.exchange(sts.token(runner_environment="self-hosted"), scope="deploy:read")
    assert resp.get_json()["risk"]["clears"][1]["exchanges_left"] == 1
    assert sts.baseline().facts["runner_environment"] == "github-hosted"
    assert sts.baseline().pending["runner_environment"].fresh_count == 2
    # The old runner environment is still the confirmed one.
    assert sts.granted(sts.token(), scope="deploy:read")["expires_in"] == 300


def test_observe_mode_enforces_nothing_but_records_everything(make_sts: Callable[..., STS]) -> None:
    risk = {"mode": "observe", "networks": ["10.0.0.0/8"], **PRIVILEGED}
    sts = make_sts(policy(rule(risk=risk)))
    body = sts.granted(sts.token(age=120), source="192.0.2.77", scope="deploy:read deploy:write")
    assert (body["scope"], body["expires_in"]) == ("deploy:read deploy:write", 300)
    record = sts.risk()
    assert record["mode"] == "observe"
    assert [s["name"] for s in record["signals"]] == SIGNAL_NAMES
    assert all({"name", "fired", "weight", "reason", "evidence"} <= set(s) for s in record["signals"])
    assert sts.fired() == ["unusual_network", "elevated_privilege"]
    assert record["score"] == 60
    # What it would have done: ask for fresh attestation (the token is 120 s old).
    assert record["decision"]["action"] == "step_up"
    assert record["decision"]["enforced"] is False
    assert record["decision"]["fired"] == ["unusual_network", "elevated_privilege"]
    assert sts.last()["granted_scope"] == ["deploy:read", "deploy:write"]
    # Observing still learns.
    assert sts.baseline().count == 1


def test_deny_band_refuses_with_a_risk_member(make_sts: Callable[..., STS]) -> None:
    risk = {"networks": ["10.0.0.0/8"], "weights": {"unusual_network": 70}, **PRIVILEGED}
    sts = make_sts(policy(rule(risk=risk)))
    resp = sts.exchange(sts.token(), source="192.0.2.77", scope="deploy:write")
    assert resp.status_code == 400
    assert_no_store(resp)
    assert resp.get_json() == {
        "error": "invalid_request",
        "error_description": "The request is refused for risk; the risk member says which signals.",
        "risk": {"decision": "deny", "signals": ["unusual_network", "elevated_privilege"]},
    }
    record = sts.last()
    assert record["outcome"] == "refused" and record["reasons"][-1] == "risk.denied"
    assert record["details"]["risk"]["score"] == 100
    # From inside the declared networks the same request is only narrowed to nothing: step up.
    resp = sts.exchange(sts.token(age=120), source=HOME, scope="deploy:write")
    assert resp.get_json()["error"] == "insufficient_user_authentication"
    assert sts.granted(sts.token(), source=HOME, scope="deploy:read")["expires_in"] == 300


def test_privileged_request_narrowed_to_nothing_steps_up_once_then_is_refused(
    make_sts: Callable[..., STS],
) -> None:
    """Renewing cannot make a privileged scope less privileged: one step-up, then a plain refusal."""
    sts = make_sts(policy(rule(risk=PRIVILEGED)))
    resp = sts.exchange(sts.token(age=120), scope="deploy:write")
    assert resp.get_json()["error"] == "insufficient_user_authentication"
    assert resp.get_json()["step_up"]["signals"] == ["elevated_privilege"]
    resp = sts.exchange(sts.token(), scope="deploy:write")  # renewed, as asked
    assert resp.status_code == 400
    assert_no_store(resp)
    assert resp.get_json()["risk"] == {"decision": "deny", "signals": ["elevated_privilege"]}
    assert sts.last()["reasons"][-1] == "risk.narrowed_to_nothing"
    # Asked with something unprivileged, the rest is issued.
    body = sts.granted(sts.token(), scope="deploy:read deploy:write")
    assert (body["scope"], body["expires_in"]) == ("deploy:read", 210)


def test_recent_failures_accumulate_from_refusals_and_then_fire(make_sts: Callable[..., STS]) -> None:
    sts = make_sts(policy(rule(risk={"max_failures": 3, "failure_window": 600})))
    for n in range(3):
        assert sts.granted(sts.token(), scope="deploy:read")["expires_in"] == 300, n
        resp = sts.exchange(sts.token(), audience="https://elsewhere.example.com")
        assert resp.get_json()["error"] == "invalid_target"
        sts.clock.now += 10
    assert len(sts.baseline().failures) == 3
    body = sts.granted(sts.token(), scope="deploy:read")
    assert body["expires_in"] == 210  # 300 * (1 - 30 / 100)
    assert sts.fired() == ["recent_failures"]
    failures = next(s for s in sts.risk()["signals"] if s["name"] == "recent_failures")
    assert failures["evidence"] == {"count": 3, "window": 600}
    # Once the refusals are older than the window, they no longer count.
    sts.clock.now += 600
    assert sts.granted(sts.token(), scope="deploy:read")["expires_in"] == 300
    assert sts.fired() == []


def test_recent_failures_count_for_a_subject_longer_than_the_record_keeps(
    make_sts: Callable[..., STS],
) -> None:
    """The record keeps 500 characters of the subject; refusals were counted under that cut
    subject, an identity nobody reads, so a long branch name never fired recent_failures (an
    outside audit)."""
    ref = "refs/heads/" + "b" * 530
    subject = f"repo:acme/app:ref:{ref}"
    sts = make_sts(policy({**rule(risk={"max_failures": 3, "failure_window": 600}), "subject": subject}))
    assert sts.granted(sts.token(ref=ref), scope="deploy:read")["expires_in"] == 300  # its baseline
    for _ in range(3):
        resp = sts.exchange(sts.token(ref=ref), audience="https://elsewhere.example.com")
        assert resp.get_json()["error"] == "invalid_target"
        sts.clock.now += 10
    assert sts.runtime.baselines is not None
    assert len(sts.runtime.baselines.load(f"upstream|{subject}").failures) == 3
    assert sts.granted(sts.token(ref=ref), scope="deploy:read")["expires_in"] == 210
    assert sts.fired() == ["recent_failures"]


def test_a_strangers_refusals_leave_no_failures(
    make_sts: Callable[..., STS], every_store: dict[str, Any]
) -> None:
    """Any repository can get a valid token from a public issuer: its refusals left a baseline row
    or Redis key each, kept 30 days, that nothing reads (an outside audit grew them by one per
    request).  Refusals count for an identity with a live baseline only: one granted here, under
    a rule that keeps one.  (Choosing by the policy's rules instead left holes for rules that name
    no subject, and dropped known workloads' refusals: three outside reviews.)"""
    sts = make_sts(policy(rule(risk={"max_failures": 3, "failure_window": 600})), **every_store)
    baselines = sts.runtime.baselines
    assert baselines is not None
    # A stranger, refused by the policy or for the audience it asks: nothing kept.
    for repository, audience in (("evil/app", DEPLOY), ("evil/lib", "https://elsewhere.example.com")):
        resp = sts.exchange(sts.token(repository=repository, owner="evil"), audience=audience)
        assert resp.status_code == 400
        assert baselines.load(f"upstream|repo:{repository}:ref:refs/heads/main").failures == ()
    # The workload the rule is for: nothing either until it is granted here; then its refusals count.
    resp = sts.exchange(sts.token(), audience="https://elsewhere.example.com")
    assert resp.get_json()["error"] == "invalid_target" and sts.baseline().failures == ()
    assert sts.granted(sts.token(), scope="deploy:read")["expires_in"] == 300
    resp = sts.exchange(sts.token(), audience="https://elsewhere.example.com")
    assert resp.get_json()["error"] == "invalid_target"
    assert len(sts.baseline().failures) == 1


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def every_store(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The settings of each store: embedded SQLite, embedded PostgreSQL, Redis."""
    if request.param == "redis":
        db: redis.Redis = request.getfixturevalue("redis_db")
        return {"store": "redis", "redis_url": url_of(db)}
    if request.param == "postgresql":
        pg: PgSchema = request.getfixturevalue("pg")
        return {"database_url": pg.url}
    return {}


def test_a_refusal_recorded_while_a_grant_is_decided_survives_the_grant(
    make_sts: Callable[..., STS], every_store: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grant writes back the baseline it read when it was decided; a refusal recorded by another
    instance between that read and the grant's commit was undone by it (last writer wins), so that
    a workload that is granted could probe with refusals and stay under max_failures (an outside
    audit: 4 refusals sent with 12 grants, 2 kept).  The refusals are kept apart now."""
    sts = make_sts(policy(rule(risk={"max_failures": 3, "failure_window": 600})), **every_store)
    other = create_app(sts.runtime.settings, clock=sts.clock)  # another instance, the same store
    elsewhere = other.test_client()

    def refuse() -> None:
        resp = elsewhere.post(
            "/token",
            data=exchange_form(sts.token(), audience="https://elsewhere.example.com"),
            environ_base={"REMOTE_ADDR": HOME},
        )
        assert resp.get_json()["error"] == "invalid_target"

    assert sts.granted(sts.token(), scope="deploy:read")["expires_in"] == 300
    sts.clock.now += 1
    refuse()
    assert sts.baseline().failures == (sts.clock.now,)

    baselines = sts.runtime.baselines
    assert baselines is not None
    read = baselines.load

    def read_then_refused_elsewhere(identity: str) -> Baseline:
        """The grant's read of the baseline, then a refusal recorded before the grant commits."""
        baseline = read(identity)
        sts.clock.now += 1
        refuse()
        return baseline

    for _ in range(2):
        monkeypatch.setattr(baselines, "load", read_then_refused_elsewhere)
        assert sts.granted(sts.token(), scope="deploy:read")["expires_in"] == 300
        monkeypatch.setattr(baselines, "load", read)
    baseline = sts.baseline()
    assert baseline.count == 3  # Every grant learned ...
    assert len(baseline.failures) == 3  # ... and no refusal was lost.
    # The third refusal makes recent_failures fire on the next exchange.
    assert sts.granted(sts.token(), scope="deploy:read")["expires_in"] == 210
    assert sts.fired() == ["recent_failures"]
    runtime = other.extensions["sts"]
    runtime.engine.dispose()
    if runtime.redis_client is not None:
        runtime.redis_client.close()


def test_a_probation_step_refused_while_a_grant_is_decided_survives_the_grant(
    make_sts: Callable[..., STS], every_store: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused exchange whose only signal is the drift counts for the probation of the new
    value; it saved its step with the whole baseline it had read, and a grant of the confirmed
    value decided meanwhile (on another instance) wrote back the baseline it had read before, so
    that the step was undone (an outside audit: with 29 grants at the same moment, the count went
    back to nothing or stayed at 1, and the third drifted exchange was refused every time).  A
    grant that did not change the drift state now leaves the stored one."""
    risk = {"stable_facts": ["runner_environment"], "probation_exchanges": 3, "probation_period": 1,
            "max_failures": 1000}  # fmt: skip
    sts = make_sts(policy(rule(risk=risk)), **every_store)
    other = create_app(sts.runtime.settings, clock=sts.clock)  # another instance, the same store
    elsewhere = other.test_client()

    def drifted() -> TestResponse:
        return elsewhere.post(
            "/token",
            data=exchange_form(sts.token(runner_environment="self-hosted"), audience=DEPLOY),
            environ_base={"REMOTE_ADDR": HOME},
        )

    assert sts.granted(sts.token(), scope="deploy:read")["expires_in"] == 300
    baselines = sts.runtime.baselines
    assert baselines is not None
    read = baselines.load

    def read_then_drift_refused_elsewhere(identity: str) -> Baseline:
        """The grant's read of the baseline, then a drifted exchange refused before it commits."""
        baseline = read(identity)
        sts.clock.now += 1  # A newer token (its iat in seconds), which counts again.
        resp = drifted()
        assert resp.status_code == 400 and resp.get_json()["risk"]["signals"] == ["attestation_drift"]
        return baseline

    for step in (1, 2):
        monkeypatch.setattr(baselines, "load", read_then_drift_refused_elsewhere)
        assert sts.granted(sts.token(), scope="deploy:read")["expires_in"] == 300
        monkeypatch.setattr(baselines, "load", read)
        pending = sts.baseline().pending["runner_environment"]
        assert (pending.value, pending.fresh_count) == ("self-hosted", step)  # Not undone by the grant.
    # The third completes the probation (the first was more than probation_period before).
    sts.clock.now += 1
    resp = drifted()
    assert resp.status_code == 200, resp.get_json()
    baseline = sts.baseline()
    assert baseline.facts["runner_environment"] == "self-hosted" and not baseline.pending
    assert baseline.confirmed["runner_environment"]["how"] == "probation"
    # And a grant that read the baseline before the confirmation does not undo it either.
    monkeypatch.setattr(baselines, "load", lambda identity: replace(read(identity), **_before(baseline)))
    resp = sts.exchange(sts.token(), scope="deploy:read")
    monkeypatch.setattr(baselines, "load", read)
    assert resp.status_code == 200  # github-hosted, as it read.
    assert sts.baseline().facts["runner_environment"] == "self-hosted"
    runtime = other.extensions["sts"]
    runtime.engine.dispose()
    if runtime.redis_client is not None:
        runtime.redis_client.close()


def _before(confirmed: Baseline) -> dict[str, Any]:
    """The drift state of ``confirmed`` as it was before its confirmation by probation."""
    return {
        "facts": {**confirmed.facts, "runner_environment": "github-hosted"},
        "confirmed": {},
        "pending": {},
    }


def test_baselines_on_both_stores(make_sts: Callable[..., STS], store: dict[str, Any]) -> None:
    sts = make_sts(policy(rule(risk={})), **store)
    sts.learn()
    # A new /24 after learning: half the unusual_network weight, so a slightly shorter token.
    body = sts.granted(sts.token(), source="10.7.7.7", scope="deploy:read")
    assert body["expires_in"] == 255  # 300 * (1 - 15 / 100)
    assert sts.fired() == ["unusual_network"]
    sts.exchange(sts.token(), audience="https://elsewhere.example.com")
    baseline = sts.baseline()
    assert baseline.count == LEARNING_EXCHANGES + 1
    assert baseline.networks == ("10.1.2.0/24", "10.7.7.0/24")
    assert baseline.audiences == (DEPLOY,) and baseline.scopes == ("deploy:read",)
    assert baseline.facts["runner_environment"] == "github-hosted"
    assert baseline.failures == (sts.clock.now,)
    # The network is known now.
    assert sts.granted(sts.token(), source="10.7.7.8", scope="deploy:read")["expires_in"] == 300
    if store:
        raw = redis.Redis.from_url(store["redis_url"]).get(f"sts:baseline:{IDENTITY}")
        assert raw is not None and Baseline.from_json(raw).count == LEARNING_EXCHANGES + 2


@pytest.mark.parametrize("risk", [None, {}], ids=["events-only", "with-risk"])
def test_unreachable_store_fails_closed(make_sts: Callable[..., STS], risk: dict[str, Any] | None) -> None:
    """Subject state (and the baseline) cannot be read: nothing is issued, whatever the rule."""
    sts = make_sts(
        policy(rule() if risk is None else rule(risk=risk)), store="redis", redis_url="redis://127.0.0.1:1/0"
    )
    resp = sts.exchange(sts.token())
    assert resp.status_code == 503
    assert resp.get_json()["error"] == "temporarily_unavailable"
    assert int(resp.headers["Retry-After"]) > 0
    record = sts.last()
    assert (record["outcome"], record["reasons"][-1]) == ("refused", "store.unavailable")
    assert record["issued_jti"] is None


def test_identities_have_their_own_baselines(make_sts: Callable[..., STS]) -> None:
    other = "repo:acme/app:ref:refs/heads/dev"
    sts = make_sts(policy(rule(risk={}), {**rule("dev", risk={}), "subject": other}))
    sts.learn()
    token = sts.token(ref="refs/heads/dev")
    sts.granted(token, source="10.7.7.7", scope="deploy:read")
    assert sts.fired() == []  # the other identity is still learning
    assert sts.risk()["learning"] is True
    assert sts.runtime.baselines is not None
    assert sts.runtime.baselines.load(f"upstream|{other}").networks == ("10.7.7.0/24",)


# -- security events (shared signals) -------------------------------------------------------------


def put_state(sts: STS, state: SubjectState, identity: str = IDENTITY) -> None:
    assert sts.runtime.subject_states is not None
    sts.runtime.subject_states.put(identity, state, STATE_TTL)


@pytest.mark.parametrize("identity", [IDENTITY, f"*|{SUBJECT}"], ids=["own-issuer", "any-issuer"])
def test_blocked_subject_is_refused_even_without_a_risk_section(
    make_sts: Callable[..., STS], identity: str
) -> None:
    sts = make_sts(policy(rule()))
    assert sts.granted(sts.token())["expires_in"] == 300
    put_state(sts, SubjectState(blocked_until=sts.clock.now + 600, events=("session-revoked",)), identity)
    resp = sts.exchange(sts.token())
    assert resp.status_code == 400
    assert_no_store(resp)
    body = resp.get_json()
    assert body["error"] == "invalid_request"
    assert body["risk"] == {"decision": "deny", "signals": ["shared_signal"]}
    risk = sts.risk()
    assert risk["mode"] == "events" and risk["learning"] is None
    assert [s["name"] for s in risk["signals"]] == ["shared_signal"]
    assert risk["signals"][0]["evidence"]["events"] == ["session-revoked"]
    # The block lapses on its own.
    sts.clock.now += 601
    assert sts.granted(sts.token())["expires_in"] == 300


@pytest.mark.parametrize("cause", ["blocked", "outside-networks", "recent-failures"])
def test_a_refusal_for_more_than_the_drift_does_not_count_for_its_probation(
    make_sts: Callable[..., STS], cause: str
) -> None:
    """Baseline poisoning (an outside audit): while the subject's session was revoked, three fresh
    exchanges as a self-hosted runner, all refused, completed that runner's probation; once the
    block lapsed it was granted and the real, github-hosted workload was refused as the drift.
    A refusal counts for probation only when the drift is all that fired."""
    failures = 2 if cause == "recent-failures" else 100
    risk = {
        "probation_exchanges": 3,
        "probation_period": 5,
        "networks": ["10.0.0.0/8"],
        "max_failures": failures,
    }
    sts = make_sts(policy(rule(risk=risk)))
    sts.learn()
    assert sts.baseline().facts["runner_environment"] == "github-hosted"
    source = HOME
    if cause == "blocked":
        put_state(sts, SubjectState(blocked_until=sts.clock.now + 60, events=("session-revoked",)))
    elif cause == "outside-networks":
        source = "203.0.113.5"
    else:
        for _ in range(2):  # refused for an audience the rule does not grant: failures
            assert sts.exchange(sts.token(), audience="https://elsewhere.example.com").status_code == 400
    for _ in range(4):
        sts.clock.now += 3
        resp = sts.exchange(sts.token(runner_environment="self-hosted"), source=source)
        assert resp.status_code == 400, resp.get_json()
        assert "attestation_drift" in sts.fired() and len(sts.fired()) > 1, sts.fired()
    assert sts.baseline().facts["runner_environment"] == "github-hosted"
    assert "runner_environment" not in sts.baseline().pending
    if cause != "recent-failures":
        sts.clock.now += 61  # the block lapsed; back home
        refused = sts.exchange(sts.token(runner_environment="self-hosted"))
        assert refused.status_code == 400 and sts.fired() == ["attestation_drift"]
        # The drift alone counts as before: this refusal starts the probation.
        assert sts.baseline().pending["runner_environment"].fresh_count == 1


def test_raised_risk_level_shortens_tokens_and_high_asks_for_fresh_attestation(
    make_sts: Callable[..., STS],
) -> None:
    sts = make_sts(policy(rule()))
    put_state(sts, SubjectState(risk_level="medium"))
    assert sts.granted(sts.token())["expires_in"] == 210  # 300 * (1 - 30 / 100)
    put_state(sts, SubjectState(risk_level="high"))
    resp = sts.exchange(sts.token(age=120))
    assert resp.get_json()["error"] == "insufficient_user_authentication"
    assert sts.granted(sts.token())["expires_in"] == 120  # fresh: 300 * (1 - 60 / 100)
    put_state(sts, SubjectState(risk_level="critical"))
    assert sts.exchange(sts.token()).get_json()["risk"]["decision"] == "deny"


def test_block_is_enforced_on_a_rule_that_only_observes(make_sts: Callable[..., STS]) -> None:
    sts = make_sts(policy(rule(risk={"mode": "observe"})))
    put_state(sts, SubjectState(blocked_until=sts.clock.now + 600))
    assert sts.exchange(sts.token()).get_json()["risk"]["decision"] == "deny"


def test_reauth_after_forces_step_up_until_fresh_attestation(make_sts: Callable[..., STS]) -> None:
    sts = make_sts(policy(rule()))
    before = sts.token(age=10)  # recent, but minted before the event
    put_state(sts, SubjectState(reauth_after=sts.clock.now, events=("credential-change",)))
    sts.clock.now += 20
    for token in (before, sts.token(age=21)):
        resp = sts.exchange(token)
        assert resp.status_code == 400
        assert_no_store(resp)
        body = resp.get_json()
        assert body["error"] == "insufficient_user_authentication"
        assert body["step_up"]["signals"] == ["shared_signal"]
    assert sts.last()["reasons"][-1] == "risk.step_up"
    # Attestation after the event: granted (the event's weight is gone, so the full lifetime).
    assert sts.granted(sts.token(age=20))["expires_in"] == 300
    assert sts.granted(sts.token())["expires_in"] == 300


def test_reauth_after_on_an_observing_rule_is_enforced(make_sts: Callable[..., STS]) -> None:
    sts = make_sts(policy(rule(risk={"mode": "observe", "networks": ["10.0.0.0/8"]})))
    put_state(sts, SubjectState(reauth_after=sts.clock.now))
    resp = sts.exchange(sts.token(age=120), source="192.0.2.77")
    assert resp.get_json()["step_up"]["signals"] == ["shared_signal"]
    assert sts.risk()["decision"] == {
        "action": "step_up",
        "score": 90,
        "enforced": True,
        "lifetime_factor": 0.2,
        "fired": ["shared_signal"],
    }
    # Renewed: the network still counts, but only as observed.
    assert sts.granted(sts.token(), source="192.0.2.77")["expires_in"] == 300


def test_revoked_tokens_of_ours_are_refused_on_re_exchange(make_sts: Callable[..., STS]) -> None:
    sts = make_sts(policy(rule(), rule("reexchange", issuer="self")))
    ours = sts.granted(sts.token())["access_token"]
    again = sts.granted(ours, subject_token_type=ACCESS_TOKEN_TYPE)
    assert again["scope"] == "deploy:read"

    put_state(sts, SubjectState(revoked_before=sts.clock.now + 1, events=("session-revoked",)))
    resp = sts.exchange(ours, subject_token_type=ACCESS_TOKEN_TYPE)
    assert resp.status_code == 400
    assert_no_store(resp)
    assert resp.get_json()["error"] == "invalid_request"
    record = sts.last()
    assert (record["issuer"], record["reasons"][-1]) == ("self", "subject_token.revoked")
    # A token issued after the revocation time is not revoked.
    sts.clock.now += 2
    newer = sts.granted(sts.token())["access_token"]
    assert sts.granted(newer, subject_token_type=ACCESS_TOKEN_TYPE)["scope"] == "deploy:read"


def test_a_changed_proof_of_possession_key_is_attestation_drift(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    """The DPoP key is a stable fact (cnf_jkt): the same workload proving a new key has drifted."""
    import time as _time
    import uuid

    from joserfc import jwt as _jwt
    from joserfc.jwk import ECKey

    policy = {
        "version": 1,
        "rules": [
            {
                "name": "bound",
                "issuer": "upstream",
                "subject": "repo:acme/app:ref:refs/heads/main",
                "require_client_authentication": False,
                "require_dpop": True,
                "risk": {},
                "grant": {"audiences": ["https://deploy.example.com"]},
            }
        ],
    }
    app = create_app(make_settings(policy))
    web = app.test_client()

    def exchange(key: ECKey) -> Any:
        proof = _jwt.encode(
            {"typ": "dpop+jwt", "alg": "ES256", "jwk": key.as_dict(private=False)},
            {"jti": uuid.uuid4().hex, "htm": "POST", "htu": STS_ISSUER + "/token", "iat": int(_time.time())},
            key,
            algorithms=["ES256"],
        )
        # Attestation ten minutes old: drift is not excused by fresh attestation.
        subject = upstream.issuer.github_actions_token(
            audience=STS_ISSUER, now=_time.time() - 600, lifetime=3600
        )
        form = exchange_form(subject, audience="https://deploy.example.com")
        return web.post(
            "/token", data=form, headers={"DPoP": proof}, environ_base={"REMOTE_ADDR": "10.1.2.3"}
        )

    usual = ECKey.generate_key("P-256")
    for _ in range(6):
        assert exchange(usual).status_code == 200
    drifted = exchange(ECKey.generate_key("P-256"))
    assert drifted.status_code == 400, drifted.get_json()
    body = drifted.get_json()
    # A new key cannot vouch for itself: only an operator or probation confirms it.
    assert body["error"] == "invalid_request"
    assert "attestation_drift" in body["risk"]["signals"]
    assert [c["by"] for c in body["risk"]["clears"]] == ["operator_accept", "probation"]
    record = app.extensions["sts"].audit.recent(1)[0]
    drift = next(s for s in record["details"]["risk"]["signals"] if s["name"] == "attestation_drift")
    assert "cnf_jkt" in drift["evidence"]["changed"]


def test_a_separately_presented_posture_token_feeds_stale_posture(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    """``posture_token`` (extension parameter): verified like any upstream token, about the same subject;
    missing, negative or expired posture fires stale_posture."""
    subject_name = "repo:acme/app:ref:refs/heads/main"
    policy = {
        "version": 1,
        "rules": [
            {
                "name": "posture",
                "issuer": "upstream",
                "subject": subject_name,
                "require_client_authentication": False,
                "risk": {"posture_fact": "device_posture", "weights": {"stale_posture": 100}},
                "grant": {"audiences": ["https://deploy.example.com"]},
            }
        ],
    }
    app = create_app(make_settings(policy))
    web = app.test_client()
    now = time.time()

    def posture_token(
        value: str | None, *, sub: str = subject_name, age: float = 0, lifetime: int = 300
    ) -> str:
        claims: dict[str, Any] = {"iss": upstream.issuer.issuer_url, "sub": sub, "aud": STS_ISSUER,
                                  "iat": int(now - age), "exp": int(now - age + lifetime)}  # fmt: skip
        if value is not None:
            claims["device_posture"] = value
        return upstream.issuer.mint(claims)

    def exchange(posture: str | None) -> TestResponse:
        subject = upstream.issuer.github_actions_token(audience=STS_ISSUER, now=now)
        form = exchange_form(subject, audience="https://deploy.example.com")
        if posture is not None:
            form["posture_token"] = posture
        return web.post("/token", data=form, environ_base={"REMOTE_ADDR": "10.1.2.3"})

    def fired() -> dict[str, Any]:
        record = app.extensions["sts"].audit.recent(1)[0]
        return next(s for s in record["details"]["risk"]["signals"] if s["name"] == "stale_posture")

    assert exchange(posture_token("compliant")).status_code == 200
    assert fired()["fired"] is False
    for token, expected in (
        (posture_token("not-compliant"), "posture negative"),
        (posture_token(None), "posture evidence missing"),
        (posture_token("compliant", age=3600, lifetime=300), "posture token unusable"),
        (None, "posture evidence missing"),
    ):
        refused = exchange(token)
        assert refused.status_code == 400 and refused.get_json()["error"] == "invalid_request"
        assert fired()["fired"] is True and fired()["reason"] == expected
    other = exchange(posture_token("compliant", sub="repo:evil/app:ref:refs/heads/main"))
    assert other.status_code == 400
    assert app.extensions["sts"].audit.recent(1)[0]["reasons"][-1] == "posture_token.subject_mismatch"


def test_a_posture_declared_bad_by_a_security_event_outweighs_a_good_posture_token(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    """docs/policies.md: a posture asserted by a security event takes precedence over the token's.
    The signal said so, but the assurance evidence still counted the compliant posture token (an
    outside audit got ``acr:posture`` after a CAEP ``not-compliant``)."""
    subject_name = "repo:acme/app:ref:refs/heads/main"
    policy = {"version": 1, "rules": [{
        "name": "posture", "issuer": "upstream", "subject": subject_name,
        "require_client_authentication": False,
        "risk": {"posture_fact": "device_posture", "weights": {"stale_posture": 10}},
        "grant": {"audiences": ["https://deploy.example.com"]},
    }]}  # fmt: skip
    app = create_app(make_settings(policy))
    web = app.test_client()
    now = time.time()
    claims = {"iss": upstream.issuer.issuer_url, "sub": subject_name, "aud": STS_ISSUER,
              "iat": int(now), "exp": int(now + 300), "device_posture": "compliant"}  # fmt: skip

    def evidence() -> dict[str, Any]:
        form = exchange_form(
            upstream.issuer.github_actions_token(audience=STS_ISSUER, now=now),
            audience="https://deploy.example.com",
        )
        form["posture_token"] = upstream.issuer.mint(claims)
        assert web.post("/token", data=form).status_code == 200
        found: dict[str, Any] = app.extensions["sts"].audit.recent(1)[0]["details"]["assurance"]["evidence"]
        return found

    assert evidence()["posture_token"] is True
    states = app.extensions["sts"].subject_states
    states.put(f"upstream|{subject_name}", SubjectState(posture="not-compliant"), 600)
    assert evidence()["posture_token"] is False


def _posture_token(upstream: RunningServer, subject: str, now: float, **facts: Any) -> str:
    """A compliant posture token about ``subject`` from the upstream issuer, naming ``facts``."""
    claims = {"iss": upstream.issuer.issuer_url, "sub": subject, "aud": STS_ISSUER,
              "iat": int(now), "exp": int(now + 300), "device_posture": "compliant"}  # fmt: skip
    return upstream.issuer.mint({**claims, **facts})


def test_a_posture_token_about_another_instance_is_no_evidence_and_confirms_no_drift(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    """A posture token is bearer evidence about a ``sub`` replicas share: one whose facts say another
    instance (another runner, node or pod) is no evidence of this one's posture, and does not confirm
    a change of those facts.  An outside red team replayed a pod's posture token from another pod on
    another node (``drift_evidence: [posture_token]``), which confirmed that node as the identity's at
    once, and the real pod was then refused for drift."""
    subject_name = "repo:acme/app:ref:refs/heads/main"
    policy = {"version": 1, "rules": [{
        "name": "posture", "issuer": "upstream", "subject": subject_name,
        "require_client_authentication": False,
        "risk": {"posture_fact": "device_posture", "drift_evidence": ["posture_token"],
                 "stable_facts": ["runner_environment"]},
        "grant": {"audiences": [DEPLOY]},
    }]}  # fmt: skip
    app = create_app(make_settings(policy))
    web = app.test_client()
    now = time.time()

    def posture(**facts: str) -> str:
        return _posture_token(upstream, subject_name, now, **facts)

    def exchange(runner: str, posture_token: str | None = None) -> TestResponse:
        token = upstream.issuer.github_actions_token(audience=STS_ISSUER, now=now, runner_environment=runner)
        form = exchange_form(token, audience=DEPLOY)
        if posture_token is not None:
            form["posture_token"] = posture_token
        return web.post("/token", data=form)

    def last() -> dict[str, Any]:
        record: dict[str, Any] = app.extensions["sts"].audit.recent(1)[0]
        return record

    assert exchange("github-hosted", posture(runner_environment="github-hosted")).status_code == 200
    assert last()["details"]["assurance"]["evidence"]["posture_token"] is True
    # Another runner, with the posture token of the identity's own runner: the drift stands.
    refused = exchange("self-hosted", posture(runner_environment="github-hosted"))
    assert refused.status_code != 200, last()["details"]["risk"]
    signals = {s["name"]: s for s in last()["details"]["risk"]["signals"]}
    assert signals["attestation_drift"]["fired"]
    # Unusable, as an expired one is: the record says why, and it is no evidence of posture either.
    assert signals["stale_posture"]["fired"] and signals["stale_posture"]["evidence"] == {
        "problem": "another_instance"
    }
    assert last()["details"]["assurance"]["evidence"]["posture_token"] is False
    assert exchange("self-hosted").status_code != 200
    assert exchange("github-hosted").status_code == 200
    # A posture token about the new runner, or one that does not name it, confirms the change.
    assert exchange("self-hosted", posture(runner_environment="self-hosted")).status_code == 200
    assert exchange("self-hosted").status_code == 200
    assert exchange("github-hosted", posture()).status_code == 200


def test_a_posture_token_about_another_instance_does_not_outweigh_the_subjects_own_posture(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    """The posture a token about another instance states is not read in place of the subject's own
    (an outside review of the fix above: a non-compliant runner with another runner's compliant
    posture token was granted where ``stale_posture`` refused it alone).  Facts compare as JSON
    values: a posture issuer's number is the subject token's string of the same digits."""
    subject_name = "repo:acme/app:ref:refs/heads/main"
    policy = {"version": 1, "rules": [{
        "name": "posture", "issuer": "upstream", "subject": subject_name,
        "require_client_authentication": False,
        "risk": {"posture_fact": "device_posture", "stable_facts": ["runner_environment", "repository_id"],
                 "weights": {"stale_posture": 100}},
        "grant": {"audiences": [DEPLOY]},
    }]}  # fmt: skip
    app = create_app(make_settings(policy))
    web = app.test_client()
    now = time.time()

    def posture(**facts: Any) -> str:
        return _posture_token(upstream, subject_name, now, **facts)

    def exchange(posture_token: str | None) -> int:
        token = upstream.issuer.github_actions_token(
            audience=STS_ISSUER, now=now, runner_environment="self-hosted", device_posture="noncompliant"
        )
        form = exchange_form(token, audience=DEPLOY)
        if posture_token is not None:
            form["posture_token"] = posture_token
        return web.post("/token", data=form).status_code

    assert exchange(None) == 400
    assert exchange(posture(runner_environment="github-hosted")) == 400
    assert exchange(posture(runner_environment="self-hosted", repository_id=123456)) == 200
    assert exchange(posture(repository_id="654321")) == 400


def test_a_posture_token_naming_facts_a_re_exchanged_token_does_not_show_is_unusable(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    """A token of ours shows none of the upstream token's facts, so a posture token that names one
    cannot be tied to the instance re-exchanging it (a review: another runner's posture token was
    taken as this one's there).  One that names no stable fact is read, as upstream."""
    subject_name = "repo:acme/app:ref:refs/heads/main"
    policy = {"version": 1, "rules": [
        {"name": "deploy", "issuer": "upstream", "subject": subject_name,
         "require_client_authentication": False, "grant": {"audiences": [DEPLOY]}},
        {"name": "again", "issuer": "self", "subject": subject_name, "require_client_authentication": False,
         "risk": {"posture_fact": "device_posture", "stable_facts": ["runner_environment"],
                  "weights": {"stale_posture": 100}},
         "grant": {"audiences": [DEPLOY]}},
    ]}  # fmt: skip
    app = create_app(make_settings(policy))
    web = app.test_client()
    now = time.time()
    token = upstream.issuer.github_actions_token(
        audience=STS_ISSUER, now=now, runner_environment="self-hosted", device_posture="noncompliant"
    )
    ours = web.post("/token", data=exchange_form(token, audience=DEPLOY)).get_json()["access_token"]

    def again(**facts: Any) -> TestResponse:
        form = exchange_form(ours, subject_token_type=ACCESS_TOKEN_TYPE, audience=DEPLOY)
        if facts:
            form["posture_token"] = _posture_token(upstream, subject_name, now, **facts)
        return web.post("/token", data=form)

    assert again().status_code == 400
    refused = again(runner_environment="github-hosted")
    assert refused.status_code == 400, refused.get_json()
    signals = {s["name"]: s for s in app.extensions["sts"].audit.recent(1)[0]["details"]["risk"]["signals"]}
    assert signals["stale_posture"]["evidence"] == {"problem": "another_instance"}
    assert again(placeholder="unrelated").status_code == 200


def test_the_posture_level_is_refused_not_stepped_up_while_an_event_declares_the_posture_bad(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    """While a security event says the posture is bad, no renewal reaches the posture level: it was
    answered with a step-up naming that level, which the workload met (a fresh platform token, its
    key, a good posture token) and got again, forever (an outside audit).  docs/policies.md: what
    renewing cannot fix is a refusal for risk, naming the signals."""
    import uuid

    from joserfc import jwt as jose_jwt
    from joserfc.jwk import ECKey

    subject_name = "repo:acme/app:ref:refs/heads/main"
    posture = "urn:workload-sts:acr:posture"
    policy = {"version": 1, "rules": [{
        "name": "posture", "issuer": "upstream", "subject": subject_name,
        "require_client_authentication": False,
        "risk": {"posture_fact": "device_posture", "weights": {"stale_posture": 10}},
        "grant": {"audiences": ["https://deploy.example.com", "https://vault.example.com"]},
        "assurance": [{"acr": posture, "audiences": ["https://vault.example.com"]}],
    }]}  # fmt: skip
    app = create_app(make_settings(policy))
    web = app.test_client()
    key = ECKey.generate_key("P-256")

    def exchange(audience: str) -> TestResponse:
        now = time.time()
        claims = {"iss": upstream.issuer.issuer_url, "sub": subject_name, "aud": STS_ISSUER,
                  "iat": int(now), "exp": int(now + 300), "device_posture": "compliant"}  # fmt: skip
        form = exchange_form(upstream.issuer.github_actions_token(audience=STS_ISSUER), audience=audience)
        form["posture_token"] = upstream.issuer.mint(claims)
        proof = jose_jwt.encode(
            {"typ": "dpop+jwt", "alg": "ES256", "jwk": key.as_dict(private=False)},
            {"jti": uuid.uuid4().hex, "htm": "POST", "htu": STS_ISSUER + "/token", "iat": int(now)},
            key,
            algorithms=["ES256"],
        )
        return web.post("/token", data=form, headers={"DPoP": proof})

    assert exchange("https://vault.example.com").status_code == 200
    states = app.extensions["sts"].subject_states
    states.put(f"upstream|{subject_name}", SubjectState(posture="not-compliant"), 600)
    for _ in range(2):  # what the step-up asked for, presented again: the same refusal, not a loop
        refused = exchange("https://vault.example.com")
        body = refused.get_json()
        assert refused.status_code == 400 and body["error"] == "invalid_request", body
        assert body["risk"] == {"decision": "deny", "signals": ["stale_posture"]}
        record = app.extensions["sts"].audit.recent(1)[0]
        assert record["reasons"][-1] == "assurance.posture_declared_bad"
        assert record["details"]["assurance"]["required"] == posture
    # What needs no posture level is still granted.
    assert exchange("https://deploy.example.com").status_code == 200


def test_posture_evidence_comes_only_from_an_issuer_that_speaks_for_the_subject(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    """The same ``sub`` under another trusted issuer is another workload: its posture token is not
    this subject's evidence (nor does it confirm drift), unless the rule names that issuer in
    ``risk.posture_issuers``; by default only the subject token's own issuer speaks for it."""
    subject_name = "repo:acme/app:ref:refs/heads/main"
    with DevIssuer.serve_ephemeral(alg="ES256") as other:
        second = {**upstream_issuer(other), "name": "posture-svc", "algorithms": ["ES256"]}
        issuers = [upstream_issuer(upstream), second]

        def build(**risk: Any) -> FlaskClient:
            posture_rule = rule("posture", subject=subject_name)
            posture_rule["risk"] = {
                "posture_fact": "device_posture",
                "weights": {"stale_posture": 100},
                **risk,
            }
            return create_app(make_settings(policy(posture_rule), issuers=issuers)).test_client()

        def posture_token(issuer: DevIssuer) -> str:
            now = int(time.time())
            claims = {"iss": issuer.issuer_url, "sub": subject_name, "aud": STS_ISSUER, "iat": now,
                      "exp": now + 300, "device_posture": "compliant"}  # fmt: skip
            return issuer.mint(claims)

        def exchange(web: FlaskClient, posture: str) -> TestResponse:
            subject = upstream.issuer.github_actions_token(audience=STS_ISSUER)
            form = {**exchange_form(subject, audience="https://deploy.example.com"), "posture_token": posture}
            return web.post("/token", data=form, environ_base={"REMOTE_ADDR": "10.1.2.3"})

        default = build()
        assert exchange(default, posture_token(upstream.issuer)).status_code == 200
        foreign = exchange(default, posture_token(other.issuer))
        assert foreign.status_code == 400 and foreign.get_json()["error"] == "invalid_request"
        named = build(posture_issuers=["posture-svc"])
        assert exchange(named, posture_token(other.issuer)).status_code == 200
        assert exchange(named, posture_token(upstream.issuer)).status_code == 400
        for unknown in ("nobody", "self"):
            with pytest.raises(ConfigurationError, match="posture_issuers"):
                build(posture_issuers=[unknown])


def test_the_subject_token_is_not_its_own_posture_token(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    """A posture token is separate evidence: the subject token itself (or a copy with another
    signature, or the same token signed anew with a claim added) is refused as its posture token,
    where a separately issued one raises the assurance level."""
    subject_name = "repo:acme/app:ref:refs/heads/main"
    posture_rule = rule("posture", subject=subject_name)
    posture_rule["risk"] = {"posture_fact": "device_posture"}
    web = create_app(make_settings(policy(posture_rule))).test_client()
    now = int(time.time())
    claims = {"iss": upstream.issuer.issuer_url, "sub": subject_name, "aud": STS_ISSUER, "iat": now,
              "exp": now + 300, "jti": "subject-1", "device_posture": "compliant"}  # fmt: skip
    subject = upstream.issuer.mint(claims)

    def exchange(posture: str) -> TestResponse:
        form = {**exchange_form(subject, audience="https://deploy.example.com"), "posture_token": posture}
        return web.post("/token", data=form, environ_base={"REMOTE_ADDR": "10.1.2.3"})

    for same in (
        subject,
        subject.rpartition(".")[0] + ".AAAA",
        upstream.issuer.mint({**claims, "posture_checked": True}),
    ):
        refused = exchange(same)
        assert refused.status_code == 400 and refused.get_json()["error"] == "invalid_request"
        assert (
            web.application.extensions["sts"].audit.recent(1)[0]["reasons"][-1]
            == "posture_token.not_separate"
        )
    separate = exchange(upstream.issuer.mint({**claims, "jti": "posture-1"}))
    assert separate.status_code == 200, separate.get_json()
    evidence = web.application.extensions["sts"].audit.recent(1)[0]["details"]["assurance"]["evidence"]
    assert evidence["posture_token"] is True


@pytest.mark.parametrize("single_use", [False, True], ids=["reusable", "single-use"])
def test_grants_decided_at_the_same_time_each_count(
    make_sts: Callable[..., STS],
    every_store: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    single_use: bool,
) -> None:
    """A grant writes back the baseline it read when it was decided, its count one more: grants
    of one identity decided at the same time counted once between them (last writer wins), so a
    burst sent all at once was counted low (an outside audit: 14 parallel exchanges where 10 make
    a burst did not fire) and a workload stayed learning longer than its grants.  The store
    advances the counters from the stored ones now (on Redis with a single-use token, in the
    script that confirms its use)."""
    sts = make_sts(policy(rule(risk={}, single_use=single_use)), **every_store)
    other = create_app(sts.runtime.settings, clock=sts.clock)  # another instance, the same store
    elsewhere = other.test_client()
    baselines = sts.runtime.baselines
    assert baselines is not None
    read = baselines.load

    def read_then_granted_elsewhere(identity: str) -> Baseline:
        """The grant's read of the baseline, then a grant elsewhere (decided a moment later: the
        first two, of a new identity, each begin a baseline) before this one commits."""
        baseline = read(identity)
        sts.clock.now += 0.25
        resp = elsewhere.post(
            "/token",
            data=exchange_form(sts.token(), audience=DEPLOY, scope="deploy:read"),
            environ_base={"REMOTE_ADDR": HOME},
        )
        assert resp.status_code == 200, resp.get_json()
        return baseline

    for _ in range(3):
        monkeypatch.setattr(baselines, "load", read_then_granted_elsewhere)
        assert sts.granted(sts.token(), scope="deploy:read")["expires_in"] == 300
        monkeypatch.setattr(baselines, "load", read)
        sts.clock.now += 1
    baseline = sts.baseline()
    assert (baseline.count, baseline.window_count) == (6, 6)  # every grant counted, in one window
    assert not baseline.learning  # five grants learn a workload
    runtime = other.extensions["sts"]
    runtime.engine.dispose()
    if runtime.redis_client is not None:
        runtime.redis_client.close()
