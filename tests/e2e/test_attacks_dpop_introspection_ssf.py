"""The service attacked from outside, over HTTP: DPoP, introspection, revocation, metadata, SSF, faults.

An attack table, one row per attack or conformance check, each naming the
section of the standard it holds the service to.  The service is the real app
(``create_app``) on a real socket at the URL that is its issuer, trusting a
development issuer (GitHub Actions tokens, RS256) and a Shared Signals
transmitter (ES256) that both serve their JWKS over HTTP; a resource server
protected by the client library (``sts_client``) runs beside it.  Requests are
made with ``requests`` or, where a header must appear twice, ``http.client``.

* DPoP at the token endpoint (RFC 9449 §4.3 one check at a time, §5, §8, §6.1
  ``cnf.jkt`` on re-exchange) and at a resource server (§7: ``ath``, downgrade
  to Bearer, replay, two proofs).
* Introspection (RFC 7662) and revocation (RFC 7009): client authentication,
  ``token_type_hint``, the exact inactive answer, audiences, ``no-store``;
  Authlib's ``private_key_jwt`` (assertion ``aud`` = the endpoint it posts to).
* Metadata (RFC 8414) and JWKS (RFC 7517): required members, no empty arrays,
  Authlib's validation, no private members.
* Shared Signals push (RFC 8935, RFC 8417): the RFC 8935 §2.4 ``err`` of every
  refusal.
* Fault injection: an issuer's JWKS server killed mid-run, garbage, huge,
  trickled, redirected; a TokenReview API that hangs, trickles or floods.

Design choices that these rows pin down (and the README documents):
revocation by a client the token was neither issued to nor meant for is
refused with ``unauthorized_client`` (RFC 7009 §2.1: "the request is refused
and the client is informed of the error"); a DPoP ``htu`` carrying a query or
fragment names the endpoint without them (§4.3 step 9: "ignoring any query and
fragment parts"; it was refused until an outside conformance check);
introspection answers JSON whatever the ``Accept`` (RFC 9701 JWT responses are
not offered: the metadata lists no ``introspection_signing_alg_values_supported``).
"""

from __future__ import annotations

import base64
import http.client
import json
import secrets
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
import requests
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2.rfc7523 import PrivateKeyJWT, private_key_jwt_sign
from authlib.oauth2.rfc8414 import AuthorizationServerMetadata
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask, g
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, KeySet, OctKey, RSAKey
from sts_client import TokenVerifier
from sts_client.discovery import DiscoveryError, get_json
from sts_client.dpop import DPoPKey, access_token_hash
from sts_client.dpop import normalise_htu as client_normalise_htu
from sts_client.flask import require_token

from sts.adapters.jwks_cache import HttpJWKS
from sts.adapters.token_review import HttpTokenReviewer
from sts.app import create_app
from sts.core.client_secrets import hash_secret
from sts.core.dpop import normalise_htu
from sts.core.ports import KeysUnavailable, TokenReviewUnavailable
from sts.dev.issuer import DevIssuer, RunningServer
from sts.settings import Settings
from tests.conftest import settings_for
from tests.e2e.fault_server import FaultServer, Hang, Serve, Trickle, TrickleHead
from tests.e2e.live_sts import serve_sts
from tests.support.clients_support import Served
from tests.support.crafted_jose import KeySetServer

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
FORM = "application/x-www-form-urlencoded"
SET_TYPE = "application/secevent+jwt"
DEPLOY = "https://deploy.example.com"
OTHER = "https://other.example.com"
SUBJECT = "repo:acme/app:ref:refs/heads/main"
CAEP = "https://schemas.openid.net/secevent/caep/event-type/"
SESSION_REVOKED = CAEP + "session-revoked"
DEVICE_COMPLIANCE_CHANGE = CAEP + "device-compliance-change"
RISK_LEVEL_CHANGE = CAEP + "risk-level-change"
TIMEOUT = 10

RS = ("deploy-api", "deploy-api-secret-0123456789-abcdefghijkl")
OTHER_RS = ("other-api", "other-api-secret-0123456789-abcdefghijkl")
#: A resource server that authenticates with private_key_jwt (as Authlib does it).
RS_SIGNER_KEY = ECKey.generate_key("P-256", auto_kid=True)

POLICY: dict[str, Any] = {
    "version": 1,
    "rules": [
        {
            "name": "deploy",
            "issuer": "upstream",
            "subject": SUBJECT,
            "require_client_authentication": False,
            "grant": {
                "audiences": [DEPLOY],
                "scopes": ["deploy:read", "deploy:write"],
                "default_scopes": ["deploy:read"],
                "max_lifetime": 300,
            },
        },
        {
            # Re-exchange of our own tokens (issuer "self"): only narrows.
            "name": "re-exchange",
            "issuer": "self",
            "subject": SUBJECT,
            "require_client_authentication": False,
            "grant": {"audiences": [DEPLOY], "scopes": ["deploy:read"], "max_lifetime": 300},
        },
    ],
}


# -- the world: the STS, its upstream issuer, a transmitter, a resource server ----------------------


@dataclass
class World:
    url: str
    app: Flask
    upstream: RunningServer
    transmitter: RunningServer
    resource: Served

    @property
    def token_endpoint(self) -> str:
        return self.url + "/token"

    @property
    def api(self) -> str:
        return self.resource.url + "/api/deployments"

    def subject_token(self) -> str:
        return self.upstream.issuer.github_actions_token(audience=self.url)

    def exchange(
        self, dpop: str | None = None, subject_token: str | None = None, **params: str
    ) -> requests.Response:
        form = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject_token or self.subject_token(),
            "subject_token_type": JWT_TYPE if subject_token is None else ACCESS_TOKEN_TYPE,
            "audience": DEPLOY,
            **params,
        }
        headers = {"Content-Type": FORM}
        if dpop is not None:
            headers["DPoP"] = dpop
        return requests.post(self.token_endpoint, data=form, headers=headers, timeout=TIMEOUT)

    def token(self, key: DPoPKey | None = None) -> str:
        proof = key.proof("POST", self.token_endpoint) if key else None
        response = self.exchange(proof)
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    def post_form(
        self, path: str, form: dict[str, str], auth: tuple[str, str] | None = None, **headers: str
    ) -> requests.Response:
        return requests.post(
            self.url + path, data=form, auth=auth, headers={"Content-Type": FORM, **headers}, timeout=TIMEOUT
        )

    def push(self, body: str | bytes, content_type: str = SET_TYPE) -> requests.Response:
        return requests.post(
            self.url + "/ssf/events", data=body, headers={"Content-Type": content_type}, timeout=TIMEOUT
        )


def resource_server(sts_url: str) -> Served:
    """A resource server for ``DEPLOY`` protected by the client library, checking revocation too."""
    verifier = TokenVerifier(
        sts_url, DEPLOY, introspection=RS, introspection_cache_seconds=0, dpop_max_age=120
    )
    app = Flask("resource-server")

    @app.route("/api/deployments", methods=["GET", "POST"])
    @require_token(verifier)
    def deployments() -> dict[str, Any]:
        return {"sub": g.token.subject, "token_type": g.token.token_type}

    return Served(app)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    directory = tmp_path_factory.mktemp("attacks")
    upstream = DevIssuer.serve_ephemeral(alg="RS256")
    transmitter = DevIssuer.serve_ephemeral(alg="ES256")
    served = Served()
    settings = settings_for(
        directory,
        upstream,
        POLICY,
        issuer=served.url,
        issuers=[
            {
                "name": "upstream",
                "issuer": upstream.issuer.issuer_url,
                "jwks_uri": upstream.jwks_uri,
                "algorithms": ["RS256"],
                "audiences": [served.url],
                "max_token_age": 3600,
            }
        ],
        clients=[
            {
                "client_id": RS[0],
                "auth_method": "client_secret_basic",
                "secret_hash": hash_secret(RS[1]),
                "audiences": [DEPLOY],
            },
            {
                "client_id": OTHER_RS[0],
                "auth_method": "client_secret_basic",
                "secret_hash": hash_secret(OTHER_RS[1]),
                "audiences": [OTHER],
            },
            {
                "client_id": "rs-signer",
                "auth_method": "private_key_jwt",
                "jwks": {"keys": [RS_SIGNER_KEY.as_dict(private=False)]},
                "algorithms": ["ES256"],
                "audiences": [DEPLOY],
            },
        ],
        transmitters=[
            {
                "name": "idp",
                "issuer": transmitter.issuer.issuer_url,
                "jwks_uri": transmitter.jwks_uri,
                "algorithms": ["ES256"],
            }
        ],
    )
    app = create_app(settings)
    served.start(app)
    resource = resource_server(served.url)
    try:
        yield World(served.url, app, upstream, transmitter, resource)
    finally:
        resource.stop()
        served.stop()
        transmitter.stop()
        upstream.stop()


def last_reasons(world: World) -> list[str]:
    records: list[dict[str, Any]] = world.app.extensions["sts"].audit.recent(1)
    return list(records[0]["reasons"])


def verified_claims(world: World, token: str) -> dict[str, Any]:
    """The token's claims, verified with joserfc against the JWKS the STS publishes over HTTP."""
    keys = KeySet.import_key_set(requests.get(world.url + "/.well-known/jwks.json", timeout=TIMEOUT).json())
    decoded = jwt.decode(token, keys, algorithms=["ES256"])
    assert decoded.header["typ"] == "at+jwt"
    return dict(decoded.claims)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: object) -> str:
    return b64url(json.dumps(value).encode())


def post_with_headers(url: str, form: dict[str, str], headers: list[tuple[str, str]]) -> tuple[int, Any]:
    """POST with header fields exactly as listed (a name may repeat), over ``http.client``."""
    parts = urlsplit(url)
    body = urlencode(form).encode()
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=TIMEOUT)
    try:
        connection.putrequest("POST", parts.path)
        for name, value in [("Content-Type", FORM), ("Content-Length", str(len(body))), *headers]:
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


# -- DPoP proofs, crafted ---------------------------------------------------------------------------


PROOF_KEY = ECKey.generate_key("P-256")


def proof(
    htu: str,
    *,
    key: ECKey | RSAKey = PROOF_KEY,
    alg: str = "ES256",
    htm: str = "POST",
    header: dict[str, Any] | None = None,
    claims: dict[str, Any] | None = None,
    iat: float | None = None,
) -> str:
    """A DPoP proof signed by ``key``; ``header``/``claims`` entries override (``None`` removes)."""
    protected: dict[str, Any] = {"typ": "dpop+jwt", "alg": alg, "jwk": key.as_dict(private=False)}
    body: dict[str, Any] = {
        "jti": secrets.token_urlsafe(16),
        "htm": htm,
        "htu": htu,
        "iat": int(time.time() if iat is None else iat),
    }
    for target, changes in ((protected, header), (body, claims)):
        for name, value in (changes or {}).items():
            if value is None:
                target.pop(name, None)
            else:
                target[name] = value
    return jwt.encode(protected, body, key, algorithms=[alg])


def weak_rsa_key() -> RSAKey:
    """A 1024-bit RSA key (RFC 7518 §3.3 wants 2048), made with cryptography: joserfc refuses to."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the point
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)
        return RSAKey.import_key(pem)


def unsigned_proof(htu: str) -> str:
    """``alg: none`` (RFC 7518 §3.6): no signature at all."""
    header = {"typ": "dpop+jwt", "alg": "none", "jwk": PROOF_KEY.as_dict(private=False)}
    claims = {"jti": secrets.token_urlsafe(16), "htm": "POST", "htu": htu, "iat": int(time.time())}
    return f"{b64json(header)}.{b64json(claims)}."


def hmac_proof(htu: str) -> str:
    """``alg: HS256`` with the MAC key itself in ``jwk``: anyone can make one."""
    secret = OctKey.generate_key(256)
    header = {"typ": "dpop+jwt", "alg": "HS256", "jwk": secret.as_dict()}
    claims = {"jti": secrets.token_urlsafe(16), "htm": "POST", "htu": htu, "iat": int(time.time())}
    return jwt.encode(header, claims, secret, algorithms=["HS256"])


def with_host(url: str, transform: Callable[[str], str]) -> str:
    parts = urlsplit(url)
    return url.replace(f"{parts.scheme}://{parts.netloc}", transform(f"{parts.scheme}://{parts.netloc}"), 1)


def with_path(url: str, path: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{path}"


#: (id, proof for the token endpoint URL, expected status).  RFC 9449 §4.3, one check per row.
TOKEN_ENDPOINT_PROOFS: list[tuple[str, Callable[[str], str], int]] = [
    ("valid", lambda url: proof(url), 200),
    ("typ-missing (step 4)", lambda url: proof(url, header={"typ": None}), 400),
    ("typ-jwt (step 4)", lambda url: proof(url, header={"typ": "JWT"}), 400),
    ("typ-with-media-type-prefix", lambda url: proof(url, header={"typ": "application/dpop+jwt"}), 200),
    ("alg-none (step 5)", unsigned_proof, 400),
    ("alg-hs256-with-oct-jwk (step 5)", hmac_proof, 400),
    ("jwk-missing (step 6)", lambda url: proof(url, header={"jwk": None}), 400),
    (
        "jwk-with-private-d (step 7)",
        lambda url: proof(url, header={"jwk": PROOF_KEY.as_dict(private=True)}),
        400,
    ),
    (
        "jwk-not-the-signing-key (step 6)",
        lambda url: proof(url, header={"jwk": ECKey.generate_key("P-256").as_dict(private=False)}),
        400,
    ),
    (
        "jwk-rsa-1024 (weak key)",
        lambda url: proof(url, key=weak_rsa_key(), alg="RS256"),
        400,
    ),
    ("htm-get (step 8)", lambda url: proof(url, htm="GET"), 400),
    ("htm-lower-case-post (step 8)", lambda url: proof(url, htm="post"), 400),
    ("htu-other-path (step 9)", lambda url: proof(with_path(url, "/introspect")), 400),
    ("htu-other-host (step 9)", lambda url: proof("https://sts.example.com/token"), 400),
    ("htu-scheme-and-host-upper-case", lambda url: proof(with_host(url, str.upper)), 200),
    ("htu-percent-encoded-unreserved", lambda url: proof(with_path(url, "/%74oken")), 200),
    ("htu-lower-case-percent-hex", lambda url: proof(with_path(url, "/%74oke%6e")), 200),
    ("htu-dot-segments", lambda url: proof(with_path(url, "/x/../token")), 200),
    ("htu-with-query (step 9: ignored)", lambda url: proof(url + "?a=1"), 200),
    ("htu-with-fragment (step 9: ignored)", lambda url: proof(url + "#f"), 200),
    (
        "htu-other-path-with-query (step 9)",
        lambda url: proof(with_path(url, "/introspect") + "?t=/token"),
        400,
    ),
    ("htu-with-userinfo", lambda url: proof(url.replace("://", "://user@", 1)), 400),
    ("htu-not-a-string", lambda url: proof(url, claims={"htu": ["x"]}), 400),
    ("iat-an-hour-old (step 11)", lambda url: proof(url, iat=time.time() - 3600), 400),
    ("iat-an-hour-ahead (step 11)", lambda url: proof(url, iat=time.time() + 3600), 400),
    ("iat-a-string", lambda url: proof(url, claims={"iat": str(int(time.time()))}), 400),
    ("jti-missing", lambda url: proof(url, claims={"jti": None}), 400),
    ("jti-too-short", lambda url: proof(url, claims={"jti": "abc"}), 400),
    ("not-a-jws", lambda url: "not.a.proof", 400),
    ("empty", lambda url: "", 400),
]


@pytest.mark.parametrize(
    ("make", "status"),
    [pytest.param(make, status, id=name) for name, make, status in TOKEN_ENDPOINT_PROOFS],
)
def test_dpop_proof_at_the_token_endpoint(world: World, make: Callable[[str], str], status: int) -> None:
    """RFC 9449 §4.3, syntax- and scheme-based htu normalisation (RFC 3986 §6.2.2, §6.2.3)."""
    response = world.exchange(make(world.token_endpoint))
    assert response.status_code == status, response.text
    assert response.headers["Cache-Control"] == "no-store"
    if status == 200:
        body = response.json()
        assert body["token_type"] == "DPoP"  # RFC 9449 §5
        assert verified_claims(world, body["access_token"])["cnf"] == {"jkt": PROOF_KEY.thumbprint()}  # §6.1
    else:
        assert response.json() == {
            "error": "invalid_dpop_proof",
            "error_description": "The DPoP proof is invalid.",
        }
        assert any(reason.startswith("dpop.") for reason in last_reasons(world))


def test_dpop_proof_replayed_at_the_token_endpoint_is_refused(world: World) -> None:
    """RFC 9449 §11.1: a proof's jti is accepted once."""
    replayed = proof(world.token_endpoint)
    assert world.exchange(replayed).status_code == 200
    again = world.exchange(replayed)
    assert again.status_code == 400 and again.json()["error"] == "invalid_dpop_proof"
    assert "dpop.replayed_jti" in last_reasons(world)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(lambda url: [("DPoP", proof(url)), ("DPoP", proof(url))], id="two-fields"),
        pytest.param(lambda url: [("DPoP", proof(url) + "," + proof(url))], id="two-in-one-field"),
    ],
)
def test_two_dpop_proofs_are_refused(world: World, headers: Callable[[str], list[tuple[str, str]]]) -> None:
    """RFC 9449 §4.3 step 1: exactly one DPoP HTTP request header field."""
    form = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": world.subject_token(),
        "subject_token_type": JWT_TYPE,
        "audience": DEPLOY,
    }
    status, body = post_with_headers(world.token_endpoint, form, headers(world.token_endpoint))
    assert (status, body["error"]) == (400, "invalid_dpop_proof")
    assert "dpop.not_exactly_one_proof" in last_reasons(world)


def test_dpop_bound_token_re_exchange_keeps_its_key(world: World) -> None:
    """RFC 9449 §6.1: a cnf.jkt-bound token of ours is re-exchanged only with a proof by that key."""
    key = DPoPKey()
    bound = world.token(key)
    same = world.exchange(key.proof("POST", world.token_endpoint), subject_token=bound)
    assert same.status_code == 200, same.text
    assert verified_claims(world, same.json()["access_token"])["cnf"] == {"jkt": key.jkt}
    other = world.exchange(DPoPKey().proof("POST", world.token_endpoint), subject_token=bound)
    assert (other.status_code, other.json()["error"]) == (400, "invalid_dpop_proof")
    bare = world.exchange(None, subject_token=bound)
    assert (bare.status_code, bare.json()["error"]) == (400, "invalid_dpop_proof")


def test_dpop_nonce_flow_over_http(make_settings: Callable[..., Settings], upstream: RunningServer) -> None:
    """RFC 9449 §8: use_dpop_nonce with a DPoP-Nonce header; the retry with it succeeds; a forged one not."""
    with serve_sts(make_settings, upstream, dpop_nonce=True) as live:
        key = DPoPKey()

        def exchange(nonce: str | None) -> requests.Response:
            form = {
                "grant_type": TOKEN_EXCHANGE,
                "subject_token": live.github_actions_token(),
                "subject_token_type": JWT_TYPE,
                "audience": DEPLOY,
            }
            dpop = key.proof("POST", live.token_endpoint, nonce=nonce)
            return requests.post(live.token_endpoint, data=form, headers={"DPoP": dpop}, timeout=TIMEOUT)

        first = exchange(None)
        assert (first.status_code, first.json()["error"]) == (400, "use_dpop_nonce")
        nonce = first.headers["DPoP-Nonce"]
        retried = exchange(nonce)
        assert retried.status_code == 200, retried.text
        assert retried.json()["token_type"] == "DPoP"
        assert retried.headers["DPoP-Nonce"]  # §8.2: a fresh nonce with every answer
        forged = exchange(b64url(b"\x00" * 24))
        assert (forged.status_code, forged.json()["error"]) == (400, "use_dpop_nonce")


def test_dpop_normalisation_agrees_between_server_and_resource_server() -> None:
    """The STS and the client library normalise htu alike (RFC 3986 §6.2.2, §6.2.3)."""
    cases = {
        "HTTPS://STS.Example.COM:443/token": "https://sts.example.com/token",
        "http://sts.example.com:80/token": "http://sts.example.com/token",
        "https://sts.example.com:/token": "https://sts.example.com/token",
        "https://sts.example.com": "https://sts.example.com/",
        "https://sts.example.com/a/./b/../token": "https://sts.example.com/a/token",
        "https://sts.example.com/%7Euser/%2f": "https://sts.example.com/~user/%2F",
        "https://[::1]:8443/token": "https://[::1]:8443/token",
        "https://sts.example.com/token?q=1#f": "https://sts.example.com/token",
    }
    for url, expected in cases.items():
        assert normalise_htu(url) == expected, url
        assert client_normalise_htu(url) == expected, url
    for bad in ("https://user@sts.example.com/token", "https://sts.example.com:99999/token"):
        with pytest.raises(ValueError):
            normalise_htu(bad)
        with pytest.raises(ValueError):
            client_normalise_htu(bad)


# -- DPoP at a resource server (RFC 9449 §7), through the client library ----------------------------


def rs_get(world: World, authorization: str | None, dpop: list[str] | None = None, url: str = "") -> Any:
    """GET the resource server; every DPoP value is sent as its own header field."""
    headers: list[tuple[str, str]] = []
    if authorization is not None:
        headers.append(("Authorization", authorization))
    headers += [("DPoP", value) for value in dpop or []]
    parts = urlsplit(url or world.api)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=TIMEOUT)
    try:
        connection.putrequest("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.headers.get_all("WWW-Authenticate") or [], response.read()
    finally:
        connection.close()


@dataclass(frozen=True)
class Bound:
    key: DPoPKey
    token: str
    #: The private key behind ``key``, to craft proofs the library would never make.
    raw: ECKey

    def crafted(self, url: str, **changes: Any) -> str:
        """A GET proof for ``url`` bound to the token (``ath``), with ``proof``'s overrides."""
        claims = {"ath": access_token_hash(self.token), **changes.pop("claims", {})}
        return proof(url, key=self.raw, htm="GET", claims=claims, **changes)


@pytest.fixture(scope="module")
def bound(world: World) -> Bound:
    raw = ECKey.generate_key("P-256")
    key = DPoPKey(raw)
    return Bound(key, world.token(key), raw)


#: (id, request -> (Authorization, [DPoP...], url), expected status, expected error in the challenge).
RESOURCE_SERVER_REQUESTS: list[tuple[str, Callable[[World, Bound], tuple[str, list[str], str]], int, str]] = [
    (
        "valid",
        lambda w, b: (f"DPoP {b.token}", [b.key.proof("GET", w.api, access_token=b.token)], ""),
        200,
        "",
    ),
    (
        "query-ignored (step 9)",
        lambda w, b: (
            f"DPoP {b.token}",
            [b.key.proof("GET", w.api, access_token=b.token)],
            w.api + "?env=prod",
        ),
        200,
        "",
    ),
    (
        "htu-host-upper-case",
        lambda w, b: (
            f"DPoP {b.token}",
            [b.key.proof("GET", with_host(w.api, str.upper), access_token=b.token)],
            "",
        ),
        200,
        "",
    ),
    ("downgrade-to-bearer (§7.2)", lambda w, b: (f"Bearer {b.token}", [], ""), 401, "invalid_token"),
    (
        "downgrade-to-bearer-with-proof",
        lambda w, b: (f"Bearer {b.token}", [b.key.proof("GET", w.api, access_token=b.token)], ""),
        401,
        "invalid_token",
    ),
    ("no-proof", lambda w, b: (f"DPoP {b.token}", [], ""), 401, "invalid_dpop_proof"),
    (
        "no-ath (step 12)",
        lambda w, b: (f"DPoP {b.token}", [b.key.proof("GET", w.api)], ""),
        401,
        "invalid_dpop_proof",
    ),
    (
        "ath-of-another-token",
        lambda w, b: (f"DPoP {b.token}", [b.key.proof("GET", w.api, access_token=w.token())], ""),
        401,
        "invalid_dpop_proof",
    ),
    (
        "proof-by-another-key (cnf.jkt)",
        lambda w, b: (f"DPoP {b.token}", [DPoPKey().proof("GET", w.api, access_token=b.token)], ""),
        401,
        "invalid_dpop_proof",
    ),
    (
        "proof-for-another-url",
        lambda w, b: (
            f"DPoP {b.token}",
            [b.key.proof("GET", with_path(w.api, "/api/other"), access_token=b.token)],
            "",
        ),
        401,
        "invalid_dpop_proof",
    ),
    (
        "proof-for-another-method",
        lambda w, b: (f"DPoP {b.token}", [b.key.proof("POST", w.api, access_token=b.token)], ""),
        401,
        "invalid_dpop_proof",
    ),
    (
        "two-proofs (step 1)",
        lambda w, b: (
            f"DPoP {b.token}",
            [
                b.key.proof("GET", w.api, access_token=b.token),
                b.key.proof("GET", w.api, access_token=b.token),
            ],
            "",
        ),
        401,
        "invalid_dpop_proof",
    ),
    (
        "stale-proof (step 11)",
        lambda w, b: (
            f"DPoP {b.token}",
            [b.key.proof("GET", w.api, access_token=b.token, now=time.time() - 3600)],
            "",
        ),
        401,
        "invalid_dpop_proof",
    ),
    (
        "typ-with-media-type-prefix (RFC 7515 §4.1.9)",
        lambda w, b: (f"DPoP {b.token}", [b.crafted(w.api, header={"typ": "application/dpop+jwt"})], ""),
        200,
        "",
    ),
    (
        "typ-jwt (step 4)",
        lambda w, b: (f"DPoP {b.token}", [b.crafted(w.api, header={"typ": "JWT"})], ""),
        401,
        "invalid_dpop_proof",
    ),
    (
        "jwk-with-private-d (step 7)",
        lambda w, b: (f"DPoP {b.token}", [b.crafted(w.api, header={"jwk": b.raw.as_dict(private=True)})], ""),
        401,
        "invalid_dpop_proof",
    ),
    (
        "jwk-not-the-signing-key (step 6)",
        lambda w, b: (
            f"DPoP {b.token}",
            [b.crafted(w.api, header={"jwk": ECKey.generate_key("P-256").as_dict(private=False)})],
            "",
        ),
        401,
        "invalid_dpop_proof",
    ),
    (
        "jti-missing (step 3)",
        lambda w, b: (f"DPoP {b.token}", [b.crafted(w.api, claims={"jti": None})], ""),
        401,
        "invalid_dpop_proof",
    ),
    (
        "alg-none (step 5)",
        lambda w, b: (f"DPoP {b.token}", [unsigned_proof(w.api)], ""),
        401,
        "invalid_dpop_proof",
    ),
    (
        "alg-hs256 (step 5)",
        lambda w, b: (f"DPoP {b.token}", [hmac_proof(w.api)], ""),
        401,
        "invalid_dpop_proof",
    ),
    (
        "bearer-token-as-dpop",
        lambda w, b: (f"DPoP {(t := w.token())}", [b.key.proof("GET", w.api, access_token=t)], ""),
        401,
        "invalid_token",
    ),
]


@pytest.mark.parametrize(
    ("make", "status", "error"),
    [pytest.param(make, status, error, id=name) for name, make, status, error in RESOURCE_SERVER_REQUESTS],
)
def test_dpop_at_a_resource_server(
    world: World,
    bound: Bound,
    make: Callable[[World, Bound], tuple[str, list[str], str]],
    status: int,
    error: str,
) -> None:
    authorization, dpop, url = make(world, bound)
    got, challenges, body = rs_get(world, authorization, dpop, url)
    assert got == status, (challenges, body)
    if status == 200:
        assert json.loads(body)["token_type"] == "DPoP"
        return
    assert json.loads(body)["error"] == error
    # RFC 9449 §7.1/§7.2: a DPoP challenge (with algs) is always offered for a bound token.
    assert any(c.startswith("DPoP ") and "algs=" in c for c in challenges), challenges
    assert any(f'error="{error}"' in c for c in challenges), challenges


def test_dpop_proof_replayed_at_a_resource_server_is_refused(world: World, bound: Bound) -> None:
    replayed = bound.key.proof("GET", world.api, access_token=bound.token)
    assert rs_get(world, f"DPoP {bound.token}", [replayed])[0] == 200
    status, challenges, _ = rs_get(world, f"DPoP {bound.token}", [replayed])
    assert status == 401 and any('error="invalid_dpop_proof"' in c for c in challenges)


# -- introspection (RFC 7662) -------------------------------------------------------------------------


INACTIVE = {"active": False}


@pytest.mark.parametrize(
    ("auth", "form", "expected"),
    [
        pytest.param(OTHER_RS, {}, INACTIVE, id="caller-serves-another-audience"),
        pytest.param(RS, {"token": "not-a-token"}, INACTIVE, id="garbage"),
        pytest.param(RS, {"token": "eyJhbGciOiJub25lIn0.e30."}, INACTIVE, id="alg-none-jwt"),
        pytest.param(RS, {"token_type_hint": "access_token"}, "active", id="hint-access-token"),
        pytest.param(RS, {"token_type_hint": "refresh_token"}, "active", id="hint-refresh-token"),
        pytest.param(RS, {"token_type_hint": "urn:example:unknown"}, "active", id="hint-unknown"),
    ],
)
def test_introspection_answers(
    world: World, auth: tuple[str, str], form: dict[str, str], expected: Any
) -> None:
    """RFC 7662 §2.2: active only to a caller serving the token's audience; inactive is exactly
    ``{"active": false}``; an unknown ``token_type_hint`` is no error (§2.1: the server may ignore it)."""
    response = world.post_form("/introspect", {"token": world.token(), **form}, auth=auth)
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Content-Type"] == "application/json"
    if expected == "active":
        body = response.json()
        assert body["active"] is True and body["token_type"] == "Bearer" and body["aud"] == DEPLOY
    else:
        assert response.json() == expected


def test_introspection_of_a_dpop_bound_token_shows_its_key(world: World, bound: Bound) -> None:
    """RFC 9449 §6.2: token_type DPoP and cnf.jkt in the introspection response."""
    body = world.post_form("/introspect", {"token": bound.token}, auth=RS).json()
    assert body["active"] is True
    assert (body["token_type"], body["cnf"]) == ("DPoP", {"jkt": bound.key.jkt})


@pytest.mark.parametrize(
    ("auth", "form", "status", "error"),
    [
        pytest.param(None, {"token": "x"}, 401, "invalid_client", id="no-client-authentication"),
        pytest.param((RS[0], "wrong"), {"token": "x"}, 401, "invalid_client", id="wrong-secret"),
        pytest.param(("nobody", "x"), {"token": "x"}, 401, "invalid_client", id="unknown-client"),
        pytest.param(RS, {}, 400, "invalid_request", id="no-token"),
        pytest.param(RS, {"token": ""}, 400, "invalid_request", id="empty-token"),
    ],
)
@pytest.mark.parametrize("path", ["/introspect", "/revoke"])
def test_token_status_endpoints_refuse(
    world: World,
    path: str,
    auth: tuple[str, str] | None,
    form: dict[str, str],
    status: int,
    error: str,
) -> None:
    """RFC 7662 §2.1 and RFC 7009 §2.1: the caller must authenticate; ``token`` is required."""
    response = world.post_form(path, form, auth=auth)
    assert (response.status_code, response.json()["error"]) == (status, error)
    assert response.headers["Cache-Control"] == "no-store"
    if status == 401:
        assert 'Basic realm="sts"' in response.headers["WWW-Authenticate"]


def test_introspection_ignores_a_jwt_response_request(world: World) -> None:
    """RFC 9701 (JWT introspection responses) is not offered: JSON all the same, and not in metadata."""
    response = world.post_form(
        "/introspect", {"token": world.token()}, auth=RS, Accept="application/token-introspection+jwt"
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["active"] is True
    metadata = requests.get(world.url + "/.well-known/oauth-authorization-server", timeout=TIMEOUT).json()
    assert "introspection_signing_alg_values_supported" not in metadata


def authlib_signer() -> OAuth2Session:
    """Authlib with private_key_jwt as it comes: the assertion's ``aud`` is the URL it posts to."""
    session = OAuth2Session(
        "rs-signer",
        RS_SIGNER_KEY,
        token_endpoint_auth_method="private_key_jwt",
        revocation_endpoint_auth_method="private_key_jwt",
    )
    session.register_client_auth_method(PrivateKeyJWT(alg="ES256"))
    return session


def test_authlib_private_key_jwt_at_introspection_and_revocation(world: World) -> None:
    """RFC 7523 §3: ``aud`` identifies this server; Authlib names the endpoint it posts to.  An
    assertion for one endpoint is accepted there only."""
    token = world.token()
    with authlib_signer() as session:
        introspected = session.introspect_token(world.url + "/introspect", token=token, timeout=TIMEOUT)
        assert introspected.status_code == 200, introspected.text
        assert introspected.json()["active"] is True
        revoked = session.revoke_token(world.url + "/revoke", token=token, timeout=TIMEOUT)
        assert revoked.status_code == 200, (revoked.text, last_reasons(world))
        assert (
            session.introspect_token(world.url + "/introspect", token=token, timeout=TIMEOUT).json()
            == INACTIVE
        )
    # An assertion made for /introspect is not a credential at /token or /revoke.
    for path in ("/token", "/revoke"):
        assertion = private_key_jwt_sign(RS_SIGNER_KEY, "rs-signer", world.url + "/introspect", alg="ES256")
        response = world.post_form(
            path,
            {
                "token": token,
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": assertion,
                "grant_type": TOKEN_EXCHANGE,
                "subject_token": world.subject_token(),
                "subject_token_type": JWT_TYPE,
            },
        )
        assert (response.status_code, response.json()["error"]) == (401, "invalid_client"), path


# -- revocation (RFC 7009) ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "form",
    [
        pytest.param({"token": "not-a-token"}, id="unknown-token"),
        pytest.param({"token": "not-a-token", "token_type_hint": "refresh_token"}, id="refresh-hint"),
        pytest.param({"token": "not-a-token", "token_type_hint": "urn:example:unknown"}, id="unknown-hint"),
    ],
)
def test_revoking_what_is_not_ours_is_200(world: World, form: dict[str, str]) -> None:
    """RFC 7009 §2.2: 200 for an invalid token; an unknown hint is no ``unsupported_token_type``."""
    response = world.post_form("/revoke", form, auth=RS)
    assert (response.status_code, response.content) == (200, b"")
    assert response.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("hint", [None, "access_token", "refresh_token"])
def test_revocation_takes_effect_everywhere(world: World, hint: str | None) -> None:
    """RFC 7009 §2.1: a wrong hint only widens the search.  Revoked: inactive, refused at /token and
    at the resource server."""
    key = DPoPKey()
    token = world.token(key)
    form = {"token": token} | ({"token_type_hint": hint} if hint else {})
    assert world.post_form("/revoke", form, auth=RS).status_code == 200
    assert world.post_form("/introspect", {"token": token}, auth=RS).json() == INACTIVE
    again = world.exchange(key.proof("POST", world.token_endpoint), subject_token=token)
    assert again.status_code == 400 and "subject_token.revoked" in last_reasons(world)
    status, challenges, _ = rs_get(world, f"DPoP {token}", [key.proof("GET", world.api, access_token=token)])
    assert status == 401 and any('error="invalid_token"' in c for c in challenges)


def test_revocation_by_a_client_the_token_is_not_for_has_no_effect(world: World) -> None:
    """RFC 7009 §2.1: the server "verifies whether the token was issued to the client making the
    revocation request. If this validation fails, the request is refused and the client is informed
    of the error" (documented: ``unauthorized_client``).  The token stays active."""
    token = world.token()
    refused = world.post_form("/revoke", {"token": token}, auth=OTHER_RS)
    assert (refused.status_code, refused.json()["error"]) == (400, "unauthorized_client")
    assert world.post_form("/introspect", {"token": token}, auth=RS).json()["active"] is True


# -- metadata (RFC 8414) and JWKS (RFC 7517) ----------------------------------------------------------


def test_metadata_is_conformant_and_authlib_accepts_it(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    response = requests.get(world.url + "/.well-known/oauth-authorization-server", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    metadata = response.json()
    assert metadata["issuer"] == world.url  # §3.3: exactly the issuer, no trailing slash added
    for member in ("token_endpoint", "jwks_uri", "response_types_supported", "grant_types_supported"):
        assert metadata[member], member
    assert [name for name, value in metadata.items() if value == []] == []  # §3.2
    assert "signed_metadata" not in metadata
    assert "none" not in metadata["token_endpoint_auth_signing_alg_values_supported"]  # §2
    # Authlib insists on https unless told this is a development set-up (the issuer is loopback http).
    monkeypatch.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")
    AuthorizationServerMetadata(metadata).validate()
    # Every advertised endpoint answers at the URL advertised.
    for endpoint in ("token_endpoint", "introspection_endpoint", "revocation_endpoint"):
        assert requests.post(metadata[endpoint], timeout=TIMEOUT).status_code in (400, 401), endpoint


def test_jwks_is_public_labelled_and_cacheable(world: World) -> None:
    response = requests.get(world.url + "/.well-known/jwks.json", timeout=TIMEOUT)
    assert response.status_code == 200
    assert "max-age=" in response.headers["Cache-Control"]
    keys = response.json()["keys"]
    assert keys and len({key["kid"] for key in keys}) == len(keys)
    for key in keys:
        assert not {"d", "p", "q", "dp", "dq", "qi", "oth", "k"} & set(key), key
        assert key["use"] == "sig" and key["alg"] and key["kid"]
    assert not any(key.is_private for key in KeySet.import_key_set(response.json()).keys)


# -- Shared Signals push (RFC 8935, RFC 8417) ---------------------------------------------------------


def set_claims(world: World, **changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": world.transmitter.issuer.issuer_url,
        "aud": world.url,
        "iat": int(time.time()),
        "jti": uuid.uuid4().hex,
        "sub_id": {
            "format": "iss_sub",
            "iss": world.upstream.issuer.issuer_url,
            "sub": "repo:someone/else:x",
        },
        "events": {SESSION_REVOKED: {"event_timestamp": int(time.time())}},
    }
    for name, value in changes.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def signed_set(world: World, header: dict[str, Any] | None = None, **changes: Any) -> str:
    return world.transmitter.issuer.mint(
        set_claims(world, **changes), header={"typ": "secevent+jwt", **(header or {})}
    )


def other_key_set(world: World) -> str:
    intruder = ECKey.generate_key("P-256")
    return world.transmitter.issuer.mint(
        set_claims(world),
        header={"typ": "secevent+jwt", "jwk": intruder.as_dict(private=False)},
        key=intruder,
    )


def hmac_set(world: World) -> str:
    secret = OctKey.generate_key(256)
    return jwt.encode(
        {"typ": "secevent+jwt", "alg": "HS256", "kid": world.transmitter.issuer.kid},
        set_claims(world),
        secret,
        algorithms=["HS256"],
    )


def unsigned_set(world: World) -> str:
    return f"{b64json({'typ': 'secevent+jwt', 'alg': 'none'})}.{b64json(set_claims(world))}."


#: (id, body, content type, expected status, expected RFC 8935 §2.4 err or None for 202).
SET_DELIVERIES: list[tuple[str, Callable[[World], str], str, int, str | None]] = [
    ("valid", lambda w: signed_set(w), SET_TYPE, 202, None),
    (
        "media-type-parameters-and-case",
        lambda w: signed_set(w),
        "Application/SecEvent+JWT; charset=utf-8",
        202,
        None,
    ),
    (
        "unknown-event-type-ignored",
        lambda w: signed_set(w, events={"urn:example:event": {}}),
        SET_TYPE,
        202,
        None,
    ),
    ("aud-list-naming-us", lambda w: signed_set(w, aud=["https://x.example", w.url]), SET_TYPE, 202, None),
    (
        "sub-id-email",
        lambda w: signed_set(w, sub_id={"format": "email", "email": "a@example.com"}),
        SET_TYPE,
        202,
        None,
    ),
    ("sub-id-opaque", lambda w: signed_set(w, sub_id={"format": "opaque", "id": "w-1"}), SET_TYPE, 202, None),
    (
        "sub-id-complex",
        lambda w: signed_set(w, sub_id={"format": "complex", "user": {"format": "opaque", "id": "w-2"}}),
        SET_TYPE,
        202,
        None,
    ),
    ("content-type-json", lambda w: signed_set(w), "application/json", 400, "invalid_request"),
    ("content-type-jwt", lambda w: signed_set(w), "application/jwt", 400, "invalid_request"),
    ("typ-jwt", lambda w: signed_set(w, header={"typ": "JWT"}), SET_TYPE, 400, "invalid_request"),
    ("typ-missing", lambda w: signed_set(w, header={"typ": None}), SET_TYPE, 400, "invalid_request"),
    ("iss-unknown", lambda w: signed_set(w, iss="https://evil.example"), SET_TYPE, 400, "invalid_issuer"),
    ("aud-other", lambda w: signed_set(w, aud="https://other.example"), SET_TYPE, 400, "invalid_audience"),
    ("aud-missing", lambda w: signed_set(w, aud=None), SET_TYPE, 400, "invalid_audience"),
    ("alg-none", unsigned_set, SET_TYPE, 400, "invalid_key"),
    ("alg-hs256", hmac_set, SET_TYPE, 400, "invalid_key"),
    ("signed-by-a-key-in-its-own-header", other_key_set, SET_TYPE, 400, "invalid_key"),
    ("jti-missing", lambda w: signed_set(w, jti=None), SET_TYPE, 400, "invalid_request"),
    ("iat-missing", lambda w: signed_set(w, iat=None), SET_TYPE, 400, "invalid_request"),
    (
        "iat-in-the-future",
        lambda w: signed_set(w, iat=int(time.time()) + 3600),
        SET_TYPE,
        400,
        "invalid_request",
    ),
    ("events-missing", lambda w: signed_set(w, events=None), SET_TYPE, 400, "invalid_request"),
    ("events-empty", lambda w: signed_set(w, events={}), SET_TYPE, 400, "invalid_request"),
    ("events-a-list", lambda w: signed_set(w, events=[SESSION_REVOKED]), SET_TYPE, 400, "invalid_request"),
    (
        "event-payload-not-an-object",
        lambda w: signed_set(w, events={SESSION_REVOKED: "x"}),
        SET_TYPE,
        400,
        "invalid_request",
    ),
    ("sub-id-missing", lambda w: signed_set(w, sub_id=None), SET_TYPE, 400, "invalid_request"),
    (
        "sub-id-unknown-format",
        lambda w: signed_set(w, sub_id={"format": "phone_number", "phone_number": "+1"}),
        SET_TYPE,
        400,
        "invalid_request",
    ),
    (
        "sub-id-iss-sub-of-an-unknown-issuer",
        lambda w: signed_set(w, sub_id={"format": "iss_sub", "iss": "https://nope.example", "sub": "x"}),
        SET_TYPE,
        400,
        "invalid_request",
    ),
    (
        "device-compliance-status-a-list (was 503: retried forever)",
        lambda w: signed_set(w, events={DEVICE_COMPLIANCE_CHANGE: {"current_status": ["compliant"]}}),
        SET_TYPE,
        400,
        "invalid_request",
    ),
    (
        "device-compliance-status-an-object",
        lambda w: signed_set(w, events={DEVICE_COMPLIANCE_CHANGE: {"current_status": {"a": 1}}}),
        SET_TYPE,
        400,
        "invalid_request",
    ),
    (
        "risk-level-a-list",
        lambda w: signed_set(w, events={RISK_LEVEL_CHANGE: {"current_level": ["HIGH"]}}),
        SET_TYPE,
        400,
        "invalid_request",
    ),
    ("not-a-jws", lambda w: "garbage", SET_TYPE, 400, "invalid_request"),
    ("empty-body", lambda w: "", SET_TYPE, 400, "invalid_request"),
    ("claims-as-json", lambda w: json.dumps(set_claims(w)), SET_TYPE, 400, "invalid_request"),
]


@pytest.mark.parametrize(
    ("make", "content_type", "status", "err"),
    [pytest.param(make, ct, status, err, id=name) for name, make, ct, status, err in SET_DELIVERIES],
)
def test_set_push_delivery(
    world: World, make: Callable[[World], str], content_type: str, status: int, err: str | None
) -> None:
    """RFC 8935 §2.2 (202, no body) and §2.3/§2.4 (400, ``{"err", "description"}`` in JSON)."""
    response = world.push(make(world), content_type)
    assert response.status_code == status, response.text
    if err is None:
        assert response.content == b""
    else:
        assert response.headers["Content-Type"] == "application/json"
        body = response.json()
        assert set(body) == {"err", "description"} and body["err"] == err


def test_set_replay_is_accepted_and_applied_once(world: World) -> None:
    """RFC 8417 §2.2 ``jti``: a SET is applied once; RFC 8935 §2: a delivery of one received before
    is answered as the first was (a transmitter resends when the answer was lost)."""
    once = signed_set(world)
    assert world.push(once).status_code == 202
    again = world.push(once)
    assert again.status_code == 202 and again.content == b""


# -- fault injection ----------------------------------------------------------------------------------


def test_upstream_jwks_server_killed_mid_run(make_settings: Callable[..., Settings]) -> None:
    """Keys fetched before the issuer's JWKS server died keep working until ``jwks_max_stale`` past
    their expiry; a token under a key the service never saw is 503 once a refetch has failed (the key
    may exist: the client retries), never a grant and never a 500."""
    upstream = DevIssuer.serve_ephemeral(alg="RS256")
    now = [time.time()]
    try:
        web = create_app(
            make_settings(
                POLICY,
                issuers=[
                    {
                        "name": "upstream",
                        "issuer": upstream.issuer.issuer_url,
                        "jwks_uri": upstream.jwks_uri,
                        "algorithms": ["RS256"],
                        "audiences": ["https://sts.test"],
                        "jwks_max_stale": 600,
                    }
                ],
            ),
            clock=lambda: now[0],
        ).test_client()

        def token(at: float) -> str:
            return upstream.issuer.github_actions_token(audience="https://sts.test", now=at)

        def exchange(subject_token: str) -> Any:
            return web.post(
                "/token",
                data={
                    "grant_type": TOKEN_EXCHANGE,
                    "subject_token": subject_token,
                    "subject_token_type": JWT_TYPE,
                    "audience": DEPLOY,
                },
            )

        def assert_unavailable(response: Any) -> None:
            assert response.status_code == 503, response.get_json()
            assert response.get_json()["error"] == "temporarily_unavailable"
            assert response.headers["Retry-After"]

        start = now[0]
        assert exchange(token(start)).status_code == 200
        # Signed now, under the key the service has, for later moments.
        at_400, at_1000 = token(start + 400), token(start + 1000)
        upstream.stop()
        now[0] = start + 400  # The keys are stale (fresh for 300 s) and their server dead: still used.
        assert exchange(at_400).status_code == 200
        upstream.issuer.rotate_key(keep_previous=True)
        now[0] = start + 431  # Past the refetch rate limit: an unknown kid makes the service try again.
        assert_unavailable(exchange(token(now[0])))
        now[0] = start + 1000  # Past jwks_max_stale (300 + 600): even the known key is not trusted.
        assert_unavailable(exchange(at_1000))
    finally:
        upstream.stop()


def hostile_jwks(signer: ECKey, kid: str) -> dict[str, list[dict[str, Any]]]:
    """Key sets an issuer's JWKS server could serve, each with the signer's ``kid`` in it."""
    public = dict(signer.as_dict(private=False), kid=kid, use="sig")
    impostor = dict(ECKey.generate_key("P-256").as_dict(private=False), kid=kid, use="sig")
    return {
        "honest": [public],
        "duplicate-kid-same-alg": [public, impostor],
        "private-key-published": [dict(signer.as_dict(private=True), kid=kid, use="sig")],
        "symmetric-key-under-the-kid": [{"kty": "oct", "k": b64url(b"s" * 32), "kid": kid}],
        "key-for-encryption": [dict(public, use="enc")],
    }


@pytest.mark.parametrize(
    "variant",
    [
        "honest",
        "duplicate-kid-same-alg",
        "private-key-published",
        "symmetric-key-under-the-kid",
        "key-for-encryption",
    ],
)
def test_hostile_issuer_jwks_content(make_settings: Callable[..., Settings], variant: str) -> None:
    """RFC 7517 §4.5 (a kid names one key), §4.2 (``use``); RFC 8725 §3.1: an ambiguous, private,
    symmetric or encryption key never verifies a token: ``invalid_request``, never a grant, never 500."""
    signer = ECKey.generate_key("P-256")
    keys = KeySetServer()
    try:
        issuer = DevIssuer("https://issuer.example", signer, "ES256")
        keys.document = {"keys": hostile_jwks(signer, issuer.kid)[variant]}
        web = create_app(
            make_settings(
                POLICY,
                issuers=[
                    {
                        "name": "upstream",
                        "issuer": "https://issuer.example",
                        "jwks_uri": keys.url,
                        "algorithms": ["ES256"],
                        "audiences": ["https://sts.test"],
                    }
                ],
            )
        ).test_client()
        response = web.post(
            "/token",
            data={
                "grant_type": TOKEN_EXCHANGE,
                "subject_token": issuer.github_actions_token(audience="https://sts.test"),
                "subject_token_type": JWT_TYPE,
                "audience": DEPLOY,
            },
        )
    finally:
        keys.stop()
    if variant == "honest":
        assert response.status_code == 200, response.get_json()
    else:
        assert (response.status_code, response.get_json()["error"]) == (400, "invalid_request")


JWK_SET = json.dumps({"keys": [dict(ECKey.generate_key("P-256").as_dict(private=False), kid="k1")]}).encode()

#: (id, behaviour of the JWKS server).  Each must end in KeysUnavailable, quickly.
BROKEN_JWKS = [
    pytest.param(Serve(b"<html>not json</html>"), id="garbage"),
    pytest.param(Serve(b'{"keys": "not a list"}'), id="not-a-jwk-set"),
    pytest.param(Serve(b'{"keys": [' + b'{"kty": "EC"},' * 60000 + b"{}]}"), id="huge"),
    pytest.param(Serve(b"", status=500), id="http-500"),
    pytest.param(Serve(b"", status=302, headers={"Location": "http://127.0.0.2:9/jwks"}), id="redirect"),
    pytest.param(Trickle(JWK_SET, interval=0.05), id="trickled-slow-loris"),
    # A header line at a time: each read succeeds, so the read timeout never fired (90 s held).
    pytest.param(TrickleHead(interval=0.1), id="trickled-headers"),
    pytest.param(Hang(), id="hangs"),
]


@pytest.mark.parametrize("behaviour", BROKEN_JWKS)
def test_broken_jwks_server_is_keys_unavailable_quickly(behaviour: Any) -> None:
    """A JWKS fetch ends within its timeout whatever the server does (the first row of defence for
    every exchange, SET and client assertion that needs those keys); nothing is followed elsewhere."""
    with FaultServer(behaviour) as server:
        keys = HttpJWKS(server.url + "/jwks", algorithms=["ES256"], timeout=0.3, max_bytes=64 * 1024)
        started = time.monotonic()
        with pytest.raises(KeysUnavailable):
            keys.key_for("k1", "ES256")
        assert time.monotonic() - started < 1.5
        assert server.requests == 1


@pytest.mark.parametrize(
    "behaviour",
    [
        pytest.param(
            Trickle(b'{"status": {"authenticated": true}}', interval=0.05, status=201), id="trickled"
        ),
        pytest.param(Serve(b'{"status": {}, "pad": "' + b"x" * 400_000 + b'"}', status=201), id="huge"),
        pytest.param(Hang(), id="hangs"),
        pytest.param(TrickleHead(interval=0.1), id="trickled-headers"),
        pytest.param(Serve(b"not json", status=201), id="garbage"),
    ],
)
def test_broken_token_review_api_is_unavailable_quickly(behaviour: Any) -> None:
    """Kubernetes TokenReview (the pod-liveness check) fails closed and fast, and a flood is not read."""
    with FaultServer(behaviour) as server:
        reviewer = HttpTokenReviewer(server.url, timeout=0.3)
        started = time.monotonic()
        with pytest.raises(TokenReviewUnavailable):
            reviewer.review("token", ("https://sts.test",))
        assert time.monotonic() - started < 1.5


def test_a_hanging_token_review_api_holds_at_most_half_the_request_threads() -> None:
    """Each review waiting on an API server that hangs holds a request thread: at most 4 wait (of a
    worker's 8 threads); the rest are refused at once."""
    with FaultServer(Hang()) as server:
        reviewer = HttpTokenReviewer(server.url, timeout=0.3)
        outcomes: list[float] = []
        lock = threading.Lock()

        def review() -> None:
            started = time.monotonic()
            with pytest.raises(TokenReviewUnavailable):
                reviewer.review("token", ("https://sts.test",))
            with lock:
                outcomes.append(time.monotonic() - started)

        threads = [threading.Thread(target=review) for _ in range(8)]
        for thread in threads:
            thread.start()
            time.sleep(0.01)  # in order: the first ones hold the slots
        for thread in threads:
            thread.join(5)
        waited = [took for took in outcomes if took >= 0.3]
        assert len(outcomes) == 8 and len(waited) == 4, sorted(outcomes)


def test_resource_server_fetch_from_a_trickling_sts_ends_quickly() -> None:
    """The client library's metadata/JWKS/introspection fetch is bounded in time as a whole."""
    with FaultServer(Trickle(b'{"issuer": "x"}' + b" " * 200, interval=0.05)) as server:
        session = requests.Session()
        started = time.monotonic()
        with pytest.raises(DiscoveryError):
            get_json(session, server.url + "/.well-known/oauth-authorization-server", timeout=0.3)
        assert time.monotonic() - started < 1.5
        session.close()


def test_transmitter_keys_unreachable_is_503_so_the_set_is_retried(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """RFC 8935 §2.3: a general failure gets an HTTP error the transmitter retries on; not 400."""
    with FaultServer(Hang()) as server:
        web = create_app(
            make_settings(
                transmitters=[
                    {"name": "idp", "issuer": "https://idp.example", "jwks_uri": server.url + "/jwks"}
                ]
            )
        ).test_client()
        idp = DevIssuer.ephemeral("https://idp.example", "ES256")
        claims = {
            "iss": "https://idp.example",
            "aud": "https://sts.test",
            "iat": int(time.time()),
            "jti": uuid.uuid4().hex,
            "sub_id": {"format": "opaque", "id": "w"},
            "events": {SESSION_REVOKED: {}},
        }
        started = time.monotonic()
        response = web.post(
            "/ssf/events", data=idp.mint(claims, header={"typ": "secevent+jwt"}), content_type=SET_TYPE
        )
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert response.get_json()["err"] == "temporarily_unavailable"
        assert time.monotonic() - started < 8  # the app's JWKS timeout is 3 s
