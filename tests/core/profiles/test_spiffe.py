"""The ``spiffe`` profile (``sts/core/profiles/spiffe.py``): JWT-SVIDs routed by trust domain,
SPIFFE IDs, ``typ``, and trust bundles from a file and from a URL."""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flask import Flask
from joserfc.jwk import ECKey

from sts.core.profiles.spiffe import parse_spiffe_id
from sts.dev.issuer import DevIssuer, RunningServer
from sts.errors import ConfigurationError
from sts.settings import Settings
from tests.conftest import STS_ISSUER
from tests.core.profiles.conftest import (
    BILLING_ID,
    LEDGER_AUDIENCE,
    PARTNER_DOMAIN,
    SPIFFE_ISS,
    TRUST_DOMAIN,
    LocalHTTP,
    Mint,
    grant,
    granted,
    issuer_entries,
    last_record,
    payload,
    refused,
)

SPIFFE_RULES: list[dict[str, Any]] = [
    {
        "name": "svid-billing",
        "issuer": "spiffe",
        "subject": BILLING_ID,
        "facts": {"trust_domain": TRUST_DOMAIN, "path": "/ns/billing/sa/worker"},
        "require_client_authentication": False,
        "grant": grant([LEDGER_AUDIENCE], ["ledger:read"]),
    },
    {
        "name": "svid-partner",
        "issuer": "spiffe-partner",
        "facts": {"trust_domain": PARTNER_DOMAIN, "path": {"pattern": "/ns/[a-z]+/sa/[a-z]+"}},
        "require_client_authentication": False,
        "grant": grant([LEDGER_AUDIENCE], ["ledger:read"]),
    },
]


@pytest.fixture
def spiffe_app(build: Callable[..., Flask]) -> Flask:
    return build(SPIFFE_RULES)


def test_spiffe_svid_without_iss_is_routed_by_trust_domain(spiffe_app: Flask, mint: Mint) -> None:
    svid = mint.svid()
    assert "iss" not in payload(svid)
    _, claims = granted(spiffe_app, svid, "svid-billing")
    assert claims["sub"] == BILLING_ID
    assert last_record(spiffe_app)["issuer"] == "spiffe"
    # An SVID that does carry an iss is routed by it, as any token.
    granted(spiffe_app, mint.svid(iss=SPIFFE_ISS), "svid-billing")
    # The other trust domain's SVIDs go to its own bundle.
    granted(
        spiffe_app,
        mint.svid("spiffe://partner.example/ns/shop/sa/web", issuer="spiffe-partner"),
        "svid-partner",
    )
    assert last_record(spiffe_app)["issuer"] == "spiffe-partner"


def test_spiffe_svid_of_another_trust_domain_is_refused(spiffe_app: Flask, mint: Mint) -> None:
    # No issuer is configured for evil.example: nothing to route to.
    refused(spiffe_app, mint.svid("spiffe://evil.example/ns/billing/sa/worker"), "subject_token.missing_iss")
    # example.org's key vouching for partner.example: routed to partner.example's bundle, which lacks it.
    refused(spiffe_app, mint.svid("spiffe://partner.example/ns/shop/sa/web"), "subject_token.unknown_kid")
    # Through example.org's iss: its bundle verifies the signature, the profile refuses the domain.
    refused(
        spiffe_app,
        mint.svid("spiffe://partner.example/ns/shop/sa/web", iss=SPIFFE_ISS),
        "subject_token.spiffe.foreign_trust_domain",
    )


MALFORMED_SPIFFE_IDS = [
    ("uppercase-trust-domain", "spiffe://Example.org/ns/billing/sa/worker"),
    ("dot-dot-segment", "spiffe://example.org/ns/../sa/worker"),
    ("dot-segment", "spiffe://example.org/ns/./sa/worker"),
    ("query", "spiffe://example.org/ns/billing/sa/worker?admin=1"),
    ("fragment", "spiffe://example.org/ns/billing/sa/worker#x"),
    ("port", "spiffe://example.org:8443/ns/billing/sa/worker"),
    ("user-info", "spiffe://admin@example.org/ns/billing/sa/worker"),
    ("empty-segment", "spiffe://example.org/ns//sa/worker"),
    ("trailing-slash", "spiffe://example.org/ns/billing/sa/worker/"),
    ("percent-encoded", "spiffe://example.org/ns/billing%2Fsa/worker"),
    ("https-scheme", "https://example.org/ns/billing/sa/worker"),
    ("uppercase-scheme", "SPIFFE://example.org/ns/billing/sa/worker"),
    ("no-trust-domain", "spiffe:///ns/billing/sa/worker"),
    ("too-long", "spiffe://example.org/" + "a" * 2048),
]


@pytest.mark.parametrize(("spiffe_id"), [pytest.param(v, id=k) for k, v in MALFORMED_SPIFFE_IDS])
def test_spiffe_malformed_ids_are_refused(spiffe_app: Flask, mint: Mint, spiffe_id: str) -> None:
    with pytest.raises(ValueError):
        parse_spiffe_id(spiffe_id)
    claims = {"sub": spiffe_id, "aud": [STS_ISSUER], "iat": int(mint.now), "exp": int(mint.now) + 300}
    spiffe = mint.issuer("spiffe")
    # With iss, the token reaches the profile, which names the broken rule.
    with_iss = spiffe.mint({**claims, "iss": SPIFFE_ISS}, header={"typ": "JWT"})
    refused(spiffe_app, with_iss, "subject_token.spiffe.malformed_spiffe_id")
    # Without, it cannot even be routed.
    refused(spiffe_app, spiffe.mint(claims, header={"typ": "JWT"}), "subject_token.missing_iss")


def test_spiffe_id_parsing() -> None:
    assert parse_spiffe_id(BILLING_ID) == (TRUST_DOMAIN, "/ns/billing/sa/worker")
    assert parse_spiffe_id("spiffe://prod.example-1_x.org/a.b/C-d_e") == (
        "prod.example-1_x.org",
        "/a.b/C-d_e",
    )
    assert parse_spiffe_id("spiffe://example.org") == (TRUST_DOMAIN, "")


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({"typ": "JWT"}, None),
        ({"typ": "JOSE"}, None),
        ({"typ": None}, None),
        ({"typ": "at+jwt"}, "subject_token.typ_not_accepted"),
        ({"typ": "application/at+jwt"}, "subject_token.typ_not_accepted"),
        ({"typ": "dpop+jwt"}, "subject_token.typ_not_accepted"),
    ],
    ids=["JWT", "JOSE", "absent", "at+jwt", "application/at+jwt", "dpop+jwt"],
)
def test_spiffe_typ(spiffe_app: Flask, mint: Mint, header: dict[str, Any], reason: str | None) -> None:
    token = mint.remint("spiffe", mint.svid(), header=header)
    if reason is None:
        granted(spiffe_app, token, "svid-billing")
    else:
        refused(spiffe_app, token, reason)


def test_spiffe_aud_and_exp_are_required(spiffe_app: Flask, mint: Mint) -> None:
    refused(spiffe_app, mint.svid(aud=None), "subject_token.missing_aud")
    refused(spiffe_app, mint.svid(exp=None), "subject_token.missing_exp")
    refused(
        spiffe_app, mint.svid(aud=["spiffe://example.org/ns/other/sa/api"]), "subject_token.audience_mismatch"
    )


def test_spiffe_typ_default(
    make_settings: Callable[..., Settings], upstreams: dict[str, RunningServer]
) -> None:
    settings = make_settings(issuers=issuer_entries(upstreams))
    by_name = {i.name: i for i in settings.issuers}
    assert set(by_name["spiffe"].typ) == {None, "JWT", "JOSE"}
    assert set(by_name["gitlab"].typ) == {None, "JWT"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"algorithms": ["ES256", "EdDSA"]}, "EdDSA not allowed for JWT-SVIDs"),
        ({"algorithms": ["HS256"]}, "algorithms"),
        ({"trust_domain": None}, "trust_domain"),
        ({"trust_domain": "Example.org"}, "trust_domain"),
        ({"trust_domain": "spiffe://example.org"}, "trust_domain"),
        (
            {"trust_domain": PARTNER_DOMAIN},
            "setting issuers.spiffe-partner.trust_domain: 'partner.example' is already",
        ),
        ({"claim_mappings": {"team": "x"}}, "only for the generic profile"),
    ],
    ids=["EdDSA", "HS256", "no-trust-domain", "uppercase", "uri", "duplicate-trust-domain", "claim-mappings"],
)
def test_spiffe_settings_are_checked(
    make_settings: Callable[..., Settings],
    upstreams: dict[str, RunningServer],
    changes: dict[str, Any],
    message: str,
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        make_settings(issuers=issuer_entries(upstreams, {"spiffe": changes}))
    assert message in str(caught.value)
    # trust_domain belongs to SPIFFE issuers only.
    with pytest.raises(
        ConfigurationError, match=r"issuers\.gitlab\.trust_domain: only for the spiffe profile"
    ):
        make_settings(issuers=issuer_entries(upstreams, {"gitlab": {"trust_domain": TRUST_DOMAIN}}))


def _x509_authority() -> tuple[ECKey, str]:
    """An X.509-SVID CA key and its certificate (base64 DER, for ``x5c``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://example.org")]), False
        )
        .sign(key, hashes.SHA256())
    )
    der = certificate.public_bytes(serialization.Encoding.DER)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ECKey.import_key(pem), base64.b64encode(der).decode()


def spiffe_bundle(signer: DevIssuer, x509_key: ECKey, x509_cert: str) -> dict[str, Any]:
    """A SPIFFE trust bundle (SPIFFE Trust Domain and Bundle, §4): JWT-SVID and X.509-SVID keys.

    The X.509 authority gets a ``kid`` here so that a JWT signed with its key names a
    key the bundle does hold: it must still not verify, since its ``use`` is ``x509-svid``.
    """
    jwt_key = dict(signer.jwks()["keys"][0])
    jwt_key.pop("alg", None)
    jwt_key["use"] = "jwt-svid"
    x509_entry = {
        **x509_key.as_dict(private=False),
        "use": "x509-svid",
        "kid": x509_key.thumbprint(),
        "x5c": [x509_cert],
    }
    return {"keys": [x509_entry, jwt_key], "spiffe_sequence": 12, "spiffe_refresh_hint": 300}


@pytest.fixture(scope="module")
def x509_authority() -> tuple[ECKey, str]:
    return _x509_authority()


def test_spiffe_bundle_from_a_file(
    build: Callable[..., Flask], tmp_path: Path, mint: Mint, x509_authority: tuple[ECKey, str]
) -> None:
    x509_key, x509_cert = x509_authority
    bundle = tmp_path / "example.org.bundle.json"
    bundle.write_text(json.dumps(spiffe_bundle(mint.issuer("spiffe"), x509_key, x509_cert)))
    app = build(SPIFFE_RULES, changes={"spiffe": {"jwks_uri": None, "jwks_file": str(bundle)}})
    granted(app, mint.svid(), "svid-billing")
    # Signed with the X.509 authority's key (listed, with that kid, but for x509-svid only).
    forged = mint.issuer("spiffe").mint(payload(mint.svid()), header={"typ": "JWT"}, key=x509_key)
    refused(app, forged, "subject_token.unknown_kid")


def test_spiffe_bundle_with_only_x509_keys_is_refused_at_start(
    build: Callable[..., Flask], tmp_path: Path, mint: Mint, x509_authority: tuple[ECKey, str]
) -> None:
    x509_key, x509_cert = x509_authority
    document = spiffe_bundle(mint.issuer("spiffe"), x509_key, x509_cert)
    document["keys"] = document["keys"][:1]
    bundle = tmp_path / "x509-only.bundle.json"
    bundle.write_text(json.dumps(document))
    with pytest.raises(ConfigurationError, match="no usable public signature key"):
        build(SPIFFE_RULES, changes={"spiffe": {"jwks_uri": None, "jwks_file": str(bundle)}})


def test_spiffe_bundle_from_a_url(
    build: Callable[..., Flask], mint: Mint, x509_authority: tuple[ECKey, str]
) -> None:
    x509_key, x509_cert = x509_authority
    document = spiffe_bundle(mint.issuer("spiffe"), x509_key, x509_cert)
    endpoint = LocalHTTP(lambda request: (200, document) if request.path == "/bundle" else (404, {}))
    try:
        app = build(SPIFFE_RULES, changes={"spiffe": {"jwks_uri": f"{endpoint.url}/bundle"}})
        granted(app, mint.svid(), "svid-billing")
        forged = mint.issuer("spiffe").mint(payload(mint.svid()), header={"typ": "JWT"}, key=x509_key)
        refused(app, forged, "subject_token.unknown_kid")
        assert [r.path for r in endpoint.seen][:1] == ["/bundle"]
        assert all(r.method == "GET" for r in endpoint.seen)
    finally:
        endpoint.stop()
