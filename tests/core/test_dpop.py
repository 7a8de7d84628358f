"""DPoP at the token endpoint, case by case against RFC 9449 §4.3.

Every exchange goes over HTTP through the real Flask app (two real server
processes for the cross-process replay test), with subject tokens from a
development issuer serving its JWKS over HTTP.  Proofs are built here with
joserfc keys, one helper per JOSE detail, so each test bends exactly one
thing::

    POST /token
    DPoP: <header {"typ": "dpop+jwt", "alg": "ES256", "jwk": {public key}}
           claims {"jti", "htm": "POST", "htu": "https://sts.test/token", "iat", "nonce"?}>

A success is ``token_type: DPoP`` with ``cnf.jkt`` (RFC 9449 §6.1), the
RFC 7638 thumbprint of the proof's key, checked against an independent
thumbprint calculation that is itself checked against RFC 7638 §3.1.  Each
refusal is ``invalid_dpop_proof`` (400) with the audit reason naming the
§4.3 check that failed.  Time moves by setting the app's clock, never by
sleeping.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import multiprocessing
import pickle
import random
import secrets
import string
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from threading import Barrier
from typing import Any
from urllib.parse import urlencode

import pytest
import redis
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask
from flask.testing import FlaskClient
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, Key, KeySet, OctKey, OKPKey, RSAKey
from joserfc.jws import JWSRegistry
from sqlalchemy import event
from werkzeug.test import TestResponse

from sts.adapters.sql.audit_sink import SqlAuditSink
from sts.adapters.sql.engines import make_engine
from sts.app import create_app, prepare
from sts.core.client_secrets import hash_secret
from sts.core.dpop import issue_nonce
from sts.dev.issuer import DevIssuer, RunningServer
from sts.settings import Settings
from tests.conftest import ACCESS_TOKEN_TYPE, DEFAULT_CLIENTS, FORM, JWT_TYPE, STS_ISSUER, exchange_form
from tests.support.clock import Clock
from tests.support.crafted_jose import (
    NOT_UTF8,
    rsa_key_with_exponent_3,
    self_signed_x5c,
    sign_encoded,
    unsupported_x5c,
)
from tests.support.postgres import PgSchema
from tests.support.redis_server import url_of

TOKEN_URL = STS_ISSUER + "/token"
SUBJECT = "repo:acme/app:ref:refs/heads/main"
STRICT_SUBJECT = "repo:acme/strict:ref:refs/heads/main"
DEPLOY = "https://deploy.example.com"
AGENTS = r"system:serviceaccount:agents:a[0-9]+"
RS_SECRET = "deploy-api-secret-0123456789-abcdefghijkl"

# Keys are made once: RSA generation is the slow part of this file.
EC_KEY = ECKey.generate_key("P-256")
EC_OTHER = ECKey.generate_key("P-256")
EC384_KEY = ECKey.generate_key("P-384")
EC521_KEY = ECKey.generate_key("P-521")
RSA_KEY = RSAKey.generate_key(2048)
OKP_KEY = OKPKey.generate_key("Ed25519")
#: A key the service must refuse (RFC 8725 §3.5); joserfc rightly warns about it.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", SecurityWarning)
    _WEAK = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    RSA_1024 = RSAKey.import_key(_WEAK)
#: NIST SP 800-56B: e = 65537 only; a 2048-bit key with e = 3 is refused too.
RSA_E3 = rsa_key_with_exponent_3()

#: RFC 7638 §3.1: the example RSA key and its SHA-256 thumbprint.
RFC7638_JWK = {
    "kty": "RSA",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXj"
    "BZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZ"
    "gnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIq"
    "bw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 §3: SHA-256 over the required members, sorted, without whitespace.

    Written out here, not taken from joserfc, so the test does not check the
    implementation against itself.
    """
    required = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}
    members = {name: jwk[name] for name in required[jwk["kty"]]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def natural_alg(key: Key) -> str:
    if isinstance(key, ECKey):
        return {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}[key.curve_name]
    if isinstance(key, RSAKey):
        return "RS256"
    return "EdDSA"


def public_jwk(key: Key) -> dict[str, Any]:
    return dict(key.as_dict(private=False))


def compact(header: dict[str, Any], claims: dict[str, Any] | bytes, key: Key | None, alg: str) -> str:
    """A compact JWS signed exactly as told (``key`` None: no signature, as for ``alg: none``).

    Serialised by hand so a test can put anything in the header; the signature
    itself is joserfc's.
    """
    payload = claims if isinstance(claims, bytes) else json.dumps(claims, separators=(",", ":")).encode()
    signing_input = b64url(json.dumps(header, separators=(",", ":")).encode()) + "." + b64url(payload)
    signature = b""
    if key is not None:
        with warnings.catch_warnings():
            # EdDSA (deprecated by RFC 9864) and short RSA keys make joserfc warn; signing is the test's aim.
            warnings.simplefilter("ignore", SecurityWarning)
            signature = JWSRegistry(algorithms=[alg]).get_alg(alg).sign(signing_input.encode(), key)
    return signing_input + "." + b64url(signature)


def proof(
    key: Key,
    now: float,
    *,
    alg: str | None = None,
    header: dict[str, Any] | None = None,
    claims: dict[str, Any] | None = None,
    signer: Key | None = None,
) -> str:
    """A DPoP proof for POST https://sts.test/token at ``now``, signed by ``key``.

    ``header`` and ``claims`` are merged over the defaults; a value of None
    removes the member.  ``signer`` signs with another key than the one in
    ``jwk``.
    """
    alg = alg or natural_alg(key)
    protected: dict[str, Any] = {"typ": "dpop+jwt", "alg": alg, "jwk": public_jwk(key)}
    body: dict[str, Any] = {
        "jti": secrets.token_urlsafe(16),
        "htm": "POST",
        "htu": TOKEN_URL,
        "iat": int(now),
    }
    for target, changes in ((protected, header), (body, claims)):
        for name, value in (changes or {}).items():
            if value is None:
                target.pop(name, None)
            else:
                target[name] = value
    return compact(protected, body, signer or key, alg)


def policy(*, actor_may_bind_key: bool = False, self_actors: bool = False) -> dict[str, Any]:
    """The GitHub job's own tokens, a rule that demands DPoP, one for an authenticated client, and
    re-exchange of our tokens (``self``)."""
    actors: list[dict[str, Any]] = [{"issuer": "upstream", "subject_pattern": AGENTS}]
    if self_actors:
        # The agents' own tokens of ours (rule "agents"): another workload than the subject.
        actors.append({"issuer": "self", "subject_pattern": AGENTS})
    delegation = {"actors": actors, "max_depth": 3}
    grant = {
        "audiences": [DEPLOY],
        "scopes": ["deploy:read", "deploy:write"],
        "default_scopes": ["deploy:read"],
        "max_lifetime": 300,
    }
    return {
        "version": 1,
        "rules": [
            {
                "name": "deploy",
                "issuer": "upstream",
                "subject": SUBJECT,
                "claims": {"repository_id": "123456"},
                "require_client_authentication": False,
                "delegation": deepcopy(delegation),
                "grant": deepcopy(grant),
            },
            {
                "name": "strict",
                "issuer": "upstream",
                "subject": STRICT_SUBJECT,
                "require_client_authentication": False,
                "require_dpop": True,
                "grant": deepcopy(grant),
            },
            {
                "name": "ledger-with-client",
                "issuer": "upstream",
                "subject": "system:serviceaccount:payments:api",
                "clients": ["gateway"],
                "grant": {"audiences": ["ledger"], "scopes": ["ledger:read"], "max_lifetime": 300},
            },
            {
                "name": "agents",
                "issuer": "upstream",
                "subject_pattern": AGENTS,
                "require_client_authentication": False,
                "grant": {"audiences": [DEPLOY], "max_lifetime": 300},
            },
            {
                "name": "reexchange",
                "issuer": "self",
                "subject": SUBJECT,
                "require_client_authentication": False,
                "actor_may_bind_key": actor_may_bind_key,
                "delegation": deepcopy(delegation),
                "grant": deepcopy(grant),
            },
        ],
    }


CLIENTS = [
    *DEFAULT_CLIENTS,
    {
        "client_id": "deploy-api",
        "auth_method": "client_secret_basic",
        "secret_hash": hash_secret(RS_SECRET),
        "audiences": [DEPLOY],
    },
]


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

    def subject(self, subject: str = SUBJECT) -> str:
        repository = subject.removeprefix("repo:").partition(":")[0]
        return self.issuer.github_actions_token(
            audience=STS_ISSUER, repository=repository, now=self.clock.now
        )

    def actor(self, n: int) -> str:
        return self.issuer.kubernetes_token(
            audience=[STS_ISSUER], namespace="agents", service_account=f"a{n}", now=self.clock.now
        )

    def proof(self, key: Key = EC_KEY, *, age: float = 0, **kwargs: Any) -> str:
        return proof(key, self.clock.now - age, **kwargs)

    def exchange(
        self,
        dpop: str | list[str] | None = None,
        *,
        subject_token: str | None = None,
        subject_token_type: str = JWT_TYPE,
        actor: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> TestResponse:
        form = exchange_form(
            subject_token or self.subject(), subject_token_type=subject_token_type, audience=DEPLOY
        )
        if actor is not None:
            form.update(actor_token=actor, actor_token_type=JWT_TYPE)
        sent: list[tuple[str, str]] = list((headers or {}).items())
        for value in [dpop] if isinstance(dpop, str) else dpop or []:
            sent.append(("DPoP", value))
        return self.web.post("/token", data=form, headers=sent)

    def granted(self, dpop: str | list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        resp = self.exchange(dpop, **kwargs)
        assert resp.status_code == 200, (resp.get_json(), self.last_record()["reasons"])
        body: dict[str, Any] = resp.get_json()
        return body

    def claims(self, token: str) -> dict[str, Any]:
        """Verify an issued token with the app's published JWKS; return its claims."""
        jwks = self.web.get("/.well-known/jwks.json").get_json()
        decoded = jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["ES256"])
        assert decoded.header["typ"] == "at+jwt"
        assert decoded.claims["iss"] == STS_ISSUER and decoded.claims["sub"] in {SUBJECT, STRICT_SUBJECT}
        assert decoded.claims["exp"] > self.clock.now
        return dict(decoded.claims)

    def introspect(self, token: str) -> dict[str, Any]:
        auth = base64.b64encode(f"deploy-api:{RS_SECRET}".encode()).decode()
        resp = self.web.post("/introspect", data={"token": token}, headers={"Authorization": f"Basic {auth}"})
        assert resp.status_code == 200
        body: dict[str, Any] = resp.get_json()
        return body

    def last_record(self) -> dict[str, Any]:
        record: dict[str, Any] = self.app.extensions["sts"].audit.recent(1)[0]
        return record


@pytest.fixture
def make_sts(make_settings: Callable[..., Settings], upstream: RunningServer) -> Iterator[Callable[..., STS]]:
    apps: list[Flask] = []

    def build(
        policy_doc: dict[str, Any] | None = None, *, clock: Clock | None = None, **overrides: Any
    ) -> STS:
        clock = clock or Clock(float(int(time.time())))
        overrides.setdefault("clients", CLIENTS)
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
    sts: STS, resp: TestResponse, reason: str, error: str = "invalid_dpop_proof"
) -> dict[str, Any]:
    """The OAuth error, nothing issued, and the audit record names the check that failed."""
    body = resp.get_json()
    assert resp.status_code == 400, body
    assert body["error"] == error and "access_token" not in body
    assert resp.headers["Cache-Control"] == "no-store"
    record = sts.last_record()
    assert (record["outcome"], record["error"], record["issued_jti"]) == ("refused", error, None)
    assert reason in record["reasons"], record["reasons"]
    return record


# -- the oracle ------------------------------------------------------------------------------------


def test_thumbprint_oracle_matches_rfc7638_example() -> None:
    assert thumbprint(RFC7638_JWK) == RFC7638_THUMBPRINT
    # And agrees with joserfc on every key type used below.
    for key in (EC_KEY, EC384_KEY, RSA_KEY, OKP_KEY):
        assert thumbprint(public_jwk(key)) == key.thumbprint()


# -- success: a bound token (RFC 9449 §5, §6) -----------------------------------------------------


@pytest.mark.parametrize(
    ("key", "alg"),
    [(EC_KEY, "ES256"), (EC384_KEY, "ES384"), (RSA_KEY, "RS256"), (RSA_KEY, "PS256"), (OKP_KEY, "EdDSA")],
    ids=["ES256", "ES384", "RS256", "PS256", "EdDSA"],
)
def test_a_valid_proof_binds_the_issued_token_to_its_key(sts: STS, key: Key, alg: str) -> None:
    dpop = sts.proof(key, alg=alg)
    if alg == "EdDSA":
        # joserfc warns on every use of "EdDSA" (RFC 9864 prefers "Ed25519"); the proof is still valid.
        with pytest.warns(SecurityWarning):
            body = sts.granted(dpop)
    else:
        body = sts.granted(dpop)
    jkt = thumbprint(public_jwk(key))
    assert body["token_type"] == "DPoP"
    assert body["issued_token_type"] == ACCESS_TOKEN_TYPE
    claims = sts.claims(body["access_token"])
    assert claims["cnf"] == {"jkt": jkt}
    record = sts.last_record()
    assert record["outcome"] == "granted" and record["details"]["dpop_jkt"] == jkt
    # RFC 9449 §6.2: introspection says DPoP and gives the confirmation.
    info = sts.introspect(body["access_token"])
    assert info["active"] is True and info["token_type"] == "DPoP" and info["cnf"] == {"jkt": jkt}


def test_without_a_proof_the_token_is_a_bearer_token(sts: STS) -> None:
    body = sts.granted()
    assert body["token_type"] == "Bearer"
    assert "cnf" not in sts.claims(body["access_token"])
    info = sts.introspect(body["access_token"])
    assert info["token_type"] == "Bearer" and "cnf" not in info
    assert "dpop_jkt" not in sts.last_record()["details"]


def test_a_proof_works_with_an_authenticated_client(sts: STS) -> None:
    token = sts.issuer.kubernetes_token(
        audience=[STS_ISSUER], namespace="payments", service_account="api", now=sts.clock.now
    )
    basic = base64.b64encode(b"gateway:gateway-secret-with-enough-entropy-0123456789").decode()
    resp = sts.web.post(
        "/token",
        data=exchange_form(token, audience="ledger"),
        headers=[("Authorization", f"Basic {basic}"), ("DPoP", sts.proof())],
    )
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["token_type"] == "DPoP"
    assert sts.last_record()["client_id"] == "gateway"


def test_metadata_lists_the_allowed_algorithms(make_sts: Callable[..., STS]) -> None:
    default = make_sts().web.get("/.well-known/oauth-authorization-server").get_json()
    assert default["dpop_signing_alg_values_supported"] == [
        "ES256",
        "ES384",
        "Ed25519",
        "EdDSA",
        "PS256",
        "RS256",
    ]
    narrowed = make_sts(dpop_algorithms=["ES256"])
    md = narrowed.web.get("/.well-known/oauth-authorization-server").get_json()
    assert md["dpop_signing_alg_values_supported"] == ["ES256"]
    # The list is what is enforced: RS256 is now refused.
    assert_refused(narrowed, narrowed.exchange(narrowed.proof(RSA_KEY)), "dpop.algorithm_not_allowed")
    assert narrowed.granted(narrowed.proof())["token_type"] == "DPoP"


# -- refusals, one §4.3 check at a time -------------------------------------------------------------

Builder = Callable[[STS], str | list[str]]


def _private_jwk(sts: STS) -> str:
    return sts.proof(header={"jwk": dict(EC_KEY.as_dict(private=True))})


def _rsa_private_jwk(sts: STS) -> str:
    return sts.proof(
        RSA_KEY, header={"jwk": {**public_jwk(RSA_KEY), "d": RSA_KEY.as_dict(private=True)["d"]}}
    )


def _tampered(sts: STS) -> str:
    head, _, rest = sts.proof().partition(".")
    signature = rest.rpartition(".")[2]
    other = {"jti": secrets.token_urlsafe(16), "htm": "POST", "htu": TOKEN_URL, "iat": int(sts.clock.now) - 1}
    return f"{head}.{b64url(json.dumps(other).encode())}.{signature}"


def _none(sts: STS) -> str:
    header = {"typ": "dpop+jwt", "alg": "none", "jwk": public_jwk(EC_KEY)}
    claims = {"jti": secrets.token_urlsafe(16), "htm": "POST", "htu": TOKEN_URL, "iat": int(sts.clock.now)}
    return compact(header, claims, None, "none")


def _hs256(sts: STS) -> str:
    secret = OctKey.generate_key(256)
    return sts.proof(EC_KEY, alg="HS256", header={"jwk": dict(secret.as_dict(private=False))}, signer=secret)


REFUSALS: dict[str, tuple[Builder, str]] = {
    # §4.3 step 1: exactly one DPoP header.
    "two-headers": (lambda s: [s.proof(), s.proof()], "dpop.not_exactly_one_proof"),
    # Step 2-3: a well-formed JWT.
    "not-a-jwt": (lambda s: "not-a-jwt", "dpop.not_compact_jws"),
    "empty": (lambda s: "", "dpop.not_compact_jws"),
    "jwe-shaped": (lambda s: "a.b.c.d.e", "dpop.not_compact_jws"),
    "garbage-segments": (lambda s: "a.b.c", "dpop.malformed"),
    "crit": (lambda s: s.proof(header={"crit": ["exp"], "exp": 1}), "dpop.crit_not_understood"),
    # Step 4: typ.
    "typ-missing": (lambda s: s.proof(header={"typ": None}), "dpop.wrong_typ"),
    "typ-JWT": (lambda s: s.proof(header={"typ": "JWT"}), "dpop.wrong_typ"),
    "typ-at+jwt": (lambda s: s.proof(header={"typ": "at+jwt"}), "dpop.wrong_typ"),
    # Step 5: an asymmetric algorithm from the allow-list.
    "alg-none": (_none, "dpop.algorithm_not_allowed"),
    "alg-HS256": (_hs256, "dpop.algorithm_not_allowed"),
    "alg-ES512-not-allowed": (lambda s: s.proof(EC521_KEY), "dpop.algorithm_not_allowed"),
    "alg-RS384-not-allowed": (lambda s: s.proof(RSA_KEY, alg="RS384"), "dpop.algorithm_not_allowed"),
    # Step 6-7: the jwk is a public key of the algorithm's type that verifies the signature.
    "jwk-missing": (lambda s: s.proof(header={"jwk": None}), "dpop.missing_jwk"),
    "jwk-not-an-object": (lambda s: s.proof(header={"jwk": "key"}), "dpop.missing_jwk"),
    "jwk-private-d": (_private_jwk, "dpop.private_jwk"),
    "jwk-private-rsa": (_rsa_private_jwk, "dpop.private_jwk"),
    "jwk-rsa-for-ES256": (
        lambda s: s.proof(EC_KEY, header={"jwk": public_jwk(RSA_KEY)}),
        "dpop.jwk_alg_mismatch",
    ),
    "jwk-ec-for-RS256": (
        lambda s: s.proof(RSA_KEY, header={"jwk": public_jwk(EC_KEY)}),
        "dpop.jwk_alg_mismatch",
    ),
    "jwk-unknown-curve": (
        lambda s: s.proof(header={"jwk": {**public_jwk(EC_KEY), "crv": "P-999"}}),
        "dpop.malformed_jwk",
    ),
    "jwk-P384-for-ES256": (
        lambda s: s.proof(EC_KEY, header={"jwk": public_jwk(EC384_KEY)}),
        "dpop.bad_signature",
    ),
    "rsa-1024": (lambda s: s.proof(RSA_1024), "dpop.weak_key"),
    "rsa-exponent-3": (lambda s: s.proof(RSA_E3), "dpop.weak_key"),
    "signed-by-another-key": (lambda s: s.proof(EC_KEY, signer=EC_OTHER), "dpop.bad_signature"),
    "payload-changed": (_tampered, "dpop.bad_signature"),
    # Claims: jti (§4.2, enough entropy).
    "jti-missing": (lambda s: s.proof(claims={"jti": None}), "dpop.missing_jti"),
    "jti-too-short": (lambda s: s.proof(claims={"jti": "1234567"}), "dpop.malformed_jti"),
    "jti-number": (lambda s: s.proof(claims={"jti": 123456789}), "dpop.malformed_jti"),
    # Step 8: htm.
    "htm-GET": (lambda s: s.proof(claims={"htm": "GET"}), "dpop.htm_mismatch"),
    "htm-lowercase": (lambda s: s.proof(claims={"htm": "post"}), "dpop.htm_mismatch"),
    "htm-missing": (lambda s: s.proof(claims={"htm": None}), "dpop.htm_mismatch"),
    # Step 9: htu.
    "htu-other-host": (lambda s: s.proof(claims={"htu": "https://evil.test/token"}), "dpop.htu_mismatch"),
    "htu-other-path": (lambda s: s.proof(claims={"htu": STS_ISSUER + "/introspect"}), "dpop.htu_mismatch"),
    "htu-http": (lambda s: s.proof(claims={"htu": "http://sts.test/token"}), "dpop.htu_mismatch"),
    "htu-other-port": (lambda s: s.proof(claims={"htu": "https://sts.test:8443/token"}), "dpop.htu_mismatch"),
    "htu-query-elsewhere": (
        lambda s: s.proof(claims={"htu": STS_ISSUER + "/introspect?next=" + TOKEN_URL}),
        "dpop.htu_mismatch",
    ),
    "htu-missing": (lambda s: s.proof(claims={"htu": None}), "dpop.htu_mismatch"),
    "htu-bad-ipv6": (lambda s: s.proof(claims={"htu": "https://[::1/token"}), "dpop.htu_mismatch"),
    # Not a URI (RFC 3986 §2), though Python's urlsplit drops tabs and line breaks and strips
    # leading controls and spaces: each named the token endpoint.
    "htu-tab": (lambda s: s.proof(claims={"htu": STS_ISSUER + "/to\tken"}), "dpop.htu_mismatch"),
    "htu-line-feed": (lambda s: s.proof(claims={"htu": STS_ISSUER + "/to\nken"}), "dpop.htu_mismatch"),
    "htu-carriage-return-in-host": (
        lambda s: s.proof(claims={"htu": TOKEN_URL.replace("sts.test", "sts.\rtest")}),
        "dpop.htu_mismatch",
    ),
    "htu-leading-nul": (lambda s: s.proof(claims={"htu": "\x00" + TOKEN_URL}), "dpop.htu_mismatch"),
    "htu-leading-space": (lambda s: s.proof(claims={"htu": " " + TOKEN_URL}), "dpop.htu_mismatch"),
    "htu-bare-percent": (lambda s: s.proof(claims={"htu": TOKEN_URL + "%"}), "dpop.htu_mismatch"),
    # Step 11: iat within the window (dpop_max_age 300, leeway 30).
    "iat-missing": (lambda s: s.proof(claims={"iat": None}), "dpop.missing_iat"),
    "iat-string": (lambda s: s.proof(claims={"iat": str(int(s.clock.now))}), "dpop.malformed_iat"),
    "iat-bool": (lambda s: s.proof(claims={"iat": True}), "dpop.malformed_iat"),
    "iat-too-old": (lambda s: s.proof(age=301), "dpop.too_old"),
    "iat-future": (lambda s: s.proof(age=-31), "dpop.issued_in_future"),
    "iat-huge": (lambda s: s.proof(claims={"iat": 10**400}), "dpop.malformed_iat"),
    "iat-huge-negative": (lambda s: s.proof(claims={"iat": -(10**400)}), "dpop.malformed_iat"),
}


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
def test_each_check_refuses_with_invalid_dpop_proof(sts: STS, case: tuple[Builder, str]) -> None:
    build, reason = case
    assert_refused(sts, sts.exchange(build(sts)), reason)


def test_a_refused_proof_does_not_become_a_bearer_token(sts: STS) -> None:
    """A client that sent a proof wanted a bound token: a bad proof is never ignored."""
    resp = sts.exchange(sts.proof(claims={"htu": "https://evil.test/token"}))
    assert resp.status_code == 400
    assert sts.app.extensions["sts"].audit.recent(1, outcome="granted") == []


def _forged_without_key(sts: STS, curve: str, alg: str, point: bytes) -> str:
    """A proof whose ``jwk`` is the small-order ``point`` and whose signature is ``R = point`` (for
    the neutral point, ``R = O``) and ``S = 0``: RFC 8032 verification holds (for the neutral point,
    for every message), though no private key exists."""
    jwk = {"kty": "OKP", "crv": curve, "x": b64url(point)}
    header = {"typ": "dpop+jwt", "alg": alg, "jwk": jwk}
    claims = {"jti": secrets.token_urlsafe(16), "htm": "POST", "htu": TOKEN_URL, "iat": int(sts.clock.now)}
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    return signing_input + "." + b64url(point + bytes(len(point)))


@pytest.mark.parametrize(
    ("curve", "alg", "point"),
    [
        ("Ed25519", "Ed25519", b"\x01" + bytes(31)),  # the neutral point
        ("Ed25519", "EdDSA", b"\x01" + bytes(31)),
        ("Ed25519", "Ed25519", bytes(32)),  # order 4
        (
            "Ed25519",
            "Ed25519",
            bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
        ),
        ("Ed448", "EdDSA", b"\x01" + bytes(56)),  # the neutral point
        ("Ed448", "EdDSA", bytes(57)),  # order 4
    ],
    ids=[
        "Ed25519-neutral",
        "EdDSA-Ed25519-neutral",
        "Ed25519-order-4",
        "Ed25519-order-8",
        "Ed448-neutral",
        "Ed448-order-4",
    ],
)
def test_a_proof_key_of_small_order_is_refused(sts: STS, curve: str, alg: str, point: bytes) -> None:
    """RFC 9449 §4.3: the signature must prove possession of the key.  With a small-order public key
    (RFC 8032 verification, as OpenSSL does it, accepts R = O, S = 0 for the neutral point and
    every message) it proves nothing: found by an outside audit, where such a proof was granted a
    bound token, and the token re-exchanged with another forged proof."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)  # joserfc warns on "EdDSA"
        record = assert_refused(
            sts, sts.exchange(_forged_without_key(sts, curve, alg, point)), "dpop.weak_key"
        )
    assert "small order" in json.dumps(record)


@pytest.mark.parametrize("x", ["", "====", "AQ"], ids=["empty", "padding-only", "one-byte"])
def test_a_proof_key_of_the_wrong_length_is_refused(sts: STS, x: str) -> None:
    """An Ed25519 ``jwk`` whose ``x`` decodes to no 32 bytes: refused, never a 500 (the small-order
    check shifted by ``8 * len - 1``; the encoding check before it refuses these)."""
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": x}
    header = {"typ": "dpop+jwt", "alg": "Ed25519", "jwk": jwk}
    claims = {"jti": secrets.token_urlsafe(16), "htm": "POST", "htu": TOKEN_URL, "iat": int(sts.clock.now)}
    proof = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode()) + "." + "A" * 86
    assert_refused(sts, sts.exchange(proof), "dpop.malformed_jwk")


@pytest.mark.parametrize(
    "htu",
    [
        "HTTPS://STS.TEST/token",
        "https://sts.test:443/token",
        "https://STS.Test:443/token",
        "https://sts.test/token?a=b",
        "https://sts.test/token#frag",
        "https://sts.test/token?",
    ],
    ids=["uppercase-scheme-host", "default-port", "both", "query", "fragment", "empty-query"],
)
def test_htu_is_compared_after_normalisation(sts: STS, htu: str) -> None:
    """RFC 9449 §4.3 step 9 with RFC 3986 §6.2.2-6.2.3: scheme and host are case-insensitive,
    the default port may be written out, and "any query and fragment parts" are ignored (an
    outside conformance check found them refused).  The path stays case-sensitive."""
    assert sts.granted(sts.proof(claims={"htu": htu}))["token_type"] == "DPoP"
    assert_refused(sts, sts.exchange(sts.proof(claims={"htu": STS_ISSUER + "/TOKEN"})), "dpop.htu_mismatch")


def _rewritten(key: Key, name: str, change: Callable[[bytes], bytes]) -> dict[str, Any]:
    """``key``'s public JWK with member ``name`` written from other octets (``change`` of its own)."""
    jwk = public_jwk(key)
    raw = base64.urlsafe_b64decode(jwk[name] + "=" * (-len(jwk[name]) % 4))
    jwk[name] = b64url(change(raw))
    return jwk


_BASE64URL = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"


def _spare_bit_set(text: str) -> str:
    """``text`` (base64url of 32 octets) with a spare bit of its last character set: the same octets."""
    return text[:-1] + _BASE64URL[_BASE64URL.index(text[-1]) | 1]


#: One key written another way than RFC 7518 allows: each would have been another ``jkt``.
NON_CANONICAL_JWKS: dict[str, Callable[[], tuple[Key, dict[str, Any]]]] = {
    "rsa-n-leading-zero": lambda: (RSA_KEY, _rewritten(RSA_KEY, "n", lambda raw: b"\0" + raw)),
    "rsa-e-leading-zero": lambda: (RSA_KEY, {**public_jwk(RSA_KEY), "e": "AAEAAQ"}),
    "ec-x-33-octets": lambda: (EC_KEY, _rewritten(EC_KEY, "x", lambda raw: b"\0" + raw)),
    "ec-y-padded": lambda: (EC_KEY, {**public_jwk(EC_KEY), "y": public_jwk(EC_KEY)["y"] + "="}),
    # 32 octets are 43 characters whose last carries 2 spare bits: set, they decode alike.
    "ec-x-spare-bits-set": lambda: (
        EC_KEY,
        {**public_jwk(EC_KEY), "x": _spare_bit_set(public_jwk(EC_KEY)["x"])},
    ),
    "ec-x-one-character": lambda: (EC_KEY, {**public_jwk(EC_KEY), "x": "A"}),
    "okp-x-33-octets": lambda: (OKP_KEY, _rewritten(OKP_KEY, "x", lambda raw: raw + b"\0")),
    "x5c-of-another-key": lambda: (EC_KEY, {**public_jwk(EC_KEY), "x5c": self_signed_x5c(EC_OTHER)}),
    "x5c-not-a-certificate": lambda: (EC_KEY, {**public_jwk(EC_KEY), "x5c": ["AAAA"]}),
}


@pytest.mark.parametrize("variant", sorted(NON_CANONICAL_JWKS))
def test_a_proof_key_is_written_one_way_only(sts: STS, variant: str) -> None:
    """RFC 7518 §2 (Base64urlUInt in the fewest octets), §6.2.1.2 (full-size coordinates), RFC 7515
    §2 (base64url without padding), RFC 7517 §4.7 (``x5c`` holds the key): the ``jkt`` a token is
    bound to names one key, the one a resource server's thumbprint of it gives."""
    key, jwk = NON_CANONICAL_JWKS[variant]()
    if variant == "ec-x-spare-bits-set":
        assert jwk["x"] != public_jwk(EC_KEY)["x"]
        written = base64.urlsafe_b64decode(jwk["x"] + "=")
        assert written == base64.urlsafe_b64decode(public_jwk(EC_KEY)["x"] + "=")
    assert_refused(sts, sts.exchange(sts.proof(key, header={"jwk": jwk})), "dpop.malformed_jwk")


def test_a_proof_key_with_its_own_certificate_is_bound_by_its_thumbprint(sts: STS) -> None:
    jwk = {**public_jwk(EC_KEY), "x5c": self_signed_x5c(EC_KEY)}
    token = sts.granted(sts.proof(EC_KEY, header={"jwk": jwk}))["access_token"]
    assert sts.claims(token)["cnf"] == {"jkt": thumbprint(jwk)}


@pytest.mark.parametrize(
    ("x5c", "granted"), [("own", True), ("another", False), ("garbage", False), ("unsupported", False)]
)
@pytest.mark.parametrize("where", ["header", "jwk"])
def test_a_certificate_beside_the_proof_key_holds_it(sts: STS, x5c: str, granted: bool, where: str) -> None:
    """RFC 7515 §4.1.6: the first certificate of the header's ``x5c`` MUST hold the signing key; one
    of another key was accepted there, where inside the ``jwk`` it was refused (an outside audit).
    A certificate of a key algorithm no library knows was a ``500`` in both places (a review)."""
    chain = {
        "own": lambda: self_signed_x5c(EC_KEY),
        "another": lambda: self_signed_x5c(EC_OTHER),
        "garbage": lambda: ["AAAA"],
        "unsupported": unsupported_x5c,
    }[x5c]()
    header = {"x5c": chain} if where == "header" else {"jwk": {**public_jwk(EC_KEY), "x5c": chain}}
    response = sts.exchange(sts.proof(EC_KEY, header=header))
    if granted:
        assert response.status_code == 200, response.get_json()
    else:
        assert_refused(sts, response, "dpop.malformed_jwk")


@pytest.mark.parametrize("cty", ["JWT", "jwt", "application/jwt", 7])
def test_a_proof_that_says_its_payload_is_a_jwt_is_refused(sts: STS, cty: Any) -> None:
    """RFC 7519 §5.2, §7.2: ``cty: JWT`` makes the payload another JWT to verify; it was read as
    the proof's own claims (an outside audit)."""
    assert_refused(sts, sts.exchange(sts.proof(header={"cty": cty})), "dpop.nested_jwt")


def test_typ_is_a_media_type(sts: STS) -> None:
    """RFC 7515 §4.1.9: ``application/`` may be written out and case does not matter."""
    for typ in ("application/dpop+jwt", "DPoP+JWT"):
        assert sts.granted(sts.proof(header={"typ": typ}))["token_type"] == "DPoP"


@pytest.mark.parametrize("part", ["payload", "header"])
def test_a_proof_not_in_utf8_is_refused(sts: STS, part: str) -> None:
    """RFC 7515 §5.2, RFC 7519 §7.2: a proof's header and claims are UTF-8 JSON, nothing else."""

    def signed(encoding: str) -> str:
        header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": public_jwk(EC_KEY)}
        claims = {
            "jti": secrets.token_urlsafe(16),
            "htm": "POST",
            "htu": TOKEN_URL,
            "iat": int(sts.clock.now),
        }
        return sign_encoded(EC_KEY, header, claims, encoding=encoding, part=part)

    assert sts.granted(signed("utf-8"))["token_type"] == "DPoP"
    for encoding in NOT_UTF8.values():
        assert_refused(sts, sts.exchange(signed(encoding)), "dpop.not_utf8")


def test_iat_window_edges(make_sts: Callable[..., STS]) -> None:
    """``dpop_max_age`` back, ``leeway`` forward; one second further is refused."""
    sts = make_sts(dpop_max_age=60, leeway=10)
    assert sts.granted(sts.proof(age=60))["token_type"] == "DPoP"
    assert_refused(sts, sts.exchange(sts.proof(age=61)), "dpop.too_old")
    assert sts.granted(sts.proof(age=-10))["token_type"] == "DPoP"
    assert_refused(sts, sts.exchange(sts.proof(age=-11)), "dpop.issued_in_future")


def test_a_replayed_proof_is_refused(sts: STS) -> None:
    """§11.1: a jti is accepted once within the window."""
    dpop = sts.proof()
    assert sts.granted(dpop)["token_type"] == "DPoP"
    assert_refused(sts, sts.exchange(dpop), "dpop.replayed_jti")
    # Later, still inside the window, with a fresh subject token: still a replay.
    sts.clock.now += 200
    assert_refused(sts, sts.exchange(dpop), "dpop.replayed_jti")
    # A fresh proof from the same key is fine.
    assert sts.granted(sts.proof())["token_type"] == "DPoP"


def test_a_replay_is_the_jti_not_the_encoding(sts: STS) -> None:
    """Same jti, same key, different iat (so a different proof): still a replay."""
    jti = secrets.token_urlsafe(16)
    assert sts.granted(sts.proof(claims={"jti": jti}))["token_type"] == "DPoP"
    assert_refused(sts, sts.exchange(sts.proof(age=5, claims={"jti": jti})), "dpop.replayed_jti")


def test_a_refused_request_after_the_proof_check_still_spends_the_jti(sts: STS) -> None:
    """The proof was verified and its jti recorded before the subject token was refused."""
    dpop = sts.proof()
    resp = sts.exchange(dpop, subject_token="not-a-token")
    assert resp.status_code == 400 and resp.get_json()["error"] == "invalid_request"
    assert_refused(sts, sts.exchange(dpop), "dpop.replayed_jti")


def test_ath_is_irrelevant_at_the_token_endpoint(sts: STS) -> None:
    """§4.3 step 12 applies only when an access token is presented (resource servers)."""
    body = sts.granted(sts.proof(claims={"ath": "not-the-hash-of-anything"}))
    assert body["token_type"] == "DPoP"


# -- server nonces (RFC 9449 §8) ------------------------------------------------------------------


def test_nonce_is_demanded_then_accepted_and_renewed(make_sts: Callable[..., STS], tmp_path: Path) -> None:
    sts = make_sts(dpop_nonce=True)
    first = sts.exchange(sts.proof())
    record = assert_refused(sts, first, "dpop.nonce_required", "use_dpop_nonce")
    nonce = first.headers["DPoP-Nonce"]
    assert nonce and record["details"].get("dpop_jkt") is None
    # The secret behind the nonces is private to the service.
    secret_file = tmp_path / "keys" / "dpop-nonce.secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600

    sts.clock.now += 1
    ok = sts.exchange(sts.proof(claims={"nonce": nonce}))
    assert ok.status_code == 200, ok.get_json()
    assert ok.get_json()["token_type"] == "DPoP"
    fresh = ok.headers["DPoP-Nonce"]
    assert fresh != nonce
    # The fresh nonce works, and so does the older one while it lives.
    sts.clock.now += 1
    assert sts.granted(sts.proof(claims={"nonce": fresh}))["token_type"] == "DPoP"
    assert sts.granted(sts.proof(claims={"nonce": nonce}))["token_type"] == "DPoP"


def test_forged_tampered_and_expired_nonces_are_refused(make_sts: Callable[..., STS]) -> None:
    sts = make_sts(dpop_nonce=True)
    nonce = sts.exchange(sts.proof()).headers["DPoP-Nonce"]
    forged = issue_nonce(b"\x00" * 32, sts.clock.now)
    flipped = nonce[:-2] + ("A" if nonce[-2] != "A" else "B") + nonce[-1]
    # Other spellings of the same bytes are not the nonce issued (RFC 9449 §8).
    spellings = [
        " " + nonce,
        nonce + "\n",
        nonce + "=",
        nonce[:5] + "!" + nonce[5:],
        nonce[:5] + "\x00" + nonce[5:],
    ]
    spellings.append(nonce.replace("-", "+").replace("_", "/") if set("-_") & set(nonce) else nonce + "==")
    for bad in (forged, flipped, "", 12345, "x" * 100, "é" * 8, *spellings):
        resp = sts.exchange(sts.proof(claims={"nonce": bad}))
        assert_refused(sts, resp, "dpop.nonce_required", "use_dpop_nonce")
        assert resp.headers["DPoP-Nonce"]
    # Five minutes is a nonce's life (§8: the server decides).
    sts.clock.now += 301
    expired = sts.exchange(sts.proof(claims={"nonce": nonce}))
    assert_refused(sts, expired, "dpop.nonce_required", "use_dpop_nonce")
    assert expired.headers["DPoP-Nonce"] != nonce
    assert sts.granted(sts.proof(claims={"nonce": expired.headers["DPoP-Nonce"]}))["token_type"] == "DPoP"


def test_a_nonce_demand_does_not_spend_the_jti(make_sts: Callable[..., STS]) -> None:
    """The proof was refused for want of a nonce, not accepted: its jti is not recorded."""
    sts = make_sts(dpop_nonce=True)
    jti = secrets.token_urlsafe(16)
    nonce = sts.exchange(sts.proof(claims={"jti": jti})).headers["DPoP-Nonce"]
    assert sts.granted(sts.proof(claims={"jti": jti, "nonce": nonce}))["token_type"] == "DPoP"


def test_nonce_from_one_instance_is_accepted_by_another_sharing_the_keys(
    make_sts: Callable[..., STS], tmp_path: Path
) -> None:
    clock = Clock(float(int(time.time())))
    one = make_sts(dpop_nonce=True, clock=clock)
    two = make_sts(dpop_nonce=True, clock=clock)
    alone = make_sts(dpop_nonce=True, clock=clock, keys_dir=str(tmp_path / "other-keys"))
    nonce = one.exchange(one.proof()).headers["DPoP-Nonce"]
    assert two.granted(two.proof(claims={"nonce": nonce}))["token_type"] == "DPoP"
    # Another key directory is another secret: its nonces mean nothing here.
    assert_refused(
        alone, alone.exchange(alone.proof(claims={"nonce": nonce})), "dpop.nonce_required", "use_dpop_nonce"
    )


def test_without_nonces_no_nonce_is_sent_or_needed(sts: STS) -> None:
    resp = sts.exchange(sts.proof())
    assert resp.status_code == 200 and "DPoP-Nonce" not in resp.headers


# -- policy: require_dpop and bound re-exchange ---------------------------------------------------


def test_a_rule_can_require_dpop(sts: STS) -> None:
    resp = sts.exchange(subject_token=sts.subject(STRICT_SUBJECT))
    record = assert_refused(sts, resp, "dpop.required")
    assert record["rule"] == "strict"
    body = sts.granted(sts.proof(), subject_token=sts.subject(STRICT_SUBJECT))
    assert body["token_type"] == "DPoP"
    assert sts.claims(body["access_token"])["cnf"] == {"jkt": thumbprint(public_jwk(EC_KEY))}


def test_a_key_shown_with_a_bearer_token_of_ours_is_not_the_identitys_key(
    make_sts: Callable[..., STS],
) -> None:
    """A token of ours re-exchanged with a DPoP proof: the key binds the new token, but is evidence
    of the identity's key only when the token is bound to it and its issuance reached ``pop``.  An
    outside audit had the holder of a bearer token of ours (a resource server it was sent to)
    re-exchange it once with a key of its own, which became the first key of the re-exchanges'
    identity: the workload's own ``pop`` tokens were re-exchanged at ``attested`` from then on."""
    sts = make_sts(policy())
    attested, pop = "urn:workload-sts:acr:attested", "urn:workload-sts:acr:pop"

    def reexchange(token: str, key: Key) -> dict[str, Any]:
        body = sts.granted(sts.proof(key), subject_token=token, subject_token_type=ACCESS_TOKEN_TYPE)
        return sts.claims(body["access_token"])

    bearer = sts.granted()["access_token"]
    assert sts.claims(bearer)["acr"] == attested
    taken = reexchange(bearer, EC_OTHER)
    assert taken["cnf"] == {"jkt": thumbprint(public_jwk(EC_OTHER))} and taken["acr"] == attested
    # The workload's first key upstream, and its pop token re-exchanged with it: pop, as before.
    own = sts.granted(sts.proof(EC_KEY))["access_token"]
    assert sts.claims(own)["acr"] == pop
    assert reexchange(own, EC_KEY)["acr"] == pop
    # A token bound to another key at issuance, but not at pop (that key was not the identity's
    # upstream): re-exchanged with its key, it does not make that key the identity's either.
    other = sts.granted(sts.proof(EC_OTHER))["access_token"]
    assert sts.claims(other)["acr"] == attested
    assert reexchange(other, EC_OTHER)["acr"] == attested
    assert reexchange(own, EC_KEY)["acr"] == pop


def test_a_key_the_upstream_identity_confirmed_is_the_reexchanges_key_at_once(
    make_sts: Callable[..., STS],
) -> None:
    """A rotated key goes through probation upstream; from the first token issued at pop with it,
    its re-exchanges are at pop too (an outside review of the fix above: they went through a
    probation of their own after the upstream one, at attested meanwhile)."""
    sts = make_sts(policy())

    def upstream(key: Key) -> tuple[str, str]:
        token = sts.granted(sts.proof(key))["access_token"]
        return token, str(sts.claims(token)["acr"]).rpartition(":")[2]

    def reexchange(token: str, key: Key) -> str:
        body = sts.granted(sts.proof(key), subject_token=token, subject_token_type=ACCESS_TOKEN_TYPE)
        return str(sts.claims(body["access_token"])["acr"]).rpartition(":")[2]

    token, level = upstream(EC_KEY)
    assert (level, reexchange(token, EC_KEY)) == ("pop", "pop")
    levels = []
    for _ in range(6):
        sts.clock.advance(1300)
        token, level = upstream(EC_OTHER)
        levels.append((level, reexchange(token, EC_OTHER)))
    assert levels[0] == ("attested", "attested") and levels[-1] == ("pop", "pop"), levels
    assert all(up == again for up, again in levels), levels


def test_a_key_first_shown_with_an_attested_bound_token_of_ours_is_not_pinned(
    make_sts: Callable[..., STS],
) -> None:
    """The order the audit used: the other key's attested token re-exchanged first, before the
    workload's pop token ever was; the pop token's key is still the first key of the re-exchanges."""
    sts = make_sts(policy())
    own = sts.granted(sts.proof(EC_KEY))["access_token"]
    other = sts.granted(sts.proof(EC_OTHER))["access_token"]
    body = sts.granted(sts.proof(EC_OTHER), subject_token=other, subject_token_type=ACCESS_TOKEN_TYPE)
    assert sts.claims(body["access_token"])["acr"] == "urn:workload-sts:acr:attested"
    body = sts.granted(sts.proof(EC_KEY), subject_token=own, subject_token_type=ACCESS_TOKEN_TYPE)
    assert sts.claims(body["access_token"])["acr"] == "urn:workload-sts:acr:pop"


def test_a_bound_token_stays_bound_on_reexchange(sts: STS) -> None:
    bound = sts.granted(sts.proof(EC_KEY))["access_token"]

    def reexchange(dpop: str | None = None, **kwargs: Any) -> TestResponse:
        return sts.exchange(dpop, subject_token=bound, subject_token_type=ACCESS_TOKEN_TYPE, **kwargs)

    record = assert_refused(sts, reexchange(), "dpop.bound_token_needs_proof")
    assert record["issuer"] == "self"
    assert_refused(sts, reexchange(sts.proof(EC_OTHER)), "dpop.key_differs_from_bound_token")
    # Another kind of key is just another key.
    assert_refused(sts, reexchange(sts.proof(RSA_KEY)), "dpop.key_differs_from_bound_token")
    resp = reexchange(sts.proof(EC_KEY))
    assert resp.status_code == 200, sts.last_record()["reasons"]
    again = resp.get_json()
    assert again["token_type"] == "DPoP"
    assert sts.claims(again["access_token"])["cnf"] == {"jkt": thumbprint(public_jwk(EC_KEY))}


def test_a_bound_upstream_token_needs_its_key_too(sts: STS) -> None:
    """RFC 9449 §7: whoever presents a DPoP-bound token proves its key.  A bound token from
    upstream (a peer STS's ``cnf.jkt``) is no bearer token here either, nor can another key
    take it over; a certificate-bound one (``cnf.x5t#S256``) needs its certificate."""
    jkt = thumbprint(public_jwk(EC_KEY))

    def bound(cnf: dict[str, Any]) -> str:
        return sts.issuer.github_actions_token(audience=STS_ISSUER, now=sts.clock.now, cnf=cnf)

    token = bound({"jkt": jkt})
    assert_refused(sts, sts.exchange(subject_token=token), "dpop.bound_token_needs_proof")
    assert_refused(
        sts, sts.exchange(sts.proof(EC_OTHER), subject_token=token), "dpop.key_differs_from_bound_token"
    )
    body = sts.granted(sts.proof(EC_KEY), subject_token=token)
    assert body["token_type"] == "DPoP" and sts.claims(body["access_token"])["cnf"] == {"jkt": jkt}
    certificate_bound = sts.exchange(
        subject_token=bound({"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"})
    )
    assert_refused(sts, certificate_bound, "subject_token.certificate_binding_mismatch", "invalid_request")
    # The actor's seat too (RFC 8705 §3): a certificate-bound actor token needs its certificate.
    bound_actor = sts.issuer.kubernetes_token(
        audience=[STS_ISSUER],
        namespace="agents",
        service_account="a1",
        now=sts.clock.now,
        cnf={"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"},
    )
    refused = sts.exchange(actor=bound_actor)
    assert_refused(sts, refused, "actor_token.certificate_binding_mismatch", "invalid_request")
    # A confirmation method this service cannot check (RFC 7800 §3.2 jwk, a kid, an empty one):
    # refused, never taken for a bearer token.
    for cnf in ({"jwk": public_jwk(EC_KEY)}, {"kid": "k1"}, {}, {"jkt": jkt, "jwk": public_jwk(EC_KEY)}):
        refused = sts.exchange(sts.proof(EC_KEY), subject_token=bound(cnf))
        assert_refused(sts, refused, "subject_token.unsupported_confirmation", "invalid_request")
    # A method whose value is no thumbprint names no key to hold the token to: refused as malformed,
    # never taken for a bearer token (an outside audit had ``{"jkt": null}`` granted as one), and not
    # ``invalid_dpop_proof``, which no proof could ever answer (RFC 8693 §2.2.2).
    malformed: list[dict[str, Any]] = [
        {"jkt": None},
        {"x5t#S256": None},
        {"jkt": 1},
        {"jkt": ""},
        {"jkt": [jkt]},
        {"jkt": jkt + "="},
        {"jkt": jkt[:-1]},
        {"jkt": jkt, "x5t#S256": None},
    ]
    for cnf in malformed:
        refused = sts.exchange(sts.proof(EC_KEY), subject_token=bound(cnf))
        assert_refused(sts, refused, "subject_token.malformed_confirmation", "invalid_request")
    null_bound_actor = sts.issuer.kubernetes_token(
        audience=[STS_ISSUER], namespace="agents", service_account="a1", now=sts.clock.now, cnf={"jkt": None}
    )
    refused = sts.exchange(actor=null_bound_actor)
    assert_refused(sts, refused, "actor_token.malformed_confirmation", "invalid_request")


def test_an_unbound_token_of_ours_may_be_bound_on_reexchange(sts: STS) -> None:
    bearer = sts.granted()["access_token"]
    body = sts.granted(sts.proof(EC_KEY), subject_token=bearer, subject_token_type=ACCESS_TOKEN_TYPE)
    assert body["token_type"] == "DPoP"
    assert sts.claims(body["access_token"])["cnf"] == {"jkt": thumbprint(public_jwk(EC_KEY))}


def test_an_actor_binds_its_own_key_only_where_the_rule_allows(make_sts: Callable[..., STS]) -> None:
    strict = make_sts(policy(actor_may_bind_key=False))
    bound = strict.granted(strict.proof(EC_KEY))["access_token"]
    with_actor = {"subject_token": bound, "subject_token_type": ACCESS_TOKEN_TYPE}
    resp = strict.exchange(strict.proof(EC_OTHER), actor=strict.actor(1), **with_actor)
    assert_refused(strict, resp, "dpop.key_differs_from_bound_token")

    lenient = make_sts(policy(actor_may_bind_key=True))
    bound = lenient.granted(lenient.proof(EC_KEY))["access_token"]
    with_actor = {"subject_token": bound, "subject_token_type": ACCESS_TOKEN_TYPE}
    # Without an actor the rule's permission does not apply.
    assert_refused(
        lenient, lenient.exchange(lenient.proof(EC_OTHER), **with_actor), "dpop.key_differs_from_bound_token"
    )
    # The actor must still prove a key.
    assert_refused(
        lenient, lenient.exchange(actor=lenient.actor(1), **with_actor), "dpop.bound_token_needs_proof"
    )
    body = lenient.granted(lenient.proof(EC_OTHER), actor=lenient.actor(1), **with_actor)
    claims = lenient.claims(body["access_token"])
    assert body["token_type"] == "DPoP"
    assert claims["cnf"] == {"jkt": thumbprint(public_jwk(EC_OTHER))}
    assert claims["act"]["sub"] == "system:serviceaccount:agents:a1"


def test_a_bound_token_of_ours_as_actor_needs_its_key(make_sts: Callable[..., STS]) -> None:
    """A stolen bound token must not work as a bearer credential in the actor's seat either."""
    sts = make_sts(policy(self_actors=True))
    bound_actor = sts.granted(sts.proof(EC_KEY), subject_token=sts.actor(1))["access_token"]
    assert_refused(sts, sts.exchange(actor=bound_actor), "dpop.bound_actor_token_needs_proof")
    assert_refused(
        sts, sts.exchange(sts.proof(EC_OTHER), actor=bound_actor), "dpop.key_differs_from_bound_actor_token"
    )
    body = sts.granted(sts.proof(EC_KEY), actor=bound_actor)
    claims = sts.claims(body["access_token"])
    assert body["token_type"] == "DPoP" and claims["cnf"] == {"jkt": thumbprint(public_jwk(EC_KEY))}
    # An actor that was a token of ours names the issuer its own chain began with.
    assert claims["act"] == {
        "sub": "system:serviceaccount:agents:a1",
        "iss": STS_ISSUER,
        "upstream_issuer": "upstream",
    }


@pytest.mark.parametrize("actor_may_bind_key", [False, True])
def test_bound_subject_and_bound_actor(make_sts: Callable[..., STS], actor_may_bind_key: bool) -> None:
    """One proof, two bound tokens: the actor's key must be proved, and may bind only where allowed."""
    sts = make_sts(policy(self_actors=True, actor_may_bind_key=actor_may_bind_key))
    subject = sts.granted(sts.proof(EC_KEY))["access_token"]
    actor = sts.granted(sts.proof(EC_OTHER), subject_token=sts.actor(1))["access_token"]
    both = {"subject_token": subject, "subject_token_type": ACCESS_TOKEN_TYPE, "actor": actor}
    assert_refused(sts, sts.exchange(sts.proof(EC_KEY), **both), "dpop.key_differs_from_bound_actor_token")
    resp = sts.exchange(sts.proof(EC_OTHER), **both)
    if not actor_may_bind_key:
        assert_refused(sts, resp, "dpop.key_differs_from_bound_token")
        return
    assert resp.status_code == 200, sts.last_record()["reasons"]
    assert sts.claims(resp.get_json()["access_token"])["cnf"] == {"jkt": thumbprint(public_jwk(EC_OTHER))}


# -- replay across processes sharing Redis --------------------------------------------------------


def _serve(settings: Settings, ports: Any) -> None:
    """A child process: one STS instance on its own port (spawn: nothing inherited but ``settings``)."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, create_app(settings), threaded=True)
    ports.put(server.server_port)
    server.serve_forever()


def _post_raw(port: int, body: str, headers: list[tuple[str, str]]) -> tuple[int, dict[str, Any]]:
    """POST /token with header fields exactly as given (repeats included), which requests cannot send."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.putrequest("POST", "/token")
        for name, value in [("Content-Type", FORM), ("Content-Length", str(len(body))), *headers]:
            conn.putheader(name, value)
        conn.endheaders(body.encode())
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.fixture
def redis_db(fresh_redis_url: str) -> Iterator[redis.Redis]:
    """An empty database of this run's private redis-server (see tests/support/redis_server.py)."""
    client = redis.Redis.from_url(fresh_redis_url, socket_timeout=2)
    yield client
    client.close()


def test_two_processes_sharing_redis_accept_a_proof_once(
    make_settings: Callable[..., Settings], upstream: RunningServer, redis_db: redis.Redis
) -> None:
    settings = make_settings(policy(), store="redis", redis_url=url_of(redis_db), clients=CLIENTS)
    assert pickle.loads(pickle.dumps(settings)) == settings  # noqa: S301 - our own object
    prepare(settings)  # keys and schema once, before two processes race to create them
    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    children = [ctx.Process(target=_serve, args=(settings, ports), daemon=True) for _ in range(2)]
    for child in children:
        child.start()
    try:
        urls = [f"http://127.0.0.1:{ports.get(timeout=20)}/token" for _ in children]
        dpop = proof(EC_KEY, time.time())
        subject = upstream.issuer.github_actions_token(audience=STS_ISSUER)
        barrier = Barrier(len(urls))

        def post(url: str) -> requests.Response:
            barrier.wait()
            return requests.post(
                url, data=exchange_form(subject, audience=DEPLOY), headers={"DPoP": dpop}, timeout=20
            )

        with ThreadPoolExecutor(len(urls)) as pool:
            answers = list(pool.map(post, urls))
        assert sorted(r.status_code for r in answers) == [200, 400], [r.text for r in answers]
        refused = next(r for r in answers if r.status_code == 400)
        assert refused.json()["error"] == "invalid_dpop_proof"
        granted = next(r for r in answers if r.status_code == 200)
        assert granted.json()["token_type"] == "DPoP"
        # The record lives in the shared store, under the key's thumbprint.
        assert redis_db.keys(f"*dpop:{thumbprint(public_jwk(EC_KEY))}*")
        # Each process separately, sequentially, says the same.
        for url in urls:
            again = requests.post(
                url, data=exchange_form(subject, audience=DEPLOY), headers={"DPoP": dpop}, timeout=20
            )
            assert again.status_code == 400 and again.json()["error"] == "invalid_dpop_proof"
        # Two DPoP header fields over real HTTP: the server joins them with a comma (RFC 9110 §5.3),
        # and they still count as two (RFC 9449 §4.3 step 1).
        port = int(urls[0].split(":")[2].split("/")[0])
        status, body = _post_raw(
            port,
            urlencode(exchange_form(subject, audience=DEPLOY)),
            [("DPoP", proof(EC_KEY, time.time())), ("DPoP", proof(EC_KEY, time.time()))],
        )
        assert status == 400 and body["error"] == "invalid_dpop_proof"
        engine = make_engine(settings.database_url)
        try:
            assert "dpop.not_exactly_one_proof" in SqlAuditSink(engine).recent(1)[0]["reasons"]
        finally:
            engine.dispose()
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.join(timeout=10)


# -- robustness -----------------------------------------------------------------------------------

_PRINTABLE = string.ascii_letters + string.digits + "-_.~+/=!$&'()*,;:@ "


def _junk(rng: random.Random) -> Any:
    choice = rng.randrange(12)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.randint(-(2**70), 2**70)
    if choice == 3:
        return rng.choice([10**400, -(10**400), 1e308, -0.0, 0.5])
    if choice == 4:
        return [rng.randint(0, 9)]
    if choice == 5:
        return {"k": "v"}
    if choice == 6:
        return "".join(rng.choice(_PRINTABLE) for _ in range(rng.randint(0, 40)))
    if choice == 7:
        return rng.choice(
            ["https://[::1/token", "https://sts.test:99999/token", "//sts.test/token", "\u00e9"]
        )
    if choice == 8:
        return rng.choice(["POST", "GET", "dpop+jwt", "ES256", "RS256", "EdDSA", "none", "HS256"])
    if choice == 9:
        return rng.choice(["EC", "RSA", "OKP", "oct", "P-256", "P-999", "Ed25519", "X25519"])
    if choice == 10:
        return b64url(rng.randbytes(rng.choice([0, 1, 32, 33, 64, 128, 256])))
    return secrets.token_urlsafe(rng.randint(1, 20))


def _garbage(rng: random.Random, now: float) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return "".join(rng.choice(_PRINTABLE) for _ in range(rng.randint(0, 200)))
    if kind == 1:
        return ".".join(b64url(rng.randbytes(rng.randint(0, 60))) for _ in range(rng.choice([2, 3, 3, 4, 5])))
    key = rng.choice([EC_KEY, RSA_KEY, OKP_KEY, EC384_KEY])
    alg = natural_alg(key)
    jwk = public_jwk(key)
    header: dict[str, Any] = {"typ": "dpop+jwt", "alg": alg, "jwk": jwk}
    claims: dict[str, Any] = {
        "jti": secrets.token_urlsafe(12),
        "htm": "POST",
        "htu": TOKEN_URL,
        "iat": int(now),
    }
    for _ in range(rng.randint(1, 3)):
        target = rng.choice([header, claims, jwk])
        name = rng.choice([*target, "nonce", "ath", "crv", "kty", "x", "n", "e", "d", "kid", "b64", "zip"])
        target[name] = _junk(rng)
    signer: Key | None = key if kind != 2 else rng.choice([EC_OTHER, None])
    try:
        return compact(header, claims, signer, alg)
    except Exception:
        return compact(header, claims, None, alg)


def test_garbage_dpop_headers_never_cause_a_server_error(sts: STS) -> None:
    rng = random.Random(9449)
    subject = sts.subject()
    outcomes: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)  # EdDSA proofs: see the success test.
        for _ in range(250):
            headers = [_garbage(rng, sts.clock.now) for _ in range(rng.choice([1, 1, 1, 2]))]
            resp = sts.exchange(headers, subject_token=subject)
            outcomes[resp.status_code] = outcomes.get(resp.status_code, 0) + 1
            assert resp.status_code in {200, 400}, (headers, resp.get_json(), sts.last_record()["reasons"])
            if resp.status_code == 400:
                assert resp.get_json()["error"] == "invalid_dpop_proof"
                assert any(r.startswith("dpop.") for r in sts.last_record()["reasons"])
    # The loop exercised refusals (nearly all) and reached past the checks at least sometimes.
    assert outcomes.get(400, 0) > 200


# -- the parsed proof keys, remembered ------------------------------------------------------------


def _counting_imports(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every proof key the DPoP check parses from now on (the key cache starts empty)."""
    from sts.core import dpop

    dpop._imported_key.cache_clear()
    imported: list[dict[str, Any]] = []
    real = dpop._import_key

    def counted(jwk: dict[str, Any], kty: str) -> Any:
        imported.append(dict(jwk))
        return real(jwk, kty)

    monkeypatch.setattr(dpop, "_import_key", counted)
    return imported


def test_a_workloads_key_is_parsed_once(sts: STS, monkeypatch: pytest.MonkeyPatch) -> None:
    """Repeated proofs from one key reuse its parsed form and thumbprint; another key is its own."""
    imported = _counting_imports(monkeypatch)
    for _ in range(3):
        body = sts.granted(sts.proof(EC_KEY))
        assert sts.claims(body["access_token"])["cnf"] == {"jkt": thumbprint(public_jwk(EC_KEY))}
    assert imported == [public_jwk(EC_KEY)]
    body = sts.granted(sts.proof(EC_OTHER))
    assert sts.claims(body["access_token"])["cnf"] == {"jkt": thumbprint(public_jwk(EC_OTHER))}
    assert len(imported) == 2


def test_a_remembered_key_verifies_only_its_own_signatures(sts: STS, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache is keyed by every member of the ``jwk``: a proof naming a remembered key but signed
    by another, or naming that key with one member changed, is checked as before."""
    _counting_imports(monkeypatch)
    sts.granted(sts.proof(EC_KEY))
    assert_refused(sts, sts.exchange(sts.proof(EC_KEY, signer=EC_OTHER)), "dpop.bad_signature")
    moved = {**public_jwk(EC_KEY), "x": public_jwk(EC_OTHER)["x"]}
    resp = sts.exchange(sts.proof(EC_KEY, header={"jwk": moved}))
    assert_refused(sts, resp, "dpop.malformed_jwk")  # not a point on the curve


@pytest.mark.parametrize(
    ("jwk", "reason", "imports"),
    [
        (public_jwk(RSA_1024), "dpop.weak_key", 2),
        ({**public_jwk(EC_KEY), "x": public_jwk(EC_OTHER)["x"]}, "dpop.malformed_jwk", 2),
        (dict(EC_KEY.as_dict(private=True)), "dpop.private_jwk", 0),
    ],
    ids=["weak", "not-on-the-curve", "private"],
)
def test_a_refused_key_is_refused_every_time(
    sts: STS, monkeypatch: pytest.MonkeyPatch, jwk: dict[str, Any], reason: str, imports: int
) -> None:
    """A refusal is never remembered: the key is checked anew (a private key before any parsing)."""
    from sts.core import dpop

    imported = _counting_imports(monkeypatch)
    signer = RSA_1024 if reason == "dpop.weak_key" else EC_KEY
    for _ in range(2):
        assert_refused(sts, sts.exchange(sts.proof(signer, header={"jwk": jwk})), reason)
    assert dpop._imported_key.cache_info().currsize == 0
    assert len(imported) == imports


def test_a_header_with_private_key_material_is_not_remembered(sts: STS) -> None:
    """A proof whose ``jwk`` holds a private key is refused every time, and its header is kept
    neither by the key cache nor by the header cache (``jose._parsed_header``), as a public
    key's is."""
    from sts.core import dpop, jose

    jose._parsed_header.cache_clear()
    dpop._imported_key.cache_clear()
    private = dict(EC_KEY.as_dict(private=True))
    for _ in range(2):
        assert_refused(sts, sts.exchange(sts.proof(EC_KEY, header={"jwk": private})), "dpop.private_jwk")
    assert jose._parsed_header.cache_info().currsize == 0
    assert dpop._imported_key.cache_info().currsize == 0
    assert_refused(
        sts,
        sts.exchange(sts.proof(EC_KEY, header={"jwk": {"k": "c2VjcmV0", "kty": "oct"}})),
        "dpop.private_jwk",
    )
    assert jose._parsed_header.cache_info().currsize == 0
    sts.granted(sts.proof(EC_KEY))
    assert jose._parsed_header.cache_info().currsize == 2  # the proof's header and the subject token's


def test_the_key_cache_is_bounded() -> None:
    from sts.core import dpop

    dpop._imported_key.cache_clear()
    assert dpop._imported_key.cache_info().maxsize == dpop.PROOF_KEY_CACHE
    for _ in range(dpop.PROOF_KEY_CACHE + 20):
        jwk = public_jwk(ECKey.generate_key("P-256"))
        key, jkt = dpop._public_key(jwk, "ES256")
        assert jkt == thumbprint(jwk) and not key.is_private
    assert dpop._imported_key.cache_info().currsize == dpop.PROOF_KEY_CACHE


# -- one write transaction per grant (SQL): the proof's jti commits with the audit record -----------


@pytest.fixture(params=["embedded", "postgresql", "redis"])
def shared_store(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings overrides for a store two instances share: SQLite, PostgreSQL or Redis."""
    if request.param == "redis":
        db: redis.Redis = request.getfixturevalue("redis_db")
        return {"store": "redis", "redis_url": url_of(db)}
    if request.param == "postgresql":
        schema = PgSchema(request.getfixturevalue("pg_database"), f"t_{secrets.token_hex(6)}")
        schema.execute(f'CREATE SCHEMA "{schema.schema}"')
        request.addfinalizer(lambda: schema.execute(f'DROP SCHEMA IF EXISTS "{schema.schema}" CASCADE'))
        return {"store": "embedded", "database_url": schema.url}
    return {"store": "embedded"}


def test_a_grant_is_one_write_transaction_on_the_embedded_database(sts: STS) -> None:
    """The proof's jti, the baseline update and the audit record: one transaction, nothing before."""
    engine = sts.app.extensions["sts"].engine
    statements: list[str] = []

    def trace(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.set_trace_callback(statements.append)

    event.listen(engine, "connect", trace)
    engine.dispose()  # New connections, each traced.
    sts.granted(sts.proof())
    statements.clear()
    assert sts.granted(sts.proof())["token_type"] == "DPoP"
    # Python's trace callback names the statement again for each statement of a trigger it runs.
    ran = [s for n, s in enumerate(statements) if n == 0 or s != statements[n - 1]]
    written = [" ".join(s.split()[:3]) for s in ran if s.split()[0].upper() not in {"SELECT", "PRAGMA"}]
    # One statement, its own transaction (sts/adapters/sql/sqlite_grants.py).
    assert written == ["INSERT INTO sts_grants"], statements
    # Nothing is looked up in the replay table first: the insert in the transaction decides.
    assert not [s for s in statements if s.lstrip().upper().startswith("SELECT") and "replay_entries" in s]


def test_a_proof_replayed_by_a_concurrent_request_to_another_instance_is_granted_once(
    make_sts: Callable[..., STS], make_settings: Callable[..., Settings], shared_store: dict[str, Any]
) -> None:
    """Two instances, one store: the second instance's request replays the proof while the first's
    is between its check and its commit.  Exactly one of them gets a token; the other is refused
    as a replayed proof (SQL: at the commit; Redis: at the claim just before it), and the trail says so."""
    settings = make_settings(policy(), clients=CLIENTS, **shared_store)
    one = make_sts(clock=Clock(float(int(time.time()))), **shared_store)
    two = STS(create_app(settings, clock=one.clock), None, one.clock, one.issuer)  # type: ignore[arg-type]
    two.web = two.app.test_client()
    dpop = one.proof()
    answers: list[TestResponse] = []
    exchange = one.app.extensions["sts"].exchange
    signer = exchange.signer

    def replay_then_sign() -> Any:
        if not answers:
            answers.append(two.exchange(dpop))
        return signer()

    exchange.signer = replay_then_sign
    try:
        answers.append(one.exchange(dpop))
    finally:
        two.app.extensions["sts"].engine.dispose()
    assert sorted(a.status_code for a in answers) == [200, 400], [a.get_json() for a in answers]
    [refused] = [a for a in answers if a.status_code == 400]
    assert refused.get_json()["error"] == "invalid_dpop_proof"
    trail = one.app.extensions["sts"].audit.recent(10)
    assert sorted(r["outcome"] for r in trail) == ["granted", "refused"]
    [record] = [r for r in trail if r["outcome"] == "refused"]
    assert "dpop.replayed_jti" in record["reasons"] and record["issued_jti"] is None
    # Spent for good: each instance refuses it again.
    for instance in (one, two):
        assert_refused(instance, instance.exchange(dpop), "dpop.replayed_jti")


def test_an_actors_key_is_not_the_subjects_key(make_sts: Callable[..., STS]) -> None:
    """With an actor token the proof is the actor's: its key binds the new token, but is no evidence
    of the subject's key (its level, its baseline); else an agent's key would reach pop for the
    subject and become the subject's key (an outside audit)."""
    sts = make_sts(policy())
    delegated = sts.claims(sts.granted(sts.proof(EC_OTHER), actor=sts.actor(1))["access_token"])
    assert delegated["cnf"] == {"jkt": thumbprint(public_jwk(EC_OTHER))}
    assert delegated["acr"] == "urn:workload-sts:acr:attested"
    # The subject's own first key is still its first key.
    own = sts.claims(sts.granted(sts.proof(EC_KEY))["access_token"])
    assert own["acr"] == "urn:workload-sts:acr:pop"
