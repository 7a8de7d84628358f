"""The token endpoint attacked from outside, over real HTTP, as one table.

Each row is an attack (or a conformance probe) on ``POST /token``, the answer
the standards require, and, for refusals, the audit reason that names the
check.  The table covers the known attacks on JWT consumers (RFC 8725 §2:
``alg: none``, key confusion, header-supplied keys, ``crit``, JWE and JSON
serialisations, non-canonical base64url, duplicate members, psychic and
malleable ECDSA signatures, token confusion by ``typ``) and on the OAuth
endpoint (RFC 6749 §2.3, §3.2, §5.1-5.2; RFC 8693 §2.1, §2.2.2; RFC 8707;
RFC 7523 and draft-ietf-oauth-rfc7523bis client assertions).

Every answer, granted or refused, is also checked for what RFC 6749 §5.1-5.2
requires of all of them: JSON, ``Cache-Control: no-store``, an
``error_description`` in the allowed character set, and ``WWW-Authenticate``
on a 401.

The service runs on a real HTTP server on loopback (so chunked bodies and
real header handling are exercised); the upstream issuer's key set (one RSA
and one P-256 key) is served over HTTP by :class:`tests.support.crafted_jose.KeySetServer`.
Nothing sleeps; every token is fresh.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from flask import Flask
from joserfc import jwt
from joserfc.jwk import ECKey, Key, RSAKey
from werkzeug.serving import make_server
from werkzeug.test import EnvironBuilder, run_wsgi_app

from sts.app import create_app
from sts.settings.load import load_settings
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
from tests.support.crafted_jose import KeySetServer, b64url, sign_bytes

ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FORM = "application/x-www-form-urlencoded"
DEPLOY = "https://deploy.example.com"
SUBJECT = "repo:acme/app:ref:refs/heads/main"
UPSTREAM = "https://upstream.test"
#: RFC 6749 §5.2: error_description is %x20-21 / %x23-5B / %x5D-7E (no ``"`` and no ``\``).
ERROR_DESCRIPTION = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")
#: RFC 6749 §5.2: error is %x20-21 / %x23-5B / %x5D-7E, in practice a lower-case code.
ERROR_CODE = re.compile(r"[a-z_]+")
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

RSA_KEY = RSAKey.generate_key(2048, {"kid": "rs", "use": "sig", "alg": "RS256"}, private=True)
EC_KEY = ECKey.generate_key("P-256", {"kid": "es", "use": "sig", "alg": "ES256"}, private=True)
ATTACKER_RSA = RSAKey.generate_key(2048, {"kid": "rs"}, private=True)
ATTACKER_EC = ECKey.generate_key("P-256", {"kid": "es"}, private=True)


# ---------------------------------------------------------------------------
# The service under attack
# ---------------------------------------------------------------------------


@dataclass
class Target:
    url: str
    app: Flask
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def token_endpoint(self) -> str:
        return self.url + "/token"

    def own_token(self) -> str:
        """An access token this service issued (for re-exchange and confusion attacks)."""
        response = self.session.post(self.token_endpoint, data=exchange(subject()), timeout=10)
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return token


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    keys = KeySetServer()
    keys.document = {"keys": [RSA_KEY.as_dict(private=False), EC_KEY.as_dict(private=False)]}
    server = make_server("127.0.0.1", 0, lambda environ, start: [], threaded=True)
    url = f"http://127.0.0.1:{server.server_port}"
    directory: Path = tmp_path_factory.mktemp("attacks")
    policies = directory / "policies"
    policies.mkdir()
    policy = {
        "version": 1,
        "rules": [
            *DEFAULT_POLICY["rules"],
            {
                "name": "re-exchange",
                "issuer": "self",
                "subject": SUBJECT,
                "require_client_authentication": False,
                "grant": {"audiences": [DEPLOY], "scopes": ["deploy:read"], "max_lifetime": 300},
            },
        ],
    }
    (policies / "attacks.yaml").write_text(yaml.safe_dump(policy))
    settings = load_settings(
        config_file=None,
        environ={},
        overrides={
            "issuer": url,
            "database_url": f"sqlite:///{directory / 'sts.sqlite'}",
            "keys_dir": str(directory / "keys"),
            "policies_dir": str(policies),
            "clients": DEFAULT_CLIENTS,
            "issuers": [
                {
                    "name": "upstream",
                    "issuer": UPSTREAM,
                    "jwks_uri": keys.url,
                    "algorithms": ["RS256", "ES256"],
                    "audiences": [url],
                    "max_token_age": 3600,
                    "token_types": [JWT_TYPE, ID_TOKEN_TYPE],
                }
            ],
        },
    )
    app = create_app(settings)
    server.app = app
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    TARGET_URL[0] = url
    try:
        yield Target(url, app)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        keys.stop()


#: The running service's URL (its issuer identifier), for the row builders below.
TARGET_URL = [""]


# ---------------------------------------------------------------------------
# Crafting tokens and requests
# ---------------------------------------------------------------------------


def claims(**overrides: Any) -> dict[str, Any]:
    """Claims the anonymous ``deploy`` rule grants for; a ``None`` value removes the claim."""
    now = int(time.time())
    values: dict[str, Any] = {
        "iss": UPSTREAM,
        "sub": SUBJECT,
        "aud": TARGET_URL[0],
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": str(uuid.uuid4()),
        "repository_id": "123456",
    }
    values.update(overrides)
    return {name: value for name, value in values.items() if value is not None}


def header(alg: str = "RS256", **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"alg": alg, "kid": "rs" if alg.startswith(("RS", "PS")) else "es", "typ": "JWT"}
    values.update(overrides)
    return {name: value for name, value in values.items() if value is not None}


def signed(head: dict[str, Any] | bytes, body: dict[str, Any] | bytes, *, key: Key = RSA_KEY) -> str:
    """Exactly these header and payload bytes, signed with ``key`` by the header's ``alg``."""
    head_bytes = head if isinstance(head, bytes) else json.dumps(head).encode()
    body_bytes = body if isinstance(body, bytes) else json.dumps(body).encode()
    alg = json.loads(head_bytes)["alg"] if isinstance(head, bytes) else head["alg"]
    return sign_bytes(key, alg, head_bytes, body_bytes)


def subject(**overrides: Any) -> str:
    return signed(header(), claims(**overrides))


def es_subject() -> str:
    return signed(header("ES256"), claims(), key=EC_KEY)


def hs256_with_public_key() -> str:
    """Key confusion: HS256 keyed with the issuer's RSA public key (PEM), as an attacker would."""
    signing_input = f"{b64url(json.dumps(header('HS256')).encode())}.{b64url(json.dumps(claims()).encode())}"
    secret = RSA_KEY.as_pem(private=False)
    return f"{signing_input}.{b64url(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def unsigned(alg: str) -> str:
    return (
        f"{b64url(json.dumps({'alg': alg, 'typ': 'JWT'}).encode())}.{b64url(json.dumps(claims()).encode())}."
    )


def resigned_segments(edit: Callable[[str, str, str], str]) -> str:
    head, body, signature = subject().split(".")
    return edit(head, body, signature)


def flip_trailing_bits(signature: str) -> str:
    """The same signature bytes, with the unused low bits of the last base64url character set."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return signature[:-1] + alphabet[alphabet.index(signature[-1]) | 1]


def ecdsa_twin() -> str:
    """An ES256 token whose signature ``(r, s)`` is replaced by the twin ``(r, n - s)``: also valid."""
    head, body, signature = es_subject().split(".")
    raw = base64.urlsafe_b64decode(signature + "==")
    r, s = raw[:32], int.from_bytes(raw[32:], "big")
    return f"{head}.{body}.{b64url(r + (P256_ORDER - s).to_bytes(32, 'big'))}"


def psychic_signature() -> str:
    """CVE-2022-21449: r = s = 0."""
    head, body, _ = es_subject().split(".")
    return f"{head}.{body}.{b64url(bytes(64))}"


def with_header_key(name: str) -> str:
    """A token signed by the attacker, offering the attacker's key in the header (a P-256 key: small)."""
    offered: dict[str, Any] = {
        "jwk": ATTACKER_EC.as_dict(private=False),
        "jku": "http://127.0.0.1:9/jwks",
        "x5u": "http://127.0.0.1:9/cert.pem",
        "x5c": ["MIIB"],
    }
    return signed(header("ES256", **{name: offered[name]}), claims(), key=ATTACKER_EC)


def raw_claims(text: str) -> str:
    """A payload given as JSON text (duplicates, NaN, escapes survive exactly), properly signed."""
    return signed(json.dumps(header()).encode(), text.encode())


def claims_text(**replacements: str) -> str:
    """The JSON text of :func:`claims` with member values replaced by raw JSON text."""
    text = json.dumps(claims())
    for name, raw in replacements.items():
        text = text[:-1] + f', "{name}": {raw}}}'
    return text


def exchange(token: str, **params: Any) -> dict[str, Any]:
    form: dict[str, Any] = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": token,
        "subject_token_type": JWT_TYPE,
        "audience": DEPLOY,
    }
    form.update(params)
    return {name: value for name, value in form.items() if value is not None}


def ledger(**params: Any) -> dict[str, Any]:
    """A request for the ``ledger-with-client`` rule, which requires client authentication."""
    token = signed(header(), claims(sub="system:serviceaccount:payments:api", repository_id=None))
    return exchange(token, audience="ledger", **params)


def assertion(head: dict[str, Any] | None = None, **overrides: Any) -> str:
    now = int(time.time())
    values: dict[str, Any] = {
        "iss": "signer",
        "sub": "signer",
        "aud": TARGET_URL[0],
        "iat": now,
        "exp": now + 60,
        "jti": str(uuid.uuid4()),
    }
    values.update(overrides)
    protected = {"alg": "ES256", "kid": SIGNER_KEY.kid, **(head or {})}
    return jwt.encode(protected, {k: v for k, v in values.items() if v is not None}, SIGNER_KEY)


def with_assertion(token: str, **params: Any) -> dict[str, Any]:
    return ledger(client_assertion=token, client_assertion_type=ASSERTION_TYPE, **params)


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def chunks(body: bytes, size: int = 1000) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """A request: ``data`` is a form (dict or pairs), raw bytes, or a callable giving chunks."""

    data: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    query: str = ""
    content_type: str | None = FORM
    chunked: bool = False


@dataclass(frozen=True)
class Row:
    attack: str
    probe: Callable[[Target], Probe]
    status: int
    error: str | None = None
    #: The audit reason that names the check (``None``: not checked, e.g. a grant).
    reason: str | None = None


def form(build: Callable[[], Any], **kwargs: Any) -> Callable[[Target], Probe]:
    return lambda _target: Probe(build(), **kwargs)


def refused(attack: str, build: Callable[[], Any], reason: str, **kwargs: Any) -> Row:
    """A subject-token attack: RFC 8693 §2.2.2, ``invalid_request`` (400)."""
    return Row(attack, form(build, **kwargs), 400, "invalid_request", reason)


def bad_client(attack: str, build: Callable[[], Any], reason: str, **kwargs: Any) -> Row:
    """RFC 6749 §5.2 / RFC 7521 §4.2.1: ``invalid_client`` (401)."""
    return Row(attack, form(build, **kwargs), 401, "invalid_client", reason)


JWT_ATTACKS = [
    Row("well-formed RS256 token (control)", form(lambda: exchange(subject())), 200),
    Row("well-formed ES256 token (control)", form(lambda: exchange(es_subject())), 200),
    Row(
        "aud array naming this service among others",
        form(lambda: exchange(subject(aud=["x", TARGET_URL[0]]))),
        200,
    ),
    Row(
        "id_token type from an issuer configured for it",
        form(lambda: exchange(subject(), subject_token_type=ID_TOKEN_TYPE)),
        200,
    ),
    Row("ECDSA twin signature (r, n-s) of a fresh token", form(lambda: exchange(ecdsa_twin())), 200),
    refused("alg none", lambda: exchange(unsigned("none")), "subject_token.jws.algorithm_not_allowed"),
    refused("alg None", lambda: exchange(unsigned("None")), "subject_token.jws.algorithm_not_allowed"),
    refused("alg NONE", lambda: exchange(unsigned("NONE")), "subject_token.jws.algorithm_not_allowed"),
    refused(
        "HS256 keyed with the RSA public key",
        lambda: exchange(hs256_with_public_key()),
        "subject_token.jws.algorithm_not_allowed",
    ),
    refused(
        "alg outside the issuer's list (PS256)",
        lambda: exchange(signed(header("PS256"), claims())),
        "subject_token.jws.algorithm_not_allowed",
    ),
    refused(
        "RS256 header over an ES256 key's kid",
        lambda: exchange(signed(header(kid="es"), claims())),
        "subject_token.unknown_kid",
    ),
    refused(
        "kid path traversal",
        lambda: exchange(subject_with_kid("../../../../dev/null")),
        "subject_token.unknown_kid",
    ),
    refused(
        "kid SQL injection", lambda: exchange(subject_with_kid("' OR '1'='1")), "subject_token.unknown_kid"
    ),
    refused("kid unknown", lambda: exchange(subject_with_kid("nope")), "subject_token.unknown_kid"),
    refused("kid not a string", lambda: exchange(subject_with_kid(7)), "subject_token.jws.malformed_kid"),
    refused(
        "jwk header with the attacker's key",
        lambda: exchange(with_header_key("jwk")),
        "subject_token.jws.bad_signature",
    ),
    refused(
        "jku header to the attacker's set",
        lambda: exchange(with_header_key("jku")),
        "subject_token.jws.bad_signature",
    ),
    refused("x5u header", lambda: exchange(with_header_key("x5u")), "subject_token.jws.bad_signature"),
    refused("x5c header", lambda: exchange(with_header_key("x5c")), "subject_token.jws.bad_signature"),
    refused(
        "crit header",
        lambda: exchange(signed(header(crit=["exp"], exp=1), claims())),
        "subject_token.jws.crit_not_understood",
    ),
    refused(
        "b64 false with crit",
        lambda: exchange(signed(header(b64=False, crit=["b64"]), claims())),
        "subject_token.jws.malformed",
    ),
    refused(
        "JWE (five segments)", lambda: exchange("e30.e30.e30.e30.e30"), "subject_token.jws.not_compact_jws"
    ),
    refused(
        "JWS JSON serialization", lambda: exchange(json_serialization()), "subject_token.jws.not_compact_jws"
    ),
    refused("extra dot", lambda: exchange(subject() + "."), "subject_token.jws.not_compact_jws"),
    refused(
        "signature with = padding",
        lambda: exchange(resigned_segments(lambda h, b, s: f"{h}.{b}.{s}==")),
        "subject_token.jws.bad_signature",
    ),
    refused(
        "signature in standard base64 (+/)",
        lambda: exchange(standard_base64_signature()),
        "subject_token.jws.bad_signature",
    ),
    refused(
        "whitespace inside the signature",
        lambda: exchange(resigned_segments(lambda h, b, s: f"{h}.{b}.{s[:9]} {s[9:]}")),
        "subject_token.jws.bad_signature",
    ),
    refused(
        "non-canonical base64url (trailing bits)",
        lambda: exchange(resigned_segments(lambda h, b, s: f"{h}.{b}.{flip_trailing_bits(s)}")),
        "subject_token.jws.bad_signature",
    ),
    refused("space around the token", lambda: exchange(" " + subject() + " "), "subject_token.jws.malformed"),
    refused(
        "duplicate alg (none, then RS256)",
        lambda: exchange(signed(duplicate_alg_header(), claims())),
        "subject_token.jws.duplicate_member",
    ),
    refused(
        "duplicate sub",
        lambda: exchange(raw_claims(claims_text(sub='"repo:evil/x:ref:refs/heads/main"'))),
        "subject_token.jws.duplicate_member",
    ),
    refused(
        "duplicate iss",
        lambda: exchange(raw_claims(claims_text(iss=json.dumps(UPSTREAM)))),
        "subject_token.jws.duplicate_member",
    ),
    refused(
        "NaN in the claims",
        lambda: exchange(raw_claims(json.dumps({**claims(), "score": math.nan}))),
        "subject_token.jws.malformed",
    ),
    refused(
        "Infinity as exp",
        lambda: exchange(raw_claims(json.dumps({**claims(), "exp": math.inf}))),
        "subject_token.jws.malformed",
    ),
    refused(
        "unpaired surrogate in sub",
        lambda: exchange(raw_claims(json.dumps(claims(sub="\ud800")))),
        "subject_token.jws.not_utf8",
    ),
    refused(
        "unpaired surrogate in a member name",
        lambda: exchange(raw_claims(claims_text(**{"\\udc00": "1"}))),
        "subject_token.jws.not_utf8",
    ),
    refused(
        "deeply nested payload",
        lambda: exchange(raw_claims('{"a":' + "[" * 5000 + "]" * 5000 + "}")),
        "subject_token.jws.malformed",
    ),
    refused("payload is a JSON string", lambda: exchange(raw_claims('"x"')), "subject_token.jws.malformed"),
    refused("expired", lambda: exchange(subject(exp=int(time.time()) - 60)), "subject_token.expired"),
    refused(
        "exp as a string",
        lambda: exchange(subject(exp=str(int(time.time()) + 300))),
        "subject_token.malformed_exp",
    ),
    refused(
        "exp null",
        lambda: exchange(raw_claims(json.dumps({**claims(), "exp": None}))),
        "subject_token.malformed_exp",
    ),
    refused("exp missing", lambda: exchange(subject(exp=None)), "subject_token.missing_exp"),
    refused(
        "nbf in the future",
        lambda: exchange(subject(nbf=int(time.time()) + 600)),
        "subject_token.not_yet_valid",
    ),
    refused(
        "iat in the future",
        lambda: exchange(subject(iat=int(time.time()) + 600)),
        "subject_token.issued_in_future",
    ),
    refused(
        "iat older than max_token_age",
        lambda: exchange(subject(iat=int(time.time()) - 7200)),
        "subject_token.too_old",
    ),
    refused(
        "aud of another service",
        lambda: exchange(subject(aud="https://elsewhere.example")),
        "subject_token.audience_mismatch",
    ),
    refused("aud missing", lambda: exchange(subject(aud=None)), "subject_token.missing_aud"),
    refused(
        "iss with a trailing slash",
        lambda: exchange(subject(iss=UPSTREAM + "/")),
        "subject_token.untrusted_issuer",
    ),
    refused(
        "iss in upper case", lambda: exchange(subject(iss=UPSTREAM.upper())), "subject_token.untrusted_issuer"
    ),
    refused("sub empty", lambda: exchange(subject(sub="")), "subject_token.malformed_sub"),
    refused(
        "sub with NUL", lambda: exchange(subject(sub=SUBJECT + "\x00admin")), "subject_token.malformed_sub"
    ),
    refused(
        "sub with a line feed", lambda: exchange(subject(sub=SUBJECT + "\n")), "subject_token.malformed_sub"
    ),
    refused("sub with DEL", lambda: exchange(subject(sub=SUBJECT + "\x7f")), "subject_token.malformed_sub"),
    refused(
        "sub with a C1 control",
        lambda: exchange(subject(sub=SUBJECT + "\x85")),
        "subject_token.malformed_sub",
    ),
    refused(
        "sub with a right-to-left override (display spoofing)",
        lambda: exchange(subject(sub=SUBJECT + "\u202enimda")),
        "subject_token.malformed_sub",
    ),
    refused(
        "sub with a line separator",
        lambda: exchange(subject(sub=SUBJECT + "\u2028admin")),
        "subject_token.malformed_sub",
    ),
    refused(
        "upstream token typed at+jwt (token confusion)",
        lambda: exchange(signed(header(typ="at+jwt"), claims())),
        "subject_token.typ_not_accepted",
    ),
    refused(
        "upstream token typed secevent+jwt",
        lambda: exchange(signed(header(typ="secevent+jwt"), claims())),
        "subject_token.typ_not_accepted",
    ),
    refused(
        "upstream token as access_token type",
        lambda: exchange(subject(), subject_token_type=ACCESS_TOKEN_TYPE),
        "subject_token.token_type_not_accepted",
    ),
    refused(
        "ECDSA psychic signature r=s=0",
        lambda: exchange(psychic_signature()),
        "subject_token.jws.bad_signature",
    ),
    refused("ECDSA signature in DER", lambda: exchange(der_signature()), "subject_token.jws.bad_signature"),
    refused(
        "signature of another key, same kid",
        lambda: exchange(signed(header(), claims(), key=ATTACKER_RSA)),
        "subject_token.jws.bad_signature",
    ),
]


def subject_with_kid(kid: object) -> str:
    return signed(header(kid=kid), claims())


def duplicate_alg_header() -> bytes:
    return b'{"alg":"none","kid":"rs","typ":"JWT","alg":"RS256"}'


def json_serialization() -> str:
    head, body, signature = subject().split(".")
    return json.dumps({"protected": head, "payload": body, "signature": signature})


def standard_base64_signature() -> str:
    """The signature in standard base64 (of a token whose signature holds ``-`` or ``_``)."""
    for _ in range(64):
        head, body, signature = subject().split(".")
        if "-" in signature or "_" in signature:
            return f"{head}.{body}.{signature.replace('-', '+').replace('_', '/')}"
    raise AssertionError("no signature with - or _ in 64 tries")


def der_signature() -> str:
    head, body, _ = es_subject().split(".")
    return f"{head}.{body}.{b64url(bytes.fromhex('3006020101020101'))}"


def own_token_probe(**params: Any) -> Callable[[Target], Probe]:
    return lambda target: Probe(exchange(target.own_token(), **params))


def own_token_retyped(target: Target) -> Probe:
    """Our own token with its header's typ changed from at+jwt to JWT (signature kept)."""
    head, body, signature = target.own_token().split(".")
    decoded = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    retyped = b64url(json.dumps({**decoded, "typ": "JWT"}).encode())
    return Probe(exchange(f"{retyped}.{body}.{signature}", subject_token_type=ACCESS_TOKEN_TYPE))


OWN_TOKEN_ATTACKS = [
    Row(
        "our own token re-exchanged as access_token (control)",
        own_token_probe(subject_token_type=ACCESS_TOKEN_TYPE),
        200,
    ),
    Row(
        "our own token presented as an id_token",
        own_token_probe(subject_token_type=ID_TOKEN_TYPE),
        400,
        "invalid_request",
        "subject_token.token_type_not_accepted",
    ),
    Row(
        "our own token with typ altered",
        own_token_retyped,
        400,
        "invalid_request",
        "subject_token.typ_not_accepted",
    ),
    Row(
        "our own token as its own actor",
        lambda t: Probe(exchange(subject(), actor_token=t.own_token(), actor_token_type=ACCESS_TOKEN_TYPE)),
        400,
        "invalid_request",
        "actor_token.is_subject",
    ),
]


ENDPOINT_ATTACKS = [
    Row(
        "grant_type missing",
        form(lambda: exchange(subject(), grant_type=None)),
        400,
        "invalid_request",
        "request.missing_grant_type",
    ),
    Row(
        "grant_type empty",
        form(lambda: exchange(subject(), grant_type="")),
        400,
        "invalid_request",
        "request.missing_grant_type",
    ),
    Row(
        "grant_type client_credentials",
        form(lambda: exchange(subject(), grant_type="client_credentials")),
        400,
        "unsupported_grant_type",
        "request.unsupported_grant_type",
    ),
    Row(
        "grant_type in upper case",
        form(lambda: exchange(subject(), grant_type=TOKEN_EXCHANGE.upper())),
        400,
        "unsupported_grant_type",
        "request.unsupported_grant_type",
    ),
    Row(
        "grant_type twice",
        form(lambda: [*exchange(subject()).items(), ("grant_type", TOKEN_EXCHANGE)]),
        400,
        "invalid_request",
        "request.repeated_parameter",
    ),
    Row(
        "subject_token missing",
        form(lambda: exchange("")),
        400,
        "invalid_request",
        "request.missing_subject_token",
    ),
    Row(
        "subject_token twice",
        form(lambda: [*exchange(subject()).items(), ("subject_token", subject())]),
        400,
        "invalid_request",
        "request.repeated_parameter",
    ),
    Row(
        "subject_token_type missing",
        form(lambda: exchange(subject(), subject_token_type=None)),
        400,
        "invalid_request",
        "request.missing_subject_token_type",
    ),
    Row(
        "subject_token_type unknown",
        form(lambda: exchange(subject(), subject_token_type="urn:x:unknown")),
        400,
        "invalid_request",
        "request.unsupported_subject_token_type",
    ),
    Row(
        "subject_token_type saml2",
        form(lambda: exchange(subject(), subject_token_type="urn:ietf:params:oauth:token-type:saml2")),
        400,
        "invalid_request",
        "request.unsupported_subject_token_type",
    ),
    Row(
        "requested_token_type unknown",
        form(lambda: exchange(subject(), requested_token_type="urn:x:unknown")),
        400,
        "invalid_request",
        "request.unsupported_requested_token_type",
    ),
    Row(
        "requested_token_type refresh_token",
        form(
            lambda: exchange(subject(), requested_token_type="urn:ietf:params:oauth:token-type:refresh_token")
        ),
        400,
        "invalid_request",
        "request.unsupported_requested_token_type",
    ),
    Row(
        "actor_token_type without actor_token",
        form(lambda: exchange(subject(), actor_token_type=JWT_TYPE)),
        400,
        "invalid_request",
        "request.actor_token_pairing",
    ),
    Row(
        "unknown parameters, repeated (ignored)",
        form(lambda: [*exchange(subject()).items(), ("foo", "1"), ("foo", "2")]),
        200,
    ),
    Row(
        "audience no rule grants",
        form(lambda: exchange(subject(), audience="https://elsewhere.example")),
        400,
        "invalid_target",
        "policy.target_not_allowed",
    ),
    Row(
        "resource with a fragment",
        form(lambda: exchange(subject(), audience=None, resource=DEPLOY + "#f")),
        400,
        "invalid_target",
        "request.malformed_resource",
    ),
    Row(
        "resource relative",
        form(lambda: exchange(subject(), audience=None, resource="/api")),
        400,
        "invalid_target",
        "request.malformed_resource",
    ),
    Row(
        "resource without a host",
        form(lambda: exchange(subject(), audience=None, resource="https:")),
        400,
        "invalid_target",
        "request.malformed_resource",
    ),
    Row(
        "audience with a control character",
        form(lambda: exchange(subject(), audience=DEPLOY + "\x00")),
        400,
        "invalid_target",
        "request.malformed_audience",
    ),
    Row(
        "seventeen audiences",
        form(
            lambda: [
                *exchange(subject(), audience=None).items(),
                *(("audience", f"https://a{i}.example") for i in range(17)),
            ]
        ),
        400,
        "invalid_target",
        "request.too_many_targets",
    ),
    Row(
        'scope with "',
        form(lambda: exchange(subject(), scope='deploy:read "x')),
        400,
        "invalid_scope",
        "request.malformed_scope",
    ),
    Row(
        "scope with \\",
        form(lambda: exchange(subject(), scope="deploy\\read")),
        400,
        "invalid_scope",
        "request.malformed_scope",
    ),
    Row(
        "scope with a non-ASCII character",
        form(lambda: exchange(subject(), scope="deploy:réad")),
        400,
        "invalid_scope",
        "request.malformed_scope",
    ),
    Row(
        "scope separated by a tab",
        form(lambda: exchange(subject(), scope="deploy:read\tdeploy:write")),
        400,
        "invalid_scope",
        "request.malformed_scope",
    ),
    Row(
        "scope of spaces only",
        form(lambda: exchange(subject(), scope="  ")),
        400,
        "invalid_scope",
        "request.malformed_scope",
    ),
    Row(
        "scope no rule grants",
        form(lambda: exchange(subject(), scope="admin")),
        400,
        "invalid_scope",
        "policy.scope_not_allowed",
    ),
    Row(
        "requested_expires_in not a number",
        form(lambda: exchange(subject(), requested_expires_in="1e3")),
        400,
        "invalid_request",
        "request.malformed_requested_expires_in",
    ),
    Row(
        "parameters in the query string",
        form(lambda: exchange(subject()), query="?client_secret=x"),
        400,
        "invalid_request",
        "request.query_parameters",
    ),
    Row(
        "JSON body",
        form(lambda: json.dumps(exchange(subject())).encode(), content_type="application/json"),
        400,
        "invalid_request",
        "request.wrong_content_type",
    ),
    Row(
        "no Content-Type",
        form(lambda: encoded(exchange(subject())), content_type=None),
        400,
        "invalid_request",
        "request.wrong_content_type",
    ),
    Row(
        "text/plain body",
        form(lambda: encoded(exchange(subject())), content_type="text/plain"),
        400,
        "invalid_request",
        "request.wrong_content_type",
    ),
    Row(
        "charset=UTF-8 (accepted)",
        form(lambda: exchange(subject()), content_type=FORM + "; charset=UTF-8"),
        200,
    ),
    Row(
        "charset=ISO-8859-1",
        form(lambda: exchange(subject()), content_type=FORM + "; charset=ISO-8859-1"),
        400,
        "invalid_request",
        "request.unsupported_charset",
    ),
    Row(
        "body over max_body_bytes",
        form(lambda: exchange(subject(), padding="x" * 20_000)),
        400,
        "invalid_request",
        "request.body_too_large",
    ),
    Row("chunked body (accepted)", form(lambda: encoded(exchange(subject())), chunked=True), 200),
    Row(
        "chunked body over max_body_bytes",
        form(lambda: encoded(exchange(subject(), padding="x" * 20_000)), chunked=True),
        400,
        "invalid_request",
        "request.body_too_large",
    ),
    Row(
        "chunked body over the cap, with the cut before a parameter",
        form(lambda: encoded([("padding", "x" * 20_000), *exchange(subject()).items()]), chunked=True),
        400,
        "invalid_request",
        "request.body_too_large",
    ),
    Row("GET", form(lambda: None, method="GET", content_type=None), 405, "invalid_request"),
    Row("PUT", form(lambda: exchange(subject()), method="PUT"), 405, "invalid_request"),
    Row("OPTIONS", form(lambda: None, method="OPTIONS", content_type=None), 405, "invalid_request"),
]


def encoded(pairs: dict[str, Any] | list[tuple[str, Any]]) -> bytes:
    from urllib.parse import urlencode

    return urlencode(pairs).encode()


CLIENT_ATTACKS = [
    Row("Basic, right secret (control)", form(ledger, headers=basic("gateway", GATEWAY_SECRET)), 200),
    Row(
        "client_secret_post, right secret (control)",
        form(lambda: ledger(client_id="poster", client_secret=POSTER_SECRET)),
        200,
    ),
    Row("private_key_jwt, aud = issuer (control)", form(lambda: with_assertion(assertion())), 200),
    Row(
        "private_key_jwt, aud = token endpoint (RFC 7523 §3, accepted)",
        form(lambda: with_assertion(assertion(aud=TARGET_URL[0] + "/token"))),
        200,
    ),
    Row(
        "private_key_jwt typed client-authentication+jwt, aud = issuer",
        form(lambda: with_assertion(assertion({"typ": "client-authentication+jwt"}))),
        200,
    ),
    bad_client("Basic, wrong secret", ledger, "client.bad_secret", headers=basic("gateway", "wrong")),
    bad_client(
        "Basic, not base64",
        ledger,
        "client.malformed_basic_credentials",
        headers={"Authorization": "Basic !!!"},
    ),
    bad_client(
        "Basic, no colon",
        ledger,
        "client.malformed_basic_credentials",
        headers={"Authorization": "Basic " + base64.b64encode(b"gateway").decode()},
    ),
    bad_client(
        "Basic, empty", ledger, "client.malformed_basic_credentials", headers={"Authorization": "Basic "}
    ),
    bad_client(
        "Basic, empty client_id",
        ledger,
        "client.malformed_basic_credentials",
        headers=basic("", GATEWAY_SECRET),
    ),
    bad_client(
        "Bearer scheme",
        ledger,
        "client.unsupported_authorization_scheme",
        headers={"Authorization": "Bearer abc"},
    ),
    bad_client(
        "DPoP scheme",
        ledger,
        "client.unsupported_authorization_scheme",
        headers={"Authorization": "DPoP abc"},
    ),
    bad_client(
        "Basic client using client_secret_post",
        lambda: ledger(client_id="gateway", client_secret=GATEWAY_SECRET),
        "client.wrong_auth_method",
    ),
    bad_client("unknown client", lambda: ledger(client_id="nobody", client_secret="x"), "client.unknown"),
    bad_client("client_id alone", lambda: ledger(client_id="poster"), "client.unauthenticated_client_id"),
    bad_client(
        "client_id with NUL",
        lambda: ledger(client_id="poster\x00", client_secret=POSTER_SECRET),
        "client.malformed_client_id",
    ),
    bad_client(
        "no client authentication where the rule requires it", ledger, "policy.client_authentication_required"
    ),
    Row(
        "Basic and client_secret at once",
        form(
            lambda: ledger(client_id="gateway", client_secret="x"), headers=basic("gateway", GATEWAY_SECRET)
        ),
        400,
        "invalid_request",
        "client.multiple_authentication_methods",
    ),
    Row(
        "client_secret and client_assertion at once",
        form(lambda: with_assertion(assertion(), client_id="poster", client_secret=POSTER_SECRET)),
        400,
        "invalid_request",
        "client.multiple_authentication_methods",
    ),
    Row(
        "client_assertion without its type",
        form(lambda: ledger(client_assertion=assertion())),
        400,
        "invalid_request",
        "client.missing_client_assertion_type",
    ),
    bad_client(
        "client_assertion_type not jwt-bearer",
        lambda: ledger(client_assertion=assertion(), client_assertion_type="urn:x"),
        "client.unsupported_assertion_type",
    ),
    bad_client(
        "assertion iss != sub",
        lambda: with_assertion(assertion(sub="gateway")),
        "client_assertion.iss_sub_mismatch",
    ),
    bad_client(
        "assertion for another client_id",
        lambda: with_assertion(assertion(), client_id="gateway"),
        "client_assertion.client_id_mismatch",
    ),
    bad_client(
        "assertion aud of another server",
        lambda: with_assertion(assertion(aud="https://elsewhere.example")),
        "client_assertion.audience_mismatch",
    ),
    bad_client(
        "assertion aud with a trailing slash",
        lambda: with_assertion(assertion(aud=TARGET_URL[0] + "/")),
        "client_assertion.audience_mismatch",
    ),
    bad_client(
        "assertion without aud", lambda: with_assertion(assertion(aud=None)), "client_assertion.missing_aud"
    ),
    bad_client(
        "typed assertion, aud = token endpoint (rfc7523bis)",
        lambda: with_assertion(assertion({"typ": "client-authentication+jwt"}, aud=TARGET_URL[0] + "/token")),
        "client_assertion.audience_mismatch",
    ),
    bad_client(
        "typed assertion, aud = [issuer] (rfc7523bis: a string)",
        lambda: with_assertion(assertion({"typ": "client-authentication+jwt"}, aud=[TARGET_URL[0]])),
        "client_assertion.audience_not_sole_issuer",
    ),
    bad_client(
        "typed assertion, aud = [issuer, other] (rfc7523bis: sole value)",
        lambda: with_assertion(
            assertion({"typ": "client-authentication+jwt"}, aud=[TARGET_URL[0], "https://attacker.example"])
        ),
        "client_assertion.audience_not_sole_issuer",
    ),
    bad_client(
        "assertion without jti", lambda: with_assertion(assertion(jti=None)), "client_assertion.missing_jti"
    ),
    bad_client(
        "assertion without exp", lambda: with_assertion(assertion(exp=None)), "client_assertion.missing_exp"
    ),
    bad_client(
        "assertion expired",
        lambda: with_assertion(assertion(exp=int(time.time()) - 120)),
        "client_assertion.expired",
    ),
    bad_client(
        "assertion valid for a day",
        lambda: with_assertion(assertion(exp=int(time.time()) + 86400)),
        "client_assertion.lifetime_too_long",
    ),
    bad_client(
        "assertion typed at+jwt",
        lambda: with_assertion(assertion({"typ": "at+jwt"})),
        "client_assertion.typ_not_accepted",
    ),
    bad_client(
        "assertion alg none",
        lambda: with_assertion(unsigned_assertion()),
        "client_assertion.jws.algorithm_not_allowed",
    ),
    bad_client(
        "assertion with duplicate iss",
        lambda: with_assertion(duplicate_iss_assertion()),
        "client_assertion.jws.duplicate_member",
    ),
]


def unsigned_assertion() -> str:
    now = int(time.time())
    body = {"iss": "signer", "sub": "signer", "aud": TARGET_URL[0], "exp": now + 60, "jti": str(uuid.uuid4())}
    head = b64url(json.dumps({"alg": "none"}).encode())
    return f"{head}.{b64url(json.dumps(body).encode())}."


def duplicate_iss_assertion() -> str:
    now = int(time.time())
    text = json.dumps(
        {"iss": "gateway", "sub": "signer", "aud": TARGET_URL[0], "exp": now + 60, "jti": str(uuid.uuid4())}
    )
    text = text[:-1] + ', "iss": "signer"}'
    head = json.dumps({"alg": "ES256", "kid": SIGNER_KEY.kid}).encode()
    return sign_bytes(SIGNER_KEY, "ES256", head, text.encode())


TABLE = JWT_ATTACKS + OWN_TOKEN_ATTACKS + ENDPOINT_ATTACKS + CLIENT_ATTACKS


def send(target: Target, probe: Probe, request_id: str) -> requests.Response:
    headers = {"X-Request-Id": request_id, **probe.headers}
    if probe.content_type is not None:
        headers["Content-Type"] = probe.content_type
    data: Any = probe.data
    if probe.chunked:
        body = data
        data = chunks(body)  # A generator: requests sends it with Transfer-Encoding: chunked.
    return target.session.request(
        probe.method, target.token_endpoint + probe.query, data=data, headers=headers, timeout=10
    )


@pytest.mark.parametrize("row", TABLE, ids=[row.attack for row in TABLE])
def test_attack(target: Target, row: Row) -> None:
    request_id = "attack-" + uuid.uuid4().hex
    probe = row.probe(target)
    response = send(target, probe, request_id)

    assert response.status_code == row.status, (response.text, audit_reasons(target, request_id))
    # RFC 6749 §5.1, §5.2: every answer is JSON and never cached.
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    if row.status == 200:
        assert body["access_token"] and body["token_type"] == "Bearer"
        assert body["issued_token_type"] in {ACCESS_TOKEN_TYPE, JWT_TYPE}
        return
    assert "access_token" not in body
    assert body["error"] == row.error
    assert ERROR_CODE.fullmatch(body["error"])
    assert ERROR_DESCRIPTION.fullmatch(body["error_description"]), body
    if row.status == 401:
        # RFC 6749 §5.2: a 401 names the scheme the client may use (Basic), and first the scheme the
        # client used in its Authorization header when that was another one.
        challenge = response.headers["WWW-Authenticate"]
        used = (probe.headers.get("Authorization") or "Basic").split(" ")[0]
        assert challenge.startswith(f'{used} realm="sts"'), challenge
        assert 'Basic realm="sts", error="invalid_client"' in challenge
    if row.reason is not None:
        assert row.reason in audit_reasons(target, request_id)


def audit_reasons(target: Target, request_id: str) -> list[str]:
    records = target.app.extensions["sts"].audit.recent(limit=1, request_id=request_id)
    return list(records[0]["reasons"]) if records else []


class _ChunkParseError(Exception):
    """What gunicorn raises from the body stream for a malformed chunk (not an OSError)."""


class _MalformedChunks(io.RawIOBase):
    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        raise _ChunkParseError("Invalid chunk size: b'ZZ'")


def test_malformed_chunked_body_is_a_json_invalid_request(target: Target) -> None:
    """A chunked body the server cannot decode is ``invalid_request`` in JSON, audited: not a 500.

    The WSGI server decodes the chunks; gunicorn's decoder raises its own exception type, which
    Werkzeug does not treat as a broken body.
    """
    request_id = "attack-" + uuid.uuid4().hex
    environ = EnvironBuilder(
        path="/token", method="POST", content_type=FORM, headers={"X-Request-Id": request_id}
    ).get_environ()
    environ.update(
        {
            "wsgi.input": _MalformedChunks(),
            "wsgi.input_terminated": True,
            "CONTENT_LENGTH": "",
            "HTTP_TRANSFER_ENCODING": "chunked",
        }
    )
    body, status, headers = run_wsgi_app(target.app, environ, buffered=True)
    assert status.startswith("400"), b"".join(body)
    assert json.loads(b"".join(body))["error"] == "invalid_request"
    assert headers["Cache-Control"] == "no-store"
    assert "request.malformed_body" in audit_reasons(target, request_id)
