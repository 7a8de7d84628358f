"""Delegation, impersonation and re-exchange of our own tokens (RFC 8693 §1.1, §4.1, §4.4).

Every exchange goes over HTTP through the real Flask app, against a
development issuer that serves its JWKS over HTTP.  Issued tokens are
verified with joserfc against the JWKS the app publishes (ES256 only), and
then presented again as subject tokens of issuer ``self``, so a chain is
built exactly as a client would build it:

    S (GitHub Actions token) + actor A1  ->  T1  act {A1}
    T1 (issuer self)         + actor A2  ->  T2  act {A2, act {A1}}
    T2                       + actor A3  ->  T3  act {A3, act {A2, act {A1}}}

The app's clock is a parameter: upstream tokens are minted at that time (or
before it), and time moves by setting the clock, never by sleeping.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from joserfc import jwt
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry
from werkzeug.test import TestResponse

from sts.app import create_app
from sts.core.audit import token_hash
from sts.core.client_secrets import hash_secret
from sts.core.policy.compile import compile_rule
from sts.core.policy.rules import MAX_DELEGATION_DEPTH
from sts.core.subject_state import SubjectState, identity_key
from sts.dev.issuer import DevIssuer, RunningServer
from sts.errors import ConfigurationError
from sts.settings import Settings
from tests.conftest import (
    ACCESS_TOKEN_TYPE,
    DEFAULT_CLIENTS,
    JWT_TYPE,
    STS_ISSUER,
    exchange_form,
    upstream_issuer,
)
from tests.support.clock import Clock

SUBJECT = "repo:acme/app:ref:refs/heads/main"
DEPLOY = "https://deploy.example.com"
REPORTS = "https://reports.example.com"
AGENTS = r"system:serviceaccount:agents:a[0-9]+"


def agent(n: int) -> str:
    return f"system:serviceaccount:agents:a{n}"


def policy(
    *,
    max_depth: int = 3,
    upstream: dict[str, Any] | None = None,
    own: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Two rules: the GitHub job's own tokens, and re-exchange of the tokens we issued for it (``self``).

    ``upstream`` and ``own`` are merged into the first and second rule.
    """
    delegation = {"actors": [{"issuer": "upstream", "subject_pattern": AGENTS}], "max_depth": max_depth}
    from_upstream: dict[str, Any] = {
        "name": "deploy-with-agents",
        "issuer": "upstream",
        "subject": SUBJECT,
        "claims": {"repository_id": "123456"},
        "require_client_authentication": False,
        "delegation": deepcopy(delegation),
        "grant": {
            "audiences": [DEPLOY],
            "scopes": ["deploy:read", "deploy:write"],
            "default_scopes": ["deploy:read"],
            "max_lifetime": 300,
        },
    }
    reexchange: dict[str, Any] = {
        "name": "reexchange",
        "issuer": "self",
        "subject": SUBJECT,
        "require_client_authentication": False,
        "delegation": deepcopy(delegation),
        # Wider than anything the first rule grants: only the presented token may narrow it.
        "grant": {
            "audiences": [DEPLOY, REPORTS],
            "scopes": ["deploy:read", "deploy:write", "deploy:admin"],
            "default_scopes": ["deploy:read"],
            "max_lifetime": 3600,
        },
    }
    from_upstream.update(upstream or {})
    reexchange.update(own or {})
    return {"version": 1, "rules": [from_upstream, reexchange]}


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningServer]:
    """Overrides conftest's per-test issuer: one RSA key for the module keeps the file fast."""
    with DevIssuer.serve_ephemeral(alg="RS256") as server:
        yield server


@dataclass
class STS:
    """One app under test, its clock, and the upstream issuer that mints its subject and actor tokens."""

    app: Flask
    web: FlaskClient
    clock: Clock
    issuer: DevIssuer

    # -- upstream tokens, minted at the app's time unless told otherwise

    def subject(self, *, age: float = 0, **claims: Any) -> str:
        """A GitHub Actions token for SUBJECT issued ``age`` seconds ago."""
        return self.issuer.github_actions_token(
            audience=STS_ISSUER, now=self.clock.now - age, lifetime=int(age) + 600, **claims
        )

    def actor(self, n: int, namespace: str = "agents") -> str:
        return self.issuer.kubernetes_token(
            audience=[STS_ISSUER], namespace=namespace, service_account=f"a{n}", now=self.clock.now
        )

    def crafted(self, **claims: Any) -> str:
        """A token the first rule accepts, with exactly these extra claims (``act``, ``may_act``...)."""
        iat = int(self.clock.now)
        base = {
            "iss": self.issuer.issuer_url,
            "sub": SUBJECT,
            "aud": STS_ISSUER,
            "iat": iat,
            "nbf": iat,
            "exp": iat + 300,
            "jti": str(uuid.uuid4()),
            "repository_id": "123456",
        }
        base.update(claims)
        return self.issuer.mint(base, header={"typ": "JWT"})

    # -- the token endpoint

    def exchange(
        self,
        subject_token: str,
        *,
        actor: str | None = None,
        subject_token_type: str = JWT_TYPE,
        **params: Any,
    ) -> TestResponse:
        form = exchange_form(subject_token, subject_token_type=subject_token_type, **params)
        if actor is not None:
            form.update(actor_token=actor, actor_token_type=JWT_TYPE)
        return self.web.post("/token", data=form)

    def granted(self, subject_token: str, **kwargs: Any) -> str:
        resp = self.exchange(subject_token, **kwargs)
        assert resp.status_code == 200, (resp.get_json(), self.last_record()["reasons"])
        token: str = resp.get_json()["access_token"]
        return token

    def reexchange(self, token: str, **kwargs: Any) -> str:
        """Present a token we issued as the subject token (RFC 8693 §3 access_token type).

        The self rule has two targets, so the audience must be named (DEPLOY unless given).
        """
        kwargs.setdefault("audience", DEPLOY)
        return self.granted(token, subject_token_type=ACCESS_TOKEN_TYPE, **kwargs)

    def claims(self, token: str) -> dict[str, Any]:
        """Verify an issued token against the app's published JWKS (ES256 only); return its claims."""
        jwks = self.web.get("/.well-known/jwks.json").get_json()
        decoded = jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["ES256"])
        assert decoded.header["typ"] == "at+jwt"
        JWTClaimsRegistry(
            now=int(self.clock.now),
            iss={"essential": True, "value": STS_ISSUER},
            sub={"essential": True, "value": SUBJECT},
            aud={"essential": True},
            exp={"essential": True},
            iat={"essential": True},
            jti={"essential": True},
        ).validate(decoded.claims)
        return dict(decoded.claims)

    def records(self) -> list[dict[str, Any]]:
        """Audit records, newest first."""
        records: list[dict[str, Any]] = self.app.extensions["sts"].audit.recent()
        return records

    def last_record(self) -> dict[str, Any]:
        return self.records()[0]


@pytest.fixture
def make_sts(make_settings: Callable[..., Settings], upstream: RunningServer) -> Iterator[Callable[..., STS]]:
    apps: list[Flask] = []

    def build(policy_doc: dict[str, Any] | None = None, **overrides: Any) -> STS:
        clock = Clock(float(int(time.time())))
        app = create_app(make_settings(policy_doc or policy(), **overrides), clock=clock)
        apps.append(app)
        return STS(app, app.test_client(), clock, upstream.issuer)

    yield build
    for app in apps:
        app.extensions["sts"].engine.dispose()


@pytest.fixture
def sts(make_sts: Callable[..., STS]) -> STS:
    return make_sts()


def assert_refused(
    sts: STS, resp: TestResponse, error: str, reason: str, status: int = 400
) -> dict[str, Any]:
    """The response is the OAuth error and the audit record says why; nothing was issued."""
    body = resp.get_json()
    assert resp.status_code == status, body
    assert body["error"] == error
    assert "access_token" not in body
    record = sts.last_record()
    assert record["outcome"] == "refused"
    assert record["error"] == error
    assert reason in record["reasons"], record["reasons"]
    assert record["issued_jti"] is None
    return record


def actor_entry(sts: STS, n: int, inner: dict[str, Any] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"sub": agent(n), "iss": sts.issuer.issuer_url}
    if inner is not None:
        entry["act"] = inner
    return entry


def nested(sts: STS, *newest_first: int) -> dict[str, Any] | None:
    """The ``act`` claim for actors given newest first: nested(3, 2, 1) = {a3, act {a2, act {a1}}}."""
    chain: dict[str, Any] | None = None
    for n in reversed(newest_first):
        chain = actor_entry(sts, n, chain)
    return chain


def chain_of(depth: int, issuer: str) -> dict[str, Any] | None:
    """An ``act`` chain of ``depth`` foreign actors, as another STS upstream might have issued."""
    chain: dict[str, Any] | None = None
    for n in range(depth):
        chain = {
            "sub": f"spiffe://partner.example/hop-{n}",
            "iss": issuer,
            **({"act": chain} if chain else {}),
        }
    return chain


def asserted(chain: dict[str, Any] | None, issuer: str) -> dict[str, Any] | None:
    """``chain`` as carried from an issuer trusted for delegation: every entry names that issuer."""
    if chain is None:
        return None
    entry = {k: v for k, v in chain.items() if k in ("sub", "iss")} | {"asserted_by": issuer}
    inner = asserted(chain.get("act"), issuer)
    return entry | ({"act": inner} if inner is not None else {})


def trusted_for_delegation(sts_upstream: RunningServer) -> list[dict[str, Any]]:
    """The ``issuers`` setting with the upstream issuer trusted to assert delegation (another STS)."""
    return [
        {
            "name": "upstream",
            "issuer": sts_upstream.issuer.issuer_url,
            "jwks_uri": sts_upstream.jwks_uri,
            "algorithms": ["RS256"],
            "audiences": [STS_ISSUER],
            "max_token_age": 3600,
            "trusted_delegation": True,
        }
    ]


# -- delegation: act chains (RFC 8693 §4.1) -------------------------------------------------------


@pytest.mark.parametrize("own_type", [ACCESS_TOKEN_TYPE, JWT_TYPE], ids=["access_token", "jwt"])
def test_three_levels_of_delegation_nest_the_actors(sts: STS, own_type: str) -> None:
    s = sts.subject()
    t1 = sts.granted(s, actor=sts.actor(1), audience=DEPLOY)
    c1 = sts.claims(t1)
    assert c1["act"] == nested(sts, 1)
    assert sts.last_record()["details"]["delegation_depth"] == 1
    assert sts.last_record()["actor_subject"] == agent(1)

    t2 = sts.granted(t1, subject_token_type=own_type, actor=sts.actor(2), audience=DEPLOY)
    c2 = sts.claims(t2)
    assert c2["act"] == nested(sts, 2, 1)
    record = sts.last_record()
    assert (record["issuer"], record["rule"]) == ("self", "reexchange")
    assert record["details"]["delegation_depth"] == 2

    t3 = sts.granted(t2, subject_token_type=own_type, actor=sts.actor(3), audience=DEPLOY)
    c3 = sts.claims(t3)
    assert c3["act"] == nested(sts, 3, 2, 1)
    assert sts.last_record()["details"]["delegation_depth"] == 3
    # The subject stays the workload all the way down; only the actors pile up.
    assert {c["sub"] for c in (c1, c2, c3)} == {SUBJECT}
    assert len({c["jti"] for c in (c1, c2, c3)}) == 3


def test_max_depth_two_refuses_the_third_actor(make_sts: Callable[..., STS]) -> None:
    sts = make_sts(policy(max_depth=2))
    t1 = sts.granted(sts.subject(), actor=sts.actor(1))
    t2 = sts.reexchange(t1, actor=sts.actor(2))
    assert sts.claims(t2)["act"] == nested(sts, 2, 1)

    a3 = sts.actor(3)
    resp = sts.exchange(t2, subject_token_type=ACCESS_TOKEN_TYPE, audience=DEPLOY, actor=a3)
    record = assert_refused(sts, resp, "invalid_request", "policy.delegation_too_deep")
    assert record["details"]["detail"] == "3"
    assert record["actor_subject"] == agent(3)
    assert record["actor_token_sha256"] == token_hash(a3)


def test_chain_reaches_the_global_cap_and_no_further(make_sts: Callable[..., STS]) -> None:
    sts = make_sts(policy(max_depth=MAX_DELEGATION_DEPTH))
    token = sts.granted(sts.subject(), actor=sts.actor(1))
    for n in range(2, MAX_DELEGATION_DEPTH + 1):
        token = sts.reexchange(token, actor=sts.actor(n))
    assert sts.claims(token)["act"] == nested(sts, *range(MAX_DELEGATION_DEPTH, 0, -1))

    resp = sts.exchange(token, subject_token_type=ACCESS_TOKEN_TYPE, audience=DEPLOY, actor=sts.actor(9))
    assert_refused(sts, resp, "invalid_request", "policy.delegation_too_deep")


def test_a_rule_cannot_raise_the_global_cap(make_settings: Callable[..., Settings]) -> None:
    # The schema refuses it when the file is loaded...
    with pytest.raises(ConfigurationError, match="max_depth"):
        create_app(make_settings(policy(max_depth=MAX_DELEGATION_DEPTH + 1)))
    # ...and so does the compiler, for rules that do not come through the schema.
    raw = policy(max_depth=MAX_DELEGATION_DEPTH + 1)["rules"][0]
    with pytest.raises(ConfigurationError, match=f"exceeds {MAX_DELEGATION_DEPTH}"):
        compile_rule(
            raw, source="test", issuers=frozenset({"upstream"}), clients=frozenset(), max_lifetime=3600
        )


def test_foreign_chain_plus_an_actor_is_capped(make_sts: Callable[..., STS], upstream: RunningServer) -> None:
    sts = make_sts(policy(max_depth=MAX_DELEGATION_DEPTH), issuers=trusted_for_delegation(upstream))
    at_cap = sts.crafted(act=chain_of(MAX_DELEGATION_DEPTH - 1, "https://partner.example"))
    token = sts.granted(at_cap, actor=sts.actor(1))
    assert sts.last_record()["details"]["delegation_depth"] == MAX_DELEGATION_DEPTH
    assert sts.claims(token)["act"]["act"] == asserted(
        chain_of(MAX_DELEGATION_DEPTH - 1, "https://partner.example"), sts.issuer.issuer_url
    )

    over = sts.crafted(act=chain_of(MAX_DELEGATION_DEPTH, "https://partner.example"))
    resp = sts.exchange(over, actor=sts.actor(1))
    assert_refused(sts, resp, "invalid_request", "policy.delegation_too_deep")


def test_a_chain_beyond_the_global_cap_is_never_issued_even_without_an_actor(
    make_sts: Callable[..., STS], upstream: RunningServer
) -> None:
    # Impersonation carries a presented chain over; it must not carry one longer than the cap.
    sts = make_sts(policy(max_depth=MAX_DELEGATION_DEPTH), issuers=trusted_for_delegation(upstream))
    over = sts.crafted(act=chain_of(MAX_DELEGATION_DEPTH + 1, "https://partner.example"))
    resp = sts.exchange(over)
    assert_refused(sts, resp, "invalid_request", "policy.delegation_too_deep")


@pytest.mark.parametrize(
    ("act", "reason"),
    [
        pytest.param("agent", "subject_token.malformed_act", id="not-an-object"),
        pytest.param({"iss": "https://partner.example"}, "subject_token.malformed_act", id="no-sub"),
        pytest.param({"sub": ""}, "subject_token.malformed_act", id="empty-sub"),
        pytest.param({"sub": "x", "act": ["y"]}, "subject_token.malformed_act", id="nested-not-an-object"),
        # Copied into the issued token: the rule for ``sub`` (an outside re-check).
        pytest.param(
            {"sub": "x", "act": {"sub": "y\u202enimda"}}, "subject_token.malformed_act", id="bidi-sub"
        ),
        pytest.param({"sub": "x\u2028admin"}, "subject_token.malformed_act", id="line-separator"),
        pytest.param({"sub": "x\x00"}, "subject_token.malformed_act", id="nul"),
        pytest.param({"sub": "x", "iss": 5}, "subject_token.malformed_act", id="iss-not-a-string"),
        pytest.param(chain_of(9, "https://partner.example"), "subject_token.act_chain_too_long", id="9-deep"),
    ],
)
def test_a_malformed_presented_chain_is_refused(
    make_sts: Callable[..., STS], upstream: RunningServer, act: Any, reason: str
) -> None:
    trusted = make_sts(issuers=trusted_for_delegation(upstream))
    assert_refused(trusted, trusted.exchange(trusted.crafted(act=act)), "invalid_request", reason)
    # From an issuer not trusted for delegation, any act is refused before its shape is looked at.
    untrusted = make_sts()
    assert_refused(
        untrusted,
        untrusted.exchange(untrusted.crafted(act=act)),
        "invalid_request",
        "subject_token.unverified_act",
    )


# -- which actor (policy) and may_act (RFC 8693 §4.4) -----------------------------------------------


def test_an_actor_the_rule_does_not_name_is_refused_and_audited(sts: STS) -> None:
    outsider = sts.issuer.kubernetes_token(
        audience=[STS_ISSUER], namespace="payments", service_account="api", now=sts.clock.now
    )
    resp = sts.exchange(sts.subject(), actor=outsider)
    record = assert_refused(sts, resp, "invalid_request", "policy.actor_not_allowed")
    assert record["actor_issuer"] == "upstream"
    assert record["actor_subject"] == "system:serviceaccount:payments:api"
    assert record["actor_token_sha256"] == token_hash(outsider)
    assert record["details"]["detail"] == "system:serviceaccount:payments:api"
    assert outsider not in str(record)


def test_an_actor_for_a_rule_without_delegation_is_refused(make_sts: Callable[..., STS]) -> None:
    doc = policy()
    del doc["rules"][0]["delegation"]
    sts = make_sts(doc)
    assert sts.exchange(sts.subject()).status_code == 200
    resp = sts.exchange(sts.subject(), actor=sts.actor(1))
    assert_refused(sts, resp, "invalid_request", "policy.actor_not_allowed")


def test_an_unverifiable_actor_token_is_refused(sts: STS) -> None:
    stranger = DevIssuer.ephemeral(sts.issuer.issuer_url, alg="RS256")
    forged = stranger.kubernetes_token(
        audience=[STS_ISSUER], namespace="agents", service_account="a1", now=sts.clock.now
    )
    resp = sts.exchange(sts.subject(), actor=forged)
    assert_refused(sts, resp, "invalid_request", "actor_token.unknown_kid")


@pytest.mark.parametrize(
    ("may_act", "reason"),
    [
        pytest.param({"sub": agent(2)}, "actor_token.not_in_may_act", id="another-actor"),
        pytest.param(
            {"sub": agent(1), "iss": "https://elsewhere.example"},
            "actor_token.not_in_may_act",
            id="right-sub-wrong-iss",
        ),
        pytest.param({"iss": "https://elsewhere.example"}, "actor_token.not_in_may_act", id="another-issuer"),
        pytest.param(agent(1), "subject_token.malformed_may_act", id="a-string"),
        pytest.param([{"sub": agent(1)}], "subject_token.malformed_may_act", id="a-list"),
        pytest.param({}, "subject_token.malformed_may_act", id="empty"),
        pytest.param({"client_id": agent(1)}, "subject_token.malformed_may_act", id="no-sub-or-iss"),
    ],
)
def test_may_act_that_does_not_name_the_actor_is_refused(sts: STS, may_act: Any, reason: str) -> None:
    resp = sts.exchange(sts.crafted(may_act=may_act), actor=sts.actor(1))
    assert_refused(sts, resp, "invalid_request", reason)


@pytest.mark.parametrize("with_iss", [True, False], ids=["sub-and-iss", "sub-only"])
def test_may_act_naming_the_actor_is_granted(sts: STS, with_iss: bool) -> None:
    may_act = {"sub": agent(1)} | ({"iss": sts.issuer.issuer_url} if with_iss else {})
    token = sts.granted(sts.crafted(may_act=may_act), actor=sts.actor(1))
    assert sts.claims(token)["act"] == nested(sts, 1)


@pytest.mark.parametrize(
    "may_act",
    [
        pytest.param(agent(1), id="a-string"),
        pytest.param({}, id="empty"),
        pytest.param([], id="a-list"),
        # Carried into the issued token: the rule for ``sub`` (an outside re-check).
        pytest.param({"sub": "x\u2028admin"}, id="line-separator"),
        pytest.param({"sub": "x\x1b[31m"}, id="escape"),
        pytest.param({"sub": agent(1), "iss": "\u202eexample"}, id="bidi-iss"),
        pytest.param({"sub": 7}, id="sub-not-a-string"),
    ],
)
def test_a_malformed_may_act_is_refused_without_an_actor_too(sts: STS, may_act: Any) -> None:
    """Granted without an actor, the token came out without the restriction (only an object is
    carried), and a re-exchange of it then let any actor in."""
    resp = sts.exchange(sts.crafted(may_act=may_act))
    assert_refused(sts, resp, "invalid_request", "subject_token.malformed_may_act")


def test_may_act_without_an_actor_token_is_impersonation(sts: STS) -> None:
    token = sts.granted(sts.crafted(may_act={"sub": agent(1), "note": "not ours to sign for"}))
    claims = sts.claims(token)
    assert "act" not in claims
    # may_act travels with the token, so a later re-exchange is still bound by it (RFC 8693 §4.4).
    assert claims["may_act"] == {"sub": agent(1)}


def test_a_cel_condition_sees_the_actor(make_sts: Callable[..., STS]) -> None:
    condition = 'actor != null && actor.claims["kubernetes.io"]["serviceaccount"]["name"] == "a2"'
    sts = make_sts(policy(upstream={"condition": condition}))
    assert sts.claims(sts.granted(sts.subject(), actor=sts.actor(2)))["act"] == nested(sts, 2)
    # The rule's actors allow a1, but its condition does not: the rule does not apply at all.
    assert_refused(
        sts, sts.exchange(sts.subject(), actor=sts.actor(1)), "invalid_request", "policy.no_rule_for_identity"
    )
    # Without an actor, ``actor`` is null.
    assert_refused(sts, sts.exchange(sts.subject()), "invalid_request", "policy.no_rule_for_identity")


# -- impersonation (RFC 8693 §1.1) ------------------------------------------------------------------


def test_impersonation_issues_no_act(sts: STS) -> None:
    token = sts.granted(sts.subject())
    claims = sts.claims(token)
    assert "act" not in claims
    assert claims["client_id"] == SUBJECT
    assert sts.last_record()["details"]["delegation_depth"] == 0
    assert sts.last_record()["actor_subject"] is None


@pytest.mark.parametrize("depth", [1, 2])
def test_reexchange_without_an_actor_keeps_the_whole_chain(sts: STS, depth: int) -> None:
    token = sts.granted(sts.subject(), actor=sts.actor(1))
    for n in range(2, depth + 1):
        token = sts.reexchange(token, actor=sts.actor(n))
    expected = nested(sts, *range(depth, 0, -1))

    again = sts.reexchange(token)
    assert sts.claims(again)["act"] == expected
    assert sts.last_record()["details"]["delegation_depth"] == depth
    # And again: a chain is never dropped, however often the token is re-exchanged.
    assert sts.claims(sts.reexchange(again, audience=DEPLOY))["act"] == expected


def test_a_foreign_chain_from_an_issuer_trusted_for_delegation_is_carried_over(
    make_sts: Callable[..., STS], upstream: RunningServer
) -> None:
    # The carried actors count towards the rule's max_depth (docs/policies.md): 3 fit a rule of 3,
    # one more actor does not.
    sts = make_sts(policy(max_depth=3), issuers=trusted_for_delegation(upstream))
    chain = chain_of(3, "https://partner.example")
    assert sts.claims(sts.granted(sts.crafted(act=chain)))["act"] == asserted(chain, sts.issuer.issuer_url)
    resp = sts.exchange(sts.crafted(act=chain), actor=sts.actor(1))
    assert_refused(sts, resp, "invalid_request", "policy.delegation_too_deep")


def test_a_carried_chain_deeper_than_the_rule_allows_is_refused_even_without_an_actor(
    make_sts: Callable[..., STS], upstream: RunningServer
) -> None:
    """A rule of one actor at most (the default) must not issue a token holding three, though the
    request adds none: the limit is on the issued token's chain, earlier actors included."""
    sts = make_sts(policy(max_depth=1), issuers=trusted_for_delegation(upstream))
    resp = sts.exchange(sts.crafted(act=chain_of(3, "https://partner.example")))
    assert_refused(sts, resp, "invalid_request", "policy.delegation_too_deep")
    # One carried actor is within it.
    chain = chain_of(1, "https://partner.example")
    assert sts.claims(sts.granted(sts.crafted(act=chain)))["act"] == asserted(chain, sts.issuer.issuer_url)


# -- act from upstream: an assertion we did not verify ----------------------------------------------


@pytest.mark.parametrize("with_actor", [False, True], ids=["impersonation", "delegation"])
def test_an_upstream_act_is_refused_unless_its_issuer_is_trusted_for_delegation(
    sts: STS, with_actor: bool
) -> None:
    """The attack: a GitHub Actions token carrying ``act`` names an actor nobody verified; copied
    into our token, a resource server would read it as ours.  Refused, and the record says so."""
    admin = {"sub": "system:serviceaccount:kube-system:admin"}
    token = sts.issuer.github_actions_token(audience=STS_ISSUER, now=sts.clock.now, act=admin)
    resp = sts.exchange(token, actor=sts.actor(1) if with_actor else None)
    record = assert_refused(sts, resp, "invalid_request", "subject_token.unverified_act")
    assert record["details"]["upstream_act"] == "refused"
    assert record["details"]["detail"] == "upstream"
    assert (record["issuer"], record["subject"]) == ("upstream", SUBJECT)
    # Without the claim the same job is served: it is the act claim that is refused.
    assert "act" not in sts.claims(sts.granted(sts.subject()))


def test_a_carried_chain_names_who_asserted_it_and_keeps_doing_so_on_re_exchange(
    make_sts: Callable[..., STS], upstream: RunningServer
) -> None:
    """Another STS trusted to assert delegation: its chain is carried, each entry with ``asserted_by``
    naming it (an entry's own ``iss`` names the actor's issuer and is kept; an ``asserted_by`` the
    upstream put there is replaced, as we can vouch only for who told us).  Actors this service
    verified itself carry no ``asserted_by``."""
    sts = make_sts(policy(max_depth=4), issuers=trusted_for_delegation(upstream))
    partner = sts.issuer.issuer_url
    presented = {
        "sub": "spiffe://partner.example/planner",
        "asserted_by": "https://sts.test",
        # Not identity claims (RFC 8693 §4.1): not ours to sign for, so not carried (an outside
        # audit had them all copied, our own upstream_issuer too, which revocation reads).
        "scope": "deploy:write admin",
        "cnf": {"jkt": "attacker-key"},
        "upstream_issuer": "kubernetes",
        "act": {"sub": "spiffe://partner.example/scheduler", "iss": "https://partner.example", "exp": 1},
    }
    expected = {
        "sub": "spiffe://partner.example/planner",
        "asserted_by": partner,
        "act": {
            "sub": "spiffe://partner.example/scheduler",
            "iss": "https://partner.example",
            "asserted_by": partner,
        },
    }
    token = sts.granted(sts.crafted(act=presented), actor=sts.actor(1))
    record = sts.last_record()
    assert (record["details"]["upstream_act"], record["details"]["delegation_depth"]) == ("carried", 3)
    assert sts.claims(token)["act"] == actor_entry(sts, 1, expected)
    # Re-exchange: our own chain is carried as we issued it, and a new actor goes on top.
    again = sts.reexchange(token, actor=sts.actor(2))
    assert sts.claims(again)["act"] == actor_entry(sts, 2, actor_entry(sts, 1, expected))
    assert "upstream_act" not in sts.last_record()["details"]


@pytest.mark.parametrize("trusted", [False, True], ids=["issuer-not-trusted", "issuer-trusted"])
def test_an_actor_token_that_carries_act_is_refused(
    make_sts: Callable[..., STS], upstream: RunningServer, trusted: bool
) -> None:
    """An actor token that is itself delegated (someone else acting as the actor) cannot be placed
    in one chain without hiding who really acts: refused, from any issuer."""
    sts = make_sts(issuers=trusted_for_delegation(upstream)) if trusted else make_sts()
    delegated_actor = sts.issuer.kubernetes_token(
        audience=[STS_ISSUER],
        namespace="agents",
        service_account="a1",
        now=sts.clock.now,
        act={"sub": "system:serviceaccount:kube-system:admin"},
    )
    record = assert_refused(
        sts, sts.exchange(sts.subject(), actor=delegated_actor), "invalid_request", "actor_token.carries_act"
    )
    assert record["actor_subject"] == agent(1)


def with_agent_tokens(doc: dict[str, Any], *, actors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``doc`` with a rule that gives the agents tokens of ours for this service (their actor
    credentials here), and those tokens as actors of the job's first rule (``actors``: instead)."""
    doc["rules"].append(
        {
            "name": "agents",
            "issuer": "upstream",
            "subject_pattern": AGENTS,
            "require_client_authentication": False,
            "delegation": {"actors": [{"issuer": "upstream", "subject_pattern": AGENTS}]},
            "grant": {"audiences": [STS_ISSUER, DEPLOY], "max_lifetime": 300},
        }
    )
    doc["rules"][0]["delegation"]["actors"] += actors or [{"issuer": "self", "subject_pattern": AGENTS}]
    return doc


def test_a_delegated_token_of_ours_as_actor_token_is_refused(make_sts: Callable[..., STS]) -> None:
    """Our own token with an ``act`` (a2's, with a1 acting for it) as the actor of another
    exchange: the chain it carries would be dropped, so it is refused."""
    sts = make_sts(with_agent_tokens(policy()))
    ours = sts.granted(sts.actor(2), actor=sts.actor(1), audience=STS_ISSUER)
    resp = sts.exchange(sts.subject(), actor=ours)
    record = assert_refused(sts, resp, "invalid_request", "actor_token.carries_act")
    assert record["actor_issuer"] == "self"


def test_the_subject_cannot_act_for_itself(make_sts: Callable[..., STS]) -> None:
    """Delegation is one party acting for another (RFC 8693 §1.1): the subject token in the actor's
    seat, or another token of the same workload (ours, naming where it came from), would meet
    ``require_actor`` with one credential."""
    doc = policy(upstream={"require_actor": True})
    doc["rules"][0]["delegation"]["actors"] += [
        {"issuer": "upstream", "subject": SUBJECT},
        {"issuer": "self", "subject": SUBJECT},
    ]
    sts = make_sts(with_agent_tokens(doc))
    subject = sts.subject()
    assert_refused(sts, sts.exchange(subject, actor=subject), "invalid_request", "actor_token.is_subject")
    assert_refused(
        sts, sts.exchange(subject, actor=sts.subject()), "invalid_request", "actor_token.is_subject"
    )
    ours = sts.granted(sts.actor(1), audience=STS_ISSUER)
    assert sts.claims(sts.granted(subject, actor=ours))["act"]["sub"] == agent(1)


def test_a_bearer_token_of_ours_acts_only_if_it_names_this_service(make_sts: Callable[..., STS]) -> None:
    """A token of ours in the actor's seat is the actor's credential to this service: one issued
    for another audience (the deploy API, which could replay it) is refused there (RFC 8725 §3.9);
    one for this service acts."""
    sts = make_sts(with_agent_tokens(policy()))
    for_deploy = sts.granted(sts.actor(1), audience=DEPLOY)
    resp = sts.exchange(sts.subject(), actor=for_deploy)
    record = assert_refused(sts, resp, "invalid_request", "actor_token.audience_not_this_service")
    assert (record["actor_issuer"], record["actor_subject"]) == ("self", agent(1))
    for_us = sts.granted(sts.actor(1), audience=STS_ISSUER)
    assert sts.claims(sts.granted(sts.subject(), actor=for_us))["act"]["sub"] == agent(1)


def test_a_delegated_token_never_outlives_the_actors_token(make_sts: Callable[..., STS]) -> None:
    """The issued token expires no later than the actor token, as it does with the subject token."""
    sts = make_sts()
    now = sts.clock.now

    def actor(**kwargs: Any) -> str:
        return sts.issuer.kubernetes_token(
            audience=[STS_ISSUER], namespace="agents", service_account="a1", now=now, **kwargs
        )

    short = sts.granted(sts.subject(), actor=actor(lifetime=100))
    assert sts.claims(short)["exp"] - now <= 100
    # (``warnafter``, which only the Kubernetes profile reads: tests/core/profiles/test_kubernetes.py.)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_trusted_delegation_must_be_a_boolean(
    make_settings: Callable[..., Settings], upstream: RunningServer, value: Any
) -> None:
    issuers = trusted_for_delegation(upstream)
    issuers[0]["trusted_delegation"] = value
    with pytest.raises(ConfigurationError, match="trusted_delegation"):
        make_settings(issuers=issuers)


def test_require_actor_refuses_impersonation(make_sts: Callable[..., STS]) -> None:
    sts = make_sts(policy(upstream={"require_actor": True}, own={"require_actor": True}))
    resp = sts.exchange(sts.subject())
    assert_refused(sts, resp, "invalid_request", "policy.actor_required")

    token = sts.granted(sts.subject(), actor=sts.actor(1))
    # Re-exchanging a delegated token without a new actor is impersonation too.
    resp = sts.exchange(token, subject_token_type=ACCESS_TOKEN_TYPE, audience=DEPLOY)
    assert_refused(sts, resp, "invalid_request", "policy.actor_required")
    assert sts.claims(sts.reexchange(token, actor=sts.actor(2)))["act"] == nested(sts, 2, 1)


def test_require_actor_needs_actors(make_settings: Callable[..., Settings]) -> None:
    doc = policy(upstream={"require_actor": True})
    del doc["rules"][0]["delegation"]
    with pytest.raises(ConfigurationError, match=r"require_actor needs delegation\.actors"):
        create_app(make_settings(doc))


# -- re-exchange only narrows ----------------------------------------------------------------------


def test_reexchange_cannot_reach_an_audience_outside_the_presented_token(sts: STS) -> None:
    token = sts.granted(sts.subject(), audience=DEPLOY)
    assert sts.claims(token)["aud"] == DEPLOY

    # The self rule grants REPORTS, but the presented token was never for it.
    for audiences in ([REPORTS], [DEPLOY, REPORTS]):
        resp = sts.exchange(token, subject_token_type=ACCESS_TOKEN_TYPE, audience=audiences)
        assert_refused(sts, resp, "invalid_target", "reexchange.audience_not_within_presented_token")
    assert sts.claims(sts.reexchange(token, audience=DEPLOY))["aud"] == DEPLOY


def test_wider_scope_is_narrowed_to_what_the_presented_token_holds(sts: STS) -> None:
    token = sts.granted(sts.subject(), scope="deploy:read")
    resp = sts.exchange(
        token,
        subject_token_type=ACCESS_TOKEN_TYPE,
        audience=DEPLOY,
        scope="deploy:read deploy:write deploy:admin",
    )
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["scope"] == "deploy:read"
    assert sts.claims(resp.get_json()["access_token"])["scope"] == "deploy:read"
    record = sts.last_record()
    assert record["granted_scope"] == ["deploy:read"]
    assert "reexchange.scope_narrowed" in record["reasons"]


def test_asking_only_for_scopes_not_held_is_invalid_scope(sts: STS) -> None:
    token = sts.granted(sts.subject(), scope="deploy:read")
    # deploy:admin is allowed by the self rule; deploy:write by both rules; neither is held.
    for scope in ("deploy:admin", "deploy:write", "deploy:write deploy:admin"):
        resp = sts.exchange(token, subject_token_type=ACCESS_TOKEN_TYPE, audience=DEPLOY, scope=scope)
        assert_refused(sts, resp, "invalid_scope", "reexchange.scope_not_within_presented_token")


def test_default_scopes_never_widen_a_reexchange(sts: STS) -> None:
    token = sts.granted(sts.subject(), scope="deploy:write")
    resp = sts.exchange(token, subject_token_type=ACCESS_TOKEN_TYPE, audience=DEPLOY)
    # The self rule's default (deploy:read) is not held: not deploy:read, and not a token of no
    # scope either (docs/policies.md: none left is invalid_scope).
    assert_refused(sts, resp, "invalid_scope", "reexchange.scope_not_within_presented_token")
    # Asked for what it holds, it is granted that.
    assert sts.claims(sts.reexchange(token, scope="deploy:write"))["scope"] == "deploy:write"


def test_narrowing_is_repeated_at_every_level(sts: STS) -> None:
    t1 = sts.granted(sts.subject(), scope="deploy:read deploy:write")
    t2 = sts.reexchange(t1, scope="deploy:write deploy:admin", actor=sts.actor(1))
    assert sts.claims(t2)["scope"] == "deploy:write"
    t3 = sts.reexchange(t2, scope="deploy:read deploy:write deploy:admin")
    assert sts.claims(t3)["scope"] == "deploy:write"


def test_reexchange_expires_no_later_than_the_presented_token(sts: STS) -> None:
    start = sts.clock.now
    token = sts.granted(sts.subject())
    presented = sts.claims(token)
    assert presented["exp"] == start + 300

    sts.clock.now = start + 200
    resp = sts.exchange(token, subject_token_type=ACCESS_TOKEN_TYPE, audience=DEPLOY)
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["expires_in"] == 100  # not the self rule's 3600
    assert sts.claims(resp.get_json()["access_token"])["exp"] == presented["exp"]

    resp = sts.exchange(
        token, subject_token_type=ACCESS_TOKEN_TYPE, audience=DEPLOY, requested_expires_in="30"
    )
    assert sts.claims(resp.get_json()["access_token"])["exp"] == start + 230

    # Past its exp but inside the verification leeway: still verifies, but nothing is left to give.
    sts.clock.now = presented["exp"] + 10
    resp = sts.exchange(token, subject_token_type=ACCESS_TOKEN_TYPE, audience=DEPLOY)
    assert_refused(sts, resp, "invalid_request", "subject_token.expired")


def test_reexchange_carries_auth_time_over(sts: STS) -> None:
    start = sts.clock.now
    upstream_token = sts.subject(age=100)
    t1 = sts.granted(upstream_token, actor=sts.actor(1))
    assert sts.claims(t1)["auth_time"] == start - 100
    assert sts.claims(t1)["iat"] == start

    sts.clock.now = start + 60
    t2 = sts.reexchange(t1, actor=sts.actor(2))
    claims = sts.claims(t2)
    assert claims["iat"] == start + 60
    assert claims["auth_time"] == start - 100  # the workload's attestation, not T1's issue time


# -- freshness: max_attestation_age ----------------------------------------------------------------


@pytest.mark.parametrize(("age", "granted"), [(10, True), (600, True), (601, False), (1200, False)])
def test_max_attestation_age_on_upstream_tokens(
    make_sts: Callable[..., STS], age: int, granted: bool
) -> None:
    sts = make_sts(policy(upstream={"max_attestation_age": 600}))
    resp = sts.exchange(sts.subject(age=age))
    if not granted:
        assert_refused(sts, resp, "invalid_request", "policy.attestation_too_old")
        return
    assert resp.status_code == 200, resp.get_json()
    claims = sts.claims(resp.get_json()["access_token"])
    assert claims["auth_time"] == sts.clock.now - age


def test_a_carried_auth_time_older_than_iat_is_the_attestation_time(make_sts: Callable[..., STS]) -> None:
    """Another STS's token (or any token carrying ``auth_time``, RFC 9068 §2.2.1) was re-issued at
    its ``iat`` on attestation made at its ``auth_time``: the earlier of the two counts, so a peer's
    re-exchange cannot keep stale attestation fresh here (an outside audit)."""
    sts = make_sts(policy(upstream={"max_attestation_age": 600}))
    stale = sts.crafted(auth_time=int(sts.clock.now) - 1200)
    assert_refused(sts, sts.exchange(stale), "invalid_request", "policy.attestation_too_old")
    recent = sts.crafted(auth_time=int(sts.clock.now) - 100)
    assert sts.claims(sts.granted(recent))["auth_time"] == int(sts.clock.now) - 100
    # A later auth_time than iat is no reason to believe the token younger.
    later = sts.crafted(auth_time=int(sts.clock.now) + 20, iat=int(sts.clock.now) - 300)
    assert sts.claims(sts.granted(later))["auth_time"] == int(sts.clock.now) - 300


def test_max_attestation_age_on_reexchange_uses_the_original_attestation(
    make_sts: Callable[..., STS],
) -> None:
    sts = make_sts(policy(own={"max_attestation_age": 300}))
    fresh = sts.granted(sts.subject(age=100))
    stale = sts.granted(sts.subject(age=500))
    # Both tokens were just issued (iat = now); what counts is when the workload attested.
    assert sts.claims(stale)["iat"] == sts.clock.now

    assert sts.claims(sts.reexchange(fresh))["auth_time"] == sts.clock.now - 100
    resp = sts.exchange(stale, subject_token_type=ACCESS_TOKEN_TYPE, audience=DEPLOY)
    assert_refused(sts, resp, "invalid_request", "policy.attestation_too_old")


def test_policy_file_round_trips_the_delegation_fields(make_settings: Callable[..., Settings]) -> None:
    # The policy file (YAML, through the schema) compiles into the rule the tests above rely on.
    settings = make_settings(
        policy(max_depth=2, upstream={"single_use": True, "max_attestation_age": 60, "require_actor": True})
    )
    rule = create_app(settings).extensions["sts"].policy.rules[0]
    assert (rule.max_delegation_depth, rule.single_use, rule.max_attestation_age, rule.require_actor) == (
        2,
        True,
        60,
        True,
    )
    assert rule.actors[0].subject_pattern.fullmatch(agent(7))
    assert not rule.actors[0].subject_pattern.fullmatch(agent(7) + "x")


def test_may_act_binds_later_hops_too(make_sts: Callable[..., STS]) -> None:
    """The subject allowed only a1: after a1's hop, a2 may not join the chain through re-exchange."""
    sts = make_sts(policy(max_depth=3))
    first = sts.granted(sts.crafted(may_act={"sub": agent(1)}), actor=sts.actor(1))
    assert sts.claims(first)["may_act"] == {"sub": agent(1)}
    refused = sts.exchange(first, subject_token_type=ACCESS_TOKEN_TYPE, actor=sts.actor(2), audience=DEPLOY)
    assert_refused(sts, refused, "invalid_request", "actor_token.not_in_may_act")


# -- what security events say of the actor --------------------------------------------------------

RS_SECRET = "deploy-api-secret-0123456789-abcdefghijkl"


def set_actor_state(sts: STS, n: int, **state: Any) -> None:
    """What a security event (or ``sts revoke subject upstream ...``) leaves for actor ``n``."""
    runtime = sts.app.extensions["sts"]
    runtime.subject_states.put(identity_key("upstream", agent(n)), SubjectState(**state), 3600)


def test_a_blocked_actor_acts_for_nobody(sts: STS) -> None:
    """RFC 8693 §4.1: the actor is the party exercising the token; a security event that blocks it
    holds for its actor tokens, fresh ones too, as for its own exchanges."""
    set_actor_state(sts, 1, blocked_until=sts.clock.now + 600, events=("session-revoked",))
    resp = sts.exchange(sts.subject(), actor=sts.actor(1))
    assert_refused(sts, resp, "invalid_request", "actor_token.blocked")
    assert "blocked the actor" in resp.get_json()["error_description"]
    sts.granted(sts.subject(), actor=sts.actor(2))
    sts.clock.now += 601
    sts.granted(sts.subject(), actor=sts.actor(1))


def test_an_actor_a_transmitter_declared_critical_acts_for_nobody(sts: STS) -> None:
    """An actor declared at critical risk (CAEP ``risk-level-change``) was refused its own exchanges
    but acted for others at once: only its block and re-attestation were read (an outside red team).
    Its asserted level now weighs in the delegated exchange's ``shared_signal`` as the subject's."""
    set_actor_state(sts, 1, risk_level="CRITICAL", events=("risk-level-change",))
    resp = sts.exchange(sts.subject(), actor=sts.actor(1))
    record = assert_refused(sts, resp, "invalid_request", "risk.denied")
    assert resp.get_json()["risk"] == {"decision": "deny", "signals": ["shared_signal"]}
    assert record["details"]["actor_risk_level"] == "critical"
    sts.granted(sts.subject(), actor=sts.actor(2))  # another actor: untouched
    set_actor_state(sts, 1, risk_level="low", events=("risk-level-change",))
    sts.granted(sts.subject(), actor=sts.actor(1))


def test_an_actors_asserted_level_is_on_record_whatever_refuses_it(sts: STS) -> None:
    """A delegation refused for another reason (``may_act`` names someone else) still records the
    actor's asserted level (a review found it dropped)."""
    set_actor_state(sts, 1, risk_level="critical", events=("risk-level-change",))
    resp = sts.exchange(sts.crafted(may_act={"sub": agent(2)}), actor=sts.actor(1))
    record = assert_refused(sts, resp, "invalid_request", "actor_token.not_in_may_act")
    assert record["details"]["actor_risk_level"] == "critical"


def test_a_token_naming_an_actor_declared_critical_is_not_re_exchanged(sts: STS) -> None:
    """The actors a token of ours names take part in its re-exchange: a token naming an actor later
    declared critical was re-exchanged without it, again and again (an outside review)."""
    named = sts.granted(sts.subject(), actor=sts.actor(1))
    other = sts.granted(sts.subject(), actor=sts.actor(2))
    # Stored as an older writer (or a hand) left it: upper case, beside a lower level of its own.
    set_actor_state(sts, 1, risk_level="low", events=("risk-level-change",))
    runtime = sts.app.extensions["sts"]
    runtime.subject_states.put(identity_key("*", agent(1)), SubjectState(risk_level="CRITICAL"), 3600)
    resp = sts.exchange(named, subject_token_type=ACCESS_TOKEN_TYPE, audience=DEPLOY)
    record = assert_refused(sts, resp, "invalid_request", "risk.denied")
    assert record["details"]["actor_risk_level"] == "critical"
    resp = sts.exchange(named, subject_token_type=ACCESS_TOKEN_TYPE, actor=sts.actor(2), audience=DEPLOY)
    assert_refused(sts, resp, "invalid_request", "risk.denied")  # nested under another actor: the same
    sts.reexchange(other)  # a token naming another actor: untouched


def test_a_trusted_issuers_chain_naming_an_actor_declared_critical_is_refused(
    make_sts: Callable[..., STS], upstream: RunningServer
) -> None:
    """An upstream token whose ``act`` a trusted issuer asserts, naming an actor declared critical,
    was exchanged for a token of ours carrying it (only its re-exchange was refused; a review)."""
    sts = make_sts(policy(max_depth=4), issuers=trusted_for_delegation(upstream))
    set_actor_state(sts, 1, risk_level="critical", events=("risk-level-change",))
    chain = {"sub": agent(1), "iss": sts.issuer.issuer_url}
    resp = sts.exchange(sts.crafted(act=chain), audience=DEPLOY)
    record = assert_refused(sts, resp, "invalid_request", "risk.denied")
    assert record["details"]["actor_risk_level"] == "critical"
    sts.granted(sts.crafted(act={"sub": agent(2), "iss": sts.issuer.issuer_url}), audience=DEPLOY)
    resp = sts.exchange(sts.crafted(act={"sub": agent(1)}), audience=DEPLOY)  # no iss: the asserter's
    assert_refused(sts, resp, "invalid_request", "risk.denied")


def test_a_trusted_issuers_chain_is_not_judged_by_another_issuers_workload_of_that_name(
    make_sts: Callable[..., STS], upstream: RunningServer
) -> None:
    """An ``act`` entry of a trusted issuer's token was looked up under every configured issuer: an
    event about one cluster's ``default`` service account refused a peer's of the same name (a
    review).  It is looked up under the issuer it names, or the asserting one, and the any-issuer key."""
    other = {
        **trusted_for_delegation(upstream)[0],
        "name": "cluster-b",
        "issuer": "https://cluster-b.example",
    }
    sts = make_sts(policy(max_depth=4), issuers=[*trusted_for_delegation(upstream), other])
    runtime = sts.app.extensions["sts"]
    runtime.subject_states.put(identity_key("cluster-b", agent(1)), SubjectState(risk_level="critical"), 3600)
    for chain in ({"sub": agent(1)}, {"sub": agent(1), "iss": "https://cluster-c.example"}):
        sts.granted(sts.crafted(act=chain), audience=DEPLOY)
    resp = sts.exchange(
        sts.crafted(act={"sub": agent(1), "iss": "https://cluster-b.example"}), audience=DEPLOY
    )
    assert_refused(sts, resp, "invalid_request", "risk.denied")  # the entry names that issuer


def test_an_actor_asked_to_attest_again_needs_a_fresh_actor_token(sts: STS) -> None:
    before = sts.actor(1)
    sts.clock.now += 10
    set_actor_state(sts, 1, reauth_after=sts.clock.now - 5, events=("credential-change",))
    resp = sts.exchange(sts.subject(), actor=before)
    assert_refused(sts, resp, "invalid_request", "actor_token.attestation_predates_security_event")
    assert "fresh actor token" in resp.get_json()["error_description"]
    sts.granted(sts.subject(), actor=sts.actor(1))


def test_tokens_naming_a_revoked_actor_are_revoked_with_it(make_sts: Callable[..., STS]) -> None:
    """Introspection says inactive and re-exchange refuses, for the tokens whose ``act`` names the
    actor; tokens with another actor (or none) are untouched."""
    rs = {"client_id": "deploy-api", "auth_method": "client_secret_basic",
          "secret_hash": hash_secret(RS_SECRET), "audiences": [DEPLOY]}  # fmt: skip
    sts = make_sts(clients=[*DEFAULT_CLIENTS, rs])
    named = sts.granted(sts.subject(), actor=sts.actor(1))
    again = sts.reexchange(named)
    other = sts.granted(sts.subject(), actor=sts.actor(2))
    alone = sts.granted(sts.subject())

    def active(token: str) -> bool:
        resp = sts.web.post("/introspect", data={"token": token}, auth=("deploy-api", RS_SECRET))
        return bool(resp.get_json()["active"])

    assert active(named) and active(again) and active(other) and active(alone)
    sts.clock.now += 1
    set_actor_state(sts, 1, revoked_before=sts.clock.now, events=("session-revoked",))
    assert [active(t) for t in (named, again, other, alone)] == [False, False, True, True]
    resp = sts.exchange(named, subject_token_type=ACCESS_TOKEN_TYPE, audience=DEPLOY)
    assert_refused(sts, resp, "invalid_request", "subject_token.revoked")  # the subject was not revoked
    sts.reexchange(other)
    # A token issued to the actor after the event is not touched by it.
    sts.clock.now += 1
    assert active(sts.granted(sts.subject(), actor=sts.actor(1)))


@pytest.mark.parametrize(("named", "granted"), [("upstream", True), ("elsewhere", False)])
def test_a_self_actor_entry_can_name_the_issuer_the_actor_came_from(
    make_sts: Callable[..., STS], named: str, granted: bool
) -> None:
    """The same ``sub`` under two issuers is two workloads: an ``issuer: self`` actor entry says
    which by the token's ``upstream_issuer`` claim, and the issued ``act`` keeps it."""
    actors = [{"issuer": "self", "subject": agent(1), "claims": {"upstream_issuer": named}}]
    sts = make_sts(with_agent_tokens(policy(), actors=actors))
    ours = sts.granted(sts.actor(1), audience=STS_ISSUER)
    resp = sts.exchange(sts.subject(), actor=ours)
    if not granted:
        assert_refused(sts, resp, "invalid_request", "policy.actor_not_allowed")
        return
    assert resp.status_code == 200, sts.last_record()["reasons"]
    act = sts.claims(resp.get_json()["access_token"])["act"]
    assert act == {"sub": agent(1), "iss": STS_ISSUER, "upstream_issuer": "upstream"}


# -- risk: a re-exchange is judged with the workload's upstream history ----------------------------


def s2s_signal(record: dict[str, Any]) -> dict[str, Any]:
    [signal] = [s for s in record["details"]["risk"]["signals"] if s["name"] == "unexpected_s2s"]
    return signal


def test_a_chain_built_by_re_exchange_is_deeper_than_the_mature_workload_ever_was(
    make_sts: Callable[..., STS],
) -> None:
    """A workload past learning, only ever seen at depth 0: an actor added by re-exchanging its token
    fires ``unexpected_s2s`` as the same actor on its upstream token does.  The re-exchange's own
    identity (``self|<sub>``) was new, so learning: an outside audit built a chain to the rule's
    ``max_depth`` that way without the signal, and once the ``self`` identity had learned it, deep
    chains looked usual.  A re-exchange the workload's history has seen does not fire."""
    risk = {"risk": {"networks": ["127.0.0.0/8"]}}
    sts = make_sts(policy(upstream=risk, own=risk))
    for _ in range(5):  # learning ends with the fifth grant
        sts.granted(sts.subject(), audience=DEPLOY)
        assert s2s_signal(sts.last_record())["reason"].startswith("learning")
    plain = sts.granted(sts.subject(), audience=DEPLOY)
    assert not s2s_signal(sts.last_record())["fired"]

    sts.reexchange(plain)  # the same workload, at its usual depth: nothing new
    record = sts.last_record()
    assert (record["issuer"], record["details"]["risk"]["learning"]) == ("self", False)
    # The record names the identity it was judged with, and both's exchanges (its own baseline,
    # new, is learning: the record said learning false beside it, without saying why).
    assert record["details"]["risk"]["history"] == {"joined_with": f"upstream|{SUBJECT}", "count": 6}
    assert record["details"]["risk"]["baseline"]["learning"] is True
    assert not s2s_signal(record)["fired"]

    sts.reexchange(plain, actor=sts.actor(1))
    signal = s2s_signal(sts.last_record())
    assert signal["fired"] and signal["reason"] == "delegation chain deeper than usual"
    assert signal["evidence"] == {"depth": 1, "usual": 0}
    # The direct path says the same.
    sts.granted(sts.subject(), audience=DEPLOY, actor=sts.actor(1))
    assert s2s_signal(sts.last_record())["reason"] == "delegation chain deeper than usual"


def test_one_sub_under_two_issuers_keeps_two_re_exchange_baselines(
    make_sts: Callable[..., STS], upstream: RunningServer
) -> None:
    """The same ``sub`` under two issuers is two workloads, and so are the tokens of ours issued to
    them: their re-exchanges keep baselines apart (``self:<issuer>|<sub>``).  One ``self|<sub>`` for
    both let the other workload's deep chains make this one's look usual (an outside audit, after
    the re-exchange history above), and let the first key confirmed there judge the other."""
    with DevIssuer.serve_ephemeral(alg="RS256") as second:
        risk = {"risk": {"networks": ["127.0.0.0/8"]}}
        doc = policy(upstream=risk, own=risk)
        other_rule = {**deepcopy(doc["rules"][0]), "name": "other-workload", "issuer": "other"}
        doc["rules"].insert(1, other_rule)
        other = {**upstream_issuer(second), "name": "other"}
        sts = make_sts(doc, issuers=[upstream_issuer(upstream), other])
        # The other workload, same sub: a chain two deep, built by re-exchange.
        theirs = second.issuer.github_actions_token(audience=STS_ISSUER, now=sts.clock.now, lifetime=600)
        deep = sts.reexchange(sts.granted(theirs, audience=DEPLOY, actor=sts.actor(1)), actor=sts.actor(2))
        assert sts.last_record()["details"]["delegation_depth"] == 2
        # This workload: mature at depth 0, then one actor added by re-exchange.
        for _ in range(6):
            plain = sts.granted(sts.subject(), audience=DEPLOY)
        sts.reexchange(plain, actor=sts.actor(1))
        signal = s2s_signal(sts.last_record())
        assert signal["fired"] and signal["evidence"] == {"depth": 1, "usual": 0}
        baselines = sts.app.extensions["sts"].baselines
        assert baselines.load(identity_key("self:other", SUBJECT)).max_depth == 2
        assert baselines.load(identity_key("self:upstream", SUBJECT)).max_depth == 1
        assert baselines.load(identity_key("self", SUBJECT)).count == 0
        assert sts.claims(deep)["act"] == nested(sts, 2, 1)


def test_a_re_exchange_rules_own_rate_limit_is_per_workload(
    make_sts: Callable[..., STS], upstream: RunningServer
) -> None:
    """A rule's ``rate_limit`` is per workload identity: on an ``issuer: self`` rule, per workload the
    token was first issued for, not shared by two with one ``sub`` (an outside re-check: one used up
    the other's allowance)."""
    with DevIssuer.serve_ephemeral(alg="RS256") as second:
        doc = policy(own={"rate_limit": {"requests": 1, "period": 3600}})
        doc["rules"].insert(1, {**deepcopy(doc["rules"][0]), "name": "other-workload", "issuer": "other"})
        sts = make_sts(doc, issuers=[upstream_issuer(upstream), {**upstream_issuer(second), "name": "other"}])
        ours = sts.granted(sts.subject(), audience=DEPLOY)
        theirs = second.issuer.github_actions_token(audience=STS_ISSUER, now=sts.clock.now, lifetime=600)
        theirs_ours = sts.granted(theirs, audience=DEPLOY)
        sts.reexchange(ours)
        refused = sts.exchange(ours, subject_token_type=ACCESS_TOKEN_TYPE, audience=DEPLOY)
        assert refused.status_code == 429
        assert sts.last_record()["details"]["rate_limit"]["limited"].startswith(
            f"reexchange self:upstream|{SUBJECT}"
        )
        sts.reexchange(theirs_ours)  # the other workload's allowance is its own
