"""The resource-server verifier, case by case against RFC 9068, RFC 6750 §3, RFC 9449 §4.3/§7 and RFC 9470.

Tokens come from an authorization-server double with its own ES256 key,
whose metadata and JWKS are served over real HTTP; DPoP proofs are signed in
the tests with joserfc, independently of the library's own proof code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, g
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, Key, OctKey, RSAKey
from joserfc.jws import JWSRegistry
from sts_client.challenges import Challenge, parse_challenges
from sts_client.dpop import DEFAULT_DPOP_ALGORITHMS, DPoPKey, InMemoryReplayCache, ReplayCacheFull
from sts_client.errors import (
    InsufficientScope,
    InsufficientUserAuthentication,
    InvalidDPoPProof,
    InvalidRequest,
    InvalidToken,
    MissingToken,
    TemporarilyUnavailable,
    VerificationError,
)
from sts_client.flask import require_token
from sts_client.jwks import MAX_RSA_BITS, JWKSCache, KeysUnavailable, UnknownKey
from sts_client.verifier import TokenVerifier, VerifiedAccessToken
from sts_client.wsgi import ENVIRON_KEY, ProtectedPath, TokenMiddleware
from werkzeug.test import Client
from werkzeug.wrappers import Request, Response

from tests.support.clients_support import AUDIENCE, INTROSPECTION_CLIENT, FakeAuthorizationServer
from tests.support.clock import Clock
from tests.support.crafted_jose import (
    NOT_UTF8,
    b64url,
    rsa_key_with_exponent_3,
    self_signed_x5c,
    sign_bytes,
    sign_encoded,
    unsupported_x5c,
)

URL = "https://deploy.example.com/releases"
ALGS = " ".join(DEFAULT_DPOP_ALGORITHMS)


@pytest.fixture
def fake() -> Iterator[FakeAuthorizationServer]:
    server = FakeAuthorizationServer()
    yield server
    server.stop()


@pytest.fixture
def verifier(fake: FakeAuthorizationServer) -> TokenVerifier:
    return TokenVerifier(fake.issuer, AUDIENCE)


@pytest.fixture(scope="module")
def client_key() -> ECKey:
    return ECKey.generate_key("P-256")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ath(token: str) -> str:
    """RFC 9449 §4.2, computed here independently of the library."""
    return base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=").decode()


def sign_proof(
    key: Key,
    *,
    method: str = "POST",
    url: str = URL,
    token: str | None = None,
    iat: float | None = None,
    jti: str | None = None,
    alg: str = "ES256",
    header: dict[str, Any] | None = None,
    claims: dict[str, Any] | None = None,
) -> str:
    """A DPoP proof (RFC 9449 §4.2) signed with joserfc; ``header``/``claims`` override (None removes)."""
    body: dict[str, Any] = {
        "jti": jti or uuid.uuid4().hex,
        "htm": method,
        "htu": url,
        "iat": int(time.time() if iat is None else iat),
    }
    if token is not None:
        body["ath"] = ath(token)
    protected: dict[str, Any] = {"typ": "dpop+jwt", "alg": alg, "jwk": key.as_dict(private=False)}
    for target, changes in ((body, claims), (protected, header)):
        for name, value in (changes or {}).items():
            if value is None:
                target.pop(name, None)
            else:
                target[name] = value
    registry = JWSRegistry(algorithms=[alg], strict_check_header=False)
    return jwt.encode(protected, body, key, algorithms=[alg], registry=registry)


def dpop_headers(token: str, proof: str) -> list[tuple[str, str]]:
    return [("Authorization", f"DPoP {token}"), ("DPoP", proof)]


def header_lines(error: VerificationError, name: str = "WWW-Authenticate") -> list[str]:
    return [value for key, value in error.headers() if key == name]


# -- bearer tokens (RFC 9068, RFC 6750) -----------------------------------------------------------


def test_a_valid_token_gives_what_it_says(fake: FakeAuthorizationServer, verifier: TokenVerifier) -> None:
    issued = int(time.time())
    token = fake.mint(scope="deploy:read deploy:write", auth_time=issued - 5, act={"sub": "planner"})
    result = verifier.verify("GET", URL, bearer(token))
    assert isinstance(result, VerifiedAccessToken)
    assert result.subject == "repo:acme/app:ref:refs/heads/main"
    assert result.audience == (AUDIENCE,)
    assert result.scopes == {"deploy:read", "deploy:write"}
    assert result.auth_time == issued - 5
    assert result.token_type == "Bearer" and result.jkt is None
    assert result.actor == {"sub": "planner"}
    assert token not in repr(result)


def test_no_token_gets_a_bare_challenge_for_both_schemes(verifier: TokenVerifier) -> None:
    with pytest.raises(MissingToken) as info:
        verifier.verify("GET", URL, {})
    assert info.value.status == 401
    # RFC 6750 §3.1: no error code when the request carried no authentication at all.
    assert header_lines(info.value) == ["Bearer", f'DPoP algs="{ALGS}"']
    assert info.value.body() == {}
    with pytest.raises(MissingToken):
        verifier.verify("GET", URL, {"Authorization": "Basic dXNlcjpwYXNz"})


def test_realm_is_named_in_every_challenge(fake: FakeAuthorizationServer) -> None:
    verifier = TokenVerifier(fake.issuer, AUDIENCE, realm="deploy")
    with pytest.raises(InvalidToken) as info:
        verifier.verify("GET", URL, bearer("not.a.token"))
    assert header_lines(info.value) == [
        'Bearer realm="deploy", error="invalid_token", error_description="The access token is invalid."'
    ]


@pytest.mark.parametrize(
    "headers",
    [
        [("Authorization", "Bearer a.b.c"), ("Authorization", "Bearer d.e.f")],
        {"Authorization": "Bearer a.b.c, Bearer d.e.f"},  # two fields folded into one line
        {"Authorization": "Bearer two words"},
        {"Authorization": "Bearer "},
    ],
)
def test_malformed_or_repeated_authorization_is_invalid_request(
    verifier: TokenVerifier, headers: Any
) -> None:
    with pytest.raises(InvalidRequest) as info:
        verifier.verify("GET", URL, headers)
    assert info.value.status == 400
    assert header_lines(info.value)[0].startswith('Bearer error="invalid_request"')
    assert info.value.body()["error"] == "invalid_request"


def at_run_time(values: dict[str, Any]) -> dict[str, Any]:
    """A table row with its times computed now: a time in a parameter table is a function, called
    when the test runs, because "in 120 s" computed at collection is past by then in a long run."""
    return {key: value() if callable(value) else value for key, value in values.items()}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"header": {"typ": "JWT"}}, "token.typ"),
        ({"header": {"typ": None}}, "token.typ"),
        ({"header": {"crit": ["kid"]}}, "token.crit"),
        ({"iss": "https://other.example"}, "token.invalid_claim"),
        ({"audience": "https://elsewhere.example.com"}, "token.invalid_claim"),
        ({"audience": ["https://a.example", "https://b.example"]}, "token.invalid_claim"),
        ({"now": lambda: time.time() - 400, "lifetime": 300}, "token.expired"),
        ({"nbf": lambda: int(time.time()) + 120}, "token.invalid_claim"),
        ({"now": lambda: time.time() + 120}, "token.invalid_claim"),  # iat in the future
        ({"sub": None}, "token.missing_claim"),
        ({"jti": None}, "token.missing_claim"),
        ({"client_id": None}, "token.missing_claim"),
        ({"exp": None}, "token.missing_claim"),
        # Certificate-bound (RFC 8705 §3), with no certificate to hold it to.
        ({"cnf": {"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"}}, "token.certificate_required"),
        ({"cnf": {"x5t#S256": None}}, "token.unsupported_cnf"),
        ({"cnf": {"jwk": {"kty": "EC"}}}, "token.unsupported_cnf"),
        ({"cnf": {}}, "token.unsupported_cnf"),
        ({"cnf": "bound"}, "token.unsupported_cnf"),
    ],
)
def test_claims_and_header_are_checked(
    fake: FakeAuthorizationServer, verifier: TokenVerifier, change: dict[str, Any], reason: str
) -> None:
    with pytest.raises(InvalidToken) as info:
        verifier.verify("GET", URL, bearer(fake.mint(**at_run_time(change))))
    assert info.value.reason == reason
    assert info.value.status == 401
    assert header_lines(info.value) == [
        'Bearer error="invalid_token", error_description="The access token is invalid."'
    ]


@pytest.mark.parametrize("auth_time", ["1e999", "-1e999", "1" + "0" * 400, '"1700000000"', "true", "{}"])
def test_an_auth_time_that_is_no_finite_number_is_refused(
    fake: FakeAuthorizationServer, verifier: TokenVerifier, auth_time: str
) -> None:
    """RFC 7519 §2: a NumericDate is a number; JSON's 1e999 reads as infinity, which made verify()
    fail with OverflowError (a 500) rather than refuse the token (an outside audit)."""
    from joserfc import jws

    good = fake.mint(auth_time=1234567890)
    payload = base64.urlsafe_b64decode(good.split(".")[1] + "==").decode()
    assert '"auth_time":1234567890' in payload.replace(" ", "")
    edited = payload.replace(" ", "").replace('"auth_time":1234567890', f'"auth_time":{auth_time}')
    header = {"typ": "at+jwt", "alg": "ES256", "kid": fake.key.kid}
    token = jws.serialize_compact(header, edited.encode(), fake.key, algorithms=["ES256"])
    with pytest.raises(InvalidToken) as info:
        verifier.verify("GET", URL, bearer(token), max_age=60)
    assert info.value.reason == "token.invalid_claim" and info.value.status == 401


@pytest.mark.parametrize(
    ("claim", "value"),
    [("exp", "1" + "0" * 400), ("iat", "1" + "0" * 400), ("nbf", "1" + "0" * 400), ("client_id", "7")],
)
def test_time_claims_beyond_a_float_and_a_numeric_client_id_are_refused(
    fake: FakeAuthorizationServer, verifier: TokenVerifier, claim: str, value: str
) -> None:
    """An ``exp`` of 10**400 was accepted (joserfc compares the integer as it is), and with
    introspection failed with OverflowError; ``client_id: 7`` was read as "7".  The STS refuses
    both (an outside audit); RFC 7519 §2 NumericDate, RFC 9068 §2.2."""
    from joserfc import jws

    good = fake.mint(nbf=1234567890)
    payload = json.loads(base64.urlsafe_b64decode(good.split(".")[1] + "=="))
    text = json.dumps({**payload, claim: "@@"}, separators=(",", ":")).replace('"@@"', value)
    header = {"typ": "at+jwt", "alg": "ES256", "kid": fake.key.kid}
    token = jws.serialize_compact(header, text.encode(), fake.key, algorithms=["ES256"])
    with pytest.raises(InvalidToken) as info:
        verifier.verify("GET", URL, bearer(token))
    assert info.value.reason in ("token.invalid_claim", "token.claims") and info.value.status == 401


def test_a_null_cnf_is_never_a_bearer_token(fake: FakeAuthorizationServer, verifier: TokenVerifier) -> None:
    """``"cnf": null`` was read as no cnf, and the token accepted as a bearer token; the STS refuses
    it (an outside audit; RFC 9449 §7.1)."""
    from joserfc import jws

    payload = json.loads(base64.urlsafe_b64decode(fake.mint().split(".")[1] + "=="))
    text = json.dumps({**payload, "cnf": None}, separators=(",", ":"))
    header = {"typ": "at+jwt", "alg": "ES256", "kid": fake.key.kid}
    token = jws.serialize_compact(header, text.encode(), fake.key, algorithms=["ES256"])
    for scheme in ("Bearer", "DPoP"):
        with pytest.raises(InvalidToken) as info:
            verifier.verify("GET", URL, [("Authorization", f"{scheme} {token}")])
        assert info.value.reason == "token.unsupported_cnf", scheme


def test_exp_and_nbf_allow_the_leeway(fake: FakeAuthorizationServer, verifier: TokenVerifier) -> None:
    now = time.time()
    expired_recently = fake.mint(now=now - 320, lifetime=300)  # expired 20 s ago, leeway 30
    assert verifier.verify("GET", URL, bearer(expired_recently), now=now).subject
    with pytest.raises(InvalidToken):
        verifier.verify("GET", URL, bearer(expired_recently), now=now + 15)
    early = fake.mint(nbf=int(now) + 20)
    assert verifier.verify("GET", URL, bearer(early), now=now).subject


def test_a_list_audience_naming_us_is_accepted(
    fake: FakeAuthorizationServer, verifier: TokenVerifier
) -> None:
    token = fake.mint(audience=["ledger", AUDIENCE])
    assert verifier.verify("GET", URL, bearer(token)).audience == ("ledger", AUDIENCE)


def _unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """An ``alg: none`` JWT, built by hand (no library will sign one): the classic attack."""

    def part(value: dict[str, Any]) -> str:
        import json

        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part(header)}.{part(claims)}."


def test_algorithm_attacks_are_refused(fake: FakeAuthorizationServer, verifier: TokenVerifier) -> None:
    good = fake.mint()
    claims = jwt.decode(good, fake.key, algorithms=["ES256"]).claims
    none_token = _unsigned({"typ": "at+jwt", "alg": "none", "kid": fake.key.kid}, claims)
    with pytest.raises(InvalidToken) as info:
        verifier.verify("GET", URL, bearer(none_token + "x"))
    assert info.value.reason in ("token.alg", "token.not_a_jws")
    secret = OctKey.generate_key(256)
    hs = fake.mint(key=secret, alg="HS256", header={"kid": fake.key.kid})
    with pytest.raises(InvalidToken) as info:
        verifier.verify("GET", URL, bearer(hs))
    assert info.value.reason == "token.alg"
    # ES384 is asymmetric but neither ES256 nor declared by any published key.
    p384 = ECKey.generate_key("P-384", auto_kid=True)
    with pytest.raises(InvalidToken) as info:
        verifier.verify("GET", URL, bearer(fake.mint(key=p384, alg="ES384", header={"kid": fake.key.kid})))
    assert info.value.reason == "token.unknown_key"


@pytest.mark.parametrize("part", ["payload", "header"])
def test_a_token_not_in_utf8_is_refused(
    fake: FakeAuthorizationServer, verifier: TokenVerifier, part: str
) -> None:
    """RFC 7515 §5.2, RFC 7519 §7.2: header and claims are UTF-8 JSON; UTF-16/32 or a BOM is malformed."""
    claims = jwt.decode(fake.mint(), fake.key, algorithms=["ES256"]).claims
    header = {"typ": "at+jwt", "alg": "ES256", "kid": fake.key.kid}
    utf8 = sign_encoded(fake.key, header, claims, encoding="utf-8", part=part)
    assert verifier.verify("GET", URL, bearer(utf8)).subject
    for encoding in NOT_UTF8.values():
        token = sign_encoded(fake.key, header, claims, encoding=encoding, part=part)
        with pytest.raises(InvalidToken) as info:
            verifier.verify("GET", URL, bearer(token))
        assert info.value.reason == "token.malformed", encoding
        assert "UTF-8" in info.value.detail or "byte-order mark" in info.value.detail, info.value.detail


def test_the_key_never_comes_from_the_token(fake: FakeAuthorizationServer, verifier: TokenVerifier) -> None:
    attacker = ECKey.generate_key("P-256", auto_kid=True)
    embedded = fake.mint(key=attacker, header={"jwk": attacker.as_dict(private=False), "kid": attacker.kid})
    with pytest.raises(InvalidToken) as info:
        verifier.verify("GET", URL, bearer(embedded))
    assert info.value.reason == "token.unknown_key"
    # The real kid, the attacker's signature.
    forged = fake.mint(key=attacker, header={"kid": fake.key.kid})
    with pytest.raises(InvalidToken) as info:
        verifier.verify("GET", URL, bearer(forged))
    assert info.value.reason == "token.bad_signature"


def test_an_algorithm_declared_by_a_published_key_is_accepted(fake: FakeAuthorizationServer) -> None:
    rsa = RSAKey.generate_key(2048, parameters={"alg": "PS256", "use": "sig"}, auto_kid=True)
    fake.published = [fake.key, rsa]
    verifier = TokenVerifier(fake.issuer, AUDIENCE)
    assert verifier.verify("GET", URL, bearer(fake.mint(key=rsa, alg="PS256"))).subject
    assert verifier.keys.algorithms() == {"ES256", "PS256"}
    # Declared PS256: the same key may not be used with RS256 (signed here with a copy without "alg").
    undeclared = RSAKey.import_key({k: v for k, v in rsa.as_dict(private=True).items() if k != "alg"})
    with pytest.raises(InvalidToken) as info:
        verifier.verify("GET", URL, bearer(fake.mint(key=undeclared, alg="RS256", header={"kid": rsa.kid})))
    assert info.value.reason == "token.unknown_key"


# -- scopes and step-up -----------------------------------------------------------------------------


def test_missing_scope_is_403_naming_what_is_needed(fake: FakeAuthorizationServer) -> None:
    verifier = TokenVerifier(fake.issuer, AUDIENCE, required_scopes=["deploy:read"])
    token = fake.mint(scope="deploy:read")
    assert verifier.verify("GET", URL, bearer(token)).has_scopes("deploy:read")
    with pytest.raises(InsufficientScope) as info:
        verifier.verify("POST", URL, bearer(token), scopes="deploy:write")
    assert info.value.status == 403
    assert header_lines(info.value) == [
        'Bearer error="insufficient_scope", error_description="The access token does not grant the scope'
        ' this resource requires.", scope="deploy:read deploy:write"'
    ]
    with pytest.raises(InsufficientScope):
        verifier.verify("GET", URL, bearer(fake.mint(scope=None)))


def test_step_up_challenge_when_attestation_is_older_than_max_age(
    fake: FakeAuthorizationServer, verifier: TokenVerifier
) -> None:
    now = time.time()
    token = fake.mint(now=now, auth_time=int(now) - 600)
    assert verifier.verify("POST", URL, bearer(token), now=now).auth_time == int(now) - 600
    with pytest.raises(InsufficientUserAuthentication) as info:
        verifier.verify("POST", URL, bearer(token), max_age=60, now=now)
    error = info.value
    assert error.status == 401
    # RFC 9470 §3 (its example quotes max_age; either form is a valid auth-param).
    assert header_lines(error) == [
        'Bearer error="insufficient_user_authentication", '
        'error_description="More recent attestation is required.", max_age="60"'
    ]
    assert error.body() == {
        "error": "insufficient_user_authentication",
        "error_description": "More recent attestation is required.",
        "max_age": 60,
    }
    fresh = fake.mint(now=now, auth_time=int(now) - 59)
    assert verifier.verify("POST", URL, bearer(fresh), max_age=60, now=now).subject
    without = fake.mint(now=now, omit=("auth_time",))
    assert "auth_time" not in jwt.decode(without, fake.key, algorithms=["ES256"]).claims
    assert verifier.verify("POST", URL, bearer(without), now=now).auth_time is None
    with pytest.raises(InsufficientUserAuthentication) as info:
        verifier.verify("POST", URL, bearer(without), max_age=60, now=now)
    assert info.value.reason == "auth_time.missing"


# -- DPoP (RFC 9449 §4.3, §7) ----------------------------------------------------------------------


@pytest.fixture
def bound(fake: FakeAuthorizationServer, client_key: ECKey) -> str:
    return fake.mint(jkt=client_key.thumbprint())


@pytest.mark.parametrize(
    ("claims", "accepted"),
    [
        ({"exp": -120}, False),  # its own exp passed two minutes ago
        ({"nbf": 3600}, False),  # not valid for an hour
        ({"exp": "soon"}, False),
        ({"exp": 60, "nbf": -5}, True),
    ],
)
def test_a_proof_is_not_accepted_outside_its_own_exp_and_nbf(
    verifier: TokenVerifier, bound: str, client_key: ECKey, claims: dict[str, Any], accepted: bool
) -> None:
    """RFC 7519 §4.1.4-5: a proof that sets exp or nbf was accepted outside them (the STS refuses
    them: an outside audit)."""
    now = int(time.time())
    timed = {name: now + offset if isinstance(offset, int) else offset for name, offset in claims.items()}
    proof = sign_proof(client_key, token=bound, claims=timed)
    if accepted:
        assert verifier.verify("POST", URL, dpop_headers(bound, proof)).jkt == client_key.thumbprint()
    else:
        with pytest.raises(InvalidDPoPProof):
            verifier.verify("POST", URL, dpop_headers(bound, proof))


@pytest.mark.parametrize("value", ["null", "1e999", "-1e999", "NaN", "1" + "0" * 400, "true"])
@pytest.mark.parametrize("name", ["exp", "nbf"])
def test_a_proofs_exp_or_nbf_that_is_no_numeric_date_is_refused(
    verifier: TokenVerifier, bound: str, client_key: ECKey, name: str, value: str
) -> None:
    """RFC 7519 §2: a NumericDate is a finite number; the STS refuses a proof whose exp or nbf is
    null, infinite or beyond a float, and the library accepted it (an outside re-check)."""
    from joserfc import jws

    body = {"jti": uuid.uuid4().hex, "htm": "POST", "htu": URL, "iat": int(time.time()), "ath": ath(bound)}
    text = json.dumps({**body, name: "@@"}, separators=(",", ":")).replace('"@@"', value)
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": client_key.as_dict(private=False)}
    proof = jws.serialize_compact(header, text.encode(), client_key, algorithms=["ES256"])
    with pytest.raises(InvalidDPoPProof) as info:
        verifier.verify("POST", URL, dpop_headers(bound, proof))
    assert info.value.reason in (f"dpop.{name}", "dpop.malformed")  # (NaN: no JSON the parser reads)


def test_a_valid_dpop_request_passes(verifier: TokenVerifier, bound: str, client_key: ECKey) -> None:
    result = verifier.verify("POST", URL, dpop_headers(bound, sign_proof(client_key, token=bound)))
    assert result.jkt == client_key.thumbprint()
    assert result.token_type == "DPoP"


def test_the_library_proof_passes_the_verifier(
    fake: FakeAuthorizationServer, verifier: TokenVerifier
) -> None:
    key = DPoPKey()
    token = fake.mint(jkt=key.jkt)
    proof = key.proof("post", URL + "?dry=1#frag", access_token=token)
    assert verifier.verify("POST", URL + "?dry=1", dpop_headers(token, proof)).jkt == key.jkt


def test_htu_and_request_url_are_compared_without_query_and_fragment(
    verifier: TokenVerifier, bound: str, client_key: ECKey
) -> None:
    """RFC 9449 §4.3 (9): "ignoring any query and fragment parts", of the request and of ``htu``."""
    ok = sign_proof(client_key, token=bound)
    assert verifier.verify("POST", URL + "?page=2", dpop_headers(bound, ok)).jkt
    for htu in (URL + "?page=2", URL + "?page=3", URL + "#frag", URL + "?"):
        proof = sign_proof(client_key, token=bound, url=htu)
        assert verifier.verify("POST", URL + "?page=2", dpop_headers(bound, proof)).jkt
    elsewhere = sign_proof(client_key, token=bound, url="https://deploy.example.com/other?x=" + URL)
    with pytest.raises(InvalidDPoPProof) as info:
        verifier.verify("POST", URL, dpop_headers(bound, elsewhere))
    assert info.value.reason == "dpop.htu_mismatch"


def test_htu_compares_normalised(verifier: TokenVerifier, bound: str, client_key: ECKey) -> None:
    proof = sign_proof(client_key, token=bound, url="HTTPS://Deploy.Example.COM:443/%72eleases")
    assert verifier.verify("POST", URL, dpop_headers(bound, proof)).jkt


def test_htu_of_an_iri_is_compared_as_its_uri() -> None:
    """RFC 3987 §3.1: ``/api/€`` (a server's decoded path) is the client's ``/api/%E2%82%AC``."""
    from sts_client.dpop import normalise_htu

    assert normalise_htu("https://api.example/v1/caf\u00e9") == normalise_htu(
        "https://api.example/v1/caf%c3%a9"
    )
    assert normalise_htu("https://api.example/\u20ac") == "https://api.example/%E2%82%AC"


@pytest.mark.parametrize(
    ("proof_args", "reason"),
    [
        ({"method": "GET"}, "dpop.htm_mismatch"),
        ({"url": "https://deploy.example.com/other"}, "dpop.htu_mismatch"),
        ({"url": "https://evil.example.com/releases"}, "dpop.htu_mismatch"),
        # No URI (urlsplit would drop the tab and strip the leading space).
        ({"url": URL.replace("releases", "rele\tases")}, "dpop.htu_mismatch"),
        ({"url": " " + URL}, "dpop.htu_mismatch"),
        ({"iat": lambda: time.time() - 301}, "dpop.iat_stale"),
        ({"iat": lambda: time.time() + 120}, "dpop.iat_future"),
        ({"claims": {"ath": ath("some other token")}}, "dpop.ath_mismatch"),
        ({"claims": {"ath": None}}, "dpop.ath_mismatch"),
        ({"claims": {"ath": "\u00e9" * 43}}, "dpop.ath_mismatch"),  # compare_digest raised on it
        ({"claims": {"jti": None}}, "dpop.jti"),
        ({"claims": {"htu": None}}, "dpop.htm_htu_missing"),
        ({"claims": {"iat": None}}, "dpop.iat_missing"),
        ({"header": {"typ": "JWT"}}, "dpop.typ"),
        ({"header": {"typ": None}}, "dpop.typ"),
        ({"header": {"jwk": None}}, "dpop.jwk_missing"),
        ({"header": {"crit": ["jwk"]}}, "dpop.crit"),
        # A nested JWT (RFC 7519 §5.2); a certificate of another key beside the proof key (RFC 7515
        # §4.1.6), or one the library cannot read: refused by the service, accepted here before.
        ({"header": {"cty": "JWT"}}, "dpop.malformed"),
        ({"header": {"x5c": self_signed_x5c(ECKey.generate_key("P-256"))}}, "dpop.x5c_mismatch"),
        ({"header": {"x5c": unsupported_x5c()}}, "dpop.x5c_mismatch"),
    ],
)
def test_each_proof_check(
    verifier: TokenVerifier, bound: str, client_key: ECKey, proof_args: dict[str, Any], reason: str
) -> None:
    proof = sign_proof(client_key, token=bound, **at_run_time(proof_args))
    with pytest.raises(InvalidDPoPProof) as info:
        verifier.verify("POST", URL, dpop_headers(bound, proof))
    assert info.value.reason == reason
    assert info.value.status == 401
    assert header_lines(info.value) == [
        f'DPoP error="invalid_dpop_proof", error_description="The DPoP proof is invalid.", algs="{ALGS}"'
    ]


def test_a_replayed_jti_is_refused_within_the_window(
    fake: FakeAuthorizationServer, bound: str, client_key: ECKey
) -> None:
    now = time.time()
    verifier = TokenVerifier(fake.issuer, AUDIENCE, dpop_max_age=300)
    proof = sign_proof(client_key, token=bound, iat=now, jti="once")
    assert verifier.verify("POST", URL, dpop_headers(bound, proof), now=now).jkt
    with pytest.raises(InvalidDPoPProof) as info:
        verifier.verify("POST", URL, dpop_headers(bound, proof), now=now + 1)
    assert info.value.reason == "dpop.replayed"
    # A new proof with the same jti is also a replay, not only the same bytes.
    again = sign_proof(client_key, token=bound, iat=now + 2, jti="once")
    with pytest.raises(InvalidDPoPProof):
        verifier.verify("POST", URL, dpop_headers(bound, again), now=now + 2)


def test_a_proof_with_a_fractional_iat_is_remembered_as_long_as_it_is_accepted(
    fake: FakeAuthorizationServer, client_key: ECKey
) -> None:
    """With ``leeway=0`` a proof stays acceptable while ``iat >= now - dpop_max_age``: its jti was
    remembered until ``int(iat) + dpop_max_age``, up to a second less, so the same proof was
    accepted again in that second (an outside audit)."""
    start = float(int(time.time()))
    bound = fake.mint(jkt=client_key.thumbprint(), now=start)
    verifier = TokenVerifier(fake.issuer, AUDIENCE, dpop_max_age=60, leeway=0)
    proof = sign_proof(client_key, token=bound, claims={"iat": start + 0.9})
    assert verifier.verify("POST", URL, dpop_headers(bound, proof), now=start + 1).jkt
    with pytest.raises(InvalidDPoPProof) as info:
        verifier.verify("POST", URL, dpop_headers(bound, proof), now=start + 60.5)
    assert info.value.reason == "dpop.replayed"


def test_the_proof_key_must_be_the_bound_key(verifier: TokenVerifier, bound: str) -> None:
    other = ECKey.generate_key("P-256")
    with pytest.raises(InvalidDPoPProof) as info:
        verifier.verify("POST", URL, dpop_headers(bound, sign_proof(other, token=bound)))
    assert info.value.reason == "dpop.key_mismatch"


def test_a_proof_carrying_a_private_key_is_refused(
    verifier: TokenVerifier, bound: str, client_key: ECKey
) -> None:
    leaky = sign_proof(client_key, token=bound, header={"jwk": client_key.as_dict(private=True)})
    with pytest.raises(InvalidDPoPProof) as info:
        verifier.verify("POST", URL, dpop_headers(bound, leaky))
    assert info.value.reason == "dpop.jwk_not_public"


@pytest.mark.parametrize("part", ["payload", "header"])
def test_a_proof_not_in_utf8_is_refused(
    verifier: TokenVerifier, bound: str, client_key: ECKey, part: str
) -> None:
    def signed(encoding: str) -> str:
        header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": client_key.as_dict(private=False)}
        claims = {
            "jti": uuid.uuid4().hex,
            "htm": "POST",
            "htu": URL,
            "iat": int(time.time()),
            "ath": ath(bound),
        }
        return sign_encoded(client_key, header, claims, encoding=encoding, part=part)

    assert verifier.verify("POST", URL, dpop_headers(bound, signed("utf-8"))).jkt == client_key.thumbprint()
    for encoding in NOT_UTF8.values():
        with pytest.raises(InvalidDPoPProof) as info:
            verifier.verify("POST", URL, dpop_headers(bound, signed(encoding)))
        assert info.value.reason == "dpop.malformed", encoding


def test_an_rsa_proof_key_needs_exponent_65537(fake: FakeAuthorizationServer) -> None:
    """An RSA-2048 proof key (its header is over joserfc's default 512 bytes) is accepted with e = 65537
    and refused with e = 3."""
    verifier = TokenVerifier(fake.issuer, AUDIENCE)
    strong = RSAKey.generate_key(2048)
    token = fake.mint(jkt=strong.thumbprint())
    proof = sign_proof(strong, token=token, alg="RS256")
    assert verifier.verify("POST", URL, dpop_headers(token, proof)).jkt == strong.thumbprint()
    e3 = rsa_key_with_exponent_3()
    token = fake.mint(jkt=e3.thumbprint())
    with pytest.raises(InvalidDPoPProof) as info:
        verifier.verify("POST", URL, dpop_headers(token, sign_proof(e3, token=token, alg="RS256")))
    assert info.value.reason == "dpop.jwk_not_public"
    assert "exponent" in info.value.detail


@pytest.mark.parametrize("x", [b"\x01" + bytes(31), bytes(32)], ids=["neutral", "order-4"])
def test_an_ed25519_proof_key_of_small_order_is_refused(fake: FakeAuthorizationServer, x: bytes) -> None:
    """A small-order public key verifies a forged signature (R = that point, S = 0; for the neutral
    point, for every message): such a proof proves possession of no key (RFC 9449 §4.3)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    jwk = {"crv": "Ed25519", "kty": "OKP", "x": b64(x)}
    jkt = b64(hashlib.sha256(json.dumps(jwk, separators=(",", ":"), sort_keys=True).encode()).digest())
    token = fake.mint(jkt=jkt)
    header = {"typ": "dpop+jwt", "alg": "Ed25519", "jwk": jwk}
    claims = {"jti": uuid.uuid4().hex, "htm": "POST", "htu": URL, "iat": int(time.time()), "ath": ath(token)}
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    forged = signing_input + "." + b64(x + bytes(32))
    with pytest.raises(InvalidDPoPProof) as info:
        TokenVerifier(fake.issuer, AUDIENCE).verify("POST", URL, dpop_headers(token, forged))
    assert info.value.reason == "dpop.jwk_not_public"
    assert "small order" in info.value.detail


@pytest.mark.parametrize("x", ["", "====", "AQ"], ids=["empty", "padding-only", "one-byte"])
def test_an_ed25519_proof_key_of_the_wrong_length_is_refused(fake: FakeAuthorizationServer, x: str) -> None:
    """``x`` decoding to no 32 bytes raised "negative shift count" out of ``verify`` (a 500 under
    ``@require_token`` and ``TokenMiddleware``; an outside audit)."""
    jwk = {"crv": "Ed25519", "kty": "OKP", "x": x}
    token = fake.mint(jkt=b64url(hashlib.sha256(json.dumps(jwk, sort_keys=True).encode()).digest()))
    header = {"typ": "dpop+jwt", "alg": "Ed25519", "jwk": jwk}
    claims = {"jti": uuid.uuid4().hex, "htm": "POST", "htu": URL, "iat": int(time.time()), "ath": ath(token)}
    proof = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}.{'A' * 86}"
    with pytest.raises(InvalidDPoPProof) as info:
        TokenVerifier(fake.issuer, AUDIENCE).verify("POST", URL, dpop_headers(token, proof))
    assert info.value.reason == "dpop.jwk_not_public"
    assert "wrong length" in info.value.detail


def test_symmetric_or_unlisted_proof_algorithms_are_refused(fake: FakeAuthorizationServer) -> None:
    secret = OctKey.generate_key(256)
    token = fake.mint(jkt=secret.thumbprint())
    verifier = TokenVerifier(fake.issuer, AUDIENCE)
    proof = sign_proof(secret, token=token, alg="HS256", header={"jwk": {"kty": "oct", "k": "c2VjcmV0"}})
    with pytest.raises(InvalidDPoPProof) as info:
        verifier.verify("POST", URL, dpop_headers(token, proof))
    assert info.value.reason == "dpop.alg"
    only_es256 = TokenVerifier(fake.issuer, AUDIENCE, dpop_algorithms=["ES256"])
    p384 = ECKey.generate_key("P-384")
    token = fake.mint(jkt=p384.thumbprint())
    with pytest.raises(InvalidDPoPProof) as info:
        only_es256.verify("POST", URL, dpop_headers(token, sign_proof(p384, token=token, alg="ES384")))
    assert info.value.reason == "dpop.alg"
    assert header_lines(info.value)[0].endswith('algs="ES256"')


def test_exactly_one_dpop_header(verifier: TokenVerifier, bound: str, client_key: ECKey) -> None:
    one, two = sign_proof(client_key, token=bound), sign_proof(client_key, token=bound)
    for headers in (
        [("Authorization", f"DPoP {bound}"), ("DPoP", one), ("DPoP", two)],
        {"Authorization": f"DPoP {bound}", "DPoP": f"{one}, {two}"},  # folded into one line
        {"Authorization": f"DPoP {bound}"},
    ):
        with pytest.raises(InvalidDPoPProof) as info:
            verifier.verify("POST", URL, headers)
        assert info.value.reason == "dpop.count"


def test_a_bound_token_used_as_bearer_is_refused(
    verifier: TokenVerifier, bound: str, client_key: ECKey
) -> None:
    headers = [("Authorization", f"Bearer {bound}"), ("DPoP", sign_proof(client_key, token=bound))]
    with pytest.raises(InvalidToken) as info:
        verifier.verify("POST", URL, headers)
    assert info.value.reason == "token.dpop_bound_used_as_bearer"
    assert header_lines(info.value) == [
        'Bearer error="invalid_token", error_description="The access token is invalid."',
        f'DPoP algs="{ALGS}"',
    ]


def test_an_unbound_token_used_with_dpop_is_refused(
    fake: FakeAuthorizationServer, verifier: TokenVerifier, client_key: ECKey
) -> None:
    token = fake.mint()
    with pytest.raises(InvalidToken) as info:
        verifier.verify("POST", URL, dpop_headers(token, sign_proof(client_key, token=token)))
    assert info.value.reason == "token.not_dpop_bound"
    assert header_lines(info.value)[0].startswith('DPoP error="invalid_token"')


def test_dpop_challenges_use_the_dpop_scheme(
    fake: FakeAuthorizationServer, verifier: TokenVerifier, client_key: ECKey
) -> None:
    now = time.time()
    token = fake.mint(jkt=client_key.thumbprint(), auth_time=int(now) - 600, scope="deploy:read")
    with pytest.raises(InsufficientUserAuthentication) as info:
        verifier.verify("POST", URL, dpop_headers(token, sign_proof(client_key, token=token)), max_age=60)
    assert header_lines(info.value) == [
        'DPoP error="insufficient_user_authentication", error_description="More recent attestation is'
        f' required.", max_age="60", algs="{ALGS}"'
    ]


def test_replay_cache_is_bounded_and_fails_closed() -> None:
    cache = InMemoryReplayCache(max_entries=2)
    assert cache.first_use("a", expires_at=100, now=0)
    assert not cache.first_use("a", expires_at=100, now=50)
    assert cache.first_use("b", expires_at=100, now=0)
    with pytest.raises(ReplayCacheFull):
        cache.first_use("c", expires_at=100, now=50)
    assert cache.first_use("c", expires_at=300, now=100)  # a and b expired, purged
    assert len(cache) == 1
    assert cache.first_use("a", expires_at=400, now=150)  # seen before, but outside its window


# -- JWKS fetching ----------------------------------------------------------------------------------


def test_jwks_is_cached_and_refetched_once_for_an_unknown_kid(fake: FakeAuthorizationServer) -> None:
    verifier = TokenVerifier(fake.issuer, AUDIENCE, jwks_min_refresh_interval=0)
    for _ in range(5):
        verifier.verify("GET", URL, bearer(fake.mint()))
    assert fake.jwks_requests == 1
    fake.rotate()
    assert verifier.verify("GET", URL, bearer(fake.mint())).subject
    assert fake.jwks_requests == 2
    stranger = ECKey.generate_key("P-256", auto_kid=True)
    with pytest.raises(InvalidToken):
        verifier.verify("GET", URL, bearer(fake.mint(key=stranger)))
    assert fake.jwks_requests == 3


def test_unknown_kid_refetches_are_rate_limited(
    fake: FakeAuthorizationServer, verifier: TokenVerifier
) -> None:
    verifier.verify("GET", URL, bearer(fake.mint()))
    for _ in range(5):
        stranger = ECKey.generate_key("P-256", auto_kid=True)
        with pytest.raises(InvalidToken):
            verifier.verify("GET", URL, bearer(fake.mint(key=stranger)))
    assert fake.jwks_requests == 1  # within min_refresh_interval (30 s): no refetch at all


def test_a_failed_refetch_is_not_tried_again_before_the_interval(fake: FakeAuthorizationServer) -> None:
    """While the issuer's JWKS fails, neither made-up kids nor expired keys make a request each: one
    attempt per ``min_refresh_interval``; the keys fetched before serve while not too stale."""
    clock = Clock(1000.0)
    keys = JWKSCache(f"{fake.url}/.well-known/jwks.json", clock=clock, min_refresh_interval=30, max_stale=600)
    keys.key_for(fake.key.kid, "ES256")
    fake.jwks_available = False
    clock.now += 31  # the keys may be refetched now (unknown kids), but the issuer fails
    for n in range(10):
        with pytest.raises(UnknownKey):
            keys.key_for(f"made-up-{n}", "ES256")
    assert fake.jwks_requests == 2
    clock.now += 300  # past the keys' max-age: every request wants a refetch
    for _ in range(10):
        assert keys.key_for(fake.key.kid, "ES256") is not None
    assert fake.jwks_requests == 3
    clock.now += 600  # too stale to use, and still failing: refused, one attempt per interval
    for _ in range(5):
        with pytest.raises(KeysUnavailable):
            keys.key_for(fake.key.kid, "ES256")
    assert fake.jwks_requests == 4
    fake.jwks_available = True
    clock.now += 30
    assert keys.key_for(fake.key.kid, "ES256") is not None and fake.jwks_requests == 5


@pytest.mark.parametrize(
    ("cache_control", "refetch_after"),
    [
        ("public, max-age=120", 120),
        ("max-age=5", 30),
        ("no-store", 30),
        (None, 300),
        ("max-age=999999", 86400),
    ],
)
def test_jwks_cache_control_is_honoured(
    fake: FakeAuthorizationServer, cache_control: str | None, refetch_after: int
) -> None:
    fake.jwks_cache_control = cache_control or ""
    clock = Clock(1000.0)
    keys = JWKSCache(f"{fake.url}/.well-known/jwks.json", clock=clock)
    keys.key_for(fake.key.kid, "ES256")
    clock.now += refetch_after - 1
    keys.key_for(fake.key.kid, "ES256")
    assert fake.jwks_requests == 1
    clock.now += 1
    keys.key_for(fake.key.kid, "ES256")
    assert fake.jwks_requests == 2


def test_a_jwks_with_an_etag_is_revalidated_not_fetched_again(fake: FakeAuthorizationServer) -> None:
    """A set served with a strong ETag is asked for with If-None-Match once it expires: a 304 keeps
    the keys for another max-age; a rotation (a new tag) brings the new set; a weak tag is not used."""
    fake.jwks_etag = True
    clock = Clock(1000.0)
    keys = JWKSCache(f"{fake.url}/.well-known/jwks.json", clock=clock)
    first = keys.key_for(fake.key.kid, "ES256")
    for _ in range(2):
        clock.now += 300  # past max-age: revalidated
        assert keys.key_for(fake.key.kid, "ES256") is first
    assert fake.jwks_statuses == [200, 304, 304]
    clock.now += 299  # the 304's max-age counts from the revalidation
    keys.key_for(fake.key.kid, "ES256")
    assert fake.jwks_requests == 3
    kid = fake.rotate().kid
    clock.now += 31  # an unknown kid refetches after min_refresh_interval: the set changed
    assert keys.key_for(kid, "ES256") is not None
    assert fake.jwks_statuses == [200, 304, 304, 200]
    fake.jwks_etag = "weak"
    clock.now += 300
    keys.key_for(kid, "ES256")
    clock.now += 300
    keys.key_for(kid, "ES256")
    assert fake.jwks_statuses[-2:] == [200, 200]


def test_concurrent_fetches_are_single_flight(fake: FakeAuthorizationServer) -> None:
    fake.jwks_gate = threading.Event()
    # No rate limit, so only single flight can keep the waiting threads from fetching again.
    keys = JWKSCache(f"{fake.url}/.well-known/jwks.json", min_refresh_interval=0)
    found: list[Key] = []
    threads = [
        threading.Thread(target=lambda: found.append(keys.key_for(fake.key.kid, "ES256"))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while fake.jwks_requests == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    fake.jwks_gate.set()
    for thread in threads:
        thread.join(timeout=5)
    assert len(found) == 8
    assert fake.jwks_requests == 1


def test_private_symmetric_and_weak_keys_in_the_jwks_are_skipped(fake: FakeAuthorizationServer) -> None:
    weak = RSAKey.generate_key(2048, auto_kid=True).as_dict(private=False)
    weak["n"] = weak["n"][: len(weak["n"]) // 2]  # a 1024-bit modulus
    fake.jwks_document = {
        "keys": [
            fake.key.as_dict(private=True),
            {"kty": "oct", "k": "c2VjcmV0", "kid": "mac"},
            {**weak, "kid": "weak"},
            {**fake.key.as_dict(private=False), "kid": "enc", "use": "enc"},
        ]
    }
    keys = JWKSCache(f"{fake.url}/.well-known/jwks.json")
    for kid in (fake.key.kid, "mac", "weak", "enc"):
        with pytest.raises(UnknownKey):
            keys.key_for(kid, "ES256")


def test_an_rsa_key_with_exponent_3_in_the_jwks_is_skipped(
    fake: FakeAuthorizationServer, caplog: pytest.LogCaptureFixture
) -> None:
    """NIST SP 800-56B: e = 65537 only, as at the STS; the key is skipped with a log line."""
    e3 = rsa_key_with_exponent_3()
    strong = RSAKey.generate_key(2048, parameters={"kid": "strong", "alg": "RS256"})
    fake.jwks_document = {"keys": [e3.as_dict(private=False), strong.as_dict(private=False)]}
    keys = JWKSCache(f"{fake.url}/.well-known/jwks.json")
    with caplog.at_level("WARNING", logger="sts_client.jwks"):
        assert keys.key_for("strong", "RS256").thumbprint() == strong.thumbprint()
    with pytest.raises(UnknownKey):
        keys.key_for("e3", "RS256")
    assert any("exponent" in message for message in caplog.messages), caplog.messages


def test_unreachable_keys_fail_closed_with_503(fake: FakeAuthorizationServer) -> None:
    fake.jwks_available = False
    verifier = TokenVerifier(fake.issuer, AUDIENCE)
    with pytest.raises(TemporarilyUnavailable) as info:
        verifier.verify("GET", URL, bearer(fake.mint()))
    assert info.value.status == 503
    assert header_lines(info.value) == []
    assert header_lines(info.value, "Retry-After") == ["5"]


def test_metadata_naming_another_issuer_is_refused(fake: FakeAuthorizationServer) -> None:
    fake.metadata_issuer = "https://impostor.example"
    with pytest.raises(TemporarilyUnavailable):
        TokenVerifier(fake.issuer, AUDIENCE).verify("GET", URL, bearer(fake.mint()))
    assert fake.jwks_requests == 0


def test_plain_http_is_only_for_loopback() -> None:
    with pytest.raises(ValueError, match="https"):
        TokenVerifier("http://sts.example.com", AUDIENCE)
    with pytest.raises(ValueError, match="https"):
        TokenVerifier("https://sts.example.com", AUDIENCE, jwks_uri="http://keys.example.com/jwks")


# -- revocation through introspection ---------------------------------------------------------------


def test_revocation_is_seen_after_the_introspection_cache(fake: FakeAuthorizationServer) -> None:
    verifier = TokenVerifier(fake.issuer, AUDIENCE, introspection=INTROSPECTION_CLIENT)
    now = time.time()
    token = fake.mint(now=now)
    jti = jwt.decode(token, fake.key, algorithms=["ES256"]).claims["jti"]
    assert verifier.verify("GET", URL, bearer(token), now=now)
    fake.revoked.add(jti)
    assert verifier.verify("GET", URL, bearer(token), now=now + 29)  # cached answer
    assert fake.introspection_requests == 1
    with pytest.raises(InvalidToken) as info:
        verifier.verify("GET", URL, bearer(token), now=now + 31)
    assert info.value.reason == "token.inactive"
    assert fake.introspection_requests == 2


def test_introspection_failures_fail_closed(fake: FakeAuthorizationServer) -> None:
    fake.introspection_available = False
    with pytest.raises(TemporarilyUnavailable):
        TokenVerifier(fake.issuer, AUDIENCE, introspection=INTROSPECTION_CLIENT).verify(
            "GET", URL, bearer(fake.mint())
        )
    fake.introspection_available = True
    wrong = TokenVerifier(fake.issuer, AUDIENCE, introspection=("deploy-api", "wrong"))
    with pytest.raises(TemporarilyUnavailable):
        wrong.verify("GET", URL, bearer(fake.mint()))
    assert "wrong" not in repr(wrong._introspection)


def test_unusable_metadata_for_introspection_fails_closed_and_is_not_fetched_per_request(
    fake: FakeAuthorizationServer,
) -> None:
    """Metadata naming another issuer (a mix-up): introspection is unavailable (a 503, fail closed),
    never an error of the resource server, and the metadata is not fetched again for each request."""
    fake.metadata_issuer = "https://someone-else.example"
    jwks = f"{fake.url}/.well-known/jwks.json"
    verifier = TokenVerifier(fake.issuer, AUDIENCE, jwks_uri=jwks, introspection=INTROSPECTION_CLIENT)
    fetched = len(fake.metadata_requests)
    for _ in range(10):
        with pytest.raises(TemporarilyUnavailable):
            verifier.verify("GET", URL, bearer(fake.mint()))
    assert len(fake.metadata_requests) - fetched == 1


# -- Flask and WSGI integration ---------------------------------------------------------------------


@pytest.mark.parametrize("prefixed", [False, True])
def test_the_decorator_takes_the_url_the_client_used_behind_a_prefixing_proxy(
    verifier: TokenVerifier, bound: str, client_key: ECKey, prefixed: bool
) -> None:
    """The path as sent (``REQUEST_URI``) serves for ``htu`` only when it is the application's whole
    path: behind a proxy that strips a prefix and says so (``X-Forwarded-Prefix``, ``ProxyFix``),
    the client used the prefixed URL, which ``request.url`` rebuilds."""
    from werkzeug.middleware.proxy_fix import ProxyFix

    app = Flask(__name__)
    app.wsgi_app = ProxyFix(app.wsgi_app, x_proto=1, x_host=1, x_prefix=1)  # type: ignore[method-assign]

    @app.post("/releases")
    @require_token(verifier)
    def release() -> dict[str, Any]:
        return {"sub": g.token.subject}

    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "deploy.example.com"}
    used = "https://deploy.example.com/api/releases" if prefixed else URL
    if prefixed:
        forwarded["X-Forwarded-Prefix"] = "/api"
    proof = sign_proof(client_key, url=used, token=bound)
    resp = app.test_client().post("/releases", headers=[*dpop_headers(bound, proof), *forwarded.items()])
    assert resp.status_code == 200, resp.headers.get("WWW-Authenticate")


def test_flask_decorator_sets_g_token_and_answers_challenges(
    fake: FakeAuthorizationServer, verifier: TokenVerifier
) -> None:
    app = Flask(__name__)

    @app.post("/releases")
    @require_token(verifier, scopes="deploy:write", max_age=60)
    def release() -> dict[str, Any]:
        return {"sub": g.token.subject, "scopes": sorted(g.token.scopes)}

    web = app.test_client()
    token = fake.mint(scope="deploy:read deploy:write")
    resp = web.post("/releases", headers=bearer(token))
    assert resp.status_code == 200
    assert resp.get_json() == {
        "sub": "repo:acme/app:ref:refs/heads/main",
        "scopes": ["deploy:read", "deploy:write"],
    }

    resp = web.post("/releases", headers=bearer(fake.mint(scope="deploy:read")))
    assert resp.status_code == 403
    assert resp.get_json()["error"] == "insufficient_scope"
    assert 'scope="deploy:write"' in resp.headers["WWW-Authenticate"]

    old = fake.mint(scope="deploy:write", auth_time=int(time.time()) - 600)
    resp = web.post("/releases", headers=bearer(old))
    assert resp.status_code == 401
    assert resp.headers["Cache-Control"] == "no-store"
    [challenge] = parse_challenges(resp.headers.getlist("WWW-Authenticate"))
    assert challenge.error == "insufficient_user_authentication"
    assert challenge.params["max_age"] == "60"

    resp = web.post("/releases")
    assert resp.status_code == 401
    assert resp.headers.getlist("WWW-Authenticate") == ["Bearer", f'DPoP algs="{ALGS}"']


def test_flask_decorator_checks_dpop_against_the_request_url(
    fake: FakeAuthorizationServer, verifier: TokenVerifier
) -> None:
    app = Flask(__name__)

    @app.get("/items")
    @require_token(verifier)
    def items() -> dict[str, Any]:
        return {"jkt": g.token.jkt}

    key = DPoPKey()
    token = fake.mint(jkt=key.jkt)
    web = app.test_client()
    proof = key.proof("GET", "http://localhost/items", access_token=token)
    resp = web.get("/items?x=1", headers={"Authorization": f"DPoP {token}", "DPoP": proof})
    assert resp.status_code == 200 and resp.get_json() == {"jkt": key.jkt}
    wrong = key.proof("GET", "http://localhost/other", access_token=token)
    resp = web.get("/items", headers={"Authorization": f"DPoP {token}", "DPoP": wrong})
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"].startswith('DPoP error="invalid_dpop_proof"')


def test_wsgi_middleware_protects_prefixes(fake: FakeAuthorizationServer, verifier: TokenVerifier) -> None:
    seen: list[Any] = []

    @Request.application
    def inner(request: Request) -> Response:
        seen.append(request.environ.get(ENVIRON_KEY))
        return Response("ok")

    app = TokenMiddleware(
        inner,
        verifier,
        [
            "/api",
            ProtectedPath("/api/admin/", scopes=("deploy:admin",)),
            ProtectedPath("/api/fresh", max_age=60),
        ],
    )
    web = Client(app)
    assert web.get("/health").status_code == 200
    assert web.get("/apix").status_code == 200  # /api covers whole segments only
    assert seen == [None, None]
    resp = web.get("/api/things")
    assert resp.status_code == 401 and resp.headers.getlist("WWW-Authenticate")[0] == "Bearer"
    token = fake.mint(scope="deploy:read", auth_time=int(time.time()) - 600)
    resp = web.get("/api/things", headers=bearer(token))
    assert resp.status_code == 200
    assert isinstance(seen[-1], VerifiedAccessToken) and seen[-1].scopes == {"deploy:read"}
    resp = web.get("/api/admin/users", headers=bearer(token))
    assert resp.status_code == 403 and resp.json == {
        "error": "insufficient_scope",
        "error_description": "The access token does not grant the scope this resource requires.",
    }
    resp = web.get("/api/fresh", headers=bearer(token))
    assert resp.status_code == 401 and 'max_age="60"' in resp.headers["WWW-Authenticate"]
    assert len(seen) == 3


@pytest.mark.parametrize(
    "host", ["deploy.example.com/releases#", "deploy.example.com/releases?", "x@deploy.example.com/releases#"]
)
def test_the_middleware_takes_no_path_from_the_host_header(
    fake: FakeAuthorizationServer, verifier: TokenVerifier, client_key: ECKey, host: str
) -> None:
    """granian and wsgiref pass ``Host`` on as sent, and the URL for ``htu`` pasted it in: with
    ``Host: deploy.example.com/releases#``, ``/admin`` read as ``/releases``, so a proof for
    ``/releases`` passed at ``/admin`` (an outside audit).  A ``Host`` that is no authority is
    ignored for the server's own name."""
    token = fake.mint(jkt=client_key.thumbprint())

    def call(host_header: str, proof_url: str) -> str:
        answers: list[str] = []
        environ = {
            "REQUEST_METHOD": "POST",
            "wsgi.url_scheme": "https",
            "SERVER_NAME": "internal",
            "SERVER_PORT": "443",
            "SCRIPT_NAME": "",
            "PATH_INFO": "/admin",
            "HTTP_HOST": host_header,
            "HTTP_AUTHORIZATION": f"DPoP {token}",
            "HTTP_DPOP": sign_proof(client_key, url=proof_url, token=token),
        }
        app = TokenMiddleware(lambda e, start: start("200 OK", []) or [b"ok"], verifier, ["/"])
        app(environ, lambda status, headers, exc_info=None: answers.append(status))
        return answers[0]

    assert call("deploy.example.com", "https://deploy.example.com/admin") == "200 OK"
    assert call(host, URL).startswith("401")
    assert call(host, "https://internal/admin") == "200 OK", "the server's own name stands in"


# -- challenges ------------------------------------------------------------------------------------


def test_challenges_parse_what_servers_send() -> None:
    line = (
        'Bearer error="insufficient_user_authentication", error_description="More recent '
        'authentication is required", max_age=5, DPoP algs="ES256 PS256", Basic dXNlcjpwYXNz==, '
        'Newauth realm="apps", type=1, title="Login to \\"apps\\""'
    )
    parsed = parse_challenges(line)
    assert [c.scheme for c in parsed] == ["Bearer", "DPoP", "Basic", "Newauth"]
    assert parsed[0].params == {
        "error": "insufficient_user_authentication",
        "error_description": "More recent authentication is required",
        "max_age": "5",
    }
    assert parsed[1].params == {"algs": "ES256 PS256"}
    assert parsed[2].token68 == "dXNlcjpwYXNz=="
    assert parsed[3].params["title"] == 'Login to "apps"'
    assert parse_challenges(["Bearer", 'DPoP error="use_dpop_nonce"'])[1].error == "use_dpop_nonce"
    rendered = Challenge("Bearer", {"error_description": 'a "quoted"\r\nvalue'}).render()
    assert rendered == 'Bearer error_description="a \\"quoted\\"value"'
    assert parse_challenges(rendered)[0].params["error_description"] == 'a "quoted"value'


@pytest.mark.parametrize("constant", [float("nan"), float("inf")])
def test_a_proof_with_a_number_that_is_not_json_is_refused(
    verifier: TokenVerifier, bound: str, client_key: ECKey, constant: float
) -> None:
    """``NaN``/``Infinity`` are not JSON (RFC 8259 §6): a proof carrying one is an invalid proof (401),
    never an error of the resource server (it used to pass the window checks, then fail in ``int``)."""
    proof = sign_proof(client_key, token=bound, claims={"iat": constant})
    assert "NaN" in proof_payload(proof) or "Infinity" in proof_payload(proof)
    with pytest.raises(InvalidDPoPProof) as info:
        verifier.verify("POST", URL, dpop_headers(bound, proof))
    assert info.value.status == 401


def test_a_token_whose_member_names_repeat_is_refused(
    fake: FakeAuthorizationServer, verifier: TokenVerifier
) -> None:
    """RFC 7519 §4: which of two ``sub`` values counts would be the parser's choice, so neither does."""
    claims = jwt.decode(fake.mint(), fake.key, algorithms=["ES256"]).claims
    header = {"typ": "at+jwt", "alg": "ES256", "kid": fake.key.kid}
    payload = json.dumps(claims)[:-1] + ', "sub": "someone-else"}'
    token = sign_bytes(fake.key, "ES256", json.dumps(header).encode(), payload.encode())
    with pytest.raises(InvalidToken) as info:
        verifier.verify("GET", URL, bearer(token))
    assert info.value.reason == "token.malformed"


def proof_payload(proof: str) -> str:
    segment = proof.split(".")[1]
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)).decode()


def test_eddsa_tokens_and_proofs_verify_as_ed25519(fake: FakeAuthorizationServer) -> None:
    """``EdDSA`` (RFC 8037), which the STS issues with ``signing_alg: EdDSA`` and accepts in DPoP
    proofs by default, is the Ed25519 signature on an Ed25519 key (RFC 9864): the verifier takes
    both names (an outside interop check had every such token and proof refused), without
    joserfc's warning about the deprecated name (the test suite turns it into an error)."""
    from joserfc.jwk import OKPKey

    signer = OKPKey.generate_key("Ed25519", parameters={"alg": "EdDSA", "use": "sig"}, auto_kid=True)
    fake.published = [signer, *fake.published]
    client_key = OKPKey.generate_key("Ed25519")
    verifier = TokenVerifier(fake.issuer, AUDIENCE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)  # signing them here, with joserfc's EdDSA
        token = fake.mint(key=signer, alg="EdDSA", jkt=client_key.thumbprint())
        proof = sign_proof(client_key, token=token, alg="EdDSA")
        forged = sign_proof(OKPKey.generate_key("Ed25519"), token=token, alg="EdDSA")
    result = verifier.verify("POST", URL, dpop_headers(token, proof))
    assert result.jkt == client_key.thumbprint() and result.token_type == "DPoP"
    with pytest.raises(InvalidDPoPProof):
        verifier.verify("POST", URL, dpop_headers(token, forged))
    tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(VerificationError):
        verifier.verify(
            "POST", URL, dpop_headers(tampered, sign_proof(client_key, token=tampered, alg="Ed25519"))
        )


# ---------------------------------------------------------------------------
# Certificate-bound tokens (RFC 8705 §3)
# ---------------------------------------------------------------------------


def _certificate(name: str) -> Any:
    """A self-signed client certificate (the TLS layer verified its chain: not this library's part)."""
    from tests.http.test_mtls import certificate

    return certificate(name)


def _x5t(certificate: Any) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding

    digest = hashlib.sha256(certificate.public_bytes(Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def test_a_certificate_bound_token_is_accepted_over_its_certificate_only(
    fake: FakeAuthorizationServer, verifier: TokenVerifier, client_key: ECKey
) -> None:
    """RFC 8705 §3: the resource server compares ``cnf.x5t#S256`` with the certificate of the
    mutual-TLS connection, 401 ``invalid_token`` when they differ (an outside audit: the library
    refused every certificate-bound token the STS issues, so a route demanding ``acr:pop`` could
    only ever be served DPoP tokens)."""
    from urllib.parse import quote

    from cryptography.hazmat.primitives.serialization import Encoding

    mine, other = _certificate("workload"), _certificate("someone-else")
    token = fake.mint(cnf={"x5t#S256": _x5t(mine)})
    pem = mine.public_bytes(Encoding.PEM)
    for presented in (mine.public_bytes(Encoding.DER), pem, pem.decode(), quote(pem.decode())):
        result = verifier.verify("GET", URL, bearer(token), client_certificate=presented)
        assert result.token_type == "Bearer" and result.jkt is None
    for presented, reason in (
        (None, "token.certificate_required"),
        (other.public_bytes(Encoding.PEM), "token.certificate_mismatch"),
        (b"not a certificate", "token.certificate_unreadable"),
        ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----", "token.certificate_unreadable"),
    ):
        with pytest.raises(InvalidToken) as info:
            verifier.verify("GET", URL, bearer(token), client_certificate=presented)
        assert info.value.reason == reason
        assert info.value.status == 401
    # Bound to a certificate only: it is no DPoP-bound token.
    with pytest.raises(InvalidToken) as info:
        verifier.verify(
            "GET",
            URL,
            dpop_headers(token, sign_proof(client_key, method="GET", token=token)),
            client_certificate=pem,
        )
    assert info.value.reason == "token.not_dpop_bound"
    # Bound to both (a DPoP proof and a client certificate at the STS): both are needed.
    both = fake.mint(cnf={"x5t#S256": _x5t(mine), "jkt": client_key.thumbprint()})
    proof = sign_proof(client_key, method="GET", token=both)
    with pytest.raises(InvalidToken) as info:
        verifier.verify("GET", URL, dpop_headers(both, proof))
    assert info.value.reason == "token.certificate_required"
    assert verifier.verify("GET", URL, dpop_headers(both, proof), client_certificate=pem).jkt == (
        client_key.thumbprint()
    )
    with pytest.raises(InvalidToken) as info:
        verifier.verify("GET", URL, bearer(both), client_certificate=pem)
    assert info.value.reason == "token.dpop_bound_used_as_bearer"


def test_the_flask_decorator_and_the_middleware_take_the_certificate_from_the_server(
    fake: FakeAuthorizationServer, verifier: TokenVerifier
) -> None:
    """By default the certificate is the environ's ``SSL_CLIENT_CERT``, which the server sets: a
    client sending a header of that name (``HTTP_SSL_CLIENT_CERT``) proves nothing."""
    from urllib.parse import quote

    from cryptography.hazmat.primitives.serialization import Encoding

    mine = _certificate("workload")
    pem = mine.public_bytes(Encoding.PEM).decode()
    token = fake.mint(cnf={"x5t#S256": _x5t(mine)})

    app = Flask(__name__)

    @app.get("/releases")
    @require_token(verifier)
    def release() -> dict[str, Any]:
        return {"sub": g.token.subject}

    web = app.test_client()
    assert (
        web.get("/releases", headers=bearer(token), environ_base={"SSL_CLIENT_CERT": pem}).status_code == 200
    )
    refused = web.get("/releases", headers={**bearer(token), "SSL-Client-Cert": quote(pem)})
    assert refused.status_code == 401 and 'error="invalid_token"' in refused.headers["WWW-Authenticate"]

    forwarded = Flask(__name__)

    @forwarded.get("/releases")
    @require_token(verifier, client_certificate=lambda request: request.headers.get("X-Client-Cert"))
    def release_behind_proxy() -> dict[str, Any]:
        return {"sub": g.token.subject}

    resp = forwarded.test_client().get("/releases", headers={**bearer(token), "X-Client-Cert": quote(pem)})
    assert resp.status_code == 200

    @Request.application
    def inner(request: Request) -> Response:
        return Response("ok")

    middleware = Client(TokenMiddleware(inner, verifier, ["/api"]))
    assert (
        middleware.get("/api/x", headers=bearer(token), environ_base={"SSL_CLIENT_CERT": pem}).status_code
        == 200
    )
    assert (
        middleware.get("/api/x", headers={**bearer(token), "SSL-Client-Cert": quote(pem)}).status_code == 401
    )


def test_a_proof_of_the_largest_rsa_key_allowed_is_read(fake: FakeAuthorizationServer) -> None:
    """A proof by an RSA key of ``MAX_RSA_BITS`` bits (the key rules allow it) has a header of
    about 3,700 characters and a signature of 2,731: joserfc's default limits (512 and 1024)
    refused it as malformed, before its key or signature were looked at.  Here the signature is
    not the key's, so it is refused for that."""
    verifier = TokenVerifier(fake.issuer, AUDIENCE)
    modulus = (1 << (MAX_RSA_BITS - 1)) | 1
    jwk = {"kty": "RSA", "n": b64url(modulus.to_bytes(MAX_RSA_BITS // 8, "big")), "e": "AQAB"}
    token = fake.mint(jkt=RSAKey.import_key(jwk).thumbprint())
    header = {"typ": "dpop+jwt", "alg": "RS256", "jwk": jwk}
    claims = {"jti": uuid.uuid4().hex, "htm": "POST", "htu": URL, "iat": int(time.time()), "ath": ath(token)}
    signature = b64url(b"\x01" * (MAX_RSA_BITS // 8))
    proof = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}.{signature}"
    with pytest.raises(InvalidDPoPProof) as info:
        verifier.verify("POST", URL, dpop_headers(token, proof))
    assert info.value.reason == "dpop.bad_signature"
