"""Certificate-bound tokens (RFC 8705) through a trusted TLS-terminating proxy."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from flask import Flask
from joserfc import jwt
from joserfc.jwk import KeySet

from sts.app import create_app
from sts.dev.issuer import RunningServer
from sts.http.client_cert import UnreadableCertificate, certificate_thumbprint
from sts.settings import Settings
from tests.conftest import ACCESS_TOKEN_TYPE, STS_ISSUER, exchange_form

DEPLOY = "https://deploy.example.com"
PROXY = {"REMOTE_ADDR": "10.0.0.2"}


def certificate(name: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(Encoding.PEM).decode()


def x5t(cert: x509.Certificate) -> str:
    return (
        base64.urlsafe_b64encode(hashlib.sha256(cert.public_bytes(Encoding.DER)).digest())
        .rstrip(b"=")
        .decode()
    )


POLICY = {
    "version": 1,
    "rules": [
        {"name": "deploy", "issuer": "upstream", "subject": "repo:acme/app:ref:refs/heads/main",
         "require_client_authentication": False, "grant": {"audiences": [DEPLOY]}},
        {"name": "again", "issuer": "self", "subject": "repo:acme/app:ref:refs/heads/main",
         "require_client_authentication": False, "grant": {"audiences": [DEPLOY]}},
    ],
}  # fmt: skip


def der_base64(cert: x509.Certificate) -> str:
    return base64.b64encode(cert.public_bytes(Encoding.DER)).decode()


def test_thumbprint_formats() -> None:
    cert = certificate("workload")
    expected = x5t(cert)
    digest = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    assert certificate_thumbprint(pem(cert)) == expected
    assert certificate_thumbprint(quote(pem(cert))) == expected  # nginx $ssl_client_escaped_cert
    assert certificate_thumbprint(der_base64(cert)) == expected  # Caddy's certificate_der_base64
    assert certificate_thumbprint(quote(der_base64(cert))) == expected  # Traefik, one certificate
    xfcc = f'By=spiffe://x;Hash={digest};Cert="{quote(pem(cert))}";Subject="CN=workload,O=acme";URI='
    assert certificate_thumbprint(xfcc) == expected  # envoy XFCC, SANITIZE_SET
    assert certificate_thumbprint(f"By=spiffe://x;Hash={digest.upper()}") == expected  # no Cert
    assert certificate_thumbprint("") is None and certificate_thumbprint("  ") is None  # none sent


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("not a certificate", id="junk"),
        pytest.param(quote("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), id="bad-pem"),
        pytest.param("QUJD", id="base64-not-der"),
        pytest.param("%ff%fe", id="not-utf8"),
        pytest.param("two", id="two-pem"),
        pytest.param("chain", id="comma-chain"),
        pytest.param("xfcc-two", id="xfcc-appended"),
        pytest.param("xfcc-disagree", id="xfcc-hash-and-cert-disagree"),
        pytest.param("By=spiffe://x;Subject=x", id="xfcc-no-certificate"),
        pytest.param("By=spiffe://x;Hash=abc", id="xfcc-short-hash"),
        pytest.param('By=spiffe://x;Cert="unterminated', id="xfcc-unterminated"),
        pytest.param("pem-trailing", id="pem-then-garbage"),
        pytest.param("pem-nul", id="pem-then-nul"),
        pytest.param("pem-other-label", id="pem-then-x509-certificate"),
        pytest.param("x" * 20000, id="too-long"),
    ],
)
def test_a_header_that_is_not_one_certificate_is_unreadable(value: str) -> None:
    """Fail closed (an outside check): an unreadable header made the token silently unbound, and
    envoy's appended XFCC let the client's own first element (a victim's public certificate) win."""
    victim, attacker = certificate("victim"), certificate("attacker")
    examples = {
        "two": quote(pem(victim) + pem(attacker)),
        "chain": f"{der_base64(attacker)},{der_base64(victim)}",
        "xfcc-two": f'Cert="{quote(pem(victim))}",By=spiffe://proxy;Cert="{quote(pem(attacker))}"',
        "pem-trailing": quote(pem(victim) + "garbage"),
        "pem-nul": pem(victim) + "\x00",
        "pem-other-label": pem(victim) + pem(attacker).replace(" CERTIFICATE-", " X509 CERTIFICATE-"),
        "xfcc-disagree": (
            f"Hash={hashlib.sha256(victim.public_bytes(Encoding.DER)).hexdigest()};"
            f'Cert="{quote(pem(attacker))}"'
        ),
    }
    with pytest.raises(UnreadableCertificate):
        certificate_thumbprint(examples.get(value, value))


def test_an_xfcc_value_is_read_in_one_pass() -> None:
    """A run of spaces in an XFCC value was backtracked over quadratically: 15,000 of them held a
    worker 3.5 s before the refusal (an outside audit).  Linear now: far below a second."""
    started = time.perf_counter()
    for value in ("Cert=" + " " * 15000 + 'x"', "URI=" + " " * 16000, 'Cert="' + "a" * 16000):
        with pytest.raises(UnreadableCertificate):
            certificate_thumbprint(value)
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("header", ["junk", "xfcc-two"])
def test_an_unreadable_certificate_from_the_proxy_is_refused_and_recorded(
    make_settings: Callable[..., Settings], upstream: RunningServer, header: str
) -> None:
    app = create_app(
        make_settings(POLICY, trusted_proxies=["10.0.0.0/8"], mtls_client_cert_header="X-Client-Cert")
    )
    web = app.test_client()
    victim, attacker = certificate("victim"), certificate("attacker")
    value = {
        "junk": "bm90IGEgY2VydGlmaWNhdGU=",
        "xfcc-two": f'Cert="{quote(pem(victim))}",By=spiffe://proxy;Cert="{quote(pem(attacker))}"',
    }[header]
    form = exchange_form(upstream.issuer.github_actions_token(audience=STS_ISSUER), audience=DEPLOY)
    refused = web.post("/token", data=form, headers={"X-Client-Cert": value}, environ_base=PROXY)
    assert refused.status_code == 400, refused.get_json()
    assert refused.get_json()["error"] == "invalid_request"
    [record] = app.extensions["sts"].audit.recent(1)
    assert record["outcome"] == "refused", record
    assert record["reasons"] == ["request.client_certificate_unreadable"], record
    # From an untrusted peer the header is ignored, as ever: a token, not bound.
    direct = web.post(
        "/token", data=form, headers={"X-Client-Cert": value}, environ_base={"REMOTE_ADDR": "203.0.113.5"}
    )
    assert direct.status_code == 200, direct.get_json()


def test_bound_only_through_a_trusted_proxy_and_re_exchanged_over_the_same_cert(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    app = create_app(
        make_settings(POLICY, trusted_proxies=["10.0.0.0/8"], mtls_client_cert_header="X-Client-Cert")
    )
    web = app.test_client()
    cert, other = certificate("workload"), certificate("someone-else")
    form = exchange_form(upstream.issuer.github_actions_token(audience=STS_ISSUER), audience=DEPLOY)
    header = {"X-Client-Cert": quote(pem(cert))}

    direct = web.post("/token", data=form, headers=header, environ_base={"REMOTE_ADDR": "203.0.113.5"})
    jwks = KeySet.import_key_set(web.get("/.well-known/jwks.json").get_json())
    claims = jwt.decode(direct.get_json()["access_token"], jwks, algorithms=["ES256"]).claims
    assert "cnf" not in claims, "a header from an untrusted peer must be ignored"

    bound = web.post("/token", data=form, headers=header, environ_base=PROXY)
    assert bound.status_code == 200 and bound.get_json()["token_type"] == "Bearer"
    token = bound.get_json()["access_token"]
    assert jwt.decode(token, jwks, algorithms=["ES256"]).claims["cnf"] == {"x5t#S256": x5t(cert)}

    again = exchange_form(token, subject_token_type=ACCESS_TOKEN_TYPE, audience=DEPLOY)
    wrong = web.post("/token", data=again, headers={"X-Client-Cert": quote(pem(other))}, environ_base=PROXY)
    assert wrong.status_code == 400 and wrong.get_json()["error"] == "invalid_request"
    missing = web.post("/token", data=again, environ_base=PROXY)
    assert missing.status_code == 400
    same = web.post("/token", data=again, headers=header, environ_base=PROXY)
    assert same.status_code == 200, same.get_json()


@pytest.mark.parametrize("trusted", ["10.0.0.0/8", "::ffff:10.0.0.0/104"])
def test_a_dual_stack_listener_sees_an_ipv4_proxy_as_trusted(
    make_settings: Callable[..., Settings], upstream: RunningServer, trusted: str
) -> None:
    """With ``host: "::"`` an IPv4 proxy's connection arrives as ``::ffff:10.0.0.2`` (RFC 4291
    §2.5.5.2).  It matched no IPv4 ``trusted_proxies``: the forwarded certificate was dropped, and
    the token issued unbound, to every client behind the proxy under one address (an outside
    audit).  A mapped network in the setting names the same proxies."""
    app = create_app(
        make_settings(POLICY, trusted_proxies=[trusted], mtls_client_cert_header="X-Client-Cert")
    )
    web = app.test_client()
    cert = certificate("workload")
    form = exchange_form(upstream.issuer.github_actions_token(audience=STS_ISSUER), audience=DEPLOY)
    headers = {"X-Client-Cert": quote(pem(cert)), "X-Forwarded-For": "203.0.113.7"}
    for peer in ("::ffff:10.0.0.2", "10.0.0.2"):
        bound = web.post("/token", data=form, headers=headers, environ_base={"REMOTE_ADDR": peer})
        assert bound.status_code == 200, bound.get_json()
        jwks = KeySet.import_key_set(web.get("/.well-known/jwks.json").get_json())
        claims = jwt.decode(bound.get_json()["access_token"], jwks, algorithms=["ES256"]).claims
        assert claims["cnf"] == {"x5t#S256": x5t(cert)}, peer
    records = app.extensions["sts"].audit.recent(2)
    assert [r["source_ip"] for r in records] == ["203.0.113.7", "203.0.113.7"]
    # An untrusted mapped peer is recorded as the IPv4 address it is.
    direct = web.post("/token", data=form, environ_base={"REMOTE_ADDR": "::ffff:203.0.113.5"})
    assert direct.status_code == 200
    assert app.extensions["sts"].audit.recent(1)[0]["source_ip"] == "203.0.113.5"


def test_the_metadata_says_tokens_are_certificate_bound_when_they_can_be(
    make_settings: Callable[..., Settings],
) -> None:
    """RFC 8705 §3.3: ``tls_client_certificate_bound_access_tokens``, false when left out."""
    path = "/.well-known/oauth-authorization-server"
    plain = create_app(make_settings(POLICY)).test_client().get(path).get_json()
    assert "tls_client_certificate_bound_access_tokens" not in plain
    bound = create_app(
        make_settings(POLICY, trusted_proxies=["10.0.0.0/8"], mtls_client_cert_header="X-Client-Cert")
    )
    assert bound.test_client().get(path).get_json()["tls_client_certificate_bound_access_tokens"] is True


def test_introspection_of_a_certificate_bound_token_is_bearer(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    from sts.core.client_secrets import hash_secret
    from tests.conftest import DEFAULT_CLIENTS

    secret_hash = hash_secret("rs-secret-0123456789")
    rs = {
        "client_id": "rs",
        "auth_method": "client_secret_post",
        "secret_hash": secret_hash,
        "audiences": [DEPLOY],
    }
    settings = make_settings(
        POLICY,
        trusted_proxies=["10.0.0.0/8"],
        mtls_client_cert_header="X-Client-Cert",
        clients=[*DEFAULT_CLIENTS, rs],
    )
    web = create_app(settings).test_client()
    cert = certificate("workload")
    form = exchange_form(upstream.issuer.github_actions_token(audience=STS_ISSUER), audience=DEPLOY)
    token = web.post(
        "/token", data=form, headers={"X-Client-Cert": quote(pem(cert))}, environ_base=PROXY
    ).get_json()
    body = web.post(
        "/introspect",
        data={"token": token["access_token"], "client_id": "rs", "client_secret": "rs-secret-0123456789"},
    ).get_json()
    assert body["active"] is True and body["token_type"] == "Bearer"
    assert body["cnf"] == {"x5t#S256": x5t(cert)}


def test_a_key_no_exchange_judged_is_never_confirmed_on_re_exchange(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    """A token of ours re-exchanged with its bound DPoP key and a certificate it is not bound to:
    the new token is bound to both, so the pair is no evidence (``attested``), and the certificate
    is never the re-exchanges' identity's key.  A review had it ride on the bound key into a
    ``pop`` token, whose own re-exchange then confirmed it ``issued_at_pop``."""
    from tests.core.test_dpop import EC_KEY, proof

    app = create_app(
        make_settings(POLICY, trusted_proxies=["10.0.0.0/8"], mtls_client_cert_header="X-Client-Cert")
    )
    web = app.test_client()
    jwks = KeySet.import_key_set(web.get("/.well-known/jwks.json").get_json())
    workload, unknown = certificate("workload"), certificate("unknown")

    def exchange(cert: x509.Certificate | None, token: str | None = None) -> dict[str, Any]:
        if token is None:
            form = exchange_form(upstream.issuer.github_actions_token(audience=STS_ISSUER), audience=DEPLOY)
        else:
            form = exchange_form(token, subject_token_type=ACCESS_TOKEN_TYPE, audience=DEPLOY)
        headers = {"DPoP": proof(EC_KEY, time.time())}
        if cert is not None:
            headers["X-Client-Cert"] = quote(pem(cert))
        resp = web.post("/token", data=form, headers=headers, environ_base=PROXY)
        assert resp.status_code == 200, resp.get_json()
        token = resp.get_json()["access_token"]
        claims = dict(jwt.decode(token, jwks, algorithms=["ES256"]).claims)
        record = app.extensions["sts"].audit.recent(1)[0]
        return {
            "token": token,
            "acr": claims["acr"].rpartition(":")[2],
            "cnf": claims["cnf"],
            "record": record,
        }

    first = exchange(workload)
    assert first["acr"] == "pop"
    assert exchange(workload, first["token"])["acr"] == "pop"
    bound_to_key = exchange(None)
    assert bound_to_key["acr"] == "pop" and set(bound_to_key["cnf"]) == {"jkt"}
    ridden = exchange(unknown, bound_to_key["token"])
    assert ridden["cnf"]["x5t#S256"] == x5t(unknown) and ridden["acr"] == "attested"
    again = exchange(unknown, ridden["token"])
    assert again["acr"] == "attested"
    stored = app.extensions["sts"].baselines.load("self:upstream|repo:acme/app:ref:refs/heads/main")
    assert stored.confirmed_values("cnf_x5t") == (x5t(workload),), stored
    assert "cnf_x5t" not in stored.pending


@pytest.mark.parametrize("actor_may_bind_key", [False, True])
def test_with_an_actor_a_key_the_subject_token_is_not_bound_to_is_no_evidence(
    make_settings: Callable[..., Settings], upstream: RunningServer, actor_may_bind_key: bool, tmp_path: Path
) -> None:
    """With an actor token, as without: a request proving a key the subject token is not bound to
    (a new certificate, the actor's own DPoP key) shows no key, since the new token is bound to it
    too.  A review had either ride on the subject's bound key into a ``pop`` token, whose plain
    re-exchange then made it the re-exchanges' identity's key (``issued_at_pop``)."""
    from tests.core.test_dpop import AGENTS, EC_KEY, EC_OTHER, SUBJECT, proof, public_jwk, thumbprint

    delegation = {"actors": [{"issuer": "upstream", "subject_pattern": AGENTS}], "max_depth": 3}
    policy = {"version": 1, "rules": [
        *POLICY["rules"][:1],
        {"name": "agents", "issuer": "upstream", "subject_pattern": AGENTS,
         "require_client_authentication": False, "grant": {"audiences": [DEPLOY]}},
        {"name": "again", "issuer": "self", "subject": SUBJECT, "require_client_authentication": False,
         "actor_may_bind_key": actor_may_bind_key, "delegation": delegation,
         "grant": {"audiences": [DEPLOY]}},
    ]}  # fmt: skip
    actor = upstream.issuer.kubernetes_token(audience=[STS_ISSUER], namespace="agents", service_account="a1")
    identity = f"self:upstream|{SUBJECT}"

    def service(name: str) -> tuple[Flask, Callable[..., tuple[str, str]]]:
        """A service and database of its own: each case starts with an identity that has no key yet."""
        settings = make_settings(
            policy,
            trusted_proxies=["10.0.0.0/8"],
            mtls_client_cert_header="X-Client-Cert",
            database_url=f"sqlite:///{tmp_path / name}.sqlite",
        )
        app = create_app(settings)
        web = app.test_client()
        jwks = KeySet.import_key_set(web.get("/.well-known/jwks.json").get_json())

        def exchange(
            key: Any, cert: x509.Certificate | None, token: str | None = None, *, acting: bool = False
        ) -> tuple[str, str]:
            if token is None:
                form = exchange_form(
                    upstream.issuer.github_actions_token(audience=STS_ISSUER), audience=DEPLOY
                )
            else:
                form = exchange_form(token, subject_token_type=ACCESS_TOKEN_TYPE, audience=DEPLOY)
            if acting:
                form.update(actor_token=actor, actor_token_type="urn:ietf:params:oauth:token-type:jwt")
            headers = {"DPoP": proof(key, time.time())} if key is not None else {}
            if cert is not None:
                headers["X-Client-Cert"] = quote(pem(cert))
            resp = web.post("/token", data=form, headers=headers, environ_base=PROXY)
            assert resp.status_code == 200, resp.get_json()
            token = resp.get_json()["access_token"]
            return token, jwt.decode(token, jwks, algorithms=["ES256"]).claims["acr"].rpartition(":")[2]

        return app, exchange

    # The subject's DPoP key, and an unknown certificate beside it, with an actor.
    app, exchange = service("dpop")
    bound, level = exchange(EC_KEY, None)
    assert level == "pop"
    unknown = certificate("unknown")
    ridden, level = exchange(EC_KEY, unknown, bound, acting=True)
    assert level == "attested"
    exchange(EC_KEY, unknown, ridden)
    assert x5t(unknown) not in app.extensions["sts"].baselines.load(identity).confirmed_values("cnf_x5t")
    # The subject's certificate, and the actor's own DPoP key beside it.
    app, exchange = service("certificate")
    workload = certificate("workload")
    bound, level = exchange(None, workload)
    assert level == "pop"
    acted, level = exchange(EC_OTHER, workload, bound, acting=True)
    assert level == "attested"
    exchange(EC_OTHER, workload, acted)
    stored = app.extensions["sts"].baselines.load(identity)
    assert thumbprint(public_jwk(EC_OTHER)) not in stored.confirmed_values("cnf_jkt")
