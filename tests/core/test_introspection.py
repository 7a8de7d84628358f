"""RFC 7662 introspection and RFC 7009 revocation of the tokens we issue."""

from __future__ import annotations

import base64
import io
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.datastructures import MultiDict
from werkzeug.test import EnvironBuilder, run_wsgi_app

from sts.app import create_app
from sts.core.assurance import ACR_POP, ACR_POSTURE
from sts.core.client_secrets import hash_secret
from sts.core.introspection import (
    MAX_CHAIN_ACTORS,
    actor_identities,
    chain_actor_identities,
    own_token_identities,
    revocation,
)
from sts.core.subject_state import SubjectState
from sts.dev.issuer import RunningServer
from sts.settings import Settings
from tests.conftest import ACCESS_TOKEN_TYPE, DEFAULT_CLIENTS, STS_ISSUER, exchange_form, upstream_issuer
from tests.support.clock import Clock

DEPLOY = "https://deploy.example.com"
RS_SECRET = "deploy-api-secret-0123456789-abcdefghijkl"
OTHER_SECRET = "ledger-api-secret-0123456789-abcdefghijkl"


def _rs(client_id: str, secret: str, audience: str) -> dict[str, Any]:
    """A resource server registered as a client, serving one audience."""
    return {
        "client_id": client_id,
        "auth_method": "client_secret_basic",
        "secret_hash": hash_secret(secret),
        "audiences": [audience],
    }


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


@pytest.fixture
def app(make_settings: Callable[..., Settings]) -> Flask:
    clients = [
        *DEFAULT_CLIENTS,
        _rs("deploy-api", RS_SECRET, DEPLOY),
        _rs("ledger-api", OTHER_SECRET, "ledger"),
    ]
    return create_app(make_settings(clients=clients))


@pytest.fixture
def web(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def issued(web: FlaskClient, upstream: RunningServer) -> str:
    subject = upstream.issuer.github_actions_token(audience=STS_ISSUER)
    resp = web.post("/token", data=exchange_form(subject, audience=DEPLOY, scope="deploy:read"))
    assert resp.status_code == 200
    return str(resp.get_json()["access_token"])


def introspect(web: FlaskClient, token: str, who: tuple[str, str] = ("deploy-api", RS_SECRET)) -> Any:
    resp = web.post("/introspect", data={"token": token}, headers=basic(*who))
    assert resp.status_code == 200 and resp.headers["Cache-Control"] == "no-store"
    return resp.get_json()


def test_active_token_for_its_audience(web: FlaskClient, issued: str) -> None:
    body = introspect(web, issued)
    assert body["active"] is True
    assert body["aud"] == DEPLOY and body["scope"] == "deploy:read" and body["token_type"] == "Bearer"
    assert body["sub"] == "repo:acme/app:ref:refs/heads/main" and body["iss"] == STS_ISSUER
    assert {"exp", "iat", "jti", "client_id", "auth_time"} <= set(body)


def test_a_token_is_inactive_from_its_exp_though_within_the_leeway(
    make_settings: Callable[..., Settings], upstream: RunningServer, clock: Clock
) -> None:
    """RFC 7662 §2.2: active only while unexpired.  Our own expiry is decided by our clock, as at
    the token endpoint; the leeway (30 s here) is for other parties' clocks."""
    clients = [*DEFAULT_CLIENTS, _rs("deploy-api", RS_SECRET, DEPLOY)]
    web = create_app(make_settings(clients=clients), clock=clock).test_client()
    subject = upstream.issuer.github_actions_token(audience=STS_ISSUER, now=clock.now)
    resp = web.post("/token", data=exchange_form(subject, audience=DEPLOY, scope="deploy:read"))
    token = resp.get_json()["access_token"]
    exp = introspect(web, token)["exp"]
    clock.now = exp - 1
    assert introspect(web, token)["active"] is True
    for moment in (exp, exp + 1, exp + 29):
        clock.now = moment
        assert introspect(web, token) == {"active": False}, moment


def test_token_for_another_audience_is_inactive_to_that_caller(web: FlaskClient, issued: str) -> None:
    assert introspect(web, issued, ("ledger-api", OTHER_SECRET)) == {"active": False}


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "eyJhbGciOiJub25lIn0.e30."])
def test_garbage_is_inactive_and_reveals_nothing(web: FlaskClient, token: str) -> None:
    if not token:
        resp = web.post("/introspect", data={"token": token}, headers=basic("deploy-api", RS_SECRET))
        assert resp.status_code == 400 and resp.get_json()["error"] == "invalid_request"
        return
    assert introspect(web, token) == {"active": False}


def test_subject_tokens_from_upstream_are_not_ours(web: FlaskClient, upstream: RunningServer) -> None:
    assert introspect(web, upstream.issuer.github_actions_token(audience=DEPLOY)) == {"active": False}


@pytest.mark.parametrize("endpoint", ["/introspect", "/revoke"])
def test_repeated_unknown_parameters_are_ignored_and_defined_ones_refused(
    web: FlaskClient, issued: str, endpoint: str
) -> None:
    """RFC 6749 §3.1/§3.2: unknown parameters are ignored, repeated or not; defined ones appear once."""
    rs = basic("deploy-api", RS_SECRET)
    unknown = [("token", issued), ("foo", "1"), ("foo", "2"), ("bar", ""), ("bar", "")]
    resp = web.post(endpoint, data=MultiDict(unknown), headers=rs)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    for name, value in (("token", issued), ("token_type_hint", "access_token"), ("client_id", "deploy-api")):
        pairs = [("token", issued), (name, value), (name, value)] if name != "token" else [(name, value)] * 2
        resp = web.post(endpoint, data=MultiDict(pairs), headers=rs)
        assert resp.status_code == 400 and resp.get_json()["error"] == "invalid_request", name


def test_introspection_needs_client_authentication(web: FlaskClient, issued: str) -> None:
    resp = web.post("/introspect", data={"token": issued})
    assert resp.status_code == 401 and resp.get_json()["error"] == "invalid_client"
    assert "WWW-Authenticate" in resp.headers
    wrong = web.post("/introspect", data={"token": issued}, headers=basic("deploy-api", "wrong"))
    assert wrong.status_code == 401


def test_revocation_by_the_resource_server_makes_it_inactive(web: FlaskClient, issued: str) -> None:
    resp = web.post("/revoke", data={"token": issued, "token_type_hint": "access_token"},
                    headers=basic("deploy-api", RS_SECRET))  # fmt: skip
    assert resp.status_code == 200 and resp.data == b""
    assert introspect(web, issued) == {"active": False}


def test_revocation_of_unknown_tokens_is_200(web: FlaskClient) -> None:
    resp = web.post("/revoke", data={"token": "not-a-token"}, headers=basic("deploy-api", RS_SECRET))
    assert resp.status_code == 200


def test_a_client_cannot_revoke_tokens_it_neither_holds_nor_serves(web: FlaskClient, issued: str) -> None:
    resp = web.post("/revoke", data={"token": issued}, headers=basic("ledger-api", OTHER_SECRET))
    assert resp.status_code == 400 and resp.get_json()["error"] == "unauthorized_client"
    assert introspect(web, issued)["active"] is True


def test_a_security_event_revokes_earlier_tokens_of_the_subject(
    app: Flask, web: FlaskClient, issued: str
) -> None:
    runtime = app.extensions["sts"]
    before = introspect(web, issued)
    runtime.subject_states.put(
        "upstream|repo:acme/app:ref:refs/heads/main", SubjectState(revoked_before=before["iat"] + 1), 3600
    )
    assert introspect(web, issued) == {"active": False}


def test_an_event_about_another_issuers_subject_of_the_same_name_does_not_reach_the_token(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    """Our tokens name the issuer they came from (``upstream_issuer``, carried on re-exchange): a
    security event or an operator naming the same ``sub`` under another configured issuer (another
    cluster's ``system:serviceaccount:ns:sa``; a transmitter allowed to speak for that issuer only)
    does not revoke them.  Found from outside: it did, the subject being checked under every issuer."""
    first = upstream_issuer(upstream)
    other = {**first, "name": "other", "issuer": "https://other.example.com"}
    policy = {"version": 1, "rules": [
        {"name": "deploy", "issuer": "upstream", "subject": "repo:acme/app:ref:refs/heads/main",
         "require_client_authentication": False, "grant": {"audiences": [DEPLOY]}},
        {"name": "again", "issuer": "self", "subject": "repo:acme/app:ref:refs/heads/main",
         "require_client_authentication": False, "grant": {"audiences": [DEPLOY]}},
    ]}  # fmt: skip
    clients = [*DEFAULT_CLIENTS, _rs("deploy-api", RS_SECRET, DEPLOY)]
    app = create_app(make_settings(policy, issuers=[first, other], clients=clients))
    web, states = app.test_client(), app.extensions["sts"].subject_states
    subject = upstream.issuer.github_actions_token(audience=STS_ISSUER)
    token = web.post("/token", data=exchange_form(subject, audience=DEPLOY)).get_json()["access_token"]
    claims = introspect(web, token)
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert payload["upstream_issuer"] == "upstream"
    again = web.post(
        "/token", data=exchange_form(token, audience=DEPLOY, subject_token_type=ACCESS_TOKEN_TYPE)
    )
    assert again.status_code == 200, again.get_json()
    renewed = again.get_json()["access_token"]
    assert json.loads(base64.urlsafe_b64decode(renewed.split(".")[1] + "=="))["upstream_issuer"] == "upstream"
    sub = "repo:acme/app:ref:refs/heads/main"
    states.put(f"other|{sub}", SubjectState(revoked_before=claims["iat"] + 10), 3600)
    assert introspect(web, token)["active"] is True and introspect(web, renewed)["active"] is True
    for name in ("upstream", "self", "*"):
        states.put(f"{name}|{sub}", SubjectState(revoked_before=claims["iat"] + 10), 3600)
        assert introspect(web, token) == {"active": False} == introspect(web, renewed), name
        states.put(f"{name}|{sub}", SubjectState(), 3600)
    # A token of ours without the claim (issued before it existed) is checked under every issuer.
    assert own_token_identities(sub, ["upstream", "other"]) == [
        f"other|{sub}",
        f"self|{sub}",
        f"upstream|{sub}",
        f"*|{sub}",
    ]
    assert own_token_identities(sub, ["upstream", "other"], "upstream") == [
        f"self|{sub}",
        f"upstream|{sub}",
        f"*|{sub}",
    ]


def test_every_call_is_audited_without_the_token(app: Flask, web: FlaskClient, issued: str) -> None:
    introspect(web, issued)
    web.post("/revoke", data={"token": issued}, headers=basic("deploy-api", RS_SECRET))
    records = app.extensions["sts"].audit.recent(5)
    assert [r["endpoint"] for r in records[:2]] == ["revoke", "introspect"]
    assert records[1]["outcome"] == "active" and records[0]["outcome"] == "revoked"
    assert issued not in str(records)


def test_metadata_names_the_endpoints(web: FlaskClient) -> None:
    md = web.get("/.well-known/oauth-authorization-server").get_json()
    assert md["introspection_endpoint"] == STS_ISSUER + "/introspect"
    assert md["revocation_endpoint"] == STS_ISSUER + "/revoke"


def test_revocation_is_visible_to_every_instance_sharing_the_store(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    clients = [*DEFAULT_CLIENTS, _rs("deploy-api", RS_SECRET, DEPLOY)]
    settings = make_settings(clients=clients)
    one, two = create_app(settings).test_client(), create_app(settings).test_client()
    subject = upstream.issuer.github_actions_token(audience=STS_ISSUER)
    token = one.post("/token", data=exchange_form(subject, audience=DEPLOY)).get_json()["access_token"]
    assert introspect(two, token)["active"] is True
    one.post("/revoke", data={"token": token}, headers=basic("deploy-api", RS_SECRET))
    assert introspect(two, token) == {"active": False}


def test_operator_revokes_every_token_of_a_subject(
    make_settings: Callable[..., Settings], upstream: RunningServer, tmp_path: Any
) -> None:
    """`sts revoke subject` is seen by a running instance sharing the store (introspection inactive)."""
    import yaml
    from click.testing import CliRunner

    from sts.cli import main

    overrides = {"clients": [*DEFAULT_CLIENTS, _rs("deploy-api", RS_SECRET, DEPLOY)]}
    settings = make_settings(**overrides)
    web = create_app(settings).test_client()
    subject = upstream.issuer.github_actions_token(audience=STS_ISSUER)
    token = web.post("/token", data=exchange_form(subject, audience=DEPLOY)).get_json()["access_token"]
    assert introspect(web, token)["active"] is True

    config = tmp_path / "cli.yaml"
    issuers = [
        {"name": i.name, "issuer": i.issuer, "jwks_uri": i.jwks_uri, "audiences": list(i.audiences),
         "algorithms": list(i.algorithms)}
        for i in settings.issuers
    ]  # fmt: skip
    config.write_text(yaml.safe_dump({
        "issuer": settings.issuer, "database_url": settings.database_url, "keys_dir": str(settings.keys_dir),
        "policies_dir": str(settings.policies_dir),
        "issuers": issuers,
        "clients": [{**c, "audiences": list(c.get("audiences", []))} for c in overrides["clients"]],
    }))  # fmt: skip
    result = CliRunner().invoke(
        main, ["--config", str(config), "revoke", "subject", "upstream", "repo:acme/app:ref:refs/heads/main"]
    )
    assert result.exit_code == 0, result.output
    assert introspect(web, token) == {"active": False}
    # New tokens are still issued (no --block): revocation covers tokens issued before it.
    fresh = web.post("/token", data=exchange_form(subject, audience=DEPLOY))
    assert fresh.status_code == 200


def _short_body(environ: dict[str, Any]) -> None:
    """A body shorter than its declared length: the client went away mid-body."""
    environ["CONTENT_LENGTH"] = "4096"


def _long_body(environ: dict[str, Any]) -> None:
    """A body over ``max_body_bytes``."""
    body = b"token=" + b"x" * 20_000
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))


@pytest.mark.parametrize(
    ("problem", "reason"),
    [(_short_body, "request.malformed_body"), (_long_body, "request.body_too_large")],
    ids=["malformed-body", "body-too-large"],
)
@pytest.mark.parametrize("endpoint", ["/token", "/introspect", "/revoke"])
def test_a_request_that_cannot_be_read_is_refused_and_audited_on_every_endpoint(
    app: Flask,
    endpoint: str,
    problem: Callable[[dict[str, Any]], None],
    reason: str,
) -> None:
    """The token, introspection and revocation endpoints read requests the same way
    (sts.http.wire): one that cannot be read is ``invalid_request`` in JSON, and audited."""
    request_id = "unreadable-" + uuid.uuid4().hex
    environ = EnvironBuilder(
        path=endpoint,
        method="POST",
        data="token=abc",
        content_type="application/x-www-form-urlencoded",
        headers={"X-Request-Id": request_id, **basic("deploy-api", RS_SECRET)},
    ).get_environ()
    problem(environ)
    body, answer, headers = run_wsgi_app(app, environ, buffered=True)
    assert answer.startswith("400"), b"".join(body)
    assert json.loads(b"".join(body))["error"] == "invalid_request"
    assert headers["Cache-Control"] == "no-store"
    [record] = app.extensions["sts"].audit.recent(5, request_id=request_id)
    assert record["endpoint"] == endpoint.strip("/")
    assert record["outcome"] == "refused" and record["reasons"] == [reason]


def test_an_actor_of_ours_is_looked_up_under_the_issuer_it_came_from() -> None:
    """The ``act`` entry of an actor that was a token of ours names its ``upstream_issuer``: the
    same ``sub`` in another cluster is another workload, and an event about it does not reach."""
    names = frozenset({"k8s", "k8s2"})
    ours = {"sub": "system:serviceaccount:agents:executor", "iss": STS_ISSUER}
    named = actor_identities({**ours, "upstream_issuer": "k8s"}, names, {})
    assert named == [f"{n}|system:serviceaccount:agents:executor" for n in ("k8s", "self", "*")]
    # Without it (a token issued before the entry carried it): under every issuer.
    assert len(actor_identities(ours, names, {})) == 4
    upstream = {"sub": "x", "iss": "https://k8s2.example"}
    assert actor_identities(upstream, names, {"https://k8s2.example": "k8s2"}) == ["k8s2|x", "self|x", "*|x"]
    assert actor_identities(None, names, {}) == [] and actor_identities({"iss": "a"}, names, {}) == []


class _States:
    """A subject-state store over a dictionary (the port's two calls revocation makes)."""

    def __init__(self, states: dict[str, SubjectState]) -> None:
        self.states = states

    def get(self, identities: Any) -> list[SubjectState]:
        return [self.states.get(key, SubjectState()) for key in identities]


class _NoRevokedTokens:
    def revoked(self, jti: str) -> bool:
        return False


NAMES = frozenset({"github", "agents"})
ISSUER_OF = {"https://agents.example": "agents", STS_ISSUER: "self"}


def _chained(iat: float, acr: str | None = None) -> dict[str, Any]:
    """A token of ours issued at ``iat`` to a subject, acted for by agent B, which acted for agent A
    (the ``act`` chain of a token re-exchanged with a second actor)."""
    claims: dict[str, Any] = {
        "jti": "j1",
        "sub": "repo:acme/app",
        "iat": iat,
        "upstream_issuer": "github",
        "act": {
            "sub": "agent-b",
            "iss": "https://agents.example",
            "act": {"sub": "agent-a", "iss": "https://agents.example"},
        },
    }
    if acr is not None:
        claims["acr"] = acr
    return claims


def test_revoking_an_earlier_actor_of_the_chain_revokes_the_token() -> None:
    """A security event ending agent A's session reaches a token derived through A's delegation,
    though agent B acts for it now (an outside audit found it active, and re-exchangeable)."""
    claims = _chained(1000.0)
    assert revocation(claims, NAMES, _States({}), _NoRevokedTokens(), ISSUER_OF) is None
    for agent in ("agent-a", "agent-b"):
        states = _States({f"agents|{agent}": SubjectState(revoked_before=1001.0)})
        assert revocation(claims, NAMES, states, _NoRevokedTokens(), ISSUER_OF) == "actor"
    # An event before the token was issued does not reach it; nor one about another agent.
    earlier = _States({"agents|agent-a": SubjectState(revoked_before=999.0)})
    assert revocation(claims, NAMES, earlier, _NoRevokedTokens(), ISSUER_OF) is None
    other = _States({"agents|agent-c": SubjectState(revoked_before=1001.0)})
    assert revocation(claims, NAMES, other, _NoRevokedTokens(), ISSUER_OF) is None
    chain = chain_actor_identities(claims["act"], NAMES, ISSUER_OF)
    assert chain == [f"{issuer}|agent-{n}" for n in "ba" for issuer in ("agents", "self", "*")]


def test_a_deep_chain_is_read_only_so_far() -> None:
    act: dict[str, Any] = {"sub": "agent-0", "iss": "https://agents.example"}
    for n in range(1, 100):
        act = {"sub": f"agent-{n}", "iss": "https://agents.example", "act": act}
    assert len(chain_actor_identities(act, NAMES, ISSUER_OF)) == 3 * MAX_CHAIN_ACTORS


def test_a_posture_level_token_is_withdrawn_once_an_event_declares_the_posture_bad() -> None:
    """CAEP device-compliance-change ``not-compliant``: a token holding the posture level no longer
    holds it (inactive at introspection, refused when presented again); the subject's other tokens
    are untouched, and a later ``compliant`` restores nothing but the state."""
    bad = _States({"github|repo:acme/app": SubjectState(posture="not-compliant", posture_at=2000.0)})
    posture = _chained(1000.0, acr=ACR_POSTURE)
    assert revocation(posture, NAMES, bad, _NoRevokedTokens(), ISSUER_OF) == "posture"
    assert revocation(_chained(1000.0, acr=ACR_POP), NAMES, bad, _NoRevokedTokens(), ISSUER_OF) is None
    good = _States({"github|repo:acme/app": SubjectState(posture="compliant", posture_at=3000.0)})
    assert revocation(posture, NAMES, good, _NoRevokedTokens(), ISSUER_OF) is None
    assert revocation(posture, NAMES, _States({}), _NoRevokedTokens(), ISSUER_OF) is None
    # Declared about the subject under every issuer (``*``), as a transmitter may.
    anywhere = _States({"*|repo:acme/app": SubjectState(posture="not-compliant")})
    assert revocation(posture, NAMES, anywhere, _NoRevokedTokens(), ISSUER_OF) == "posture"
