"""Conformance of ``POST /token`` (RFC 8693) and of the metadata, JWKS and health endpoints.

The requests go through the real Flask app, against a development issuer that
serves its JWKS over HTTP; the app's clock is fixed so lifetimes are exact.
Tables drive the cases: each refusal is checked for its OAuth code and status
(RFC 6749 §5.2, RFC 8693 §2.2.2), a fixed ``error_description`` that echoes no
input, ``Cache-Control: no-store``, and exactly one audit record that holds the
subject token's SHA-256 but never a token or a secret.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import logging
import os
import random
import re
import uuid
from collections.abc import Callable, Iterator
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, urlencode, urlsplit

import pytest
from authlib.oauth2.rfc8414 import AuthorizationServerMetadata
from flask import Flask
from flask.testing import FlaskClient
from joserfc import jwt
from joserfc.jwk import KeySet, OctKey, RSAKey
from joserfc.jwt import JWTClaimsRegistry
from sqlalchemy import text
from werkzeug.test import TestResponse

from sts.app import create_app
from sts.dev.issuer import DevIssuer, RunningServer
from sts.errors import OAuthError
from sts.settings import Settings
from tests.conftest import (
    ACCESS_TOKEN_TYPE,
    DEFAULT_POLICY,
    FORM,
    GATEWAY_SECRET,
    JWT_TYPE,
    POSTER_SECRET,
    SIGNER_KEY,
    STS_ISSUER,
    TOKEN_EXCHANGE,
)
from tests.support.clock import Clock

ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
REFRESH_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:refresh_token"
SAML2_TYPE = "urn:ietf:params:oauth:token-type:saml2"

DEPLOY_SUBJECT = "repo:acme/app:ref:refs/heads/main"
DEPLOY_AUDIENCE = "https://deploy.example.com"
LEDGER_RESOURCE = "https://ledger.example.com/api"

#: An attacker's RSA key: not in the upstream JWKS.
ATTACKER_KEY = RSAKey.generate_key(2048)

#: DEFAULT_POLICY plus a rule whose client allow-list leaves out ``poster``.
POLICY: dict[str, Any] = deepcopy(DEFAULT_POLICY)
POLICY["rules"].append(
    {
        "name": "batch-gateway-only",
        "issuer": "upstream",
        "subject": "system:serviceaccount:payments:batch",
        "clients": ["gateway"],
        "grant": {"audiences": ["batch"], "scopes": ["batch:run"], "max_lifetime": 120},
    }
)


def _fixed_descriptions() -> frozenset[str]:
    """Every fixed ``error_description`` the service may send."""
    found: set[str] = set()
    pending: list[type[OAuthError]] = [OAuthError]
    while pending:
        cls = pending.pop()
        found.add(cls.description)
        found.update(cls.descriptions.values())
        pending.extend(cls.__subclasses__())
    # The HTTP layer's own texts (sts/http/responses.py).
    found |= {
        "The request body is too large.",
        "The HTTP method is not allowed here.",
        "The request is malformed.",
        "No such endpoint.",
    }
    return frozenset(found)


FIXED_DESCRIPTIONS = _fixed_descriptions()
OAUTH_ERROR_CODES = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "invalid_target",
        "temporarily_unavailable",
    }
)
# RFC 7517 §9.2 / RFC 7518 §6: members only a private JWK carries.
PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningServer]:
    """Overrides conftest's per-test issuer: one RSA key for the module keeps the suite fast."""
    with DevIssuer.serve_ephemeral(alg="RS256") as server:
        yield server


@pytest.fixture
def make_app(make_settings: Callable[..., Settings], clock: Clock) -> Callable[..., Flask]:
    def build(policy: dict[str, Any] | None = None, **overrides: Any) -> Flask:
        return create_app(make_settings(policy or POLICY, **overrides), clock=clock)

    return build


@pytest.fixture
def sts(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def web(sts: Flask) -> FlaskClient:
    return sts.test_client()


@dataclass
class Ctx:
    """Mints upstream tokens at the app's fixed time."""

    issuer: DevIssuer
    now: float

    def deploy(self, **kwargs: Any) -> str:
        return self.issuer.github_actions_token(**{"audience": STS_ISSUER, "now": self.now, **kwargs})

    def ledger(self, **kwargs: Any) -> str:
        return self.issuer.kubernetes_token(**{"audience": STS_ISSUER, "now": self.now, **kwargs})

    def batch(self) -> str:
        return self.ledger(service_account="batch")

    def claims(self, **extra: Any) -> dict[str, Any]:
        """Claims the ``deploy`` rule would accept, for hand-crafted tokens."""
        iat = int(self.now)
        base = {
            "iss": self.issuer.issuer_url,
            "sub": DEPLOY_SUBJECT,
            "aud": STS_ISSUER,
            "iat": iat,
            "nbf": iat,
            "exp": iat + 300,
            "repository_id": "123456",
            "jti": str(uuid.uuid4()),
        }
        base.update(extra)
        return base


@pytest.fixture
def ctx(upstream: RunningServer, clock: Clock) -> Ctx:
    return Ctx(upstream.issuer, clock.now)


# -- helpers -------------------------------------------------------------------------------------


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def encode(pairs: dict[str, Any] | list[tuple[str, str]]) -> bytes:
    """Form-encode, keeping repeated names (a list value, or a list of pairs)."""
    return urlencode(pairs, doseq=True).encode("utf-8")


def form(subject_token: str, **params: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject_token,
        "subject_token_type": JWT_TYPE,
    }
    values.update(params)
    return values


def basic(client_id: str, secret: str) -> dict[str, str]:
    """RFC 6749 §2.3.1: form-urlencode both parts, then base64."""
    raw = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode("ascii")}


def client_assertion(now: float, **claims: Any) -> str:
    """RFC 7523 §3 assertion for the registered ``signer`` client."""
    values = {
        "iss": "signer",
        "sub": "signer",
        "aud": STS_ISSUER,
        "iat": int(now),
        "exp": int(now) + 60,
        "jti": str(uuid.uuid4()),
    }
    values.update(claims)
    return jwt.encode({"alg": "ES256", "kid": SIGNER_KEY.kid}, values, SIGNER_KEY, algorithms=["ES256"])


def post(web: FlaskClient, data: Any, **kwargs: Any) -> TestResponse:
    if isinstance(data, dict | list):
        data = encode(data)
    kwargs.setdefault("content_type", FORM)
    return web.post("/token", data=data, **kwargs)


def sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def runtime(app: Flask) -> Any:
    return app.extensions["sts"]


def audit_count(app: Flask) -> int:
    with runtime(app).engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM audit_events")).scalar_one())


def new_record(app: Flask, before: int) -> dict[str, Any]:
    """The one record written since ``before`` rows; fails unless exactly one was."""
    assert audit_count(app) == before + 1, "a decision must write exactly one audit record"
    records = runtime(app).audit.recent(1)
    assert len(records) == 1
    return records[0]


def assert_nothing_secret_stored(app: Flask, tmp_path: Path, secrets: tuple[str, ...]) -> None:
    """No secret in any audit record, any raw row, or the database files themselves."""
    blobs = [json.dumps(list(runtime(app).audit.iter_all()))]
    with runtime(app).engine.connect() as conn:
        blobs.append(repr(conn.execute(text("SELECT * FROM audit_events")).all()))
    files = b"".join(p.read_bytes() for p in tmp_path.glob("sts.sqlite*"))
    for secret in secrets:
        pieces = {secret}
        # A JWT's signature on its own is as good as a fragment of the token.
        pieces |= {part for part in secret.split(".") if len(part) >= 16 and secret.count(".") == 2}
        for piece in pieces:
            assert all(piece not in blob for blob in blobs), "a token or secret reached the audit trail"
            assert piece.encode() not in files, "a token or secret reached the database file"


def assert_oauth_error(
    resp: TestResponse, error: str, status: int | tuple[int, ...], echoed: tuple[str, ...] = ()
) -> dict[str, Any]:
    """RFC 6749 §5.2 error response: JSON, exactly ``error`` and a fixed description, no-store."""
    statuses = status if isinstance(status, tuple) else (status,)
    assert resp.status_code in statuses, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"
    assert resp.headers.get("Cache-Control") == "no-store"
    body = resp.get_json()
    assert isinstance(body, dict)
    assert set(body) == {"error", "error_description"}
    assert body["error"] == error
    assert body["error_description"] in FIXED_DESCRIPTIONS
    raw = resp.get_data(as_text=True)
    for value in echoed:
        if len(value) >= 8:
            assert value not in raw, "the error response echoes request input"
    if resp.status_code == 401:
        assert 'Basic realm="sts"' in resp.headers.get("WWW-Authenticate", "")
    return body


def inputs_of(data: Any, query: dict[str, Any] | None = None) -> tuple[str, ...]:
    """Every request value (and each JWT segment of one), to check nothing is echoed back."""
    values: list[str] = []
    if isinstance(data, dict):
        for value in data.values():
            values.extend(value if isinstance(value, list) else [str(value)])
    elif isinstance(data, list):
        values.extend(v for _, v in data)
    values.extend(str(v) for v in (query or {}).values())
    segments = [s for v in values for s in v.split(".") if v.count(".") >= 2]
    # Standard URNs and our own fixed configuration are not request secrets.
    return tuple(v for v in values + segments if not v.startswith("urn:ietf:params:oauth:"))


def issued_claims(web: FlaskClient, token: str, clock: Clock) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify an issued token against the JWKS the app publishes; return (header, claims)."""
    jwks = web.get("/.well-known/jwks.json").get_json()
    decoded = jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["ES256"])
    JWTClaimsRegistry(
        now=int(clock.now),
        iss={"essential": True, "value": STS_ISSUER},
        sub={"essential": True},
        aud={"essential": True},
        exp={"essential": True},
        iat={"essential": True},
        jti={"essential": True},
        client_id={"essential": True},
    ).validate(decoded.claims)
    return dict(decoded.header), dict(decoded.claims)


# -- success (RFC 8693 §2.2.1, RFC 9068) -----------------------------------------------------------


def test_success_response_is_rfc8693_shaped(web: FlaskClient, ctx: Ctx) -> None:
    resp = post(web, form(ctx.deploy()))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"
    assert resp.headers["Cache-Control"] == "no-store"
    body = resp.get_json()
    assert set(body) == {"access_token", "issued_token_type", "token_type", "expires_in", "scope"}
    assert body["issued_token_type"] == ACCESS_TOKEN_TYPE
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 300
    assert body["scope"] == "deploy:read"  # the rule's default scopes
    assert "refresh_token" not in body


def test_issued_token_is_an_rfc9068_jwt_signed_by_a_published_key(
    web: FlaskClient, ctx: Ctx, clock: Clock
) -> None:
    subject_token = ctx.deploy()
    body = post(web, form(subject_token, scope="deploy:write")).get_json()
    header, claims = issued_claims(web, body["access_token"], clock)
    assert header["typ"] == "at+jwt"
    assert header["alg"] == "ES256"
    kids = {k["kid"] for k in web.get("/.well-known/jwks.json").get_json()["keys"]}
    assert header["kid"] in kids
    assert claims["iss"] == STS_ISSUER
    assert claims["sub"] == DEPLOY_SUBJECT
    assert claims["aud"] == DEPLOY_AUDIENCE
    assert claims["iat"] == int(clock.now)
    assert claims["exp"] - claims["iat"] == body["expires_in"]
    assert claims["scope"] == "deploy:write"
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 16
    assert isinstance(claims["client_id"], str) and claims["client_id"]
    upstream_claims = json.loads(base64.urlsafe_b64decode(subject_token.split(".")[1] + "=="))
    assert claims["auth_time"] == upstream_claims["iat"]


def test_every_issued_token_has_a_fresh_jti(web: FlaskClient, ctx: Ctx, clock: Clock) -> None:
    jtis = {issued_claims(web, post(web, form(ctx.deploy())).get_json()["access_token"], clock)[1]["jti"]}
    jtis.add(issued_claims(web, post(web, form(ctx.deploy())).get_json()["access_token"], clock)[1]["jti"])
    assert len(jtis) == 2


def test_exchanges_draw_their_random_identifiers_in_one_call_for_many(
    web: FlaskClient, ctx: Ctx, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Request id, trace and span ids, audit event id, ``jti``: one ``os.urandom`` for many exchanges
    (was one call each, five per exchange)."""
    tokens = [ctx.deploy() for _ in range(11)]  # signed first: the issuer draws its own
    assert post(web, form(tokens.pop())).status_code == 200
    calls: list[int] = []

    def counting(real: Callable[[int], bytes]) -> Callable[[int], bytes]:
        def draw(count: int) -> bytes:
            calls.append(count)
            return real(count)

        return draw

    monkeypatch.setattr(os, "urandom", counting(os.urandom))
    monkeypatch.setattr(random, "_urandom", counting(random._urandom))  # type: ignore[attr-defined]
    ids = set()
    for token in tokens:
        resp = post(web, form(token))
        assert resp.status_code == 200
        ids.add(resp.headers["X-Request-Id"])
    assert len(ids) == len(tokens)
    assert len(calls) <= 1


def test_the_subject_token_is_hashed_once(
    sts: Flask, web: FlaskClient, ctx: Ctx, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = ctx.deploy()
    hashed: list[bytes] = []
    real = hashlib.sha256

    def counting(data: bytes = b"", **kwargs: Any) -> Any:
        hashed.append(bytes(data))
        return real(data, **kwargs)

    monkeypatch.setattr(hashlib, "sha256", counting)
    before = audit_count(sts)
    assert post(web, form(token)).status_code == 200
    assert hashed.count(token.encode()) == 1
    assert new_record(sts, before)["subject_token_sha256"] == real(token.encode()).hexdigest()


@pytest.mark.parametrize(
    ("requested", "issued"),
    [
        (None, ACCESS_TOKEN_TYPE),
        (ACCESS_TOKEN_TYPE, ACCESS_TOKEN_TYPE),
        (JWT_TYPE, JWT_TYPE),
    ],
)
def test_requested_token_type_is_honoured(
    web: FlaskClient, ctx: Ctx, requested: str | None, issued: str
) -> None:
    extra = {"requested_token_type": requested} if requested else {}
    body = post(web, form(ctx.deploy(), **extra)).get_json()
    assert body["issued_token_type"] == issued
    assert body["token_type"] == "Bearer"


@pytest.mark.parametrize(
    ("client_auth", "client_id"),
    [
        ("basic", "gateway"),
        ("post", "poster"),
        ("private_key_jwt", "signer"),
    ],
)
def test_each_client_authentication_method_grants(
    web: FlaskClient, ctx: Ctx, clock: Clock, client_auth: str, client_id: str
) -> None:
    params: dict[str, Any] = {"audience": "ledger", "scope": "ledger:read"}
    headers: dict[str, str] = {}
    if client_auth == "basic":
        headers = basic("gateway", GATEWAY_SECRET)
    elif client_auth == "post":
        params |= {"client_id": "poster", "client_secret": POSTER_SECRET}
    else:
        params |= {
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": client_assertion(clock.now),
        }
    resp = post(web, form(ctx.ledger(), **params), headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    _, claims = issued_claims(web, resp.get_json()["access_token"], clock)
    assert claims["client_id"] == client_id
    assert claims["sub"] == "system:serviceaccount:payments:api"


# Lifetime = min(rule max_lifetime, requested_expires_in, what is left of the subject token).
# The ledger rule allows 600 s; (issued seconds ago, upstream lifetime, requested) -> expires_in.
LIFETIME_CASES = [
    pytest.param(0, 3000, None, 600, id="rule-maximum"),
    pytest.param(0, 3000, 60, 60, id="requested-shorter"),
    pytest.param(0, 3000, 5000, 600, id="requested-longer-capped-by-rule"),
    pytest.param(510, 600, None, 90, id="capped-by-subject-token"),
    pytest.param(510, 600, 30, 30, id="requested-below-remaining"),
    pytest.param(510, 600, 200, 90, id="requested-above-remaining"),
    pytest.param(0, 3000, 1, 1, id="one-second"),
]


@pytest.mark.parametrize(("age", "upstream_lifetime", "requested", "expected"), LIFETIME_CASES)
def test_lifetime_is_the_smallest_of_rule_request_and_subject_token(
    sts: Flask,
    web: FlaskClient,
    ctx: Ctx,
    clock: Clock,
    age: int,
    upstream_lifetime: int,
    requested: int | None,
    expected: int,
) -> None:
    subject_token = ctx.issuer.kubernetes_token(
        audience=STS_ISSUER, now=clock.now - age, lifetime=upstream_lifetime
    )
    extra = {"requested_expires_in": str(requested)} if requested is not None else {}
    before = audit_count(sts)
    resp = post(
        web, form(subject_token, audience="ledger", **extra), headers=basic("gateway", GATEWAY_SECRET)
    )
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json()["expires_in"] == expected
    _, claims = issued_claims(web, resp.get_json()["access_token"], clock)
    assert claims["exp"] - claims["iat"] == expected
    assert new_record(sts, before)["granted_lifetime"] == expected


def test_subject_token_expired_within_leeway_gets_no_token(web: FlaskClient, ctx: Ctx, clock: Clock) -> None:
    # Still inside the verification leeway, but with nothing left to grant.
    subject_token = ctx.deploy(now=clock.now - 310, lifetime=300)
    assert_oauth_error(post(web, form(subject_token)), "invalid_request", 400)


@pytest.mark.parametrize(
    ("scope", "granted"),
    [
        pytest.param(None, None, id="none-requested-no-defaults"),
        pytest.param("ledger:read", "ledger:read", id="exact"),
        pytest.param("ledger:write ledger:read", "ledger:write ledger:read", id="order-kept"),
        pytest.param("ledger:read bogus:write", "ledger:read", id="narrowed"),
        pytest.param("ledger:read ledger:read", "ledger:read", id="duplicates"),
        pytest.param("nope ledger:admin other", "ledger:admin", id="narrowed-to-one"),
    ],
)
def test_scope_is_granted_or_narrowed(
    sts: Flask, web: FlaskClient, ctx: Ctx, clock: Clock, scope: str | None, granted: str | None
) -> None:
    extra = {"scope": scope} if scope is not None else {}
    before = audit_count(sts)
    resp = post(web, form(ctx.ledger(), audience="ledger", **extra), headers=basic("gateway", GATEWAY_SECRET))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body.get("scope") == granted
    _, claims = issued_claims(web, body["access_token"], clock)
    assert claims.get("scope") == granted
    assert new_record(sts, before)["granted_scope"] == (granted.split() if granted else [])


def test_default_scopes_when_none_requested(web: FlaskClient, ctx: Ctx, clock: Clock) -> None:
    body = post(web, form(ctx.deploy())).get_json()
    assert body["scope"] == "deploy:read"
    assert issued_claims(web, body["access_token"], clock)[1]["scope"] == "deploy:read"


@pytest.mark.parametrize(
    ("targets", "aud"),
    [
        pytest.param([("audience", "ledger")], "ledger", id="audience"),
        pytest.param([("resource", LEDGER_RESOURCE)], LEDGER_RESOURCE, id="resource"),
        pytest.param(
            [("audience", "ledger"), ("resource", LEDGER_RESOURCE)], {"ledger", LEDGER_RESOURCE}, id="both"
        ),
        pytest.param([("audience", "ledger"), ("audience", "ledger")], "ledger", id="repeated-same"),
        # The cap of 16 counts distinct targets: repeats are dropped first (docs/openapi.yaml).
        pytest.param([("audience", "ledger")] * 17, "ledger", id="seventeen-copies"),
        pytest.param(
            [("resource", LEDGER_RESOURCE)] * 40 + [("audience", "ledger")] * 40,
            {"ledger", LEDGER_RESOURCE},
            id="forty-copies-of-each",
        ),
    ],
)
def test_audiences_and_resources_all_granted(
    web: FlaskClient, ctx: Ctx, clock: Clock, targets: list[tuple[str, str]], aud: str | set[str]
) -> None:
    pairs = [*form(ctx.ledger()).items(), *targets]
    resp = post(web, pairs, headers=basic("gateway", GATEWAY_SECRET))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    _, claims = issued_claims(web, resp.get_json()["access_token"], clock)
    assert (set(claims["aud"]) if isinstance(aud, set) else claims["aud"]) == aud


def test_unknown_parameters_are_ignored(web: FlaskClient, ctx: Ctx) -> None:
    """RFC 6749 §3.1: the server MUST ignore unrecognized request parameters."""
    resp = post(web, form(ctx.deploy(), foo="bar", response_type="code", nonce="n-0S6_WzA2Mj"))
    assert resp.status_code == 200, resp.get_data(as_text=True)


def test_repeated_unknown_parameters_are_ignored(web: FlaskClient, ctx: Ctx) -> None:
    """RFC 6749 §3.1: unrecognized parameters are ignored, however often they are sent.

    "MUST NOT be included more than once" (RFC 6749 §3.2) is about the parameters
    the endpoint defines; those are still refused when repeated (below).
    """
    pairs = [*form(ctx.deploy()).items(), ("foo", "1"), ("foo", "2"), ("nonce", ""), ("nonce", "")]
    resp = post(web, pairs)
    assert resp.status_code == 200, resp.get_data(as_text=True)


def test_empty_parameters_are_omitted(web: FlaskClient, ctx: Ctx, clock: Clock) -> None:
    """RFC 6749 §3.1: a parameter sent without a value is treated as if it were omitted."""
    resp = post(
        web,
        form(ctx.deploy(), scope="", audience="", resource="", requested_token_type="", actor_token=""),
    )
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["scope"] == "deploy:read"
    assert body["issued_token_type"] == ACCESS_TOKEN_TYPE
    assert issued_claims(web, body["access_token"], clock)[1]["aud"] == DEPLOY_AUDIENCE


def test_id_token_subject_type_is_accepted(web: FlaskClient, ctx: Ctx) -> None:
    resp = post(web, form(ctx.deploy(), subject_token_type=ID_TOKEN_TYPE))
    assert resp.status_code == 200, resp.get_data(as_text=True)


def test_client_assertion_cannot_be_replayed(web: FlaskClient, ctx: Ctx, clock: Clock) -> None:
    """RFC 7523 §3: a used ``jti`` is refused."""
    params = {
        "audience": "ledger",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": client_assertion(clock.now),
    }
    assert post(web, form(ctx.ledger(), **params)).status_code == 200
    assert_oauth_error(post(web, form(ctx.ledger(), **params)), "invalid_client", 401)


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"aud": "https://someone-else.example"}, id="wrong-aud"),
        pytest.param({"sub": "gateway"}, id="iss-sub-differ"),
        pytest.param({"exp": None}, id="no-exp"),
        pytest.param({"jti": None}, id="no-jti"),
        pytest.param({"exp": 0}, id="expired"),
    ],
)
def test_bad_client_assertions(web: FlaskClient, ctx: Ctx, clock: Clock, claims: dict[str, Any]) -> None:
    values = {k: v for k, v in claims.items() if v is not None}
    assertion = client_assertion(clock.now, **values)
    if None in claims.values():
        # Drop the claim entirely: re-sign without it.
        header = {"alg": "ES256", "kid": SIGNER_KEY.kid}
        decoded = jwt.decode(assertion, SIGNER_KEY, algorithms=["ES256"]).claims
        payload = {k: v for k, v in decoded.items() if claims.get(k, "") is not None}
        assertion = jwt.encode(header, payload, SIGNER_KEY, algorithms=["ES256"])
    params = {
        "audience": "ledger",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion,
    }
    assert_oauth_error(post(web, form(ctx.ledger(), **params)), "invalid_client", 401)


def test_basic_and_form_client_id_must_agree(web: FlaskClient, ctx: Ctx) -> None:
    resp = post(
        web,
        form(ctx.ledger(), audience="ledger", client_id="poster"),
        headers=basic("gateway", GATEWAY_SECRET),
    )
    assert_oauth_error(resp, "invalid_client", 401)


def test_our_own_access_token_cannot_be_exchanged_again(web: FlaskClient, ctx: Ctx) -> None:
    issued = post(web, form(ctx.deploy())).get_json()["access_token"]
    for token_type in (ACCESS_TOKEN_TYPE, JWT_TYPE):
        resp = post(web, form(issued, subject_token_type=token_type))
        assert_oauth_error(resp, "invalid_request", 400, echoed=tuple(issued.split(".")))


# -- refusals: a table of (request -> code, status, audit reason) ----------------------------------


@dataclass
class Call:
    """One request to the token endpoint."""

    data: Any
    headers: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] | None = None
    content_type: str | None = FORM
    #: The subject token whose hash the audit record must carry (None: no hash expected).
    hashed_token: str | None = None
    #: Strings that must never reach the audit trail.
    secrets: tuple[str, ...] = ()


def send(web: FlaskClient, call: Call) -> TestResponse:
    data = call.data
    if isinstance(data, dict | list) and (call.content_type or "").startswith(FORM):
        data = encode(data)
    kwargs: dict[str, Any] = {"headers": call.headers, "query_string": call.query}
    if call.content_type is not None:
        kwargs["content_type"] = call.content_type
    return web.post("/token", data=data, **kwargs)


def std(token: str, **params: Any) -> Call:
    """A form request presenting ``token``; its hash must be recorded and the token never."""
    return Call(form(token, **params), hashed_token=token, secrets=(token,))


def with_basic(call: Call, client_id: str = "gateway", secret: str = GATEWAY_SECRET) -> Call:
    call.headers = {**call.headers, **basic(client_id, secret)}
    call.secrets = (*call.secrets, secret)
    return call


def without_hash(call: Call) -> Call:
    call.hashed_token = None
    return call


def _unsigned(ctx: Ctx) -> str:
    return f"{b64(json.dumps({'alg': 'none', 'typ': 'JWT'}))}.{b64(json.dumps(ctx.claims()))}."


def _hs256_with_public_key(ctx: Ctx) -> str:
    # RFC 8725 §2.1: the issuer's public key used as an HMAC secret.
    secret = json.dumps(ctx.issuer.jwks()["keys"][0], sort_keys=True).encode()
    return ctx.issuer.mint(
        ctx.claims(), key=OctKey.import_key(secret), alg="HS256", header={"kid": ctx.issuer.kid}
    )


def _embedded_jwk(ctx: Ctx) -> str:
    public = ATTACKER_KEY.as_dict(private=False)
    return ctx.issuer.mint(ctx.claims(), key=ATTACKER_KEY, header={"jwk": public})


def _too_large(ctx: Ctx) -> Call:
    token = ctx.deploy()
    body = form(token, padding="x" * 20_000)
    return Call(body, secrets=(token,))


RefusalBuilder = Callable[[Ctx], Call]


@dataclass(frozen=True)
class Refusal:
    build: RefusalBuilder
    error: str
    status: int | tuple[int, ...] = 400
    reason: str | None = None


REFUSALS: dict[str, Refusal] = {
    # RFC 6749 §5.2 / RFC 8693 §2.1: grant type.
    "grant-type-authorization-code": Refusal(
        lambda c: std(c.deploy(), grant_type="authorization_code"), "unsupported_grant_type"
    ),
    "grant-type-client-credentials": Refusal(
        lambda c: std(c.deploy(), grant_type="client_credentials"), "unsupported_grant_type"
    ),
    "grant-type-jwt-bearer": Refusal(
        lambda c: std(c.deploy(), grant_type="urn:ietf:params:oauth:grant-type:jwt-bearer"),
        "unsupported_grant_type",
    ),
    "grant-type-wrong-case": Refusal(
        lambda c: std(c.deploy(), grant_type=TOKEN_EXCHANGE.upper()), "unsupported_grant_type"
    ),
    "grant-type-missing": Refusal(
        lambda c: Call(
            {"subject_token": (t := c.deploy()), "subject_token_type": JWT_TYPE},
            hashed_token=t,
            secrets=(t,),
        ),
        "invalid_request",
        reason="request.missing_grant_type",
    ),
    "grant-type-empty": Refusal(lambda c: std(c.deploy(), grant_type=""), "invalid_request"),
    # RFC 8693 §2.1: required and paired parameters.
    "subject-token-missing": Refusal(
        lambda c: Call({"grant_type": TOKEN_EXCHANGE, "subject_token_type": JWT_TYPE}),
        "invalid_request",
        reason="request.missing_subject_token",
    ),
    "subject-token-empty": Refusal(lambda c: Call(form("")), "invalid_request"),
    "subject-token-type-missing": Refusal(
        lambda c: Call(
            {"grant_type": TOKEN_EXCHANGE, "subject_token": (t := c.deploy())}, hashed_token=t, secrets=(t,)
        ),
        "invalid_request",
        reason="request.missing_subject_token_type",
    ),
    "subject-token-type-unknown": Refusal(
        lambda c: std(c.deploy(), subject_token_type="urn:example:not-a-token-type"), "invalid_request"
    ),
    "subject-token-type-saml2": Refusal(
        lambda c: std(c.deploy(), subject_token_type=SAML2_TYPE), "invalid_request"
    ),
    "subject-token-type-refresh": Refusal(
        lambda c: std(c.deploy(), subject_token_type=REFRESH_TOKEN_TYPE), "invalid_request"
    ),
    "actor-token-without-type": Refusal(
        lambda c: std(c.deploy(), actor_token=c.ledger()),
        "invalid_request",
        reason="request.actor_token_pairing",
    ),
    "actor-token-type-without-token": Refusal(
        lambda c: std(c.deploy(), actor_token_type=JWT_TYPE),
        "invalid_request",
        reason="request.actor_token_pairing",
    ),
    "requested-refresh-token": Refusal(
        lambda c: std(c.deploy(), requested_token_type=REFRESH_TOKEN_TYPE), "invalid_request"
    ),
    "requested-id-token": Refusal(
        lambda c: std(c.deploy(), requested_token_type=ID_TOKEN_TYPE), "invalid_request"
    ),
    "requested-saml2": Refusal(lambda c: std(c.deploy(), requested_token_type=SAML2_TYPE), "invalid_request"),
    "requested-expires-in-zero": Refusal(
        lambda c: std(c.deploy(), requested_expires_in="0"), "invalid_request"
    ),
    "requested-expires-in-negative": Refusal(
        lambda c: std(c.deploy(), requested_expires_in="-5"), "invalid_request"
    ),
    "requested-expires-in-not-a-number": Refusal(
        lambda c: std(c.deploy(), requested_expires_in="1e3"), "invalid_request"
    ),
    # RFC 8707 §2 / RFC 8693 §2.2.2: targets.
    "resource-relative": Refusal(
        lambda c: with_basic(std(c.ledger(), resource="/api")),
        "invalid_target",
        reason="request.malformed_resource",
    ),
    "resource-with-fragment": Refusal(
        lambda c: with_basic(std(c.ledger(), resource=LEDGER_RESOURCE + "#section")),
        "invalid_target",
        reason="request.malformed_resource",
    ),
    "resource-with-space": Refusal(
        lambda c: with_basic(std(c.ledger(), resource="https://ledger.example.com/a b")), "invalid_target"
    ),
    "resource-not-allowed": Refusal(
        lambda c: with_basic(std(c.ledger(), resource="https://ledger.example.com/other")), "invalid_target"
    ),
    "audience-not-allowed": Refusal(
        lambda c: std(c.deploy(), audience="https://canary-audience.example.net"), "invalid_target"
    ),
    "audience-with-control-char": Refusal(
        lambda c: std(c.deploy(), audience=DEPLOY_AUDIENCE + "\x01"), "invalid_target"
    ),
    "audiences-all-or-nothing": Refusal(
        lambda c: std(c.deploy(), audience=[DEPLOY_AUDIENCE, "https://canary-audience.example.net"]),
        "invalid_target",
    ),
    "audience-and-foreign-resource": Refusal(
        lambda c: with_basic(std(c.ledger(), audience="ledger", resource="https://canary.example.net/x")),
        "invalid_target",
    ),
    "target-must-be-named": Refusal(lambda c: with_basic(std(c.ledger())), "invalid_target"),
    # RFC 8693 §2.2.2: a subject token "unacceptable based on policy" is invalid_request.
    "no-rule-for-identity": Refusal(
        lambda c: with_basic(std(c.ledger(service_account="stranger"), audience="ledger")),
        "invalid_request",
    ),
    "no-rule-for-other-repository": Refusal(
        lambda c: std(c.deploy(repository="evil/app", repository_id="999")), "invalid_request"
    ),
    # RFC 6749 §3.3 / §5.2: scope.
    "scope-wholly-outside": Refusal(lambda c: std(c.deploy(), scope="canary:scope admin"), "invalid_scope"),
    "scope-of-another-rule": Refusal(lambda c: std(c.deploy(), scope="ledger:admin"), "invalid_scope"),
    "scope-with-quote": Refusal(
        lambda c: std(c.deploy(), scope='deploy:read "x'), "invalid_scope", reason="request.malformed_scope"
    ),
    "scope-with-backslash": Refusal(
        lambda c: std(c.deploy(), scope="deploy:read\\x"), "invalid_scope", reason="request.malformed_scope"
    ),
    "scope-with-unicode": Refusal(lambda c: std(c.deploy(), scope="déploy:read"), "invalid_scope"),
    "scope-with-nul": Refusal(lambda c: std(c.deploy(), scope="deploy:read\x00"), "invalid_scope"),
    "scope-blank": Refusal(lambda c: std(c.deploy(), scope="   "), "invalid_scope"),
    # RFC 6749 §2.3 / §5.2: clients.
    "client-required-by-rule": Refusal(lambda c: std(c.ledger(), audience="ledger"), "invalid_client", 401),
    "client-bad-secret": Refusal(
        lambda c: with_basic(std(c.ledger(), audience="ledger"), "gateway", "wrong-secret-canary-123"),
        "invalid_client",
        401,
    ),
    "client-unknown": Refusal(
        lambda c: with_basic(std(c.ledger(), audience="ledger"), "stranger", "whatever-secret-123"),
        "invalid_client",
        401,
    ),
    "client-id-alone": Refusal(
        lambda c: std(c.ledger(), audience="ledger", client_id="gateway"), "invalid_client", 401
    ),
    "client-wrong-method": Refusal(
        lambda c: Call(
            form(t := c.ledger(), audience="ledger", client_id="gateway", client_secret=GATEWAY_SECRET),
            hashed_token=t,
            secrets=(t, GATEWAY_SECRET),
        ),
        "invalid_client",
        401,
    ),
    "client-two-methods": Refusal(
        lambda c: with_basic(
            Call(
                form(t := c.ledger(), audience="ledger", client_id="poster", client_secret=POSTER_SECRET),
                hashed_token=t,
                secrets=(t, POSTER_SECRET),
            )
        ),
        "invalid_request",
    ),
    "client-bearer-scheme": Refusal(
        lambda c: Call(
            form(t := c.ledger(), audience="ledger"),
            headers={"Authorization": "Bearer " + t},
            hashed_token=t,
            secrets=(t,),
        ),
        "invalid_client",
        401,
    ),
    "client-basic-not-base64": Refusal(
        lambda c: Call(
            form(t := c.ledger(), audience="ledger"),
            headers={"Authorization": "Basic !!!not-base64!!!"},
            hashed_token=t,
            secrets=(t,),
        ),
        "invalid_client",
        401,
    ),
    "client-id-with-nul": Refusal(
        lambda c: Call(
            form(t := c.ledger(), audience="ledger", client_id="poster\x00", client_secret=POSTER_SECRET),
            hashed_token=t,
            secrets=(t, POSTER_SECRET),
        ),
        "invalid_client",
        401,
        reason="client.malformed_client_id",
    ),
    "client-not-in-allow-list": Refusal(
        lambda c: Call(
            form(t := c.batch(), audience="batch", client_id="poster", client_secret=POSTER_SECRET),
            hashed_token=t,
            secrets=(t, POSTER_SECRET),
        ),
        "unauthorized_client",
    ),
    "client-assertion-unknown-type": Refusal(
        lambda c: std(
            c.ledger(),
            audience="ledger",
            client_assertion_type="urn:example:other",
            client_assertion=client_assertion(c.now),
        ),
        "invalid_client",
        401,
    ),
    # RFC 8693 §2.2.2: a subject token that fails validation is invalid_request.
    "subject-token-attacker-key": Refusal(
        lambda c: std(c.issuer.mint(c.claims(), key=ATTACKER_KEY)), "invalid_request"
    ),
    "subject-token-attacker-key-real-kid": Refusal(
        lambda c: std(c.issuer.mint(c.claims(), key=ATTACKER_KEY, header={"kid": c.issuer.kid})),
        "invalid_request",
    ),
    "subject-token-alg-none": Refusal(lambda c: std(_unsigned(c)), "invalid_request"),
    "subject-token-hs256-confusion": Refusal(lambda c: std(_hs256_with_public_key(c)), "invalid_request"),
    "subject-token-embedded-jwk": Refusal(lambda c: std(_embedded_jwk(c)), "invalid_request"),
    "subject-token-jku": Refusal(
        lambda c: std(
            c.issuer.mint(c.claims(), key=ATTACKER_KEY, header={"jku": "https://attacker.example/jwks"})
        ),
        "invalid_request",
    ),
    "subject-token-crit": Refusal(
        lambda c: std(c.issuer.mint(c.claims(), header={"crit": ["x-canary"], "x-canary": 1})),
        "invalid_request",
    ),
    "subject-token-expired": Refusal(
        lambda c: std(c.deploy(now=c.now - 400, lifetime=300)),
        "invalid_request",
        reason="subject_token.expired",
    ),
    "subject-token-wrong-audience": Refusal(
        lambda c: std(c.issuer.github_actions_token(audience="https://someone-else.example", now=c.now)),
        "invalid_request",
    ),
    "subject-token-no-exp": Refusal(lambda c: std(c.issuer.mint(c.claims(exp=None))), "invalid_request"),
    "subject-token-untrusted-issuer": Refusal(
        lambda c: std(c.issuer.mint(c.claims(iss="https://evil.example"))), "invalid_request"
    ),
    "subject-token-not-yet-valid": Refusal(
        lambda c: std(c.issuer.mint(c.claims(nbf=int(c.now) + 3600))), "invalid_request"
    ),
    "subject-token-typ-at-jwt": Refusal(
        lambda c: std(c.issuer.mint(c.claims(), header={"typ": "at+jwt"})), "invalid_request"
    ),
    "subject-token-typ-dpop": Refusal(
        lambda c: std(c.issuer.mint(c.claims(), header={"typ": "dpop+jwt"})), "invalid_request"
    ),
    "subject-token-kid-path-traversal": Refusal(
        lambda c: std(c.issuer.mint(c.claims(), key=ATTACKER_KEY, header={"kid": "../../../../dev/null"})),
        "invalid_request",
    ),
    "subject-token-kid-sql": Refusal(
        lambda c: std(c.issuer.mint(c.claims(), key=ATTACKER_KEY, header={"kid": "x' OR '1'='1"})),
        "invalid_request",
    ),
    "subject-token-x5u": Refusal(
        lambda c: std(
            c.issuer.mint(c.claims(), key=ATTACKER_KEY, header={"x5u": "https://attacker.example/cert.pem"})
        ),
        "invalid_request",
    ),
    "subject-token-iss-trailing-slash": Refusal(
        lambda c: std(c.issuer.mint(c.claims(iss=c.issuer.issuer_url + "/"))), "invalid_request"
    ),
    "subject-token-own-issuer": Refusal(
        lambda c: std(c.issuer.mint(c.claims(iss=STS_ISSUER))), "invalid_request"
    ),
    "subject-token-sub-trailing-newline": Refusal(
        lambda c: std(c.issuer.mint(c.claims(sub=DEPLOY_SUBJECT + "\n"))), "invalid_request"
    ),
    "subject-token-sub-other-case": Refusal(
        lambda c: std(c.issuer.mint(c.claims(sub=DEPLOY_SUBJECT.upper()))), "invalid_request"
    ),
    "subject-token-claim-type-confusion": Refusal(
        lambda c: std(c.issuer.mint(c.claims(repository_id=123456))), "invalid_request"
    ),
    "subject-token-renamed-repository-id": Refusal(
        lambda c: std(c.deploy(repository_id="654321")), "invalid_request"
    ),
    "actor-token-delegation": Refusal(
        lambda c: std(c.deploy(), actor_token=c.ledger(), actor_token_type=JWT_TYPE), "invalid_request"
    ),
    # RFC 6749 §3.2: the wire.
    "query-string-with-valid-form": Refusal(
        lambda c: Call(form(t := c.deploy()), query={"foo": "bar"}, hashed_token=t, secrets=(t,)),
        "invalid_request",
        reason="request.query_parameters",
    ),
    "query-string-holds-the-token": Refusal(
        lambda c: Call(
            {"grant_type": TOKEN_EXCHANGE, "subject_token_type": JWT_TYPE},
            query={"subject_token": (t := c.deploy())},
            hashed_token=t,
            secrets=(t,),
        ),
        "invalid_request",
        reason="request.query_parameters",
    ),
    "query-string-client-secret": Refusal(
        lambda c: Call(
            form(t := c.ledger(), audience="ledger"),
            query={"client_id": "poster", "client_secret": POSTER_SECRET},
            hashed_token=t,
            secrets=(t, POSTER_SECRET),
        ),
        "invalid_request",
        reason="request.query_parameters",
    ),
    "query-string-empty-value": Refusal(
        lambda c: Call(form(t := c.deploy()), query={"x": ""}, hashed_token=t, secrets=(t,)),
        "invalid_request",
    ),
    "content-type-json": Refusal(
        lambda c: Call(json.dumps(form(t := c.deploy())), content_type="application/json", secrets=(t,)),
        "invalid_request",
        reason="request.wrong_content_type",
    ),
    "content-type-multipart": Refusal(
        lambda c: Call(
            form(t := c.deploy()), content_type="multipart/form-data", hashed_token=t, secrets=(t,)
        ),
        "invalid_request",
        reason="request.wrong_content_type",
    ),
    "content-type-missing": Refusal(
        lambda c: Call(encode(form(t := c.deploy())), content_type=None, secrets=(t,)),
        "invalid_request",
        reason="request.wrong_content_type",
    ),
    "content-type-text-plain": Refusal(
        lambda c: Call(encode(form(t := c.deploy())), content_type="text/plain", secrets=(t,)),
        "invalid_request",
    ),
    # RFC 9110 §8.4: a coded body is not decoded here, and must not be read as if it were plain
    # (a proxy that decodes it sees another body): an outside check had one granted.
    "content-encoding-gzip-plain-body": Refusal(
        lambda c: Call(form(t := c.deploy()), headers={"Content-Encoding": "gzip"}, secrets=(t,)),
        "invalid_request",
        reason="request.content_encoding",
    ),
    "content-encoding-gzip": Refusal(
        lambda c: Call(
            gzip.compress(encode(form(t := c.deploy()))),
            headers={"Content-Encoding": "gzip"},
            secrets=(t,),
        ),
        "invalid_request",
        reason="request.content_encoding",
    ),
    "content-encoding-listed-after-identity": Refusal(
        lambda c: Call(form(t := c.deploy()), headers={"Content-Encoding": "identity, br"}, secrets=(t,)),
        "invalid_request",
        reason="request.content_encoding",
    ),
    "charset-latin1": Refusal(
        lambda c: Call(
            form(t := c.deploy()), content_type=FORM + "; charset=iso-8859-1", hashed_token=t, secrets=(t,)
        ),
        "invalid_request",
        reason="request.unsupported_charset",
    ),
    "charset-utf16": Refusal(
        lambda c: Call(
            form(t := c.deploy()), content_type=FORM + ";charset=UTF-16", hashed_token=t, secrets=(t,)
        ),
        "invalid_request",
        reason="request.unsupported_charset",
    ),
    "body-too-large": Refusal(_too_large, "invalid_request", (400, 413), reason="request.body_too_large"),
    "authorization-header-repeated": Refusal(
        lambda c: Call(
            form(t := c.ledger(), audience="ledger"),
            headers={
                "Authorization": basic("gateway", GATEWAY_SECRET)["Authorization"]
                + ", "
                + basic("poster", POSTER_SECRET)["Authorization"]
            },
            hashed_token=t,
            secrets=(t, GATEWAY_SECRET, POSTER_SECRET),
        ),
        "invalid_request",
        reason="request.repeated_authorization_header",
    ),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusal(sts: Flask, web: FlaskClient, ctx: Ctx, tmp_path: Path, name: str) -> None:
    case = REFUSALS[name]
    call = case.build(ctx)
    before = audit_count(sts)
    resp = send(web, call)
    assert_oauth_error(resp, case.error, case.status, echoed=inputs_of(call.data, call.query))
    assert "access_token" not in resp.get_data(as_text=True)

    record = new_record(sts, before)
    assert record["outcome"] == "refused"
    assert record["error"] == case.error
    assert record["reasons"], "a refusal carries a reason tag"
    assert all(re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+", r) for r in record["reasons"])
    if case.reason is not None:
        assert case.reason in record["reasons"]
    assert record["issued_jti"] is None
    assert record["granted_audience"] == []
    if call.hashed_token is not None:
        assert record["subject_token_sha256"] == sha256(call.hashed_token)
    assert_nothing_secret_stored(sts, tmp_path, call.secrets)


@pytest.mark.parametrize(
    "name",
    [
        "grant_type",
        "subject_token",
        "subject_token_type",
        "actor_token",
        "actor_token_type",
        "scope",
        "requested_token_type",
        "requested_expires_in",
        "client_id",
        "client_secret",
        "client_assertion",
        "client_assertion_type",
        "posture_token",
    ],
)
def test_non_repeatable_parameter_repeated(sts: Flask, web: FlaskClient, ctx: Ctx, name: str) -> None:
    """RFC 6749 §3.1: parameters MUST NOT be included more than once (same value or not)."""
    token = ctx.deploy()
    values = {"grant_type": TOKEN_EXCHANGE, "subject_token": token, "subject_token_type": JWT_TYPE}
    value = values.get(name, "x")
    pairs = [(k, v) for k, v in form(token).items() if k != name] + [(name, value), (name, value)]
    before = audit_count(sts)
    assert_oauth_error(post(web, pairs), "invalid_request", 400)
    record = new_record(sts, before)
    assert record["error"] == "invalid_request"
    assert "request.repeated_parameter" in record["reasons"]


def test_repeated_empty_value_is_still_a_repeat(web: FlaskClient, ctx: Ctx) -> None:
    pairs = [*form(ctx.deploy()).items(), ("scope", ""), ("scope", "deploy:read")]
    assert_oauth_error(post(web, pairs), "invalid_request", 400)


def test_body_cap_follows_the_setting(make_app: Callable[..., Flask], ctx: Ctx) -> None:
    web = make_app(max_body_bytes=4096).test_client()
    token = ctx.deploy()
    assert post(web, form(token)).status_code == 200
    resp = post(web, form(token, padding="x" * 4096))
    assert_oauth_error(resp, "invalid_request", (400, 413))


def test_body_too_large_without_content_length(sts: Flask, web: FlaskClient, ctx: Ctx) -> None:
    """A chunked body (no Content-Length) over the cap is refused, never cut off and parsed.

    The WSGI server has decoded the chunks (``wsgi.input_terminated``); Werkzeug alone would read
    the first ``max_body_bytes`` and parse them as the whole form.
    """
    body = encode(form(ctx.deploy(), padding="x" * 40_000))
    before = audit_count(sts)
    resp = web.post(
        "/token",
        input_stream=io.BytesIO(body),
        content_type=FORM,
        environ_overrides={
            "wsgi.input_terminated": True,
            "CONTENT_LENGTH": "",
            "HTTP_TRANSFER_ENCODING": "chunked",
        },
    )
    assert_oauth_error(resp, "invalid_request", (400, 413))
    assert "request.body_too_large" in new_record(sts, before)["reasons"]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_other_methods_on_token_endpoint(web: FlaskClient, ctx: Ctx, method: str) -> None:
    resp = web.open("/token", method=method, query_string=form(ctx.deploy()))
    assert resp.status_code == 405
    assert resp.mimetype == "application/json"
    assert set(resp.get_json()) == {"error", "error_description"}
    assert resp.get_json()["error_description"] in FIXED_DESCRIPTIONS
    assert "POST" in {m.strip() for m in resp.headers["Allow"].split(",")}
    assert "access_token" not in resp.get_data(as_text=True)


def test_unauthorized_client_needs_a_rule_allow_list(web: FlaskClient, ctx: Ctx) -> None:
    """The same request by a client that is on the allow-list is granted."""
    ok = post(web, form(ctx.batch(), audience="batch"), headers=basic("gateway", GATEWAY_SECRET))
    assert ok.status_code == 200, ok.get_data(as_text=True)
    refused = post(web, form(ctx.batch(), audience="batch", client_id="poster", client_secret=POSTER_SECRET))
    assert_oauth_error(refused, "unauthorized_client", 400)


def test_client_required_when_no_rule_is_anonymous(make_app: Callable[..., Flask], ctx: Ctx) -> None:
    policy = deepcopy(POLICY)
    policy["rules"] = [r for r in policy["rules"] if r["name"] != "deploy"]
    web = make_app(policy).test_client()
    assert_oauth_error(post(web, form(ctx.ledger(), audience="ledger")), "invalid_client", 401)


# -- garbage never makes a 500 -------------------------------------------------------------------


RS256_HEADER = b64(json.dumps({"alg": "RS256"}))
FAKE_SIGNATURE = b64("sig")


def crafted(header: str, payload: str) -> str:
    """A compact JWS shape around already-encoded segments, with a meaningless signature."""
    return f"{header}.{payload}.{FAKE_SIGNATURE}"


NASTY_TOKENS: dict[str, Callable[[Ctx], str]] = {
    "two-segments": lambda c: "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0",
    "four-segments": lambda c: c.deploy() + ".AAAA",
    "five-segments-jwe": lambda c: ".".join(
        [b64(json.dumps({"alg": "RSA-OAEP", "enc": "A256GCM"})), "AAAA", "AAAA", "AAAA", "AAAA"]
    ),
    "one-segment": lambda c: "eyJhbGciOiJSUzI1NiJ9",
    "dots-only": lambda c: "..",
    "payload-not-json": lambda c: crafted(RS256_HEADER, b64("not json")),
    "payload-json-array": lambda c: crafted(RS256_HEADER, b64("[1,2]")),
    "payload-json-string": lambda c: crafted(RS256_HEADER, b64(json.dumps("x"))),
    "payload-not-base64": lambda c: crafted(RS256_HEADER, "!!!"),
    "payload-nested-shallow": lambda c: crafted(RS256_HEADER, b64(json.dumps({"a": [[[[[1]]]]]}))),
    "payload-huge-numbers": lambda c: crafted(RS256_HEADER, b64('{"exp":1e999,"iat":-1e999}')),
    "payload-claims-of-wrong-types": lambda c: crafted(
        RS256_HEADER, b64(json.dumps({"iss": 1, "sub": [], "aud": {}, "exp": "soon"}))
    ),
    "header-not-json": lambda c: crafted(b64("nope"), b64("{}")),
    "header-alg-number": lambda c: crafted(b64(json.dumps({"alg": 256})), b64(json.dumps(c.claims()))),
    "header-kid-object": lambda c: crafted(b64(json.dumps({"alg": "RS256", "kid": {"a": 1}})), b64("{}")),
    "header-deeply-nested": lambda c: crafted(b64("[" * 3000), b64("{}")),
    "header-duplicate-alg": lambda c: crafted(
        b64('{"alg":"none","alg":"RS256"}'), b64(json.dumps(c.claims()))
    ),
    "unicode": lambda c: "ëÿ.ö.ü☃",
    "null-bytes": lambda c: "\x00\x00.\x00.\x00",
    "control-chars": lambda c: "\x01\x02\x1b[31m.\x7f.\x08",
    "whitespace-around": lambda c: " " + c.deploy() + "\n",
    "percent-escapes": lambda c: "%zz.%00.%",
    "huge-token-like": lambda c: "A" * 15_000 + ".B.C",
    "signature-stripped": lambda c: c.deploy().rsplit(".", 1)[0] + ".",
    "signature-swapped": lambda c: c.deploy().rsplit(".", 1)[0] + "." + c.ledger().rsplit(".", 1)[1],
    "payload-swapped": lambda c: ".".join(
        [
            c.deploy().split(".")[0],
            b64(json.dumps(c.claims(sub="repo:evil/app:ref:refs/heads/main"))),
            c.deploy().split(".")[2],
        ]
    ),
}


@pytest.mark.parametrize("name", list(NASTY_TOKENS))
def test_nasty_subject_tokens_are_invalid_request(sts: Flask, web: FlaskClient, ctx: Ctx, name: str) -> None:
    token = NASTY_TOKENS[name](ctx)
    before = audit_count(sts)
    resp = post(web, form(token))
    assert_oauth_error(resp, "invalid_request", 400)
    record = new_record(sts, before)
    assert (
        record["subject_token_sha256"] == hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
    )


NASTY_BODIES: dict[str, bytes] = {
    "binary-junk": bytes(range(256)) * 4,
    "nul-bytes": b"\x00" * 1000,
    "lone-percent": b"%",
    "bad-escapes": b"%zz=%zz&grant_type=%G0",
    "invalid-utf8-escapes": b"grant_type=%ff%fe&subject_token=%c3%28&subject_token_type=%ed%a0%80",
    "invalid-utf8-raw": b"grant_type=\xff\xfe&subject_token=\xc3\x28",
    "empty-names": b"=&=&&&==&=x",
    "no-equals": b"grant_type",
    "many-parameters": b"&".join(b"p%d=1" % i for i in range(1500)),
    "utf8-bom": b"\xef\xbb\xbfgrant_type=" + TOKEN_EXCHANGE.encode(),
    "newlines": b"grant_type=\r\n" + TOKEN_EXCHANGE.encode() + b"\r\n&subject_token=\r\n",
    "unicode-everywhere": "grant_type=ü&subject_token=☃.☃.☃&subject_token_type=ñ".encode(),
    "json-in-form": b'{"grant_type":"' + TOKEN_EXCHANGE.encode() + b'"}',
}


@pytest.mark.parametrize("name", list(NASTY_BODIES))
def test_nasty_bodies_are_oauth_errors(sts: Flask, web: FlaskClient, name: str) -> None:
    before = audit_count(sts)
    resp = post(web, NASTY_BODIES[name])
    assert 400 <= resp.status_code < 500
    body = assert_oauth_error(resp, resp.get_json()["error"], resp.status_code)
    assert body["error"] in OAUTH_ERROR_CODES
    assert new_record(sts, before)["outcome"] == "refused"


def test_random_bytes_never_make_a_500(sts: Flask, web: FlaskClient, ctx: Ctx) -> None:
    """A small seeded fuzz loop (hypothesis is not a dependency): bodies, tokens and headers."""
    rng = random.Random(8693)
    before = audit_count(sts)
    sent = 0
    for _ in range(60):
        junk = rng.randbytes(rng.randrange(0, 1500))
        # As the whole body...
        resp = post(web, junk)
        # ...as the subject token (latin-1 keeps every byte)...
        resp2 = post(web, form(junk.decode("latin-1")))
        # ...as three base64url segments that look like a JWT...
        parts = [b64(rng.randbytes(rng.randrange(0, 300))) for _ in range(3)]
        resp3 = post(web, form(".".join(parts)))
        # ...and as Basic credentials.
        creds = {"Authorization": "Basic " + base64.b64encode(junk[:200]).decode()}
        resp4 = post(web, form(ctx.deploy()), headers=creds)
        sent += 4
        for r in (resp, resp2, resp3, resp4):
            assert 400 <= r.status_code < 500, r.get_data(as_text=True)
            assert r.mimetype == "application/json"
            assert r.get_json()["error"] in OAUTH_ERROR_CODES
            assert "access_token" not in r.get_json()
    assert audit_count(sts) == before + sent


# -- error descriptions are fixed ----------------------------------------------------------------


def test_error_descriptions_never_echo_input(web: FlaskClient, ctx: Ctx) -> None:
    token = ctx.deploy()
    probes = [
        form(token, audience="https://canary-7f3a.example"),
        form(token, scope="canary7f3a:scope"),
        form(token, subject_token_type="urn:canary7f3a"),
        form(token, grant_type="canary7f3a"),
        form(token, requested_token_type="urn:canary7f3a"),
        form(token + "canary7f3a"),
        form(token, client_id="canary7f3a", client_secret="canary7f3a-secret"),
        form(token, resource="relative/canary7f3a"),
    ]
    for probe in probes:
        resp = post(web, probe)
        assert resp.status_code >= 400
        raw = resp.get_data(as_text=True)
        assert "canary7f3a" not in raw and "7f3a" not in raw
        assert token.split(".")[1] not in raw and token.split(".")[2] not in raw
        assert resp.get_json()["error_description"] in FIXED_DESCRIPTIONS


# -- the audit trail -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_auth", "scope", "expected_scope"),
    [
        ("none", None, ["deploy:read"]),
        ("basic", "ledger:read bogus", ["ledger:read"]),
        ("post", "ledger:write", ["ledger:write"]),
        ("private_key_jwt", "ledger:admin", ["ledger:admin"]),
    ],
)
def test_grant_writes_one_complete_record(
    sts: Flask,
    web: FlaskClient,
    ctx: Ctx,
    clock: Clock,
    tmp_path: Path,
    client_auth: str,
    scope: str | None,
    expected_scope: list[str],
) -> None:
    secrets: tuple[str, ...] = ()
    headers: dict[str, str] = {}
    if client_auth == "none":
        subject_token, params, rule, audience = ctx.deploy(), {}, "deploy", [DEPLOY_AUDIENCE]
    else:
        subject_token, rule, audience = ctx.ledger(), "ledger-with-client", ["ledger"]
        params = {"audience": "ledger", "scope": scope}
        if client_auth == "basic":
            headers, secrets = basic("gateway", GATEWAY_SECRET), (GATEWAY_SECRET,)
        elif client_auth == "post":
            params |= {"client_id": "poster", "client_secret": POSTER_SECRET}
            secrets = (POSTER_SECRET,)
        else:
            assertion = client_assertion(clock.now)
            params |= {
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": assertion,
            }
            secrets = (assertion,)
    before = audit_count(sts)
    resp = post(web, form(subject_token, **params), headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    access_token = resp.get_json()["access_token"]
    _, claims = issued_claims(web, access_token, clock)

    record = new_record(sts, before)
    assert record["outcome"] == "granted"
    assert record["error"] is None
    assert record["rule"] == rule
    assert record["issued_jti"] == claims["jti"]
    assert record["issued_exp"] == claims["exp"]
    assert record["issued_kid"] is not None
    assert record["granted_audience"] == audience
    assert record["granted_scope"] == expected_scope
    assert record["granted_lifetime"] == resp.get_json()["expires_in"]
    assert record["subject_token_sha256"] == sha256(subject_token)
    assert record["subject"] == claims["sub"]
    method = {"basic": "client_secret_basic", "post": "client_secret_post"}.get(client_auth, client_auth)
    assert record["client_auth_method"] == method
    assert "policy.rule_matched" in record["reasons"]
    # The issued token is a bearer credential too: it must not be stored either.
    assert_nothing_secret_stored(sts, tmp_path, (subject_token, access_token, *secrets))


def test_audit_rows_are_findable_by_token_hash(sts: Flask, web: FlaskClient, ctx: Ctx) -> None:
    token = ctx.deploy()
    post(web, form(token))
    post(web, form(token, audience="https://elsewhere.example"))
    rows = runtime(sts).audit.recent(10, subject_token_sha256=sha256(token))
    assert [r["outcome"] for r in rows] == ["refused", "granted"]


def test_audit_failure_withholds_the_token(sts: Flask, web: FlaskClient, ctx: Ctx) -> None:
    """The audit guarantee: no committed record, no token.

    The failure is real: the table the sink writes to is moved away after the
    app is built, so the INSERT fails in SQLite.  (Making the file read-only
    would not do: the tests may run as root, who can write it anyway.)
    """
    engine = runtime(sts).engine
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_events RENAME TO audit_events_away"))
    try:
        resp = post(web, form(ctx.deploy()))
        assert resp.status_code == 503
        assert resp.headers["Cache-Control"] == "no-store"
        assert int(resp.headers["Retry-After"]) > 0
        body = resp.get_json()
        assert body == {"error": "temporarily_unavailable", "error_description": body["error_description"]}
        assert body["error_description"] in FIXED_DESCRIPTIONS
        raw = resp.get_data(as_text=True)
        assert "access_token" not in raw and "eyJ" not in raw

        # A refusal still says what was wrong: only grants depend on the record.
        assert_oauth_error(
            post(web, form(ctx.deploy(), grant_type="password")), "unsupported_grant_type", 400
        )
    finally:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE audit_events_away RENAME TO audit_events"))
    assert audit_count(sts) == 0
    # Once the database is back, grants resume and are recorded.
    assert post(web, form(ctx.deploy())).status_code == 200
    assert runtime(sts).audit.recent(1)[0]["outcome"] == "granted"


def test_audit_failure_when_the_table_is_dropped(sts: Flask, web: FlaskClient, ctx: Ctx) -> None:
    with runtime(sts).engine.begin() as conn:
        conn.execute(text("DROP TABLE audit_events"))
    resp = post(web, form(ctx.deploy()))
    assert resp.status_code == 503
    assert resp.get_json()["error"] == "temporarily_unavailable"
    assert "access_token" not in resp.get_json()


@pytest.mark.parametrize(
    "client_id_source",
    ["form", "basic"],
)
def test_client_id_with_control_characters_never_reaches_the_audit_record(
    sts: Flask, web: FlaskClient, ctx: Ctx, client_id_source: str
) -> None:
    """RFC 6749 Appendix A.1: client_id is VSCHAR.  A NUL in it made PostgreSQL refuse the audit row."""
    token = ctx.ledger()
    if client_id_source == "form":
        resp = post(web, form(token, audience="ledger", client_id="gate\x00way", client_secret="s3cret-x"))
    else:
        resp = post(web, form(token, audience="ledger"), headers=basic("gate\x00way", "s3cret-x"))
    assert_oauth_error(resp, "invalid_client", 401)
    record = runtime(sts).audit.recent(1)[0]
    assert record["client_id"] is None
    assert "client.malformed_client_id" in record["reasons"]


# -- metadata, JWKS, health (RFC 8414, RFC 7517) -------------------------------------------------


def test_metadata_is_rfc8414(web: FlaskClient) -> None:
    resp = web.get("/.well-known/oauth-authorization-server")
    assert resp.status_code == 200
    assert resp.mimetype == "application/json"
    md = resp.get_json()
    assert md["issuer"] == STS_ISSUER
    assert md["token_endpoint"] == STS_ISSUER + "/token"
    assert md["jwks_uri"] == STS_ISSUER + "/.well-known/jwks.json"
    assert TOKEN_EXCHANGE in md["grant_types_supported"]
    assert {"client_secret_basic", "client_secret_post", "private_key_jwt"} <= set(
        md["token_endpoint_auth_methods_supported"]
    )
    assert isinstance(md["response_types_supported"], list)  # RFC 8414 §2: REQUIRED
    # The advertised endpoints are the ones this app serves.
    assert web.get(urlsplit(md["jwks_uri"]).path).status_code == 200
    assert web.post(urlsplit(md["token_endpoint"]).path).status_code == 400


def test_metadata_passes_authlib_validation(web: FlaskClient) -> None:
    """authlib's RFC 8414 validation, all of it (``response_types_supported`` included)."""
    document = web.get("/.well-known/oauth-authorization-server").get_json()
    AuthorizationServerMetadata(document).validate()
    assert document["response_types_supported"] == ["none"]


def test_metadata_has_no_empty_arrays(web: FlaskClient) -> None:
    """RFC 8414 §3.2: "Claims with zero elements MUST be omitted from the response"."""
    document = web.get("/.well-known/oauth-authorization-server").get_json()
    assert [name for name, value in document.items() if value == []] == []
    assert "code_challenge_methods_supported" not in document  # No PKCE: no authorization endpoint.


def test_metadata_issuer_with_a_path(make_app: Callable[..., Flask]) -> None:
    """RFC 8414 §3.1: the well-known segment goes between host and path; issuer still exact."""
    web = make_app(issuer="https://sts.test/tenant-a").test_client()
    md = web.get("/.well-known/oauth-authorization-server/tenant-a").get_json()
    assert md["issuer"] == "https://sts.test/tenant-a"
    assert md["token_endpoint"] == "https://sts.test/tenant-a/token"


def test_jwks_has_only_public_members(web: FlaskClient) -> None:
    resp = web.get("/.well-known/jwks.json")
    assert resp.status_code == 200
    assert resp.mimetype == "application/json"
    keys = resp.get_json()["keys"]
    assert keys
    kids = [k["kid"] for k in keys]
    assert len(set(kids)) == len(kids)
    for key in keys:
        assert not PRIVATE_JWK_MEMBERS & set(key), key
        assert key.get("use", "sig") == "sig"
        assert key["kty"] in {"EC", "RSA", "OKP"}
    assert all(not k.is_private for k in KeySet.import_key_set(resp.get_json()).keys)


def test_healthz(web: FlaskClient) -> None:
    resp = web.get("/healthz")
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ok"}
    assert resp.headers["Cache-Control"] == "no-store"


# -- X-Request-Id --------------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["abc-123", "req.42:A_b-c", "x" * 64])
def test_valid_request_id_is_echoed_and_audited(
    sts: Flask, web: FlaskClient, ctx: Ctx, request_id: str
) -> None:
    for data in (form(ctx.deploy()), form(ctx.deploy(), grant_type="password")):
        resp = post(web, data, headers={"X-Request-Id": request_id})
        assert resp.headers["X-Request-Id"] == request_id
        assert runtime(sts).audit.recent(1)[0]["request_id"] == request_id
    assert web.get("/healthz", headers={"X-Request-Id": request_id}).headers["X-Request-Id"] == request_id


@pytest.mark.parametrize(
    "request_id",
    [
        "",
        " ",
        "has space",
        "x" * 65,
        "semi;colon",
        "<script>",
        "ÿÿ",
        "é1",
        "a\tb",
        'quote"d',
        "a,b",
        # Punctuation only, or leading punctuation: not an id anyone could look up ("-" is also
        # what logs print for "none").
        "-",
        ".",
        "...",
        ":",
        "-_-",
        "-abc",
        "_abc",
        ".hidden",
    ],
)
def test_junk_request_id_is_replaced(sts: Flask, web: FlaskClient, ctx: Ctx, request_id: str) -> None:
    resp = post(web, form(ctx.deploy()), headers={"X-Request-Id": request_id})
    echoed = resp.headers["X-Request-Id"]
    assert echoed != request_id
    assert str(uuid.UUID(echoed)) == echoed
    assert runtime(sts).audit.recent(1)[0]["request_id"] == echoed


@pytest.mark.parametrize("values", [("abc", "def"), ("abc", "abc"), ("", "abc"), ("abc", "")])
def test_repeated_request_id_header_is_replaced(
    sts: Flask, web: FlaskClient, ctx: Ctx, values: tuple[str, str]
) -> None:
    """Two X-Request-Id fields name no single request: neither is used (WSGI joins them)."""
    headers = [("X-Request-Id", value) for value in values]
    resp = post(web, form(ctx.deploy()), headers=headers)
    echoed = resp.headers["X-Request-Id"]
    assert str(uuid.UUID(echoed)) == echoed
    assert runtime(sts).audit.recent(1)[0]["request_id"] == echoed


def test_request_id_generated_when_absent(web: FlaskClient) -> None:
    first = web.get("/healthz").headers["X-Request-Id"]
    second = web.get("/healthz").headers["X-Request-Id"]
    assert uuid.UUID(first) and uuid.UUID(second)
    assert first != second


# -- access log ----------------------------------------------------------------------------------


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "sts.access"]


def test_access_log_names_the_route_never_the_path_or_query(
    web: FlaskClient, ctx: Ctx, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LWluLXRoZS1wYXRo.c2ln"
    caplog.set_level(logging.INFO, logger="sts.access")
    granted = post(web, form(ctx.deploy()), headers={"X-Request-Id": "req-1"})
    assert granted.status_code == 200
    in_query = web.post(f"/token?subject_token={secret}", data=form(secret), content_type=FORM)
    assert in_query.status_code == 400
    assert web.get(f"/{secret}").status_code == 404
    assert web.get(f"/.well-known/oauth-authorization-server/{secret}").status_code == 404
    assert web.get(f"/token/{secret}").status_code == 404
    assert web.open("/token", method="OPTIONS").status_code == 405
    assert web.open("/token", method=secret.replace(".", "")).status_code == 405
    # A path Werkzeug reads as ``/token`` (its leading slashes stripped) is still unmatched.
    for method in ("POST", "GET"):
        doubled = web.open("/", method=method, data=form(secret), environ_overrides={"PATH_INFO": "//token"})
        assert doubled.status_code == 404
    records = _access_lines(caplog)
    lines = [r.getMessage() for r in records]
    assert len(lines) == 9, lines
    assert lines[7].startswith('127.0.0.1 "POST <unmatched>" 404 '), lines[7]
    assert lines[8].startswith('127.0.0.1 "GET <unmatched>" 404 '), lines[8]
    assert re.fullmatch(r'127\.0\.0\.1 "POST /token" 200 \d+ \d+\.\dms request_id=req-1', lines[0]), lines[0]
    assert lines[1].startswith('127.0.0.1 "POST /token" 400 ')
    for line in lines[2:5]:
        assert line.startswith('127.0.0.1 "GET <unmatched>" 404 '), line
    assert lines[5].startswith('127.0.0.1 "OPTIONS <unmatched>" 405 ')
    assert lines[6].startswith('127.0.0.1 "<other> <unmatched>" 405 ')
    assert secret not in caplog.text and "c2VjcmV0" not in caplog.text and "?" not in caplog.text
    # The same fields, structured, for a JSON log formatter.
    first = records[0]
    assert (first.http_method, first.http_route, first.http_status) == ("POST", "/token", 200)  # type: ignore[attr-defined]
    assert first.response_bytes == len(granted.get_data())  # type: ignore[attr-defined]
    assert first.request_id == "req-1" and first.client_address == "127.0.0.1"  # type: ignore[attr-defined]
    assert 0 <= first.duration_ms < 60_000  # type: ignore[attr-defined]
    assert first.queued_ms == 0.0  # type: ignore[attr-defined]  # (not served by sts serve here)
    # Under `sts serve`, the wait for a request thread is in the duration (a fault audit saw 10 s
    # answers logged as 1.8 s): the server puts it in the environ.
    caplog.clear()
    queued = post(web, form(ctx.deploy()), environ_base={"sts.queued_seconds": 2.5})
    assert queued.status_code == 200
    [record] = _access_lines(caplog)
    assert record.queued_ms == 2500.0 and 2500 <= record.duration_ms < 62_500  # type: ignore[attr-defined]


def test_unexpected_error_log_names_the_route_not_the_path(
    sts: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LWluLWFuLWVycm9y.c2ln"

    def fail(token: str) -> None:
        raise RuntimeError("a bug")

    sts.add_url_rule("/boom/<token>", "boom", fail)
    caplog.set_level(logging.INFO)
    response = sts.test_client().get(f"/boom/{secret}")
    assert response.status_code == 500 and response.get_json()["error"] == "server_error"
    assert "unhandled error on GET /boom/<token>" in caplog.text
    assert '"GET /boom/<token>" 500 ' in caplog.text
    assert secret not in caplog.text and "c2VjcmV0" not in caplog.text
