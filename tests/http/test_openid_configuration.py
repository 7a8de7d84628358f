"""``/.well-known/openid-configuration``: the metadata as an OpenID Connect Discovery 1.0 document.

Verifiers of workload tokens (cloud workload-identity federation, Vault's JWT auth, go-oidc, the
Kubernetes JWT authenticator) find an issuer's keys through it: issuer, then ``jwks_uri``, then
the algorithms in ``id_token_signing_alg_values_supported``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
from authlib.oidc.discovery import OpenIDProviderMetadata
from flask import Flask
from joserfc import jwt
from joserfc.jwk import KeySet

from sts.http.oauth import openid_configuration_document
from tests.conftest import STS_ISSUER

WELL_KNOWN = "/.well-known/openid-configuration"


def test_the_document_is_the_metadata_and_the_members_oidc_discovery_requires(
    make_app: Callable[..., Flask],
) -> None:
    web = make_app().test_client()
    response = web.get(WELL_KNOWN)
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.headers["Cache-Control"] == "public, max-age=300"
    document = response.get_json()
    metadata = web.get("/.well-known/oauth-authorization-server").get_json()
    assert {name: document[name] for name in metadata} == metadata
    added = set(document) - set(metadata)
    assert added == {"subject_types_supported", "id_token_signing_alg_values_supported"}
    assert document["issuer"] == STS_ISSUER
    assert document["subject_types_supported"] == ["public"]
    keys = web.get(urlsplit(document["jwks_uri"]).path).get_json()["keys"]
    assert document["id_token_signing_alg_values_supported"] == sorted({k["alg"] for k in keys}) == ["ES256"]


def test_an_rs256_issuer_passes_authlibs_oidc_discovery_validation(make_app: Callable[..., Flask]) -> None:
    """Authlib validates every member OpenID Connect Discovery §3 defines (RS256 among the
    algorithms, as §3 asks of OpenID Providers: listed here only when an RS256 key is published)."""
    document = make_app(signing_alg="RS256").test_client().get(WELL_KNOWN).get_json()
    OpenIDProviderMetadata(document).validate()
    assert document["id_token_signing_alg_values_supported"] == ["RS256"]


def test_an_issuer_with_a_path_serves_it_appended_to_the_issuer(make_app: Callable[..., Flask]) -> None:
    """OpenID Connect Discovery §4: ``issuer`` + ``/.well-known/openid-configuration`` (appended,
    unlike RFC 8414's inserted form); also at the root, for a proxy that strips the prefix."""
    web = make_app(issuer="https://sts.test/tenant-a").test_client()
    for path in ("/tenant-a" + WELL_KNOWN, WELL_KNOWN):
        document = web.get(path).get_json()
        assert document["issuer"] == "https://sts.test/tenant-a", path
        assert document["jwks_uri"] == "https://sts.test/tenant-a/.well-known/jwks.json"
        assert web.get(urlsplit(document["jwks_uri"]).path).status_code == 200
    assert web.get("/tenant-b" + WELL_KNOWN).status_code == 404
    assert web.post(WELL_KNOWN).status_code == 405


@pytest.mark.parametrize("alg", ["ES256", "ES384", "RS256", "PS256", "Ed25519"])
def test_a_token_verifies_as_a_discovery_client_verifies_it(make_app: Callable[..., Flask], alg: str) -> None:
    """What go-oidc does: the keys from ``jwks_uri``, only the listed algorithms."""
    app = make_app(signing_alg=alg)
    web = app.test_client()
    document = web.get(WELL_KNOWN).get_json()
    keys = KeySet.import_key_set(web.get(urlsplit(document["jwks_uri"]).path).get_json())
    signer = app.extensions["sts"].keyring.signer()
    token = signer.sign({"typ": "at+jwt"}, {"iss": STS_ISSUER, "sub": "workload", "aud": "api"})
    assert document["id_token_signing_alg_values_supported"] == [alg]
    decoded = jwt.decode(token, keys, algorithms=document["id_token_signing_alg_values_supported"])
    assert decoded.claims["iss"] == document["issuer"]


@pytest.mark.parametrize(
    ("jwks", "algs"),
    [
        ({"keys": [{"kty": "EC", "alg": "ES256"}, {"kty": "RSA", "alg": "RS256"}]}, ["ES256", "RS256"]),
        ({"keys": [{"kty": "EC", "alg": "ES256"}, {"kty": "EC", "alg": "ES256"}]}, ["ES256"]),
        ({"keys": [{"kty": "EC"}, "not a key", {"kty": "OKP", "alg": 7}]}, None),
        ({"keys": []}, None),
        ({}, None),
    ],
)
def test_the_algorithms_are_those_of_the_published_keys(jwks: dict[str, Any], algs: list[str] | None) -> None:
    """A key rotated to another algorithm is listed beside the old one; without any ``alg`` the
    member is left out (RFC 8414 §3.2: never an empty array)."""
    document = openid_configuration_document({"issuer": STS_ISSUER}, jwks)
    assert document.get("id_token_signing_alg_values_supported") == algs
    assert document["subject_types_supported"] == ["public"]
