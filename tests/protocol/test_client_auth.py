"""Client authentication at ``POST /token`` (RFC 6749 §2.3, RFC 7521 §4.2, RFC 7523 §2.2/§3).

Three methods, never two at once (STANDARDS.md "Client authentication")::

    Authorization: Basic base64(urlencode(client_id) ":" urlencode(secret))   client_secret_basic
    client_id=...&client_secret=...                                           client_secret_post
    client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer
    &client_assertion=eyJ...                                                  private_key_jwt

A failed authentication is ``invalid_client`` with 401 and a ``WWW-Authenticate``
challenge (RFC 6749 §5.2); a request that is malformed (two methods, an
assertion without its type) is ``invalid_request``.  Secrets are stored hashed
and compared in constant time; neither a secret nor an assertion is ever
written to the audit trail or echoed in a response.

The subject token is a Kubernetes service-account token for the
``ledger-with-client`` rule, which requires an authenticated client.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import http.client
import json
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, urlencode

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, Key, OKPKey, RSAKey
from joserfc.jws import JWSRegistry
from werkzeug.serving import make_server
from werkzeug.test import TestResponse

from sts.app import create_app
from sts.core.client_secrets import PBKDF2_ITERATIONS, check_hash_format, hash_secret, verify_secret
from sts.dev.issuer import DevIssuer, RunningServer
from sts.errors import ConfigurationError
from sts.settings import Settings
from tests.conftest import (
    DEFAULT_CLIENTS,
    DEFAULT_POLICY,
    FORM,
    GATEWAY_SECRET,
    POSTER_SECRET,
    SIGNER_KEY,
    STS_ISSUER,
    exchange_form,
    settings_for,
)
from tests.support.crafted_jose import NOT_UTF8, KeySetServer, rsa_key_with_exponent_3, sign_encoded

LEDGER = "https://ledger.example.com/api"
TOKEN_ENDPOINT = STS_ISSUER + "/token"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

#: A client_secret_basic client whose id and secret both need RFC 6749 §2.3.1 form-encoding.
ODD_CLIENT = "ci:deploy/odd@x"
ODD_SECRET = "p@ss:w rd+/%20&=~é"
#: A client_secret_basic client whose secret an operator chose, stored with PBKDF2.
SLOW_CLIENT = "operator-chosen"
SLOW_SECRET = "correct horse battery staple"

#: A private_key_jwt client with an Ed25519 key and no ``algorithms`` setting (the default list).
ED_CLIENT = "ed-signer"
ED_KEY = OKPKey.generate_key("Ed25519", auto_kid=True)

CLIENTS: list[dict[str, Any]] = [
    *DEFAULT_CLIENTS,
    {
        "client_id": ED_CLIENT,
        "auth_method": "private_key_jwt",
        "jwks": {"keys": [ED_KEY.as_dict(private=False)]},
    },
    {"client_id": ODD_CLIENT, "auth_method": "client_secret_basic", "secret_hash": hash_secret(ODD_SECRET)},
    {
        "client_id": SLOW_CLIENT,
        "auth_method": "client_secret_basic",
        "secret_hash": hash_secret(SLOW_SECRET, slow=True),
    },
]


#: A public client (RFC 7591 ``none``): what libraries configured for "none" send, a client_id alone.
PUBLIC_CLIENT = "cli-public"
CLIENTS.append({"client_id": PUBLIC_CLIENT, "auth_method": "none"})
DEPLOY = "https://deploy.example.com"


def policy_with_extra_clients() -> dict[str, Any]:
    policy = copy.deepcopy(DEFAULT_POLICY)
    ledger = next(rule for rule in policy["rules"] if rule["name"] == "ledger-with-client")
    ledger["clients"] = [*ledger["clients"], ODD_CLIENT, SLOW_CLIENT, ED_CLIENT]
    return policy


# ---------------------------------------------------------------------------
# Fixtures: one issuer and one app for the module (each test uses fresh jtis)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_upstream() -> Iterator[RunningServer]:
    with DevIssuer.serve_ephemeral(alg="RS256") as server:
        yield server


@pytest.fixture(scope="module")
def shared_app(tmp_path_factory: pytest.TempPathFactory, shared_upstream: RunningServer) -> Flask:
    tmp = tmp_path_factory.mktemp("client-auth")
    return create_app(settings_for(tmp, shared_upstream, policy_with_extra_clients(), clients=CLIENTS))


@pytest.fixture
def app(shared_app: Flask) -> Flask:
    """Overrides conftest's ``app`` (conftest's ``client`` then uses it)."""
    return shared_app


@pytest.fixture
def issuer(shared_upstream: RunningServer) -> DevIssuer:
    return shared_upstream.issuer


@pytest.fixture(scope="module")
def live_url(shared_app: Flask) -> Iterator[str]:
    """The shared app on a real threaded HTTP server on loopback."""
    server = make_server("127.0.0.1", 0, shared_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def basic(client_id: str, secret: str, *, encode: bool = True) -> str:
    """RFC 6749 §2.3.1: each part form-urlencoded, then RFC 7617 Basic."""
    user, password = (quote_plus(client_id), quote_plus(secret)) if encode else (client_id, secret)
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def raw_basic(credentials: bytes) -> str:
    return "Basic " + base64.b64encode(credentials).decode("ascii")


def b64json(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode("ascii")


def subject_token(issuer: DevIssuer) -> str:
    return issuer.kubernetes_token(audience=STS_ISSUER)


def form(issuer: DevIssuer, **params: str) -> dict[str, str]:
    return exchange_form(subject_token(issuer), resource=LEDGER, **params)


def post(
    client: FlaskClient,
    data: dict[str, str],
    *,
    authorization: str | list[str] | None = None,
    path: str = "/token",
) -> TestResponse:
    headers: list[tuple[str, str]] = []
    if isinstance(authorization, str):
        headers.append(("Authorization", authorization))
    elif authorization is not None:
        headers.extend(("Authorization", value) for value in authorization)
    return client.post(path, data=data, content_type=FORM, headers=headers)


def assertion(
    *,
    key: Key = SIGNER_KEY,
    alg: str = "ES256",
    header: dict[str, Any] | None = None,
    now: float | None = None,
    **overrides: Any,
) -> str:
    """A client assertion for ``signer`` (RFC 7523 §3); ``None`` values are dropped."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": "signer",
        "sub": "signer",
        "aud": STS_ISSUER,
        "iat": issued,
        "exp": issued + 60,
        "jti": str(uuid.uuid4()),
    }
    claims.update(overrides)
    protected: dict[str, Any] = {"alg": alg, "kid": SIGNER_KEY.kid}
    protected.update(header or {})
    return jwt.encode(
        {k: v for k, v in protected.items() if v is not None},
        {k: v for k, v in claims.items() if v is not None},
        key,
        algorithms=[alg],
    )


def jwt_form(issuer: DevIssuer, client_assertion: str, **params: str) -> dict[str, str]:
    return form(issuer, client_assertion_type=JWT_BEARER, client_assertion=client_assertion, **params)


def last_record(app: Flask) -> dict[str, Any]:
    records = app.extensions["sts"].audit.recent(limit=1)
    assert records, "no audit record was written"
    record: dict[str, Any] = records[0]
    return record


def assert_granted(app: Flask, response: TestResponse, client_id: str, method: str) -> None:
    body = response.get_json()
    assert response.status_code == 200, (body, last_record(app)["reasons"])
    assert body["access_token"]
    claims = json.loads(base64.urlsafe_b64decode(body["access_token"].split(".")[1] + "=="))
    assert claims["client_id"] == client_id
    record = last_record(app)
    assert record["outcome"] == "granted"
    assert record["client_id"] == client_id
    assert record["client_auth_method"] == method


def assert_invalid_client(app: Flask, response: TestResponse, reason: str | None = None) -> None:
    """RFC 6749 §5.2: 401 ``invalid_client`` with a challenge; nothing issued; the reason audited."""
    body = response.get_json()
    assert response.status_code == 401, body
    assert body["error"] == "invalid_client"
    assert body["error_description"] == "Client authentication failed."
    assert "access_token" not in body
    assert response.headers["WWW-Authenticate"].endswith('Basic realm="sts", error="invalid_client"')
    assert response.headers["Cache-Control"] == "no-store"
    record = last_record(app)
    assert record["outcome"] == "refused"
    assert record["error"] == "invalid_client"
    assert record["issued_jti"] is None
    if reason is not None:
        assert reason in record["reasons"], record["reasons"]


def assert_invalid_request(app: Flask, response: TestResponse, reason: str) -> None:
    body = response.get_json()
    assert response.status_code == 400, body
    assert body["error"] == "invalid_request"
    assert "access_token" not in body
    record = last_record(app)
    assert record["outcome"] == "refused"
    assert reason in record["reasons"], record["reasons"]


# ---------------------------------------------------------------------------
# client_secret_basic and client_secret_post
# ---------------------------------------------------------------------------


def test_basic_with_the_right_secret_is_accepted(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    response = post(client, form(issuer), authorization=basic("gateway", GATEWAY_SECRET))
    assert_granted(app, response, "gateway", "client_secret_basic")


def test_basic_credentials_are_form_decoded(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    """RFC 6749 §2.3.1: id and secret are form-urlencoded inside Basic, so ``:`` may appear in either."""
    response = post(client, form(issuer), authorization=basic(ODD_CLIENT, ODD_SECRET))
    assert_granted(app, response, ODD_CLIENT, "client_secret_basic")


def test_basic_secret_sent_without_form_encoding_is_also_accepted(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    """Form-decoded, the ``+`` in the secret would be a space; many clients (google-auth, Authlib)
    skip the RFC 6749 §2.3.1 encoding, so the secret as sent is tried too.  Neither reading of a
    wrong secret passes."""
    response = post(
        client, form(issuer), authorization=basic(quote_plus(ODD_CLIENT), ODD_SECRET, encode=False)
    )
    assert_granted(app, response, ODD_CLIENT, "client_secret_basic")
    wrong = post(
        client, form(issuer), authorization=basic(quote_plus(ODD_CLIENT), ODD_SECRET + "+x", encode=False)
    )
    assert_invalid_client(app, wrong, "client.bad_secret")


def test_basic_with_a_pbkdf2_stored_secret(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    response = post(client, form(issuer), authorization=basic(SLOW_CLIENT, SLOW_SECRET))
    assert_granted(app, response, SLOW_CLIENT, "client_secret_basic")
    response = post(client, form(issuer), authorization=basic(SLOW_CLIENT, SLOW_SECRET + " "))
    assert_invalid_client(app, response, "client.bad_secret")
    # Within the pause after that failure, a secret the hash has not verified is not checked (503,
    # to retry): one PBKDF2 check per pause; the client's own secret, verified before, still passes.
    paused = post(client, form(issuer), authorization=basic(SLOW_CLIENT, "another guess"))
    assert paused.status_code == 503 and paused.get_json()["error"] == "temporarily_unavailable"
    assert "client.secret_checks_paused" in last_record(app)["reasons"]
    again = post(client, form(issuer), authorization=basic(SLOW_CLIENT, SLOW_SECRET))
    assert_granted(app, again, SLOW_CLIENT, "client_secret_basic")


def test_post_with_the_right_secret_is_accepted(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    response = post(client, form(issuer, client_id="poster", client_secret=POSTER_SECRET))
    assert_granted(app, response, "poster", "client_secret_post")


@pytest.mark.parametrize(
    "secret",
    [GATEWAY_SECRET[:-1], GATEWAY_SECRET + "0", GATEWAY_SECRET.upper(), "x" + GATEWAY_SECRET[1:], "x"],
    ids=["prefix", "suffix", "case", "first-char", "short"],
)
def test_basic_with_a_wrong_secret_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer, secret: str
) -> None:
    response = post(client, form(issuer), authorization=basic("gateway", secret))
    assert_invalid_client(app, response, "client.bad_secret")


def test_basic_with_an_empty_secret_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    response = post(client, form(issuer), authorization=basic("gateway", ""))
    assert_invalid_client(app, response, "client.bad_secret")


def test_post_with_a_wrong_secret_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    response = post(client, form(issuer, client_id="poster", client_secret=POSTER_SECRET.replace("+", " ")))
    assert_invalid_client(app, response, "client.bad_secret")


@pytest.mark.parametrize("method", ["basic", "post"])
def test_unknown_client_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer, method: str) -> None:
    if method == "basic":
        response = post(client, form(issuer), authorization=basic("nobody", GATEWAY_SECRET))
    else:
        response = post(client, form(issuer, client_id="nobody", client_secret=GATEWAY_SECRET))
    assert_invalid_client(app, response, "client.unknown")


def test_basic_client_using_post_is_refused_even_with_the_right_secret(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    response = post(client, form(issuer, client_id="gateway", client_secret=GATEWAY_SECRET))
    assert_invalid_client(app, response, "client.wrong_auth_method")


def test_post_client_may_use_basic_as_rfc_6749_requires(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    """RFC 6749 §2.3.1: the server MUST support HTTP Basic for every client issued a password (an
    outside conformance audit); the form parameters are the exception, not the other way round."""
    response = post(client, form(issuer), authorization=basic("poster", POSTER_SECRET))
    assert response.status_code == 200, response.get_json()
    record = last_record(app)
    assert (record["client_id"], record["client_auth_method"]) == ("poster", "client_secret_basic")
    response = post(client, form(issuer), authorization=basic("poster", GATEWAY_SECRET))
    assert_invalid_client(app, response, "client.bad_secret")


def test_private_key_jwt_client_using_a_secret_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    response = post(client, form(issuer), authorization=basic("signer", "anything"))
    assert_invalid_client(app, response, "client.wrong_auth_method")


def test_a_client_id_with_a_colon_sent_without_form_encoding_is_found(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    """Authlib, requests and google-auth put the client id in Basic as it is: at the first ``:``
    it names no client, so the split that names a registered one is taken (an outside interop
    check); only that client's own secret passes."""
    raw = raw_basic(f"{ODD_CLIENT}:{ODD_SECRET}".encode())
    assert_granted(app, post(client, form(issuer), authorization=raw), ODD_CLIENT, "client_secret_basic")
    wrong = raw_basic(f"{ODD_CLIENT}:{GATEWAY_SECRET}".encode())
    assert_invalid_client(app, post(client, form(issuer), authorization=wrong), "client.bad_secret")
    assert ODD_CLIENT in json.dumps(last_record(app))
    # requests-oauthlib with include_client_id and HTTPBasicAuth: the same id in the body too.
    with_id = {**form(issuer), "client_id": ODD_CLIENT}
    assert_granted(app, post(client, with_id, authorization=raw), ODD_CLIENT, "client_secret_basic")
    assert_invalid_client(app, post(client, with_id, authorization=wrong), "client.bad_secret")
    other_id = {**form(issuer), "client_id": "gateway"}
    assert_invalid_client(app, post(client, other_id, authorization=raw), "client.client_id_mismatch")


def test_basic_credentials_in_latin1_are_read_as_such(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    """RFC 7617 §2.1 leaves the charset open: Authlib and requests' ``HTTPBasicAuth`` send a
    secret's non-ASCII characters (here ``é``) in ISO-8859-1, not encoded; UTF-8 is read first."""
    latin1 = raw_basic(f"{ODD_CLIENT}:{ODD_SECRET}".encode("latin-1"))
    assert_granted(app, post(client, form(issuer), authorization=latin1), ODD_CLIENT, "client_secret_basic")
    wrong = raw_basic(f"{ODD_CLIENT}:{ODD_SECRET}x".encode("latin-1"))
    assert_invalid_client(app, post(client, form(issuer), authorization=wrong), "client.bad_secret")


@pytest.mark.parametrize(
    "authorization",
    [
        "Basic !!!not-base64!!!",
        "Basic " + base64.b64encode(b"gateway:" + GATEWAY_SECRET.encode()).decode().rstrip("="),
        raw_basic(b"gateway" + GATEWAY_SECRET.encode()),
        raw_basic(b"\xff\xfe:\xff\xfe"),
        raw_basic(b"gateway:\xff" + GATEWAY_SECRET.encode()),
        raw_basic(b":" + GATEWAY_SECRET.encode()),
        raw_basic(b""),
        "Basic",
        "Basic ",
        "Basic \u00e9\u00e9\u00e9\u00e9",
        "Bearer " + GATEWAY_SECRET,
        "Digest username=gateway",
        GATEWAY_SECRET,
    ],
    ids=[
        "bad-base64",
        "unpadded",
        "no-colon",
        "non-utf8",
        "non-utf8-secret",
        "empty-id",
        "empty",
        "scheme-only",
        "scheme-and-space",
        "latin1",
        "bearer",
        "digest",
        "no-scheme",
    ],
)
def test_malformed_authorization_header_is_invalid_client(
    app: Flask, client: FlaskClient, issuer: DevIssuer, authorization: str
) -> None:
    """Never a 500 (authlib answers one for non-UTF-8 credentials): always 401 with a challenge."""
    response = post(client, form(issuer), authorization=authorization)
    assert_invalid_client(app, response)


def test_percent_encoded_invalid_utf8_in_basic_is_just_a_wrong_secret(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    response = post(client, form(issuer), authorization=raw_basic(b"gateway:%FF%FE"))
    assert_invalid_client(app, response, "client.bad_secret")


def test_two_authorization_headers_are_refused(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    good = basic("gateway", GATEWAY_SECRET)
    response = post(client, form(issuer), authorization=[good, basic("poster", POSTER_SECRET)])
    assert_invalid_request(app, response, "request.repeated_authorization_header")
    response = post(client, form(issuer), authorization=[good, good])
    assert_invalid_request(app, response, "request.repeated_authorization_header")


def test_two_authorization_headers_over_real_http_are_refused(live_url: str, issuer: DevIssuer) -> None:
    """A real WSGI server folds repeated headers into one value; the request must still be refused."""
    good = basic("gateway", GATEWAY_SECRET)
    body = urlencode(form(issuer)).encode()
    host, _, port = live_url.removeprefix("http://").partition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest("POST", "/token")
        connection.putheader("Content-Type", FORM)
        connection.putheader("Content-Length", str(len(body)))
        connection.putheader("Authorization", good)
        connection.putheader("Authorization", good)
        connection.endheaders(body)
        response = connection.getresponse()
        payload = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 400, payload
    assert payload["error"] == "invalid_request"
    assert "access_token" not in payload


def test_basic_and_a_body_secret_at_once_is_invalid_request(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    """RFC 6749 §2.3: a client MUST NOT use more than one authentication method per request."""
    response = post(
        client,
        form(issuer, client_id="gateway", client_secret=GATEWAY_SECRET),
        authorization=basic("gateway", GATEWAY_SECRET),
    )
    assert_invalid_request(app, response, "client.multiple_authentication_methods")


def test_basic_and_an_assertion_at_once_is_invalid_request(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    response = post(client, jwt_form(issuer, assertion()), authorization=basic("gateway", GATEWAY_SECRET))
    assert_invalid_request(app, response, "client.multiple_authentication_methods")


def test_body_secret_and_an_assertion_at_once_is_invalid_request(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    data = jwt_form(issuer, assertion(), client_id="signer", client_secret="whatever")
    assert_invalid_request(app, post(client, data), "client.multiple_authentication_methods")


def test_client_id_alone_is_invalid_client(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    response = post(client, form(issuer, client_id="gateway"))
    assert_invalid_client(app, response, "client.unauthenticated_client_id")


def test_a_public_client_id_alone_is_anonymous(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    """RFC 7591 §2 ``none``, RFC 6749 §3.2.1: a registered public client may name itself; the
    request is anonymous all the same (the id proves nothing): granted only by a rule that takes
    the subject token as the only credential, and the token's ``client_id`` is not the claim."""
    github = issuer.github_actions_token(audience=STS_ISSUER)
    response = post(client, exchange_form(github, audience=DEPLOY, client_id=PUBLIC_CLIENT))
    body = response.get_json()
    assert response.status_code == 200, body
    claims = json.loads(base64.urlsafe_b64decode(body["access_token"].split(".")[1] + "=="))
    assert claims["client_id"] == claims["sub"] == "repo:acme/app:ref:refs/heads/main"
    record = last_record(app)
    assert (record["outcome"], record["client_id"], record["client_auth_method"]) == (
        "granted",
        PUBLIC_CLIENT,
        "none",
    )
    # Where a rule wants an authenticated client, a public one is none.
    assert_invalid_client(app, post(client, form(issuer, client_id=PUBLIC_CLIENT)))
    # requests-oauthlib sends a client without a secret as Basic with an empty password: the same.
    response = post(client, exchange_form(github, audience=DEPLOY), authorization=basic(PUBLIC_CLIENT, ""))
    assert response.status_code == 200, response.get_json()
    record = last_record(app)
    assert (record["client_id"], record["client_auth_method"]) == (PUBLIC_CLIENT, "none")
    # It has no secret to send, and no other client_id alone is anonymous.
    response = post(client, form(issuer), authorization=basic(PUBLIC_CLIENT, "guess"))
    assert_invalid_client(app, response, "client.wrong_auth_method")
    response = post(client, form(issuer), authorization=basic("gateway", ""))
    assert_invalid_client(app, response, "client.bad_secret")
    response = post(client, exchange_form(github, audience=DEPLOY, client_id="cli-unknown"))
    assert_invalid_client(app, response, "client.unauthenticated_client_id")


def test_a_public_client_is_not_a_client_for_introspection(app: Flask, client: FlaskClient) -> None:
    response = client.post("/introspect", data={"token": "x", "client_id": PUBLIC_CLIENT}, content_type=FORM)
    assert response.status_code == 401 and response.get_json()["error"] == "invalid_client"
    assert "client.authentication_required" in last_record(app)["reasons"]
    # Its id in Basic with an empty password is no credential either, and recorded as none.
    empty = basic(PUBLIC_CLIENT, "")
    response = client.post(
        "/introspect", data={"token": "x"}, content_type=FORM, headers={"Authorization": empty}
    )
    assert response.status_code == 401 and response.get_json()["error"] == "invalid_client"
    record = last_record(app)
    assert "client.authentication_required" in record["reasons"] and record["client_auth_method"] == "none"


def test_a_public_client_has_no_credentials_and_no_rule_names_it(
    tmp_path: Path, shared_upstream: RunningServer
) -> None:
    for extra in (
        {"secret_hash": hash_secret("x")},
        {"jwks_uri": "https://keys.example/jwks"},
        {"audiences": ["a"]},
    ):
        public = {"client_id": "pub", "auth_method": "none", **extra}
        with pytest.raises(
            ConfigurationError, match=r"clients\.pub: a public client \(auth_method none\) has no"
        ):
            settings_for(tmp_path, shared_upstream, DEFAULT_POLICY, clients=[*DEFAULT_CLIENTS, public])
    policy = copy.deepcopy(DEFAULT_POLICY)
    policy["rules"][1]["clients"] = ["gateway", "pub"]
    public = {"client_id": "pub", "auth_method": "none"}
    settings = settings_for(tmp_path, shared_upstream, policy, clients=[*DEFAULT_CLIENTS, public])
    with pytest.raises(ConfigurationError, match=r"unknown client\(s\) pub"):
        create_app(settings)


def test_an_anonymous_grant_whose_subject_names_a_registered_client_is_refused(
    tmp_path: Path, shared_upstream: RunningServer
) -> None:
    """An anonymous token's ``client_id`` is its subject: one naming a registered client read, to
    resource servers and to ``/revoke``, as issued to that client (an outside audit had that client
    revoke it).  Such an exchange is refused; any other subject is granted as before."""
    subject = "repo:acme/app:ref:refs/heads/main"
    clashing = {
        "client_id": subject,
        "auth_method": "client_secret_basic",
        "secret_hash": hash_secret("s" * 32),
    }
    app = create_app(
        settings_for(tmp_path, shared_upstream, DEFAULT_POLICY, clients=[*DEFAULT_CLIENTS, clashing])
    )
    issuer = shared_upstream.issuer

    def anonymous() -> dict[str, str]:
        token = issuer.github_actions_token(audience=STS_ISSUER)
        return exchange_form(token, audience="https://deploy.example.com")

    response = post(app.test_client(), anonymous())
    assert_invalid_request(app, response, "client.subject_names_a_client")
    (tmp_path / "other").mkdir()
    other = create_app(settings_for(tmp_path / "other", shared_upstream, DEFAULT_POLICY))
    granted = post(other.test_client(), anonymous())
    assert granted.status_code == 200, granted.get_json()


def test_no_client_authentication_is_invalid_client_for_a_rule_that_requires_it(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    assert_invalid_client(app, post(client, form(issuer)))


def test_client_secret_without_client_id_is_invalid_client(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    response = post(client, form(issuer, client_secret=POSTER_SECRET))
    assert_invalid_client(app, response, "client.missing_client_id")


def test_form_client_id_must_match_basic(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    auth = basic("gateway", GATEWAY_SECRET)
    assert_invalid_client(app, post(client, form(issuer, client_id="poster"), authorization=auth))
    assert_granted(
        app,
        post(client, form(issuer, client_id="gateway"), authorization=auth),
        "gateway",
        "client_secret_basic",
    )


def test_credentials_in_the_query_string_are_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    """RFC 6749 §3.2: the token endpoint takes parameters in the body; a query is refused outright."""
    response = client.post(
        f"/token?client_id=poster&client_secret={quote_plus(POSTER_SECRET)}",
        data=form(issuer),
        content_type=FORM,
    )
    assert_invalid_request(app, response, "request.query_parameters")


# ---------------------------------------------------------------------------
# private_key_jwt (RFC 7523)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "aud", [STS_ISSUER, TOKEN_ENDPOINT, [STS_ISSUER], ["https://other.example", TOKEN_ENDPOINT]]
)
def test_private_key_jwt_is_accepted(
    app: Flask, client: FlaskClient, issuer: DevIssuer, aud: str | list[str]
) -> None:
    response = post(client, jwt_form(issuer, assertion(aud=aud)))
    assert_granted(app, response, "signer", "private_key_jwt")


@pytest.mark.parametrize("typ", ["JWT", "client-authentication+jwt", "application/client-authentication+jwt"])
def test_private_key_jwt_with_an_explicit_typ_is_accepted(
    app: Flask, client: FlaskClient, issuer: DevIssuer, typ: str
) -> None:
    response = post(client, jwt_form(issuer, assertion(header={"typ": typ})))
    assert_granted(app, response, "signer", "private_key_jwt")


@pytest.mark.parametrize("alg", ["Ed25519", "EdDSA"])
def test_ed25519_assertion_is_accepted_by_default(
    app: Flask, client: FlaskClient, issuer: DevIssuer, alg: str
) -> None:
    """RFC 9864 names the algorithm ``Ed25519``; RFC 8037's ``EdDSA`` stays accepted.  The client
    sets no ``algorithms``: both are in the default list, and both are advertised in metadata."""
    claims = {"iss": ED_CLIENT, "sub": ED_CLIENT, "aud": STS_ISSUER, "iat": int(time.time())}
    claims.update(exp=claims["iat"] + 60, jti=str(uuid.uuid4()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)  # joserfc warns on every use of "EdDSA"
        signed = jwt.encode(
            {"alg": alg, "kid": ED_KEY.kid}, claims, ED_KEY, registry=JWSRegistry(algorithms=[alg])
        )
        response = post(client, jwt_form(issuer, signed))
    assert_granted(app, response, ED_CLIENT, "private_key_jwt")
    metadata = client.get("/.well-known/oauth-authorization-server").get_json()
    assert alg in metadata["token_endpoint_auth_signing_alg_values_supported"]


def test_private_key_jwt_with_a_matching_client_id_is_accepted(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    response = post(client, jwt_form(issuer, assertion(), client_id="signer"))
    assert_granted(app, response, "signer", "private_key_jwt")


def test_replayed_assertion_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    """RFC 7523 §3 item 7: a ``jti`` already used is refused, for as long as the assertion lives."""
    once = assertion()
    assert_granted(app, post(client, jwt_form(issuer, once)), "signer", "private_key_jwt")
    assert_invalid_client(app, post(client, jwt_form(issuer, once)), "client_assertion.replayed")
    # A different assertion re-using the jti is a replay too.
    jti = json.loads(base64.urlsafe_b64decode(once.split(".")[1] + "=="))["jti"]
    assert_invalid_client(
        app, post(client, jwt_form(issuer, assertion(jti=jti))), "client_assertion.replayed"
    )


def test_failed_assertion_does_not_burn_its_jti(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    """The jti is recorded only once the signature verifies, so a forger cannot lock a client out."""
    jti = str(uuid.uuid4())
    forged = assertion(key=ECKey.generate_key("P-256"), jti=jti)
    assert_invalid_client(app, post(client, jwt_form(issuer, forged)), "client_assertion.jws.bad_signature")
    assert_granted(app, post(client, jwt_form(issuer, assertion(jti=jti))), "signer", "private_key_jwt")


def test_concurrent_uses_of_one_assertion_succeed_exactly_once(live_url: str, issuer: DevIssuer) -> None:
    once = assertion()
    forms = [jwt_form(issuer, once) for _ in range(10)]
    barrier = threading.Barrier(len(forms))
    results: list[tuple[int, dict[str, Any]]] = []
    lock = threading.Lock()

    def send(data: dict[str, str]) -> None:
        barrier.wait(timeout=10)
        response = requests.post(live_url + "/token", data=data, timeout=20)
        with lock:
            results.append((response.status_code, response.json()))

    threads = [threading.Thread(target=send, args=(data,)) for data in forms]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] + [401] * 9, results
    assert sum(1 for _, body in results if "access_token" in body) == 1
    assert all(body["error"] == "invalid_client" for status, body in results if status == 401)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"jti": None}, "client_assertion.missing_jti"),
        ({"jti": ""}, "client_assertion.malformed_jti"),
        ({"jti": 12345}, "client_assertion.malformed_jti"),
        ({"exp": None}, "client_assertion.missing_exp"),
        ({"exp": "9999999999"}, "client_assertion.malformed_exp"),
        ({"exp": True}, "client_assertion.malformed_exp"),
        ({"exp": 10**400}, "client_assertion.malformed_exp"),
        ({"nbf": 10**400}, "client_assertion.malformed_nbf"),
        ({"iat": 10**400}, "client_assertion.malformed_iat"),
        ({"sub": "gateway"}, "client_assertion.iss_sub_mismatch"),
        ({"sub": None}, "client_assertion.iss_sub_mismatch"),
        ({"iss": None}, "client_assertion.iss_sub_mismatch"),
        ({"aud": None}, "client_assertion.missing_aud"),
        ({"aud": "https://other.example"}, "client_assertion.audience_mismatch"),
        ({"aud": STS_ISSUER + "/other"}, "client_assertion.audience_mismatch"),
        ({"aud": "https://STS.test"}, "client_assertion.audience_mismatch"),
        ({"aud": [TOKEN_ENDPOINT + "/"]}, "client_assertion.audience_mismatch"),
        ({"aud": []}, "client_assertion.malformed_aud"),
        ({"nbf": int(time.time()) + 3600}, "client_assertion.not_yet_valid"),
        ({"iat": int(time.time()) + 3600}, "client_assertion.issued_in_future"),
    ],
    ids=lambda value: (
        "-".join(f"{k}={str(v)[:12]}" for k, v in value.items()) if isinstance(value, dict) else ""
    ),
)
def test_bad_assertion_claims_are_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer, overrides: dict[str, Any], reason: str
) -> None:
    response = post(client, jwt_form(issuer, assertion(**overrides)))
    assert_invalid_client(app, response, reason)


def test_expired_assertion_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    past = time.time() - 300
    response = post(client, jwt_form(issuer, assertion(now=past, exp=int(time.time()) - 31)))
    assert_invalid_client(app, response, "client_assertion.expired")


def test_assertion_lifetime_is_bounded(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    """``exp`` at most max_client_assertion_lifetime (3600 s) + leeway (30 s) ahead; further is refused."""
    settings = app.extensions["sts"].settings
    limit = settings.max_client_assertion_lifetime + settings.leeway
    assert limit == 3630
    far = assertion(exp=int(time.time()) + limit + 5)
    assert_invalid_client(app, post(client, jwt_form(issuer, far)), "client_assertion.lifetime_too_long")
    near = assertion(exp=int(time.time()) + settings.max_client_assertion_lifetime)
    assert_granted(app, post(client, jwt_form(issuer, near)), "signer", "private_key_jwt")


def test_assertion_signed_by_another_key_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    forged = assertion(key=ECKey.generate_key("P-256"))
    assert_invalid_client(app, post(client, jwt_form(issuer, forged)), "client_assertion.jws.bad_signature")


def test_assertion_naming_an_unknown_kid_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    other = ECKey.generate_key("P-256", auto_kid=True)
    forged = assertion(key=other, header={"kid": other.kid})
    assert_invalid_client(app, post(client, jwt_form(issuer, forged)), "client_assertion.unknown_kid")


@pytest.mark.parametrize("part", ["payload", "header"])
def test_assertion_not_in_utf8_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer, part: str
) -> None:
    """RFC 7515 §5.2, RFC 7519 §7.2: header and claims are UTF-8 JSON; UTF-16/32 or a BOM is refused."""

    def signed(encoding: str) -> str:
        claims = json.loads(base64.urlsafe_b64decode(assertion().split(".")[1] + "=="))
        header = {"alg": "ES256", "kid": SIGNER_KEY.kid}
        return sign_encoded(SIGNER_KEY, header, claims, encoding=encoding, part=part)

    assert_granted(app, post(client, jwt_form(issuer, signed("utf-8"))), "signer", "private_key_jwt")
    for encoding in NOT_UTF8.values():
        response = post(client, jwt_form(issuer, signed(encoding)))
        assert_invalid_client(app, response, "client_assertion.jws.not_utf8")


@pytest.fixture
def key_set_server() -> Iterator[KeySetServer]:
    server = KeySetServer()
    yield server
    server.stop()


def test_rsa_key_with_public_exponent_3_in_a_client_jwks_is_skipped(
    tmp_path: Path,
    issuer: DevIssuer,
    shared_upstream: RunningServer,
    key_set_server: KeySetServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A ``private_key_jwt`` client's ``jwks_uri`` is filtered like an issuer's: e = 65537 only."""
    e3 = rsa_key_with_exponent_3()
    strong = RSAKey.generate_key(2048, parameters={"kid": "strong", "use": "sig", "alg": "RS256"})
    key_set_server.document = {"keys": [e3.as_dict(private=False), strong.as_dict(private=False)]}
    policy = copy.deepcopy(DEFAULT_POLICY)
    ledger = next(rule for rule in policy["rules"] if rule["name"] == "ledger-with-client")
    ledger["clients"] = ["rsa-signer"]
    rsa_client = {
        "client_id": "rsa-signer",
        "auth_method": "private_key_jwt",
        "jwks_uri": key_set_server.url,
        "algorithms": ["RS256"],
    }
    app = create_app(settings_for(tmp_path, shared_upstream, policy, clients=[rsa_client]))
    web = app.test_client()

    def signed_by(key: RSAKey) -> str:
        return assertion(key=key, alg="RS256", header={"kid": key.kid}, iss="rsa-signer", sub="rsa-signer")

    with caplog.at_level("WARNING", logger="sts.adapters.jwks"):
        response = post(web, jwt_form(issuer, signed_by(e3)))
    assert_invalid_client(app, response, "client_assertion.unknown_kid")
    assert any("kid 'e3'" in m and "public exponent 3" in m for m in caplog.messages), caplog.messages
    assert_granted(app, post(web, jwt_form(issuer, signed_by(strong))), "rsa-signer", "private_key_jwt")


@pytest.mark.parametrize(
    "secret",
    [b"a-shared-secret-of-thirty-two-bytes!", SIGNER_KEY.as_pem(private=False)],
    ids=["shared-secret", "public-key-pem"],
)
def test_hmac_assertion_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer, secret: bytes) -> None:
    """RFC 9700 §2.5 prefers asymmetric methods; HS256 is not among the client's algorithms.

    Made by hand: joserfc will not use a PEM public key as an HMAC secret, but an attacker's code would.
    """
    header = b64json({"alg": "HS256", "kid": SIGNER_KEY.kid})
    payload = assertion().split(".")[1]
    mac = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    forged = f"{header}.{payload}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    assert_invalid_client(
        app, post(client, jwt_form(issuer, forged)), "client_assertion.jws.algorithm_not_allowed"
    )


@pytest.mark.parametrize("trailing_dot", [True, False])
def test_unsigned_assertion_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer, trailing_dot: bool
) -> None:
    signed = assertion()
    unsigned = f"{b64json({'alg': 'none', 'typ': 'JWT'})}.{signed.split('.')[1]}" + (
        "." if trailing_dot else ""
    )
    reason = (
        "client_assertion.jws.algorithm_not_allowed"
        if trailing_dot
        else "client_assertion.jws.not_compact_jws"
    )
    assert_invalid_client(app, post(client, jwt_form(issuer, unsigned)), reason)


def test_deeply_nested_assertion_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    header, _, signature = assertion().split(".")
    nested = base64.urlsafe_b64encode(b"[" * 6000).rstrip(b"=").decode()
    response = post(client, jwt_form(issuer, f"{header}.{nested}.{signature}"))
    assert_invalid_client(app, response, "client_assertion.jws.malformed")


def test_tampered_assertion_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    header, payload, signature = assertion().split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["exp"] += 1
    tampered = f"{header}.{b64json(claims)}.{signature}"
    assert_invalid_client(app, post(client, jwt_form(issuer, tampered)), "client_assertion.jws.bad_signature")


@pytest.mark.parametrize("typ", ["at+jwt", "dpop+jwt", "secevent+jwt"])
def test_assertion_of_another_kind_is_refused_by_typ(
    app: Flask, client: FlaskClient, issuer: DevIssuer, typ: str
) -> None:
    response = post(client, jwt_form(issuer, assertion(header={"typ": typ})))
    assert_invalid_client(app, response, "client_assertion.typ_not_accepted")


def test_assertion_with_unknown_crit_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    header, payload, _ = assertion().split(".")
    protected = {"alg": "ES256", "kid": SIGNER_KEY.kid, "crit": ["urn:example:ext"], "urn:example:ext": 1}
    # joserfc will not sign an unknown critical header; an attacker need not ask it.
    response = post(client, jwt_form(issuer, f"{b64json(protected)}.{payload}.AAAA"))
    assert_invalid_client(app, response, "client_assertion.jws.crit_not_understood")
    del header


def test_form_client_id_differing_from_the_assertion_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    response = post(client, jwt_form(issuer, assertion(), client_id="gateway"))
    assert_invalid_client(app, response, "client_assertion.client_id_mismatch")


def test_assertion_for_a_secret_client_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    forged = assertion(iss="gateway", sub="gateway")
    assert_invalid_client(app, post(client, jwt_form(issuer, forged)), "client.wrong_auth_method")


def test_assertion_for_an_unknown_client_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    forged = assertion(iss="nobody", sub="nobody")
    assert_invalid_client(app, post(client, jwt_form(issuer, forged)), "client.unknown")


@pytest.mark.parametrize("kind", ["saml", "jwt-bearer-grant", "misspelt"])
def test_wrong_client_assertion_type_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer, kind: str
) -> None:
    assertion_type = {
        "saml": "urn:ietf:params:oauth:client-assertion-type:saml2-bearer",
        "jwt-bearer-grant": "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "misspelt": JWT_BEARER.upper(),
    }[kind]
    data = form(issuer, client_assertion_type=assertion_type, client_assertion=assertion())
    assert_invalid_client(app, post(client, data), "client.unsupported_assertion_type")


def test_assertion_without_its_type_is_invalid_request(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    response = post(client, form(issuer, client_assertion=assertion()))
    assert_invalid_request(app, response, "client.missing_client_assertion_type")


def test_assertion_type_without_an_assertion_is_invalid_request(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    response = post(client, form(issuer, client_assertion_type=JWT_BEARER))
    assert_invalid_request(app, response, "client.missing_client_assertion")


def test_repeated_client_assertion_is_invalid_request(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    data: dict[str, Any] = jwt_form(issuer, assertion())
    data["client_assertion"] = [assertion(), assertion()]
    assert_invalid_request(app, post(client, data), "request.repeated_parameter")


# ---------------------------------------------------------------------------
# Nothing secret is kept or echoed
# ---------------------------------------------------------------------------


def test_no_secret_or_assertion_reaches_the_audit_trail_or_a_response(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    wrong_secret = "wrong-" + uuid.uuid4().hex
    good_assertion, bad_assertion = assertion(), assertion(key=ECKey.generate_key("P-256"))
    expired_assertion = assertion(exp=int(time.time()) - 3600, iat=int(time.time()) - 3700)
    subject_tokens: list[str] = []
    attempts: list[tuple[dict[str, str], str | None]] = [
        (form(issuer), basic("gateway", GATEWAY_SECRET)),
        (form(issuer), basic("gateway", wrong_secret)),
        (form(issuer), basic("nobody", GATEWAY_SECRET)),
        (form(issuer), basic("poster", POSTER_SECRET)),
        (form(issuer), basic(ODD_CLIENT, ODD_SECRET)),
        (form(issuer, client_id="poster", client_secret=POSTER_SECRET), None),
        (form(issuer, client_id="poster", client_secret=wrong_secret), None),
        (form(issuer, client_id="gateway", client_secret=GATEWAY_SECRET), basic("gateway", GATEWAY_SECRET)),
        (jwt_form(issuer, good_assertion), None),
        (jwt_form(issuer, good_assertion), None),
        (jwt_form(issuer, bad_assertion), None),
        (jwt_form(issuer, expired_assertion), None),
        (form(issuer, client_assertion=good_assertion), None),
        (jwt_form(issuer, good_assertion, client_id="gateway"), None),
    ]
    first_event = len(list(app.extensions["sts"].audit.iter_all()))
    responses = []
    for data, authorization in attempts:
        subject_tokens.append(data["subject_token"])
        response = post(client, data, authorization=authorization)
        responses.append(response.get_data(as_text=True) + json.dumps(dict(response.headers)))
    assert (
        sum(1 for body in responses if '"access_token"' in body) == 5
    )  # poster by Basic too (RFC 6749 §2.3.1)

    secrets = [GATEWAY_SECRET, POSTER_SECRET, ODD_SECRET, wrong_secret, quote_plus(ODD_SECRET)]
    secrets += [basic("gateway", GATEWAY_SECRET).removeprefix("Basic ")]
    for token in (good_assertion, bad_assertion, expired_assertion):
        secrets += [token, token.split(".")[2]]
    secrets += subject_tokens
    records = list(app.extensions["sts"].audit.iter_all())[first_event:]
    assert len(records) == len(attempts)
    trail = json.dumps(records)
    for text in [*responses, trail]:
        for secret in secrets:
            assert secret not in text
    # What is kept instead: which client, how it tried, and the subject token's hash.
    assert {r["client_auth_method"] for r in records} >= {"client_secret_basic", "private_key_jwt"}
    assert all(len(r["subject_token_sha256"]) == 64 for r in records)


# ---------------------------------------------------------------------------
# Stored secrets (sts.core.client_secrets)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("secret", ["s3cret-value", POSTER_SECRET, ODD_SECRET, "ключ-🔑", " "])
def test_sha256_secret_hash_round_trip(secret: str) -> None:
    stored = hash_secret(secret)
    scheme, salt, digest = stored.split("$")
    assert scheme == "sha256"
    assert check_hash_format(stored)
    assert secret not in stored
    assert verify_secret(secret, stored) is True
    assert verify_secret(secret + "x", stored) is False
    assert verify_secret(secret[:-1], stored) is False
    assert verify_secret("", stored) is False
    # Salted: the same secret hashes differently each time, and both verify.
    again = hash_secret(secret)
    assert again != stored
    assert verify_secret(secret, again) is True
    del salt, digest


def test_pbkdf2_secret_hash_round_trip() -> None:
    """Slow on purpose (600 000 iterations): done once."""
    stored = hash_secret(SLOW_SECRET, slow=True)
    scheme, iterations, _, _ = stored.split("$")
    assert scheme == "pbkdf2-sha256"
    assert int(iterations) == PBKDF2_ITERATIONS >= 600_000
    assert check_hash_format(stored)
    assert SLOW_SECRET not in stored
    assert verify_secret(SLOW_SECRET, stored) is True
    assert verify_secret(SLOW_SECRET.upper(), stored) is False


def test_unknown_client_never_verifies() -> None:
    """With no stored hash a dummy one is checked (same cost), and the answer is always no."""
    for candidate in ["", "anything", "A" * 43]:
        assert verify_secret(candidate, None) is False


@pytest.mark.parametrize("flip", [0, 10, -1], ids=["first", "middle", "last"])
def test_secrets_differing_anywhere_are_refused(flip: int) -> None:
    """A constant-time comparison still compares everything: a difference in any position refuses."""
    secret = "0123456789abcdefghijklmnopqrstuvwxyz"
    stored = hash_secret(secret)
    chars = list(secret)
    chars[flip] = "#"
    assert verify_secret("".join(chars), stored) is False


def test_secret_that_is_not_valid_unicode_does_not_crash() -> None:
    """A form value decoded with surrogateescape must compare, not raise."""
    stored = hash_secret("secret")
    assert verify_secret("secr\udcffet", stored) is False


@pytest.mark.parametrize(
    "stored",
    [
        "plaintext-secret",
        "",
        "sha256$",
        "sha256$c2hvcnQ$" + "A" * 43,
        "sha256$AAAAAAAAAAAAAAAAAAAAAA$short",
        "pbkdf2-sha256$1000$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,
        "pbkdf2-sha256$many$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,
        "md5$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 22,
    ],
)
def test_hash_format_check_refuses_what_verify_cannot_use(stored: str) -> None:
    assert check_hash_format(stored) is False


def test_app_refuses_to_start_with_a_plaintext_secret(make_settings: Callable[..., Settings]) -> None:
    clients = [
        *DEFAULT_CLIENTS,
        {"client_id": "plain", "auth_method": "client_secret_basic", "secret_hash": "hunter2"},
    ]
    with pytest.raises(ConfigurationError, match="secret_hash"):
        create_app(make_settings(clients=clients))


@pytest.mark.parametrize("endpoint", ["/token", "/introspect", "/revoke"])
def test_an_unregistered_client_id_is_recorded_only_as_a_digest(
    app: Flask, client: FlaskClient, issuer: DevIssuer, endpoint: str
) -> None:
    """A client that swaps its credentials in a Basic header sends its secret as the client id:
    that "id" names no client, so the audit trail keeps only a digest of it (an outside audit found
    a client secret stored in the clear, and shown by the review page and ``sts audit``)."""
    data = form(issuer) if endpoint == "/token" else {"token": "x"}
    response = post(client, data, authorization=basic(GATEWAY_SECRET, GATEWAY_SECRET), path=endpoint)
    assert_invalid_client(app, response, "client.unknown")
    record = last_record(app)
    stored = json.dumps(record, ensure_ascii=False)
    assert GATEWAY_SECRET not in stored
    digest = hashlib.sha256(GATEWAY_SECRET.encode()).hexdigest()[:32]
    assert f"unregistered:{digest}" in stored
    # A registered client's id is recorded as it is, refused or not.
    post(client, data, authorization=basic("gateway", "wrong"), path=endpoint)
    assert "gateway" in json.dumps(last_record(app))
