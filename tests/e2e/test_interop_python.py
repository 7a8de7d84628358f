"""Interoperability with Python OAuth/JOSE libraries we did not write, over real HTTP.

* google-auth's RFC 8693 client (``google.oauth2.sts.Client``), anonymous and
  with ``client_secret_basic``;
* Authlib's ``OAuth2Session.fetch_token`` with ``client_secret_basic`` and
  with ``private_key_jwt`` (``authlib.oauth2.rfc7523.PrivateKeyJWT``);
* PyJWT's ``PyJWKClient`` + ``jwt.decode`` verifying an issued token against
  our published JWKS.

The service runs on a threaded werkzeug server on loopback whose issuer is its
own ``http://127.0.0.1:<port>`` URL (see ``live_sts.py``).  Library quirks
these tests pin down:

* google-auth and Authlib both send ``Authorization: Basic`` as
  ``base64(client_id ":" secret)`` *without* the RFC 6749 §2.3.1
  form-encoding.  The server tries the secret both form-decoded (the RFC)
  and as sent, so operator-chosen secrets with ``+`` or ``%`` work with them.
* Authlib's ``PrivateKeyJWT`` imports a ``client_secret`` that is not already
  a joserfc key as an *RSA* key, so an EC key must be passed as a joserfc
  ``ECKey`` (imported from PEM or JWK) together with ``alg="ES256"``.  Its
  assertion's ``aud`` is the token endpoint URL unless an explicit
  ``token_endpoint`` is given; the server accepts the issuer or the token
  endpoint.  It sends no ``client_id`` in the body (nor does its
  ``client_secret_basic``).
* Authlib's assertions live 3600 s, with no ``PrivateKeyJWT`` option to
  shorten them; the server's default ``max_client_assertion_lifetime`` is
  therefore 3600 s.  A deployment that lowers it must have such clients sign
  shorter assertions (``expires_in`` of ``private_key_jwt_sign``).
* ``PrivateKeyJWT(claims={...})`` stores the first generated ``jti`` in that
  dict, so every later assertion repeats it and the server refuses it as a
  replay.
* Authlib posts ``data=dict(url_decode(body))``: a repeated parameter
  (``audience``/``resource``) keeps only one value.  Not used here.
"""

from __future__ import annotations

import base64
import copy
import json
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs

import google.auth.exceptions
import google.auth.transport.requests
import jwt as pyjwt
import pytest
import requests
from authlib.integrations.base_client import OAuthError as AuthlibOAuthError
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2.rfc7523 import PrivateKeyJWT, private_key_jwt_sign
from google.oauth2 import sts as google_sts
from google.oauth2.utils import ClientAuthentication, ClientAuthType
from joserfc import jwt
from joserfc.jwk import ECKey
from oauthlib.oauth2 import Client as OAuthlibClient
from oauthlib.oauth2.rfc6749.errors import OAuth2Error as OAuthlibError

from sts.core.client_secrets import generate_secret, hash_secret
from sts.dev.issuer import RunningServer
from sts.settings import Settings
from tests.conftest import (
    ACCESS_TOKEN_TYPE,
    DEFAULT_CLIENTS,
    DEFAULT_POLICY,
    GATEWAY_SECRET,
    JWT_TYPE,
    POSTER_SECRET,
    SIGNER_KEY,
    TOKEN_EXCHANGE,
)
from tests.e2e.live_sts import LiveSts, serve_sts

DEPLOY = "https://deploy.example.com"
LEDGER_RESOURCE = "https://ledger.example.com/api"
TIMEOUT = 10
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

#: A client_secret_basic client whose secret comes from the service's own generator.
GENERATED_CLIENT = "generated"
GENERATED_SECRET = generate_secret()
CHOSEN_CLIENT = "chosen"
CHOSEN_SECRET = "op+chosen/secret%41 x"


@pytest.fixture
def live(make_settings: Callable[..., Settings], upstream: RunningServer) -> Iterator[LiveSts]:
    clients = [
        *DEFAULT_CLIENTS,
        {
            "client_id": GENERATED_CLIENT,
            "auth_method": "client_secret_basic",
            "secret_hash": hash_secret(GENERATED_SECRET),
        },
        {
            "client_id": CHOSEN_CLIENT,
            "auth_method": "client_secret_basic",
            "secret_hash": hash_secret(CHOSEN_SECRET),
        },
    ]
    policy = copy.deepcopy(DEFAULT_POLICY)
    policy["rules"][1]["clients"] = [*policy["rules"][1]["clients"], GENERATED_CLIENT, CHOSEN_CLIENT]
    with serve_sts(make_settings, upstream, clients=clients, policy=policy) as server:
        yield server


def _b64json(part: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def claims_of(token: str) -> dict[str, Any]:
    """The payload of a compact JWS, unverified (the PyJWT and jose tests verify)."""
    return _b64json(token.split(".")[1])


def header_of(token: str) -> dict[str, Any]:
    return _b64json(token.split(".")[0])


# -- google-auth --------------------------------------------------------------------------------


def google_request() -> google.auth.transport.requests.Request:
    return google.auth.transport.requests.Request()


def test_google_auth_sts_client_exchanges_without_client_authentication(live: LiveSts) -> None:
    subject = live.github_actions_token()
    response = google_sts.Client(live.token_endpoint).exchange_token(
        request=google_request(),
        grant_type=TOKEN_EXCHANGE,
        subject_token=subject,
        subject_token_type=JWT_TYPE,
        audience=DEPLOY,
        requested_token_type=ACCESS_TOKEN_TYPE,
        scopes=["deploy:write"],
    )
    assert response["issued_token_type"] == ACCESS_TOKEN_TYPE
    assert response["token_type"] == "Bearer"
    assert 0 < response["expires_in"] <= 300
    assert response["scope"] == "deploy:write"
    claims = claims_of(response["access_token"])
    assert claims["iss"] == live.issuer
    assert claims["aud"] in (DEPLOY, [DEPLOY])
    assert claims["sub"] == "repo:acme/app:ref:refs/heads/main"
    assert claims["scope"] == "deploy:write"


def test_google_auth_surfaces_our_error_code(live: LiveSts) -> None:
    with pytest.raises(google.auth.exceptions.OAuthError) as raised:
        google_sts.Client(live.token_endpoint).exchange_token(
            request=google_request(),
            grant_type=TOKEN_EXCHANGE,
            subject_token=live.github_actions_token(),
            subject_token_type=JWT_TYPE,
            audience="https://elsewhere.example.com",
            scopes=["deploy:read"],
        )
    message, body = raised.value.args
    assert message.startswith("Error code invalid_target: ")
    assert json.loads(body)["error"] == "invalid_target"


@pytest.mark.parametrize(
    ("client_id", "secret"),
    [("gateway", GATEWAY_SECRET), (GENERATED_CLIENT, GENERATED_SECRET), (CHOSEN_CLIENT, CHOSEN_SECRET)],
    ids=["gateway", "generated-secret", "chosen-secret-sent-without-form-encoding"],
)
def test_google_auth_with_client_secret_basic(live: LiveSts, client_id: str, secret: str) -> None:
    client = google_sts.Client(
        live.token_endpoint,
        client_authentication=ClientAuthentication(ClientAuthType.basic, client_id, secret),
    )
    response = client.exchange_token(
        request=google_request(),
        grant_type=TOKEN_EXCHANGE,
        subject_token=live.kubernetes_token(),
        subject_token_type=JWT_TYPE,
        audience="ledger",
        resource=LEDGER_RESOURCE,
        scopes=["ledger:read", "ledger:write"],
    )
    assert response["issued_token_type"] == ACCESS_TOKEN_TYPE
    assert response["token_type"] == "Bearer"
    assert 0 < response["expires_in"] <= 600
    assert set(response["scope"].split()) == {"ledger:read", "ledger:write"}
    claims = claims_of(response["access_token"])
    assert claims["client_id"] == client_id
    assert claims["sub"] == "system:serviceaccount:payments:api"
    assert sorted(claims["aud"]) == sorted(["ledger", LEDGER_RESOURCE])


def test_google_auth_with_a_wrong_secret_gets_invalid_client(live: LiveSts) -> None:
    client = google_sts.Client(
        live.token_endpoint,
        client_authentication=ClientAuthentication(ClientAuthType.basic, "gateway", GATEWAY_SECRET + "x"),
    )
    with pytest.raises(google.auth.exceptions.OAuthError) as raised:
        client.exchange_token(
            request=google_request(),
            grant_type=TOKEN_EXCHANGE,
            subject_token=live.kubernetes_token(),
            subject_token_type=JWT_TYPE,
            audience="ledger",
        )
    assert json.loads(raised.value.args[1])["error"] == "invalid_client"


def test_google_auth_without_client_authentication_where_the_rule_requires_it(live: LiveSts) -> None:
    with pytest.raises(google.auth.exceptions.OAuthError) as raised:
        google_sts.Client(live.token_endpoint).exchange_token(
            request=google_request(),
            grant_type=TOKEN_EXCHANGE,
            subject_token=live.kubernetes_token(),
            subject_token_type=JWT_TYPE,
            audience="ledger",
        )
    assert json.loads(raised.value.args[1])["error"] == "invalid_client"


# -- Authlib ------------------------------------------------------------------------------------


def test_authlib_fetch_token_with_client_secret_basic(live: LiveSts) -> None:
    sent: list[Any] = []
    with OAuth2Session("gateway", GATEWAY_SECRET, scope="ledger:read") as session:
        assert session.token_endpoint_auth_method == "client_secret_basic"
        session.hooks["response"].append(lambda response, **_: sent.append(response.request))
        token = session.fetch_token(live.token_endpoint, **ledger_exchange(live, audience="ledger"))
    assert token["issued_token_type"] == ACCESS_TOKEN_TYPE
    assert token["token_type"] == "Bearer"
    assert token["scope"] == "ledger:read"
    assert 0 < token["expires_in"] <= 600
    claims = claims_of(token["access_token"])
    assert token["expires_at"] >= claims["exp"] - 2
    assert claims["client_id"] == "gateway"
    assert claims["aud"] in ("ledger", ["ledger"])
    (request,) = sent
    assert request.headers["Authorization"].startswith("Basic ")
    assert not {"client_id", "client_secret"} & set(_form(request.body))


def test_authlib_fetch_token_with_client_secret_post(live: LiveSts) -> None:
    """The poster's secret has a space, ``/``, ``+`` and ``:``: form-encoding in the body round-trips them."""
    with OAuth2Session("poster", POSTER_SECRET, token_endpoint_auth_method="client_secret_post") as session:
        token = session.fetch_token(live.token_endpoint, **ledger_exchange(live, audience="ledger"))
    assert claims_of(token["access_token"])["client_id"] == "poster"


def test_authlib_surfaces_our_error_code(live: LiveSts) -> None:
    with OAuth2Session("gateway", "not-the-secret") as session, pytest.raises(AuthlibOAuthError) as raised:
        session.fetch_token(
            live.token_endpoint,
            grant_type=TOKEN_EXCHANGE,
            subject_token=live.kubernetes_token(),
            subject_token_type=JWT_TYPE,
            audience="ledger",
            timeout=TIMEOUT,
        )
    assert raised.value.error == "invalid_client"


class ShortLivedPrivateKeyJWT(PrivateKeyJWT):
    """Authlib's ``PrivateKeyJWT`` with assertions that live ``expires_in`` seconds.

    Authlib 1.9 signs every assertion for 3600 s and gives ``PrivateKeyJWT`` no
    way to change that; ``private_key_jwt_sign`` takes ``expires_in``.  The
    claims are copied because Authlib writes the generated ``jti`` into the
    dict it was given, so every later assertion would repeat it.
    """

    def __init__(self, token_endpoint: str | None = None, *, expires_in: int, **kwargs: Any) -> None:
        super().__init__(token_endpoint, **kwargs)
        self.expires_in = expires_in

    def sign(self, auth: Any, token_endpoint: str) -> str:
        return private_key_jwt_sign(
            auth.client_secret,
            client_id=auth.client_id,
            token_endpoint=token_endpoint,
            alg=self.alg,
            claims=dict(self.claims or {}),
            header=self.headers,
            expires_in=self.expires_in,
        )


def signer_key_from_pem() -> ECKey:
    # Authlib imports a PEM string given as client_secret as an RSA key: hand it a joserfc ECKey.
    return ECKey.import_key(SIGNER_KEY.as_pem(private=True))


def signer_key_from_jwk() -> ECKey:
    return ECKey.import_key(SIGNER_KEY.as_dict(private=True))


def signer_session(auth: PrivateKeyJWT, key: ECKey, sent: list[dict[str, str]]) -> OAuth2Session:
    session = OAuth2Session("signer", key, token_endpoint_auth_method="private_key_jwt")
    session.register_client_auth_method(auth)
    session.hooks["response"].append(lambda response, **_: sent.append(_form(response.request.body)))
    return session


def ledger_exchange(live: LiveSts, **params: Any) -> dict[str, Any]:
    return {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": live.kubernetes_token(),
        "subject_token_type": JWT_TYPE,
        "timeout": TIMEOUT,
        **params,
    }


@pytest.mark.parametrize(
    ("load_key", "assertion_audience"),
    [(signer_key_from_pem, "token_endpoint"), (signer_key_from_jwk, "issuer")],
    ids=["pem-key-aud-token-endpoint", "jwk-key-aud-issuer"],
)
def test_authlib_fetch_token_with_private_key_jwt(
    live: LiveSts, load_key: Callable[[], ECKey], assertion_audience: str
) -> None:
    # Authlib signs with `token_endpoint` as `aud`, defaulting to the URL it posts to.
    endpoint = live.issuer if assertion_audience == "issuer" else None
    auth = ShortLivedPrivateKeyJWT(endpoint, alg="ES256", expires_in=120)
    sent: list[dict[str, str]] = []
    with signer_session(auth, load_key(), sent) as session:
        token = session.fetch_token(
            live.token_endpoint, **ledger_exchange(live, resource=LEDGER_RESOURCE, scope="ledger:write")
        )
    assert token["issued_token_type"] == ACCESS_TOKEN_TYPE
    assert token["scope"] == "ledger:write"
    claims = claims_of(token["access_token"])
    assert claims["client_id"] == "signer"
    assert claims["aud"] in (LEDGER_RESOURCE, [LEDGER_RESOURCE])
    # What Authlib actually sent: an ES256 assertion for the endpoint or the issuer, and no client_id.
    (form,) = sent
    assert "client_id" not in form
    assert form["client_assertion_type"] == JWT_BEARER
    assertion = form["client_assertion"]
    assert header_of(assertion)["alg"] == "ES256"
    assertion_claims = claims_of(assertion)
    assert assertion_claims["aud"] == (live.issuer if endpoint else live.token_endpoint)
    assert assertion_claims["iss"] == assertion_claims["sub"] == "signer"
    assert assertion_claims["exp"] - assertion_claims["iat"] == 120


def test_authlib_default_hour_long_assertion_exceeds_a_lowered_cap(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    """Authlib's stock ``PrivateKeyJWT`` asserts for 3600 s: refused where the cap is lowered to 300 s."""
    sent: list[dict[str, str]] = []
    with (
        serve_sts(make_settings, upstream, max_client_assertion_lifetime=300) as live,
        signer_session(PrivateKeyJWT(alg="ES256"), signer_key_from_jwk(), sent) as session,
        pytest.raises(AuthlibOAuthError) as raised,
    ):
        session.fetch_token(live.token_endpoint, **ledger_exchange(live, audience="ledger"))
    assert raised.value.error == "invalid_client"
    (form,) = sent
    assertion_claims = claims_of(form["client_assertion"])
    assert assertion_claims["exp"] - assertion_claims["iat"] == 3600


def test_authlib_default_private_key_jwt_works_out_of_the_box(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    with serve_sts(make_settings, upstream) as live:
        sent: list[dict[str, str]] = []
        with signer_session(PrivateKeyJWT(alg="ES256"), signer_key_from_jwk(), sent) as session:
            token = session.fetch_token(live.token_endpoint, **ledger_exchange(live, audience="ledger"))
    assert token["token_type"] == "Bearer"
    assert claims_of(token["access_token"])["client_id"] == "signer"
    assert claims_of(sent[0]["client_assertion"])["aud"] == live.token_endpoint


def test_authlib_private_key_jwt_replayed_assertion_is_refused(live: LiveSts) -> None:
    """A fixed ``jti`` (Authlib lets callers set claims) is usable once: the second request fails."""
    auth = ShortLivedPrivateKeyJWT(alg="ES256", expires_in=120, claims={"jti": "fixed-jti-for-replay"})
    sent: list[dict[str, str]] = []
    with signer_session(auth, signer_key_from_jwk(), sent) as session:
        first = session.fetch_token(live.token_endpoint, **ledger_exchange(live, audience="ledger"))
        assert first["token_type"] == "Bearer"
        with pytest.raises(AuthlibOAuthError) as raised:
            session.fetch_token(live.token_endpoint, **ledger_exchange(live, audience="ledger"))
    assert raised.value.error == "invalid_client"
    assert [claims_of(f["client_assertion"])["jti"] for f in sent] == ["fixed-jti-for-replay"] * 2


def _form(body: str | bytes | None) -> dict[str, str]:
    text = body.decode() if isinstance(body, bytes) else body or ""
    return {k: v[0] for k, v in parse_qs(text).items()}


# -- PyJWT --------------------------------------------------------------------------------------


def test_pyjwt_verifies_an_issued_token_from_our_jwks_url(live: LiveSts) -> None:
    token = google_sts.Client(live.token_endpoint).exchange_token(
        request=google_request(),
        grant_type=TOKEN_EXCHANGE,
        subject_token=live.github_actions_token(),
        subject_token_type=JWT_TYPE,
        audience=DEPLOY,
    )["access_token"]
    jwks = pyjwt.PyJWKClient(live.jwks_uri, cache_keys=False, timeout=TIMEOUT)
    signing_key = jwks.get_signing_key_from_jwt(token)
    assert signing_key.key_id == pyjwt.get_unverified_header(token)["kid"]
    claims = pyjwt.decode(
        token,
        signing_key.key,
        algorithms=["ES256"],
        audience=DEPLOY,
        issuer=live.issuer,
        options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"]},
    )
    assert pyjwt.get_unverified_header(token)["typ"] == "at+jwt"
    assert claims["scope"] == "deploy:read"
    assert claims["client_id"] == claims["sub"] == "repo:acme/app:ref:refs/heads/main"

    with pytest.raises(pyjwt.InvalidAudienceError):
        pyjwt.decode(token, signing_key.key, algorithms=["ES256"], audience="ledger", issuer=live.issuer)
    with pytest.raises(pyjwt.InvalidIssuerError):
        pyjwt.decode(token, signing_key.key, algorithms=["ES256"], audience=DEPLOY, issuer="https://sts.test")
    with pytest.raises(pyjwt.InvalidAlgorithmError):
        pyjwt.decode(token, signing_key.key, algorithms=["RS256"], audience=DEPLOY, issuer=live.issuer)


def test_pyjwt_jwk_client_takes_every_published_key(live: LiveSts) -> None:
    """PyJWKClient reads the whole JWK Set (the active and the next key): each one is a usable
    public signing key to it, labelled with ``kid``, ``use`` and ``alg`` (RFC 7517 §4)."""
    published = requests.get(live.jwks_uri, timeout=TIMEOUT).json()["keys"]
    signing_keys = pyjwt.PyJWKClient(live.jwks_uri, cache_keys=False, timeout=TIMEOUT).get_signing_keys()
    assert sorted(k.key_id for k in signing_keys) == sorted(k["kid"] for k in published)
    assert len(published) >= 2  # publish-before-use: the next key is already out
    for key in signing_keys:
        assert key.algorithm_name == "ES256" and key.public_key_use == "sig"


# -- oauthlib -------------------------------------------------------------------------------------


def test_oauthlib_parses_our_token_answers(live: LiveSts, monkeypatch: pytest.MonkeyPatch) -> None:
    """oauthlib's RFC 6749 §5.1/§5.2 response parsing: our Bearer and DPoP answers are tokens with
    their type, lifetime and granted scope; our errors become its errors, with our code."""
    monkeypatch.setenv("OAUTHLIB_STRICT_TOKEN_TYPE", "1")  # token_type must be there (RFC 6749 §5.1)
    client = OAuthlibClient("repo:acme/app")

    def exchange(**headers: str) -> requests.Response:
        return requests.post(
            live.token_endpoint,
            data={
                "grant_type": TOKEN_EXCHANGE,
                "subject_token": live.github_actions_token(),
                "subject_token_type": JWT_TYPE,
                "audience": DEPLOY,
                "scope": "deploy:read",
            },
            headers=headers,
            timeout=TIMEOUT,
        )

    bearer = client.parse_request_body_response(exchange().text, scope=["deploy:read"])
    assert bearer["token_type"] == "Bearer" and bearer["scope"] == ["deploy:read"]
    assert isinstance(bearer["expires_in"], int) and bearer["expires_in"] > 0
    assert bearer["issued_token_type"] == ACCESS_TOKEN_TYPE

    key = ECKey.generate_key("P-256")
    proof = jwt.encode(
        {"typ": "dpop+jwt", "alg": "ES256", "jwk": key.as_dict(private=False)},
        {"jti": generate_secret(), "htm": "POST", "htu": live.token_endpoint, "iat": int(time.time())},
        key,
        algorithms=["ES256"],
    )
    bound = client.parse_request_body_response(exchange(DPoP=proof).text, scope=["deploy:read"])
    assert bound["token_type"] == "DPoP"

    with pytest.raises(OAuthlibError) as refused:
        client.parse_request_body_response(exchange(DPoP="not-a-proof").text)
    assert refused.value.error == "invalid_dpop_proof"
