"""Known attacks on JWT consumers, aimed at the subject token of ``POST /token``.

RFC 8725 §2 lists them and §3 the defences (STANDARDS.md "JWT handling"):
algorithm allow-lists without ``none`` or HMAC, keys only from the issuer's
own key set (never the token's ``jwk``/``jku``/``x5u``/``x5c``), exact
``iss``, required ``aud`` and ``exp``, explicit ``typ``, unknown ``crit``
refused, weak keys refused.  RFC 8693 §2.2.2: a subject token that fails
validation is ``invalid_request`` (400); nothing is issued, and the audit
record names the check that failed.

Every token here is signed by a real key and checked against a real JWKS
served over HTTP on loopback (the ``upstream`` dev issuer, or a small key-set
server for key sets the dev issuer refuses to publish).  Time moves through
an injected clock; nothing sleeps.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask
from flask.testing import FlaskClient
from joserfc import jwe, jwt
from joserfc.jwk import ECKey, OctKey, RSAKey
from werkzeug.test import TestResponse

from sts.app import create_app
from sts.core.attest import VerifiedToken, verify_token
from sts.core.jose import MAX_HEADER_CHARS, MAX_JWT_BYTES, MAX_RSA_BITS, JWSInvalid, parse_compact
from sts.dev.issuer import DevIssuer, RunningServer
from sts.errors import InvalidRequest
from sts.settings import Settings
from tests.conftest import DEFAULT_POLICY, FORM, JWT_TYPE, STS_ISSUER, exchange_form, settings_for
from tests.support.clock import Clock
from tests.support.crafted_jose import (
    NOT_UTF8,
    KeySetServer,
    rsa_key_with_exponent_3,
    self_signed_x5c,
    sign_encoded,
)

DEPLOY_AUDIENCE = "https://deploy.example.com"
DEPLOY_SUBJECT = "repo:acme/app:ref:refs/heads/main"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
#: HttpJWKS's default minimum time between two fetches of one issuer's key set.
REFETCH_INTERVAL = 30
#: The dev issuer serves its key set with ``Cache-Control: max-age=300``.
JWKS_FRESH_FOR = 300


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: object) -> str:
    return b64url(json.dumps(value).encode())


def segments(token: str) -> list[str]:
    return token.split(".")


def deploy_claims(issuer: DevIssuer, now: float, **overrides: Any) -> dict[str, Any]:
    """Claims that the ``deploy`` rule grants for (anonymous client); ``None`` removes a claim."""
    claims: dict[str, Any] = {
        "iss": issuer.issuer_url,
        "sub": DEPLOY_SUBJECT,
        "aud": STS_ISSUER,
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now) + 300,
        "jti": str(uuid.uuid4()),
        "repository_id": "123456",
    }
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not None}


def post_token(client: FlaskClient, token: str, **params: Any) -> TestResponse:
    params.setdefault("audience", DEPLOY_AUDIENCE)
    return client.post("/token", data=exchange_form(token, **params), content_type=FORM)


def last_record(app: Flask) -> dict[str, Any]:
    records = app.extensions["sts"].audit.recent(limit=1)
    assert records, "no audit record was written"
    record: dict[str, Any] = records[0]
    return record


def assert_granted(app: Flask, response: TestResponse) -> None:
    assert response.status_code == 200, (response.get_json(), last_record(app)["reasons"])
    assert response.get_json()["access_token"]
    assert last_record(app)["outcome"] == "granted"


def assert_refused(app: Flask, response: TestResponse, reason: str) -> None:
    """400 ``invalid_request``, no token, and an audit record tagged ``subject_token.<reason>``."""
    body = response.get_json()
    assert response.status_code == 400, body
    assert body["error"] == "invalid_request"
    assert "access_token" not in body
    assert response.headers["Cache-Control"] == "no-store"
    record = last_record(app)
    assert record["outcome"] == "refused"
    assert record["error"] == "invalid_request"
    assert f"subject_token.{reason}" in record["reasons"], record["reasons"]
    assert record["issued_jti"] is None


def assert_unavailable(app: Flask, response: TestResponse) -> None:
    body = response.get_json()
    assert response.status_code == 503, body
    assert body["error"] == "temporarily_unavailable"
    assert "access_token" not in body
    assert int(response.headers["Retry-After"]) > 0
    record = last_record(app)
    assert record["outcome"] == "refused"
    assert "subject_token.issuer_keys_unavailable" in record["reasons"], record["reasons"]


def hs256(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 compact JWS made by hand, as an attacker would (libraries refuse PEM secrets)."""
    signing_input = f"{b64json(header)}.{b64json(claims)}"
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def weak_rsa_key() -> RSAKey:
    """A 1024-bit RSA key (joserfc warns when making one; the warning is expected here)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the point
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RSAKey.import_key(pem, {"kid": "weak-1024", "use": "sig", "alg": "RS256"})


@pytest.fixture
def key_set_server() -> Iterator[KeySetServer]:
    server = KeySetServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_upstream() -> Iterator[RunningServer]:
    """One dev issuer for the tests that only read from it (building one per test is most of the time)."""
    with DevIssuer.serve_ephemeral(alg="RS256") as server:
        yield server


@pytest.fixture(scope="module")
def shared_app(tmp_path_factory: pytest.TempPathFactory, shared_upstream: RunningServer) -> Flask:
    """The default configuration (as ``make_settings()`` builds it), trusting ``shared_upstream``."""
    return create_app(settings_for(tmp_path_factory.mktemp("jwt-attacks"), shared_upstream))


@pytest.fixture
def app(shared_app: Flask) -> Flask:
    """Overrides conftest's ``app``: tests that change the issuer or the clock build their own."""
    return shared_app


@pytest.fixture
def issuer(shared_upstream: RunningServer) -> DevIssuer:
    return shared_upstream.issuer


@pytest.fixture
def timed_app(make_settings: Callable[..., Settings], clock: Clock) -> Flask:
    """The default app, with its clock (and so its JWKS cache's clock) under the test's control."""
    return create_app(make_settings(), clock=clock)


def app_trusting(
    make_settings: Callable[..., Settings],
    upstream: RunningServer,
    *,
    name: str,
    iss: str,
    jwks_uri: str,
    algorithms: list[str],
) -> Flask:
    """An app trusting ``upstream`` and one more issuer, with a copy of the ``deploy`` rule for it."""
    policy = copy.deepcopy(DEFAULT_POLICY)
    policy["rules"].append({**copy.deepcopy(policy["rules"][0]), "name": f"deploy-{name}", "issuer": name})
    issuers = [
        {
            "name": "upstream",
            "issuer": upstream.issuer.issuer_url,
            "jwks_uri": upstream.jwks_uri,
            "algorithms": ["RS256"],
            "audiences": [STS_ISSUER],
        },
        {
            "name": name,
            "issuer": iss,
            "jwks_uri": jwks_uri,
            "algorithms": algorithms,
            "audiences": [STS_ISSUER],
        },
    ]
    return create_app(make_settings(policy, issuers=issuers))


@pytest.fixture
def ec_upstream() -> Iterator[RunningServer]:
    """A second dev issuer, signing ES256: its keys are small enough for a JWS header (at most 512 bytes)."""
    with DevIssuer.serve_ephemeral(alg="ES256") as server:
        yield server


@pytest.fixture
def ec_app(
    make_settings: Callable[..., Settings], upstream: RunningServer, ec_upstream: RunningServer
) -> Flask:
    return app_trusting(
        make_settings,
        upstream,
        name="ec",
        iss=ec_upstream.issuer.issuer_url,
        jwks_uri=ec_upstream.jwks_uri,
        algorithms=["ES256"],
    )


# ---------------------------------------------------------------------------
# The baseline: a well-formed token is granted (so the refusals below mean something)
# ---------------------------------------------------------------------------


def test_well_formed_token_is_granted(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    token = issuer.mint(deploy_claims(issuer, time.time()), header={"typ": "JWT"})
    assert_granted(app, post_token(client, token))


# ---------------------------------------------------------------------------
# Algorithm attacks (RFC 8725 §2.1, §3.1, §3.2)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("trailing_dot", [True, False], ids=["with-dot", "without-dot"])
@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer, alg: str, trailing_dot: bool
) -> None:
    unsigned = f"{b64json({'alg': alg, 'typ': 'JWT'})}.{b64json(deploy_claims(issuer, time.time()))}"
    token = unsigned + "." if trailing_dot else unsigned
    reason = "jws.algorithm_not_allowed" if trailing_dot else "jws.not_compact_jws"
    assert_refused(app, post_token(client, token), reason)


@pytest.mark.parametrize("secret_form", ["pem", "der", "jwk-json"])
def test_hmac_signed_with_the_issuers_public_key_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer, secret_form: str
) -> None:
    """Key confusion: the RSA public key, which anyone can fetch, used as an HMAC secret."""
    jwk = issuer.jwks()["keys"][0]
    public = RSAKey.import_key(dict(jwk))
    secret = {
        "pem": public.as_pem(private=False),
        "der": public.as_der(private=False),
        "jwk-json": json.dumps(jwk).encode(),
    }[secret_form]
    token = hs256(
        {"alg": "HS256", "typ": "JWT", "kid": issuer.kid}, deploy_claims(issuer, time.time()), secret
    )
    assert_refused(app, post_token(client, token), "jws.algorithm_not_allowed")


def test_es256_from_an_rs256_only_issuer_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    attacker = ECKey.generate_key("P-256", auto_kid=True)
    token = issuer.mint(
        deploy_claims(issuer, time.time()), header={"typ": "JWT", "kid": issuer.kid}, key=attacker
    )
    assert_refused(app, post_token(client, token), "jws.algorithm_not_allowed")


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({"kid": "x"}, "jws.malformed"),
        ({"alg": None}, "jws.missing_alg"),
        ({"alg": 256}, "jws.missing_alg"),
        ({"alg": ["RS256"]}, "jws.missing_alg"),
        ({"alg": ""}, "jws.algorithm_not_allowed"),
        ({"alg": "rs256"}, "jws.algorithm_not_allowed"),
    ],
)
def test_missing_or_odd_alg_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer, header: dict[str, Any], reason: str
) -> None:
    """An ``alg`` that is absent, not a string, or not exactly an allowed name (with a real signature)."""
    _, payload, signature = segments(issuer.mint(deploy_claims(issuer, time.time())))
    assert_refused(app, post_token(client, f"{b64json(header)}.{payload}.{signature}"), reason)


# ---------------------------------------------------------------------------
# Key selection (RFC 8725 §3.10: never from the token's own header)
# ---------------------------------------------------------------------------


def test_kid_naming_no_published_key_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    token = issuer.mint(deploy_claims(issuer, time.time()), header={"typ": "JWT", "kid": "no-such-key"})
    assert_refused(app, post_token(client, token), "unknown_kid")


@pytest.mark.parametrize("embedding", ["jwk", "jku", "x5u", "x5c"])
def test_key_offered_in_the_header_is_never_used(
    ec_app: Flask, ec_upstream: RunningServer, embedding: str
) -> None:
    """An attacker signs with its own key and offers it in the header; the published key is used, and fails.

    The real ``kid`` is named (or, for ``x5c``, none: the issuer's only key is
    then chosen), so a verifier that trusted the header would accept the token.
    """
    issuer = ec_upstream.issuer
    client = ec_app.test_client()
    with DevIssuer.serve_ephemeral(alg="ES256") as attacker_server:
        attacker = attacker_server.issuer
        attacker_jwk = attacker.jwks()["keys"][0]
        # The x5c certificate needs a private key the test holds; the others use the attacker issuer's.
        certified = ECKey.generate_key("P-256")
        offered: Any = {
            "jwk": {name: attacker_jwk[name] for name in ("kty", "crv", "x", "y")},
            "jku": attacker_server.jwks_uri,
            "x5u": attacker_server.url + "/cert.pem",
            "x5c": self_signed_x5c(certified),
        }[embedding]
        header = {"kid": None if embedding == "x5c" else issuer.kid, embedding: offered}
        token = attacker.mint(
            deploy_claims(issuer, time.time()), header=header, key=certified if embedding == "x5c" else None
        )
        # joserfc refuses headers over 512 bytes before anything else; this one must get further.
        assert len(segments(token)[0]) <= 512
        assert_refused(ec_app, post_token(client, token), "jws.bad_signature")
        assert attacker.jwks_requests == 0
    # The same issuer's genuine tokens pass, so the refusal is about the offered key.
    assert_granted(ec_app, post_token(client, issuer.mint(deploy_claims(issuer, time.time()))))


@pytest.mark.parametrize("embedding", ["jwk", "jku"])
def test_attackers_own_kid_with_an_offered_key_is_unknown(
    ec_app: Flask, ec_upstream: RunningServer, embedding: str
) -> None:
    issuer = ec_upstream.issuer
    with DevIssuer.serve_ephemeral(alg="ES256") as attacker_server:
        attacker = attacker_server.issuer
        offered = attacker_server.jwks_uri if embedding == "jku" else attacker.jwks()["keys"][0]
        token = attacker.mint(deploy_claims(issuer, time.time()), header={embedding: offered})
        assert_refused(ec_app, post_token(ec_app.test_client(), token), "unknown_kid")
        assert attacker.jwks_requests == 0


def test_certificate_chain_in_the_header_is_read_and_ignored(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    """An ``x5c`` chain makes a header longer than joserfc's default 512-character limit, which
    refused it as malformed; it is read (up to ``MAX_HEADER_CHARS``) and never trusted: the key
    comes from the issuer's set, so the attacker's key in the chain verifies nothing."""
    attacker = RSAKey.generate_key(2048, auto_kid=True)
    header = {"kid": issuer.kid, "x5c": self_signed_x5c(attacker)}
    forged = issuer.mint(deploy_claims(issuer, time.time()), header=header, key=attacker)
    assert len(segments(forged)[0]) > 512
    assert_refused(app, post_token(client, forged), "jws.bad_signature")
    genuine = issuer.mint(deploy_claims(issuer, time.time()), header=header)
    assert_granted(app, post_token(client, genuine))
    too_long = issuer.mint(
        deploy_claims(issuer, time.time()), header={**header, "pad": "x" * MAX_HEADER_CHARS}
    )
    assert_refused(app, post_token(client, too_long), "jws.malformed")
    assert last_record(app)["details"]["detail"] == "ExceededSizeError"


def test_signature_of_the_largest_rsa_key_allowed_is_parsed() -> None:
    """An RSA key of ``MAX_RSA_BITS`` bits (which the key rules accept) signs 2,731 characters:
    joserfc's default limit of 1024 refused every token of a key over 6,144 bits as malformed."""
    header, payload = b64json({"alg": "RS256", "kid": "big"}), b64json({"sub": "x"})
    signature = base64.urlsafe_b64encode(b"\x01" * (MAX_RSA_BITS // 8)).rstrip(b"=").decode()
    assert len(signature) == 2731
    assert parse_compact(f"{header}.{payload}.{signature}").header["kid"] == "big"
    with pytest.raises(JWSInvalid) as caught:
        parse_compact(f"{header}.{payload}.{signature}AAAA")
    assert caught.value.reason == "jws.malformed"


# ---------------------------------------------------------------------------
# Header checks: crit and typ (RFC 7515 §4.1.11, RFC 8725 §3.11)
# ---------------------------------------------------------------------------


def test_unknown_crit_extension_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    token = issuer.mint(
        deploy_claims(issuer, time.time()),
        header={"typ": "JWT", "crit": ["urn:example:must-understand"], "urn:example:must-understand": 1},
    )
    assert_refused(app, post_token(client, token), "jws.crit_not_understood")


@pytest.mark.parametrize(("cty", "nested"), [("JWT", True), ("Application/JWT", True), ("json", False)])
def test_a_token_that_says_its_payload_is_a_jwt_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer, cty: Any, nested: bool
) -> None:
    """RFC 7519 §5.2, §7.2 step 8: ``cty: JWT`` makes the payload another JWT, to verify in turn; a
    token saying so was read as if its payload were its claims (an outside audit).  Another
    media type is the payload's, which is JSON claims here: ignored."""
    token = issuer.mint(deploy_claims(issuer, time.time()), header={"typ": "JWT", "cty": cty})
    response = post_token(client, token)
    if nested:
        assert_refused(app, response, "jws.nested_jwt")
    else:
        assert response.status_code == 200, response.get_json()


@pytest.mark.parametrize(
    "typ", ["at+jwt", "application/at+jwt", "dpop+jwt", "secevent+jwt", "JOSE", "", "jwt+other"]
)
def test_other_kinds_of_jwt_are_refused_by_typ(
    app: Flask, client: FlaskClient, issuer: DevIssuer, typ: str
) -> None:
    token = issuer.mint(deploy_claims(issuer, time.time()), header={"typ": typ})
    assert_refused(app, post_token(client, token), "typ_not_accepted")


@pytest.mark.parametrize("typ", ["JWT", "jwt", "application/jwt", "application/JWT", None])
def test_plain_jwt_typ_values_and_no_typ_are_accepted(
    app: Flask, client: FlaskClient, issuer: DevIssuer, typ: str | None
) -> None:
    token = issuer.mint(deploy_claims(issuer, time.time()), header={"typ": typ})
    assert_granted(app, post_token(client, token))


def test_typ_that_is_not_a_string_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    _, payload, signature = segments(issuer.mint(deploy_claims(issuer, time.time())))
    header = b64json({"alg": "RS256", "kid": issuer.kid, "typ": ["JWT"]})
    assert_refused(app, post_token(client, f"{header}.{payload}.{signature}"), "typ_not_accepted")


# ---------------------------------------------------------------------------
# Time claims (RFC 7519 §4.1.4-§4.1.6; leeway 30 s, max_token_age 3600 s)
# ---------------------------------------------------------------------------


def test_expired_beyond_leeway_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    issued = time.time() - 400
    token = issuer.mint(deploy_claims(issuer, issued, exp=int(time.time()) - 31), header={"typ": "JWT"})
    assert_refused(app, post_token(client, token), "expired")


def test_expiry_leeway_applies_when_verifying(app: Flask, issuer: DevIssuer) -> None:
    """Within the leeway a just-expired token still verifies; one second past it, it does not.

    At the endpoint such a token is refused all the same (``subject_token.expired``):
    nothing of its lifetime is left for an issued token to inherit.
    """
    issuers = app.extensions["sts"].exchange.issuers
    leeway = app.extensions["sts"].settings.leeway
    assert leeway == 30
    exp = int(time.time())
    token = issuer.mint(deploy_claims(issuer, exp - 300, exp=exp), header={"typ": "JWT"})
    verified = verify_token(token, JWT_TYPE, issuers, now=exp + leeway - 1, leeway=leeway)
    assert isinstance(verified, VerifiedToken)
    assert verified.subject == DEPLOY_SUBJECT
    with pytest.raises(InvalidRequest) as refused:
        verify_token(token, JWT_TYPE, issuers, now=exp + leeway, leeway=leeway)
    assert refused.value.reason == "subject_token.expired"


def test_just_expired_token_within_leeway_gets_no_token(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    token = issuer.mint(
        deploy_claims(issuer, time.time() - 300, exp=int(time.time()) - 10), header={"typ": "JWT"}
    )
    assert_refused(app, post_token(client, token), "expired")


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_time_claims_within_leeway_in_the_future_are_accepted(
    app: Flask, client: FlaskClient, issuer: DevIssuer, claim: str
) -> None:
    """Clock skew: an issuer a little ahead of us is tolerated up to the leeway."""
    ahead = int(time.time()) + 20
    token = issuer.mint(deploy_claims(issuer, time.time(), **{claim: ahead}), header={"typ": "JWT"})
    assert_granted(app, post_token(client, token))


def test_nbf_in_the_future_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    token = issuer.mint(deploy_claims(issuer, time.time(), nbf=int(time.time()) + 120), header={"typ": "JWT"})
    assert_refused(app, post_token(client, token), "not_yet_valid")


def test_iat_in_the_future_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    token = issuer.mint(
        deploy_claims(issuer, time.time(), iat=int(time.time()) + 120, nbf=None), header={"typ": "JWT"}
    )
    assert_refused(app, post_token(client, token), "issued_in_future")


def test_iat_older_than_max_token_age_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    """A cluster may extend expiry silently; max_token_age (3600 s here) bounds it."""
    issued = time.time() - 3600 - 31 - 5
    token = issuer.mint(deploy_claims(issuer, issued, exp=int(time.time()) + 300), header={"typ": "JWT"})
    assert_refused(app, post_token(client, token), "too_old")


def test_missing_iat_is_refused_when_max_token_age_is_set(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    token = issuer.mint(deploy_claims(issuer, time.time(), iat=None), header={"typ": "JWT"})
    assert_refused(app, post_token(client, token), "missing_iat")


def test_missing_exp_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    token = issuer.mint(deploy_claims(issuer, time.time(), exp=None), header={"typ": "JWT"})
    assert_refused(app, post_token(client, token), "missing_exp")


@pytest.mark.parametrize(
    ("exp", "reason"),
    [
        ("9999999999", "malformed_exp"),
        (True, "malformed_exp"),
        (False, "malformed_exp"),
        # NaN and the infinities are Python's extension to JSON: the payload is not JSON at all.
        (float("nan"), "jws.malformed"),
        (float("inf"), "jws.malformed"),
        (float("-inf"), "jws.malformed"),
        ([9999999999], "malformed_exp"),
        ({"t": 1}, "malformed_exp"),
    ],
    ids=["string", "true", "false", "nan", "infinity", "minus-infinity", "list", "object"],
)
def test_exp_that_is_not_a_numeric_date_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer, exp: Any, reason: str
) -> None:
    token = issuer.mint(deploy_claims(issuer, time.time(), exp=exp), header={"typ": "JWT"})
    assert_refused(app, post_token(client, token), reason)


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_integer_too_large_for_a_float_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer, claim: str
) -> None:
    """``10**400`` is valid JSON and a Python int, but no float: refused, not a server error."""
    token = issuer.mint(deploy_claims(issuer, time.time(), **{claim: 10**400}), header={"typ": "JWT"})
    assert_refused(app, post_token(client, token), f"malformed_{claim}")


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_nbf_and_iat_that_are_not_numeric_dates_are_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer, claim: str
) -> None:
    token = issuer.mint(deploy_claims(issuer, time.time(), **{claim: "0"}), header={"typ": "JWT"})
    assert_refused(app, post_token(client, token), f"malformed_{claim}")


# ---------------------------------------------------------------------------
# Audience, subject, issuer (RFC 7519 §4.1.1-§4.1.3; RFC 8725 §3.8, §3.9)
# ---------------------------------------------------------------------------


def test_missing_aud_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    token = issuer.mint(deploy_claims(issuer, time.time(), aud=None), header={"typ": "JWT"})
    assert_refused(app, post_token(client, token), "missing_aud")


@pytest.mark.parametrize(
    "aud", ["https://other-service.example", ["https://other-service.example"], STS_ISSUER + "/"]
)
def test_aud_of_another_service_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer, aud: str | list[str]
) -> None:
    token = issuer.mint(deploy_claims(issuer, time.time(), aud=aud), header={"typ": "JWT"})
    assert_refused(app, post_token(client, token), "audience_mismatch")


@pytest.mark.parametrize("aud", [[], [STS_ISSUER, 7], 42], ids=["empty-list", "list-with-number", "number"])
def test_malformed_aud_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer, aud: Any) -> None:
    token = issuer.mint(deploy_claims(issuer, time.time(), aud=aud), header={"typ": "JWT"})
    assert_refused(app, post_token(client, token), "malformed_aud")


def test_aud_list_containing_ours_is_accepted(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    aud = ["https://other-service.example", STS_ISSUER]
    token = issuer.mint(deploy_claims(issuer, time.time(), aud=aud), header={"typ": "JWT"})
    assert_granted(app, post_token(client, token))


@pytest.mark.parametrize(
    ("sub", "reason"),
    [
        (None, "missing_sub"),
        ("", "malformed_sub"),
        (12345, "malformed_sub"),
        (["repo:acme/app:ref:refs/heads/main"], "malformed_sub"),
    ],
)
def test_missing_or_empty_sub_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer, sub: Any, reason: str
) -> None:
    claims = deploy_claims(issuer, time.time())
    if sub is None:
        del claims["sub"]
    else:
        claims["sub"] = sub
    token = issuer.mint(claims, header={"typ": "JWT"})
    assert_refused(app, post_token(client, token), reason)


@pytest.mark.parametrize("variant", ["trailing-slash", "upper-case", "upper-host", "leading-space"])
def test_iss_is_compared_exactly(app: Flask, client: FlaskClient, issuer: DevIssuer, variant: str) -> None:
    url = issuer.issuer_url
    iss = {
        "trailing-slash": url + "/",
        "upper-case": url.upper(),
        "upper-host": url.replace("http://", "HTTP://"),
        "leading-space": " " + url,
    }[variant]
    assert iss != url
    token = issuer.mint(deploy_claims(issuer, time.time(), iss=iss), header={"typ": "JWT"})
    assert_refused(app, post_token(client, token), "untrusted_issuer")


def test_untrusted_issuer_is_refused_without_contacting_it(app: Flask, client: FlaskClient) -> None:
    with DevIssuer.serve_ephemeral() as stranger_server:
        stranger = stranger_server.issuer
        token = stranger.mint(deploy_claims(stranger, time.time()), header={"typ": "JWT"})
        assert_refused(app, post_token(client, token), "untrusted_issuer")
        assert stranger.jwks_requests == 0


@pytest.mark.parametrize(
    ("iss", "reason"), [(None, "missing_iss"), (42, "malformed_iss"), (["http://127.0.0.1"], "malformed_iss")]
)
def test_missing_or_non_string_iss_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer, iss: Any, reason: str
) -> None:
    token = issuer.mint(deploy_claims(issuer, time.time(), iss=iss), header={"typ": "JWT"})
    assert_refused(app, post_token(client, token), reason)


# ---------------------------------------------------------------------------
# Serialisation tricks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["", "e30", "e30.e30", "...", "e30.e30.e30.e30"])
def test_wrong_number_of_segments_is_refused(app: Flask, client: FlaskClient, token: str) -> None:
    response = post_token(client, token)
    if token == "":
        # An empty subject_token is an omitted one (RFC 6749 §3.1): refused before attestation.
        assert response.status_code == 400
        assert "access_token" not in response.get_json()
        return
    assert_refused(app, response, "jws.not_compact_jws")


def test_jwe_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    """A JWE encrypted to the issuer's public key carries no signature at all."""
    jwk = issuer.jwks()["keys"][0]
    public = RSAKey.import_key({name: jwk[name] for name in ("kty", "n", "e")})
    token = jwe.encrypt_compact(
        {"alg": "RSA-OAEP-256", "enc": "A256GCM", "typ": "JWT"},
        json.dumps(deploy_claims(issuer, time.time())).encode(),
        public,
        algorithms=["RSA-OAEP-256", "A256GCM"],
    )
    assert len(segments(token)) == 5
    assert_refused(app, post_token(client, token), "jws.not_compact_jws")


def test_jws_json_serialization_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    """The flattened JSON form of a validly signed token: only the compact form is accepted."""
    protected, payload, signature = segments(
        issuer.mint(deploy_claims(issuer, time.time()), header={"typ": "JWT"})
    )
    token = json.dumps({"protected": protected, "payload": payload, "signature": signature})
    assert_refused(app, post_token(client, token), "jws.not_compact_jws")


def test_tampered_payload_with_the_original_signature_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    original = issuer.mint(
        deploy_claims(issuer, time.time(), sub="repo:acme/other:ref:refs/heads/main"), header={"typ": "JWT"}
    )
    protected, _, signature = segments(original)
    forged_payload = b64json(deploy_claims(issuer, time.time()))
    assert_refused(app, post_token(client, f"{protected}.{forged_payload}.{signature}"), "jws.bad_signature")


def test_tampered_header_with_the_original_signature_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer
) -> None:
    protected, payload, signature = segments(issuer.mint(deploy_claims(issuer, time.time())))
    header = json.loads(base64.urlsafe_b64decode(protected + "=="))
    header["typ"] = "JWT"
    assert_refused(app, post_token(client, f"{b64json(header)}.{payload}.{signature}"), "jws.bad_signature")


def test_stripped_signature_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    protected, payload, _ = segments(issuer.mint(deploy_claims(issuer, time.time()), header={"typ": "JWT"}))
    assert_refused(app, post_token(client, f"{protected}.{payload}."), "jws.bad_signature")


def test_payload_that_is_a_json_array_is_refused(app: Flask, client: FlaskClient, issuer: DevIssuer) -> None:
    protected, _, signature = segments(issuer.mint(deploy_claims(issuer, time.time()), header={"typ": "JWT"}))
    payload = b64json([deploy_claims(issuer, time.time())])
    assert_refused(app, post_token(client, f"{protected}.{payload}.{signature}"), "jws.malformed")


@pytest.mark.parametrize("opening", [b"[", b'{"a":['], ids=["arrays", "object-of-arrays"])
def test_deeply_nested_payload_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer, opening: bytes
) -> None:
    """Nesting deeper than the JSON parser's recursion limit, inside the size limit: a 400, not a 500."""
    protected, _, signature = segments(issuer.mint(deploy_claims(issuer, time.time()), header={"typ": "JWT"}))
    payload = b64url(opening * (6000 // len(opening)))
    assert len(payload) < MAX_JWT_BYTES
    assert_refused(app, post_token(client, f"{protected}.{payload}.{signature}"), "jws.malformed")


@pytest.mark.parametrize(
    "header", [b"not json", b'["RS256"]', b'"RS256"', b"\xff\xfe"], ids=["text", "array", "string", "bytes"]
)
def test_header_that_is_not_a_json_object_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer, header: bytes
) -> None:
    _, payload, signature = segments(issuer.mint(deploy_claims(issuer, time.time()), header={"typ": "JWT"}))
    assert_refused(app, post_token(client, f"{b64url(header)}.{payload}.{signature}"), "jws.malformed")


@pytest.mark.parametrize("token", ["a.b.c", "..", "e30.e30.", "e30.e30.!!", "é.é.é"])
def test_garbage_in_three_segments_is_refused(app: Flask, client: FlaskClient, token: str) -> None:
    assert_refused(app, post_token(client, token), "jws.malformed")


def test_token_over_the_size_limit_is_refused(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    issuer = upstream.issuer
    # A larger body limit, so that the token limit (not the request limit) is what refuses.
    app = create_app(make_settings(max_body_bytes=4 * MAX_JWT_BYTES))
    client = app.test_client()

    def token_of_about(size: int) -> str:
        claims = deploy_claims(issuer, time.time(), padding="")
        bare = len(issuer.mint(claims, header={"typ": "JWT"}))
        claims["padding"] = "x" * ((size - bare) * 3 // 4)
        return issuer.mint(claims, header={"typ": "JWT"})

    small = token_of_about(MAX_JWT_BYTES - 200)
    assert len(small) <= MAX_JWT_BYTES
    assert_granted(app, post_token(client, small))
    large = token_of_about(MAX_JWT_BYTES + 200)
    assert len(large) > MAX_JWT_BYTES
    assert_refused(app, post_token(client, large), "jws.too_large")


def test_token_type_not_configured_for_the_issuer_is_refused(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    issuer = upstream.issuer
    settings = make_settings(
        issuers=[
            {
                "name": "upstream",
                "issuer": issuer.issuer_url,
                "jwks_uri": upstream.jwks_uri,
                "algorithms": ["RS256"],
                "audiences": [STS_ISSUER],
                "token_types": [JWT_TYPE],
            }
        ]
    )
    app = create_app(settings)
    client = app.test_client()
    token = issuer.mint(deploy_claims(issuer, time.time()), header={"typ": "JWT"})
    assert_refused(
        app, post_token(client, token, subject_token_type=ID_TOKEN_TYPE), "token_type_not_accepted"
    )
    assert_granted(app, post_token(client, token, subject_token_type=JWT_TYPE))


# ---------------------------------------------------------------------------
# Key sets the dev issuer will not publish: a weak RSA key, a symmetric key
# ---------------------------------------------------------------------------

KEY_SET_ISSUER = "https://keys.example"


@pytest.fixture
def key_set_app(
    make_settings: Callable[..., Settings], upstream: RunningServer, key_set_server: KeySetServer
) -> Flask:
    """An app trusting ``KEY_SET_ISSUER`` (RS256 only), whose JWKS is :class:`KeySetServer`'s."""
    return app_trusting(
        make_settings,
        upstream,
        name="keys",
        iss=KEY_SET_ISSUER,
        jwks_uri=key_set_server.url,
        algorithms=["RS256"],
    )


def key_set_claims() -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": KEY_SET_ISSUER,
        "sub": DEPLOY_SUBJECT,
        "aud": STS_ISSUER,
        "iat": now,
        "exp": now + 300,
        "repository_id": "123456",
    }


def test_weak_rsa_key_in_the_key_set_is_skipped(key_set_app: Flask, key_set_server: KeySetServer) -> None:
    weak = weak_rsa_key()
    strong = RSAKey.generate_key(2048, parameters={"kid": "strong", "use": "sig", "alg": "RS256"})
    key_set_server.document = {"keys": [weak.as_dict(private=False), strong.as_dict(private=False)]}
    client = key_set_app.test_client()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # joserfc warns when signing with a short key.
        weak_token = jwt.encode(
            {"alg": "RS256", "kid": "weak-1024"}, key_set_claims(), weak, algorithms=["RS256"]
        )
    assert_refused(key_set_app, post_token(client, weak_token), "unknown_kid")
    # The same key set's strong key works, so the refusal is about the weak key alone.
    strong_token = jwt.encode(
        {"alg": "RS256", "kid": "strong"}, key_set_claims(), strong, algorithms=["RS256"]
    )
    assert_granted(key_set_app, post_token(client, strong_token))


def test_algorithm_outside_the_issuers_allow_list_is_refused_even_with_its_key(
    key_set_app: Flask, key_set_server: KeySetServer
) -> None:
    """PS256 by the issuer's own RSA key (which declares no ``alg``): valid, but not allow-listed."""
    key = RSAKey.generate_key(2048, parameters={"kid": "rsa"})
    key_set_server.document = {"keys": [key.as_dict(private=False)]}
    client = key_set_app.test_client()
    pss = jwt.encode({"alg": "PS256", "kid": "rsa"}, key_set_claims(), key, algorithms=["PS256"])
    assert_refused(key_set_app, post_token(client, pss), "jws.algorithm_not_allowed")
    pkcs1 = jwt.encode({"alg": "RS256", "kid": "rsa"}, key_set_claims(), key, algorithms=["RS256"])
    assert_granted(key_set_app, post_token(client, pkcs1))


@pytest.mark.parametrize("alg", ["HS256", "RS256"])
def test_symmetric_key_in_the_key_set_is_never_used(
    key_set_app: Flask, key_set_server: KeySetServer, alg: str
) -> None:
    """An ``oct`` key published by the issuer (anyone can read it) must not verify anything."""
    secret = OctKey.generate_key(256, parameters={"kid": "shared", "alg": "HS256"})
    key_set_server.document = {"keys": [secret.as_dict(private=True)]}
    token = hs256({"alg": alg, "kid": "shared"}, key_set_claims(), secret.raw_value)
    reason = "jws.algorithm_not_allowed" if alg == "HS256" else "unknown_kid"
    assert_refused(key_set_app, post_token(key_set_app.test_client(), token), reason)


def test_rsa_key_with_public_exponent_3_is_skipped(
    key_set_app: Flask, key_set_server: KeySetServer, caplog: pytest.LogCaptureFixture
) -> None:
    """NIST SP 800-56B: e = 65537 only.  The key is skipped with a log line, like other unusable keys."""
    e3 = rsa_key_with_exponent_3()
    strong = RSAKey.generate_key(2048, parameters={"kid": "strong", "use": "sig", "alg": "RS256"})
    key_set_server.document = {"keys": [e3.as_dict(private=False), strong.as_dict(private=False)]}
    client = key_set_app.test_client()
    e3_token = jwt.encode({"alg": "RS256", "kid": "e3"}, key_set_claims(), e3, algorithms=["RS256"])
    with caplog.at_level("WARNING", logger="sts.adapters.jwks"):
        assert_refused(key_set_app, post_token(client, e3_token), "unknown_kid")
    assert any("kid 'e3'" in m and "public exponent 3" in m for m in caplog.messages), caplog.messages
    strong_token = jwt.encode(
        {"alg": "RS256", "kid": "strong"}, key_set_claims(), strong, algorithms=["RS256"]
    )
    assert_granted(key_set_app, post_token(client, strong_token))


# ---------------------------------------------------------------------------
# Only UTF-8 JSON (RFC 7515 §5.2, RFC 7519 §7.2): json.loads(bytes) would also read UTF-16/32
# ---------------------------------------------------------------------------


@pytest.fixture
def key_set_rsa(key_set_server: KeySetServer) -> RSAKey:
    """The key :class:`KeySetServer` publishes for ``KEY_SET_ISSUER``; the test signs raw bytes with it."""
    key = RSAKey.generate_key(2048, parameters={"kid": "raw", "use": "sig", "alg": "RS256"})
    key_set_server.document = {"keys": [key.as_dict(private=False)]}
    return key


def raw_token(key: RSAKey, encoding: str, part: str = "payload", **claims: Any) -> str:
    header = {"alg": "RS256", "kid": "raw", "typ": "JWT"}
    return sign_encoded(key, header, {**key_set_claims(), **claims}, encoding=encoding, part=part)


@pytest.mark.parametrize("part", ["payload", "header"])
def test_subject_token_not_in_utf8_is_refused(key_set_app: Flask, key_set_rsa: RSAKey, part: str) -> None:
    client = key_set_app.test_client()
    # The same claims, signed the same way, in UTF-8: granted, so only the encoding differs.
    assert_granted(key_set_app, post_token(client, raw_token(key_set_rsa, "utf-8", part)))
    for encoding in NOT_UTF8.values():
        token = raw_token(key_set_rsa, encoding, part, jti=str(uuid.uuid4()))
        assert_refused(key_set_app, post_token(client, token), "jws.not_utf8")


def test_actor_token_not_in_utf8_is_refused(key_set_app: Flask, key_set_rsa: RSAKey) -> None:
    subject = raw_token(key_set_rsa, "utf-8")
    actor = raw_token(key_set_rsa, "utf-16", sub="spiffe://example.org/agent")
    response = post_token(key_set_app.test_client(), subject, actor_token=actor, actor_token_type=JWT_TYPE)
    assert response.status_code == 400, response.get_json()
    assert last_record(key_set_app)["reasons"] == ["actor_token.jws.not_utf8"]


def test_posture_token_not_in_utf8_is_unusable(
    make_settings: Callable[..., Settings],
    upstream: RunningServer,
    key_set_server: KeySetServer,
    key_set_rsa: RSAKey,
) -> None:
    """A posture token in UTF-16 is not evidence: the stale_posture signal fires as for an expired one."""
    policy = {
        "version": 1,
        "rules": [
            {
                "name": "posture",
                "issuer": "keys",
                "subject": DEPLOY_SUBJECT,
                "require_client_authentication": False,
                "risk": {"posture_fact": "device_posture", "weights": {"stale_posture": 100}},
                "grant": {"audiences": [DEPLOY_AUDIENCE]},
            }
        ],
    }
    issuers = [
        {
            "name": "keys",
            "issuer": KEY_SET_ISSUER,
            "jwks_uri": key_set_server.url,
            "algorithms": ["RS256"],
            "audiences": [STS_ISSUER],
        }
    ]
    app = create_app(make_settings(policy, issuers=issuers))
    client = app.test_client()
    subject = raw_token(key_set_rsa, "utf-8")

    def stale_posture() -> dict[str, Any]:
        signals = last_record(app)["details"]["risk"]["signals"]
        return next(s for s in signals if s["name"] == "stale_posture")

    good = raw_token(key_set_rsa, "utf-8", device_posture="compliant")
    assert_granted(app, post_token(client, subject, posture_token=good))
    assert stale_posture()["fired"] is False
    utf16 = raw_token(key_set_rsa, "utf-16", device_posture="compliant")
    assert post_token(client, subject, posture_token=utf16).status_code == 400
    assert stale_posture()["fired"] is True
    assert stale_posture()["evidence"] == {"problem": "jws.not_utf8"}


# ---------------------------------------------------------------------------
# A time claim that is present is a number: null is not "absent" (RFC 7519 §2, §4.1.4-§4.1.6)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_time_claim_that_is_null_is_refused(
    app: Flask, client: FlaskClient, issuer: DevIssuer, claim: str
) -> None:
    claims = deploy_claims(issuer, time.time())
    claims[claim] = None
    token = issuer.mint(claims, header={"typ": "JWT"})
    assert_refused(app, post_token(client, token), f"malformed_{claim}")


# ---------------------------------------------------------------------------
# The issuer's key set over time: rotation, unknown-kid floods, outages
# ---------------------------------------------------------------------------


def test_key_rotation_is_picked_up_with_one_refetch(
    timed_app: Flask, upstream: RunningServer, clock: Clock
) -> None:
    issuer = upstream.issuer
    client = timed_app.test_client()
    before_rotation = issuer.mint(deploy_claims(issuer, clock()))
    assert_granted(timed_app, post_token(client, before_rotation))
    assert issuer.jwks_requests == 1

    old_kid = issuer.kid
    clock.advance(REFETCH_INTERVAL + 1)
    new_kid = issuer.rotate_key()
    assert new_kid != old_kid
    assert_granted(timed_app, post_token(client, issuer.mint(deploy_claims(issuer, clock()))))
    assert issuer.jwks_requests == 2
    # The new key is now cached: no further fetch.
    assert_granted(timed_app, post_token(client, issuer.mint(deploy_claims(issuer, clock()))))
    assert issuer.jwks_requests == 2
    # The old key stays published during the overlap: a token it signed still verifies.
    assert_granted(timed_app, post_token(client, before_rotation))
    assert issuer.jwks_requests == 2


def test_token_from_a_removed_key_is_refused_after_rotation(
    timed_app: Flask, upstream: RunningServer, clock: Clock
) -> None:
    issuer = upstream.issuer
    client = timed_app.test_client()
    before_rotation = issuer.mint(deploy_claims(issuer, clock()), header={"typ": "JWT"})
    assert_granted(timed_app, post_token(client, before_rotation))
    clock.advance(REFETCH_INTERVAL + 1)
    issuer.rotate_key(keep_previous=False)
    assert_granted(timed_app, post_token(client, issuer.mint(deploy_claims(issuer, clock()))))
    assert issuer.jwks_requests == 2
    # The key that signed ``before_rotation`` is gone from the refetched set.
    assert_refused(timed_app, post_token(client, before_rotation), "unknown_kid")
    assert issuer.jwks_requests == 2


def test_unknown_kid_flood_refetches_at_most_once_per_interval(
    timed_app: Flask, upstream: RunningServer, clock: Clock
) -> None:
    issuer = upstream.issuer
    client = timed_app.test_client()
    assert_granted(timed_app, post_token(client, issuer.mint(deploy_claims(issuer, clock()))))
    assert issuer.jwks_requests == 1

    def flood(count: int) -> None:
        for _ in range(count):
            kid = uuid.uuid4().hex
            token = issuer.mint(deploy_claims(issuer, clock()), header={"kid": kid})
            assert_refused(timed_app, post_token(client, token), "unknown_kid")

    flood(15)  # Within the interval of the first fetch: no refetch at all.
    assert issuer.jwks_requests == 1
    clock.advance(REFETCH_INTERVAL + 1)
    flood(15)
    assert issuer.jwks_requests == 2
    clock.advance(REFETCH_INTERVAL / 2)
    flood(15)
    assert issuer.jwks_requests == 2
    clock.advance(REFETCH_INTERVAL)
    flood(15)
    assert issuer.jwks_requests == 3
    # Genuine tokens are still served from the cache throughout.
    assert_granted(timed_app, post_token(client, issuer.mint(deploy_claims(issuer, clock()))))
    assert issuer.jwks_requests == 3


def test_outage_with_a_warm_cache_still_verifies(
    timed_app: Flask, upstream: RunningServer, clock: Clock
) -> None:
    issuer = upstream.issuer
    client = timed_app.test_client()
    assert_granted(timed_app, post_token(client, issuer.mint(deploy_claims(issuer, clock()))))
    upstream.stop()
    assert_granted(timed_app, post_token(client, issuer.mint(deploy_claims(issuer, clock()))))
    # Past the key set's freshness the refetch fails, and the last good keys are served.
    clock.advance(JWKS_FRESH_FOR + 60)
    assert_granted(timed_app, post_token(client, issuer.mint(deploy_claims(issuer, clock()))))
    # Past max_stale (3600 s by default) nothing verifies any more.
    clock.advance(3600)
    assert_unavailable(timed_app, post_token(client, issuer.mint(deploy_claims(issuer, clock()))))


def test_outage_with_a_cold_cache_is_temporarily_unavailable(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    app = create_app(make_settings())
    client = app.test_client()
    issuer = upstream.issuer
    upstream.stop()
    token = issuer.mint(deploy_claims(issuer, time.time()), header={"typ": "JWT"})
    assert_unavailable(app, post_token(client, token))
    # A retry (within the refetch interval, so no new fetch is even tried) still issues nothing.
    assert_unavailable(app, post_token(client, token))
    assert issuer.jwks_requests == 0


def test_parse_compact_reads_a_plain_token_as_joserfc_does() -> None:
    """The one-pass parse of a plain compact JWS builds what ``jws.extract_compact`` builds (header,
    decoded payload, segments), so joserfc verifies it the same way; and what it does not take
    (an RFC 7797 ``b64`` header with ``crit``) is still refused as before."""
    from joserfc import jws

    from sts.core.jose import JWSInvalid, parse_compact

    key = ECKey.generate_key("P-256")
    token = jwt.encode({"alg": "ES256", "kid": "k"}, {"sub": "é", "n": 1}, key, algorithms=["ES256"])
    parsed = parse_compact(token)
    reference = jws.extract_compact(token.encode("ascii"))
    assert parsed.compact is not None
    assert parsed.compact.protected == reference.protected == parsed.header
    assert parsed.compact.payload == reference.payload
    assert parsed.compact.segments == reference.segments
    assert parsed.claims == {"sub": "é", "n": 1}
    assert jws.validate_compact(parsed.compact, key, algorithms=["ES256"])
    unencoded = jws.serialize_compact(
        {"alg": "ES256", "b64": False, "crit": ["b64"]}, b"payload", key, algorithms=["ES256"]
    )
    with pytest.raises(JWSInvalid) as refused:
        parse_compact(unencoded)
    assert refused.value.reason == "jws.malformed"  # joserfc reads no b64 payload: as on main


def test_a_remembered_header_is_the_one_each_token_carries() -> None:
    """Protected headers are remembered by their exact segment (``jose._parsed_header``): a token
    with the same header is read without parsing it again, yet its signature is checked over its
    own bytes; a header differing in one member is its own; a caller changing its header changes
    nobody else's; and a header refused once is refused again."""
    from sts.core.jose import (
        HEADER_CACHE,
        JWSInvalid,
        _parsed_header,
        parse_compact,
        verify_compact_signature,
    )

    _parsed_header.cache_clear()
    key, other = ECKey.generate_key("P-256"), ECKey.generate_key("P-256")
    token = jwt.encode({"alg": "ES256", "kid": "a"}, {"sub": "x"}, key, algorithms=["ES256"])
    first = parse_compact(token)
    first.header["kid"] = "changed"
    again = parse_compact(token)
    assert _parsed_header.cache_info().hits == 1
    assert again.header == {"typ": "JWT", "alg": "ES256", "kid": "a"}
    assert again.compact is not None and again.compact.protected == again.header
    assert verify_compact_signature(again.compact, key, "ES256") is True
    # The same header segment, signed by another key or over another payload: refused.
    forged = jwt.encode({"alg": "ES256", "kid": "a"}, {"sub": "y"}, other, algorithms=["ES256"])
    assert forged.split(".")[0] == token.split(".")[0]
    for text in (forged, ".".join([*forged.split(".")[:2], token.split(".")[2]])):
        parsed = parse_compact(text)
        assert parsed.claims == {"sub": "y"}
        assert parsed.compact is not None and verify_compact_signature(parsed.compact, key, "ES256") is False
    # One member changed: a header of its own.
    moved = jwt.encode({"alg": "ES256", "kid": "b"}, {"sub": "x"}, key, algorithms=["ES256"])
    assert parse_compact(moved).header == {"typ": "JWT", "alg": "ES256", "kid": "b"}
    # A refusal is not remembered.
    duplicated = base64.urlsafe_b64encode(b'{"alg":"ES256","alg":"none"}').rstrip(b"=").decode()
    for _ in range(2):
        with pytest.raises(JWSInvalid) as refused:
            parse_compact(f"{duplicated}.{token.split('.', 1)[1]}")
        assert refused.value.reason == "jws.duplicate_member"
    assert _parsed_header.cache_info().currsize == 2
    assert _parsed_header.cache_info().maxsize == HEADER_CACHE


def _outcome(check: Callable[[], bool]) -> object:
    try:
        return check()
    except Exception as exc:  # The exception's type is the outcome compared.
        return type(exc)


@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512", "RS256", "RS384", "PS256"])
def test_direct_signature_check_answers_as_joserfc_does(alg: str) -> None:
    """:func:`verify_compact_signature` gives what ``jws.validate_compact`` gives (True, False or the
    same exception) for good and tampered signatures and for keys joserfc refuses (wrong curve,
    ``use: enc``, ``key_ops`` without ``verify``, another ``alg``)."""
    from joserfc import jws

    from sts.core.jose import parse_compact, registry_for, verify_compact_signature

    curve = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}.get(alg)

    def new_key(**parameters: Any) -> Any:
        if curve is None:
            return RSAKey.generate_key(2048, parameters=parameters)
        return ECKey.generate_key(cast(Any, curve), parameters=parameters)

    key = new_key()
    token = jwt.encode({"alg": alg}, {"sub": "x"}, key, algorithms=[alg])
    header, payload, signature = token.split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    tokens = [
        token,
        f"{header}.{payload}.{flipped}",
        f"{header}.{payload}.{signature[:-4]}",
        f"{header}.{payload}.AA",
    ]
    public = key.as_dict(private=False)
    keys = [
        key,
        new_key(),
        ECKey.generate_key("P-256" if curve != "P-256" else "P-384"),
        RSAKey.import_key({**public, "use": "enc"})
        if curve is None
        else ECKey.import_key({**public, "use": "enc"}),
        RSAKey.import_key({**public, "key_ops": ["sign"]})
        if curve is None
        else ECKey.import_key({**public, "key_ops": ["sign"]}),
        RSAKey.import_key({**public, "alg": "RS512"})
        if curve is None
        else ECKey.import_key({**public, "alg": "ES512"}),
    ]
    outcomes = []
    for text in tokens:
        compact = parse_compact(text).compact
        for candidate in keys:
            ours = _outcome(lambda c=compact, k=candidate: verify_compact_signature(c, k, alg))
            theirs = _outcome(
                lambda c=compact, k=candidate: jws.validate_compact(c, k, registry=registry_for(alg))
            )
            assert ours == theirs, (text, candidate.as_dict(private=False))
            outcomes.append(ours)
    assert outcomes[0] is True and False in outcomes  # both kinds of answer were compared


def test_what_an_unauthenticated_request_asks_for_is_recorded_at_a_bounded_size(
    app: Flask, client: FlaskClient
) -> None:
    """A refusal with no credential at all: its record kept a 5,300-character audience whole (an
    outside audit: 16,860 bytes of audit trail against 984 for a usual refusal, 200 a second per
    network under the default rate limit)."""
    long_target = "https://x.example/" + "a" * 5300
    response = post_token(client, "x.y.z", audience=long_target, resource=long_target, scope="s" * 5000)
    assert response.status_code == 400
    record = last_record(app)
    assert record["outcome"] == "refused"
    assert [len(v) for v in record["requested_audience"] + record["requested_resource"]] == [513, 513]
    assert record["requested_audience"][0] == long_target[:512] + "\u2026"
    assert len(record["requested_scope"][0]) == 129
    assert len(json.dumps(record)) < 3000
