"""The development issuer: real JWKS over HTTP, realistic workload tokens, loopback only.

Tokens are verified the way the STS will verify them: the JWK set is fetched
over HTTP from a server on an ephemeral loopback port, and joserfc checks the
signature with an explicit algorithm list and the claims at a fixed ``now``.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from joserfc import jws, jwt
from joserfc.errors import BadSignatureError, UnsupportedAlgorithmError, UnsupportedHeaderError
from joserfc.jwk import ECKey, KeySet, RSAKey

from sts.dev.issuer import DevIssuer, RunningServer, require_loopback_host

NOW = 1_800_000_000
GITHUB_ISSUER = "https://token.actions.githubusercontent.com"
STS_AUDIENCE = "https://sts.example.test"
TIMEOUT = 5


@pytest.fixture(scope="module")
def issuer() -> DevIssuer:
    return DevIssuer.ephemeral(GITHUB_ISSUER)


@pytest.fixture(scope="module")
def server(issuer: DevIssuer) -> Iterator[RunningServer]:
    with issuer.serve_in_thread() as running:
        yield running


@pytest.fixture(scope="module")
def fetched_keys(server: RunningServer) -> KeySet:
    """The JWK set as a relying party gets it: discovery document, then ``jwks_uri``."""
    discovery = requests.get(server.discovery_url, timeout=TIMEOUT).json()
    return KeySet.import_key_set(requests.get(discovery["jwks_uri"], timeout=TIMEOUT).json())


def verify(
    token: str, keys: KeySet, *, alg: str = "RS256", iss: str | None = GITHUB_ISSUER, aud: str = STS_AUDIENCE
) -> jwt.Token:
    decoded = jwt.decode(token, keys, algorithms=[alg])
    options: dict[str, Any] = {"aud": {"essential": True, "value": aud}, "exp": {"essential": True}}
    if iss is not None:
        options["iss"] = {"essential": True, "value": iss}
    jwt.JWTClaimsRegistry(now=NOW, leeway=0, **options).validate(decoded.claims)
    return decoded


# -- discovery and JWKS over HTTP ------------------------------------------------------------------


def test_discovery_document_points_at_the_served_jwks(server: RunningServer, issuer: DevIssuer) -> None:
    response = requests.get(server.discovery_url, timeout=TIMEOUT)

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    document = response.json()
    assert document["issuer"] == GITHUB_ISSUER
    assert document["jwks_uri"] == f"{server.url}/.well-known/jwks"
    assert document["id_token_signing_alg_values_supported"] == ["RS256"]
    assert issuer.issuer_url == GITHUB_ISSUER


def test_jwks_is_public_cacheable_and_keyed_by_thumbprint(server: RunningServer, issuer: DevIssuer) -> None:
    response = requests.get(server.jwks_uri, timeout=TIMEOUT)

    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "max-age=300"
    (jwk,) = response.json()["keys"]
    assert jwk["kty"] == "RSA"
    assert jwk["alg"] == "RS256"
    assert jwk["use"] == "sig"
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk), "private members leaked"
    public_key = RSAKey.import_key(jwk)
    assert public_key.raw_value.key_size == 2048
    assert jwk["kid"] == public_key.thumbprint() == issuer.kid
    # Kubernetes relying parties look under /openid/v1/jwks.
    assert requests.get(f"{server.url}/openid/v1/jwks", timeout=TIMEOUT).json() == response.json()


def test_jwks_requests_are_counted(server: RunningServer, issuer: DevIssuer) -> None:
    before = issuer.jwks_requests
    requests.get(server.jwks_uri, timeout=TIMEOUT)
    requests.get(server.jwks_uri, timeout=TIMEOUT)
    assert issuer.jwks_requests == before + 2


def test_unknown_paths_and_methods_are_refused(server: RunningServer) -> None:
    assert requests.get(f"{server.url}/nope", timeout=TIMEOUT).status_code == 404
    response = requests.post(server.jwks_uri, timeout=TIMEOUT)
    assert response.status_code == 405
    assert "GET" in response.headers["Allow"]


# -- GitHub Actions --------------------------------------------------------------------------------


def test_github_ref_subject_and_claims(issuer: DevIssuer, fetched_keys: KeySet) -> None:
    token = verify(issuer.github_actions_token(audience=STS_AUDIENCE, now=NOW), fetched_keys)

    assert token.header == {"alg": "RS256", "kid": issuer.kid, "typ": "JWT"}
    claims = token.claims
    assert claims["sub"] == "repo:acme/app:ref:refs/heads/main"
    assert claims["aud"] == STS_AUDIENCE
    assert (claims["iat"], claims["nbf"], claims["exp"]) == (NOW, NOW, NOW + 300)
    assert claims["repository"] == "acme/app"
    assert claims["repository_id"] == "123456"
    assert claims["repository_owner"] == "acme"
    assert claims["repository_owner_id"] == "7890"
    assert claims["ref"] == "refs/heads/main"
    assert claims["ref_type"] == "branch"
    assert (
        claims["workflow_ref"]
        == claims["job_workflow_ref"]
        == "acme/app/.github/workflows/deploy.yml@refs/heads/main"
    )
    assert claims["event_name"] == "push"
    assert claims["runner_environment"] == "github-hosted"
    assert claims["repository_visibility"] == "private"
    assert len(claims["sha"]) == 40
    for name in ("repository_id", "repository_owner_id", "run_id", "run_number", "run_attempt", "actor_id"):
        assert isinstance(claims[name], str), f"{name} must be a string, as GitHub sends it"
    assert "environment" not in claims


def test_github_environment_subject(issuer: DevIssuer, fetched_keys: KeySet) -> None:
    token = issuer.github_actions_token(audience=STS_AUDIENCE, environment="prod", now=NOW)
    claims = verify(token, fetched_keys).claims

    assert claims["sub"] == "repo:acme/app:environment:prod"
    assert claims["environment"] == "prod"


def test_github_immutable_subject(issuer: DevIssuer, fetched_keys: KeySet) -> None:
    token = issuer.github_actions_token(
        audience=STS_AUDIENCE,
        immutable_sub=True,
        environment="prod",
        runner_environment="self-hosted",
        now=NOW,
    )
    claims = verify(token, fetched_keys).claims

    assert claims["sub"] == "repo:acme@7890/app@123456:environment:prod"
    assert claims["runner_environment"] == "self-hosted"


def test_github_pull_request_and_tag_subjects(issuer: DevIssuer, fetched_keys: KeySet) -> None:
    pull_request = issuer.github_actions_token(
        audience=STS_AUDIENCE, event_name="pull_request", ref="refs/pull/7/merge", now=NOW
    )
    tag = issuer.github_actions_token(audience=STS_AUDIENCE, ref="refs/tags/v1.2.0", now=NOW)

    assert verify(pull_request, fetched_keys).claims["sub"] == "repo:acme/app:pull_request"
    tag_claims = verify(tag, fetched_keys).claims
    assert tag_claims["sub"] == "repo:acme/app:ref:refs/tags/v1.2.0"
    assert tag_claims["ref_type"] == "tag"


def test_extra_claims_override_add_and_remove(issuer: DevIssuer) -> None:
    token = issuer.github_actions_token(
        audience=STS_AUDIENCE, now=NOW, iss="https://evil.example", custom="x", jti=None
    )
    claims = jwt.decode(token, KeySet.import_key_set(issuer.jwks()), algorithms=["RS256"]).claims

    assert claims["iss"] == "https://evil.example"
    assert claims["custom"] == "x"
    assert "jti" not in claims


def test_each_token_gets_a_fresh_jti(issuer: DevIssuer) -> None:
    keys = KeySet.import_key_set(issuer.jwks())
    first, second = (
        jwt.decode(issuer.github_actions_token(audience=STS_AUDIENCE, now=NOW), keys, algorithms=["RS256"])
        for _ in range(2)
    )
    assert first.claims["jti"] != second.claims["jti"]


def test_github_rejects_a_repository_without_owner(issuer: DevIssuer) -> None:
    with pytest.raises(ValueError, match="OWNER/REPO"):
        issuer.github_actions_token(audience=STS_AUDIENCE, repository="app")


# -- Kubernetes ------------------------------------------------------------------------------------


def test_kubernetes_projected_token(issuer: DevIssuer, fetched_keys: KeySet) -> None:
    token = issuer.kubernetes_token(audience=STS_AUDIENCE, now=NOW, warnafter=NOW + 3607, lifetime=31_536_000)
    decoded = verify(token, fetched_keys)

    assert "typ" not in decoded.header
    claims = decoded.claims
    assert claims["sub"] == "system:serviceaccount:payments:api"
    assert claims["aud"] == [STS_AUDIENCE]
    assert (claims["iat"], claims["nbf"], claims["exp"]) == (NOW, NOW, NOW + 31_536_000)
    assert claims["jti"]
    details = claims["kubernetes.io"]
    assert details["namespace"] == "payments"
    assert details["serviceaccount"]["name"] == "api"
    assert details["pod"]["name"] == "api-7d9f"
    assert details["node"]["name"] == "node-a"
    assert details["warnafter"] == NOW + 3607
    uids = {details[kind]["uid"] for kind in ("serviceaccount", "pod", "node")}
    assert len(uids) == 3 and all(len(uid) == 36 for uid in uids)


def test_kubernetes_uids_are_stable_unless_the_object_is_recreated(issuer: DevIssuer) -> None:
    keys = KeySet.import_key_set(issuer.jwks())

    def service_account_uid(token: str) -> str:
        uid: str = jwt.decode(token, keys, algorithms=["RS256"]).claims["kubernetes.io"]["serviceaccount"][
            "uid"
        ]
        return uid

    first = service_account_uid(issuer.kubernetes_token(audience=STS_AUDIENCE))
    again = service_account_uid(issuer.kubernetes_token(audience=STS_AUDIENCE))
    recreated = service_account_uid(
        issuer.kubernetes_token(
            audience=STS_AUDIENCE, service_account_uid="0b7e3c0e-1111-4222-8333-944455556666"
        )
    )
    assert first == again
    assert recreated != first


def test_kubernetes_unbound_and_legacy_shapes(issuer: DevIssuer) -> None:
    keys = KeySet.import_key_set(issuer.jwks())
    unbound = jwt.decode(
        issuer.kubernetes_token(audience=[STS_AUDIENCE, "vault"], pod=None), keys, algorithms=["RS256"]
    ).claims
    legacy = jwt.decode(
        issuer.kubernetes_token(audience=STS_AUDIENCE, iss="kubernetes/serviceaccount", exp=None, nbf=None),
        keys,
        algorithms=["RS256"],
    ).claims

    assert unbound["aud"] == [STS_AUDIENCE, "vault"]
    assert set(unbound["kubernetes.io"]) == {"namespace", "serviceaccount"}
    assert legacy["iss"] == "kubernetes/serviceaccount"
    assert "exp" not in legacy and "nbf" not in legacy


# -- GitLab and SPIFFE -----------------------------------------------------------------------------


def test_gitlab_id_token(fetched_keys: KeySet, issuer: DevIssuer) -> None:
    token = issuer.gitlab_token(audience=STS_AUDIENCE, environment="production", now=NOW)
    decoded = verify(token, fetched_keys)

    assert decoded.header["typ"] == "JWT"
    claims = decoded.claims
    assert claims["sub"] == "project_path:acme/app:ref_type:branch:ref:main"
    assert claims["project_path"] == "acme/app"
    assert claims["namespace_path"] == "acme"
    assert claims["project_id"] == "4242"
    assert claims["namespace_id"] == "77"
    assert claims["user_id"] == "1001"
    assert claims["ref_protected"] == "true"
    assert claims["ref_path"] == "refs/heads/main"
    assert claims["environment"] == "production"
    assert claims["pipeline_source"] == "push"
    assert claims["runner_environment"] == "gitlab-hosted"
    assert claims["user_login"] == "dev-user"
    assert claims["nbf"] <= claims["iat"] == NOW


def test_gitlab_unprotected_tag(issuer: DevIssuer) -> None:
    token = issuer.gitlab_token(audience=STS_AUDIENCE, ref="v1.0.0", ref_type="tag", ref_protected=False)
    claims = jwt.decode(token, KeySet.import_key_set(issuer.jwks()), algorithms=["RS256"]).claims

    assert claims["sub"] == "project_path:acme/app:ref_type:tag:ref:v1.0.0"
    assert claims["ref_protected"] == "false"
    assert "environment" not in claims


def test_spiffe_jwt_svid(issuer: DevIssuer, fetched_keys: KeySet) -> None:
    token = issuer.spiffe_svid("spiffe://prod.example/ns/payments/sa/api", STS_AUDIENCE, now=NOW)
    decoded = verify(token, fetched_keys, iss=None)

    assert decoded.header["typ"] == "JWT"
    assert decoded.claims == {
        "sub": "spiffe://prod.example/ns/payments/sa/api",
        "aud": [STS_AUDIENCE],
        "exp": NOW + 300,
        "iat": NOW,
    }


@pytest.mark.parametrize("spiffe_id", ["https://prod.example/api", "spiffe:///no-trust-domain", "api"])
def test_spiffe_refuses_non_spiffe_ids(issuer: DevIssuer, spiffe_id: str) -> None:
    with pytest.raises(ValueError, match="spiffe://"):
        issuer.spiffe_svid(spiffe_id, STS_AUDIENCE)


# -- raw minting: crafting bad tokens --------------------------------------------------------------


def test_mint_signs_exactly_the_given_claims_and_merges_header(
    issuer: DevIssuer, fetched_keys: KeySet
) -> None:
    token = issuer.mint({"sub": "client-1"}, header={"typ": "at+jwt", "kid": None})
    decoded = jwt.decode(token, fetched_keys.keys[0], algorithms=["RS256"])

    assert decoded.header == {"alg": "RS256", "typ": "at+jwt"}
    assert decoded.claims == {"sub": "client-1"}


def test_mint_with_a_foreign_key_does_not_verify_against_the_jwks(
    fetched_keys: KeySet, issuer: DevIssuer
) -> None:
    attacker_key = RSAKey.generate_key(2048)
    token = issuer.mint({"sub": "x"}, key=attacker_key, header={"kid": issuer.kid})

    with pytest.raises(BadSignatureError):
        jwt.decode(token, fetched_keys, algorithms=["RS256"])


def test_mint_can_send_unknown_critical_headers(issuer: DevIssuer) -> None:
    token = issuer.mint({"sub": "x"}, header={"crit": ["exp-v2"], "exp-v2": "1"})

    assert jws.extract_compact(token.encode()).headers()["crit"] == ["exp-v2"]
    # RFC 7515 §4.1.11: a verifier that does not understand a critical header must reject the token.
    with pytest.raises(UnsupportedHeaderError):
        jwt.decode(token, KeySet.import_key_set(issuer.jwks()), algorithms=["RS256"])


def test_mint_refuses_alg_in_header(issuer: DevIssuer) -> None:
    with pytest.raises(ValueError, match="alg="):
        issuer.mint({"sub": "x"}, header={"alg": "none"})


def test_es256_issuer_is_not_accepted_by_an_rs256_allow_list() -> None:
    es_issuer = DevIssuer.ephemeral("https://gitlab.example.com", alg="ES256")
    (jwk,) = es_issuer.jwks()["keys"]
    keys = KeySet.import_key_set(es_issuer.jwks())
    token = es_issuer.gitlab_token(audience=STS_AUDIENCE, now=NOW)

    assert (jwk["kty"], jwk["crv"], jwk["alg"]) == ("EC", "P-256", "ES256")
    assert verify(token, keys, alg="ES256", iss="https://gitlab.example.com").claims["project_id"] == "4242"
    with pytest.raises(UnsupportedAlgorithmError):
        jwt.decode(token, keys, algorithms=["RS256"])


@pytest.mark.parametrize("alg", ["HS256", "none", "PS256"])
def test_unsupported_algorithms_are_refused(alg: str) -> None:
    with pytest.raises(ValueError, match="unsupported"):
        DevIssuer.ephemeral(GITHUB_ISSUER, alg=alg)


def test_weak_or_mismatched_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="P-256"):
        DevIssuer(GITHUB_ISSUER, ECKey.generate_key("P-384"), "ES256")
    with pytest.raises(ValueError, match="RSA 2048"):
        DevIssuer(GITHUB_ISSUER, ECKey.generate_key("P-256"), "RS256")
    public_only = RSAKey.import_key(RSAKey.generate_key(2048).as_dict(private=False))
    with pytest.raises(ValueError, match="private key"):
        DevIssuer(GITHUB_ISSUER, public_only, "RS256")


def test_rotation_publishes_the_new_key_and_optionally_drops_the_old() -> None:
    rotating = DevIssuer.ephemeral(GITHUB_ISSUER, alg="ES256")
    old_kid = rotating.kid
    old_token = rotating.mint({"sub": "x"})

    new_kid = rotating.rotate_key()
    overlapping = KeySet.import_key_set(rotating.jwks())
    assert new_kid != old_kid
    assert rotating.kid == new_kid
    assert [key.kid for key in overlapping] == [new_kid, old_kid]
    assert jwt.decode(rotating.mint({"sub": "x"}), overlapping, algorithms=["ES256"]).header["kid"] == new_kid
    assert jwt.decode(old_token, overlapping, algorithms=["ES256"]).claims == {"sub": "x"}

    newest_kid = rotating.rotate_key(keep_previous=False)
    assert [key["kid"] for key in rotating.jwks()["keys"]] == [newest_kid]


# -- POST /mint ------------------------------------------------------------------------------------


def test_post_mint_github_actions(server: RunningServer, fetched_keys: KeySet) -> None:
    response = requests.post(
        f"{server.url}/mint/github-actions",
        json={
            "audience": STS_AUDIENCE,
            "environment": "prod",
            "actor": "alice",
            "now": NOW,
            "claims": {"enterprise": "acme-corp"},
        },
        timeout=TIMEOUT,
    )

    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    claims = verify(response.json()["token"], fetched_keys).claims
    assert claims["sub"] == "repo:acme/app:environment:prod"
    assert claims["actor"] == "alice"
    assert claims["enterprise"] == "acme-corp"
    assert claims["iat"] == NOW


def test_post_mint_kubernetes(server: RunningServer, fetched_keys: KeySet) -> None:
    response = requests.post(
        f"{server.url}/mint/kubernetes",
        json={"audience": [STS_AUDIENCE], "namespace": "billing", "service_account": "worker", "now": NOW},
        timeout=TIMEOUT,
    )

    assert response.status_code == 200
    claims = verify(response.json()["token"], fetched_keys).claims
    assert claims["sub"] == "system:serviceaccount:billing:worker"
    assert claims["kubernetes.io"]["namespace"] == "billing"


def test_post_mint_gitlab_and_spiffe(server: RunningServer, fetched_keys: KeySet) -> None:
    gitlab = requests.post(
        f"{server.url}/mint/gitlab",
        json={"audience": STS_AUDIENCE, "project_id": "99", "now": NOW},
        timeout=TIMEOUT,
    )
    spiffe = requests.post(
        f"{server.url}/mint/spiffe",
        json={"spiffe_id": "spiffe://dev.example/api", "audience": STS_AUDIENCE, "now": NOW},
        timeout=TIMEOUT,
    )

    assert verify(gitlab.json()["token"], fetched_keys).claims["project_id"] == "99"
    assert verify(spiffe.json()["token"], fetched_keys, iss=None).claims["sub"] == "spiffe://dev.example/api"


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({}, 400, "missing parameters ['audience']"),
        ({"audience": STS_AUDIENCE, "enviroment": "prod"}, 400, "unknown parameters ['enviroment']"),
        ({"audience": STS_AUDIENCE, "immutable_sub": "yes"}, 400, "'immutable_sub' has the wrong type"),
        ({"audience": STS_AUDIENCE, "lifetime": True}, 400, "'lifetime' has the wrong type"),
        ({"audience": STS_AUDIENCE, "claims": {"environment": "prod"}}, 400, "top-level parameters"),
        ({"audience": STS_AUDIENCE, "claims": ["x"]}, 400, "must be a JSON object"),
        ({"audience": STS_AUDIENCE, "repository": "no-owner"}, 400, "OWNER/REPO"),
        (["audience"], 400, "must be a JSON object"),
    ],
)
def test_post_mint_rejects_bad_bodies(
    server: RunningServer, body: object, status: int, fragment: str
) -> None:
    response = requests.post(f"{server.url}/mint/github-actions", json=body, timeout=TIMEOUT)

    assert response.status_code == status
    assert response.json()["error"] == "invalid_request"
    assert fragment in response.json()["error_description"]


def test_post_mint_requires_json_content_type(server: RunningServer) -> None:
    response = requests.post(
        f"{server.url}/mint/github-actions", data={"audience": STS_AUDIENCE}, timeout=TIMEOUT
    )
    assert response.status_code == 415
    assert "token" not in response.json()


def test_mint_endpoints_can_be_switched_off() -> None:
    issuer = DevIssuer.ephemeral(GITHUB_ISSUER, alg="ES256")
    with issuer.serve_in_thread(mint_endpoints=False) as running:
        response = requests.post(
            f"{running.url}/mint/github-actions", json={"audience": "x"}, timeout=TIMEOUT
        )
        assert response.status_code == 404
        assert requests.get(running.jwks_uri, timeout=TIMEOUT).status_code == 200


# -- serving ---------------------------------------------------------------------------------------


def test_serve_ephemeral_issuer_is_its_own_url() -> None:
    with DevIssuer.serve_ephemeral(alg="ES256") as running:
        document = requests.get(running.discovery_url, timeout=TIMEOUT).json()
        token = running.issuer.kubernetes_token(audience=STS_AUDIENCE, now=NOW)
        keys = KeySet.import_key_set(requests.get(document["jwks_uri"], timeout=TIMEOUT).json())

        assert running.url == f"http://127.0.0.1:{running.port}"
        assert document["issuer"] == running.url == running.issuer.issuer_url
        assert verify(token, keys, alg="ES256", iss=running.url).claims["iss"] == running.url


def test_stopped_server_no_longer_answers() -> None:
    running = DevIssuer.ephemeral(GITHUB_ISSUER, alg="ES256").serve_in_thread()
    assert requests.get(running.jwks_uri, timeout=TIMEOUT).status_code == 200
    running.stop()
    running.stop()  # idempotent

    with pytest.raises(requests.ConnectionError):
        requests.get(running.jwks_uri, timeout=TIMEOUT)


@pytest.mark.parametrize("host", ["0.0.0.0", "", "::", "10.0.0.5", "192.168.1.20", "example.com"])
def test_non_loopback_binds_are_refused(issuer: DevIssuer, host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        issuer.serve_in_thread(host=host)
    with pytest.raises(ValueError, match="loopback"):
        DevIssuer.serve_ephemeral(host=host)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_hosts_are_accepted(host: str) -> None:
    require_loopback_host(host)


# -- persisted key ---------------------------------------------------------------------------------


def test_load_or_create_persists_a_private_key(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys" / "dev-issuer"
    first = DevIssuer.load_or_create(key_dir, "http://127.0.0.1:8081")
    (key_file,) = key_dir.iterdir()
    second = DevIssuer.load_or_create(key_dir, "http://127.0.0.1:8081")

    assert key_file.name == "signing-key-rs256.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    # PEM header of an unencrypted PKCS#8 key (spelled in two parts so no scanner mistakes it for a key).
    assert key_file.read_bytes().startswith(b"-----BEGIN " + b"PRIVATE KEY-----")
    assert second.kid == first.kid
    # A token minted by one process verifies with the keys the other publishes.
    token = first.github_actions_token(audience=STS_AUDIENCE, now=NOW)
    assert (
        verify(token, KeySet.import_key_set(second.jwks()), iss="http://127.0.0.1:8081").claims["iat"] == NOW
    )


def test_load_or_create_keeps_one_key_per_algorithm(tmp_path: Path) -> None:
    rsa = DevIssuer.load_or_create(tmp_path, GITHUB_ISSUER)
    ec = DevIssuer.load_or_create(tmp_path, GITHUB_ISSUER, alg="ES256")

    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "signing-key-es256.pem",
        "signing-key-rs256.pem",
    ]
    assert rsa.kid != ec.kid
    assert DevIssuer.load_or_create(tmp_path, GITHUB_ISSUER, alg="ES256").kid == ec.kid


def test_load_or_create_refuses_a_public_key_file(tmp_path: Path) -> None:
    (tmp_path / "signing-key-rs256.pem").write_bytes(RSAKey.generate_key(2048).as_pem(private=False))

    with pytest.raises(ValueError, match="private key"):
        DevIssuer.load_or_create(tmp_path, GITHUB_ISSUER)


def test_concurrent_first_use_agrees_on_one_key(tmp_path: Path) -> None:
    key_dir = tmp_path / "dev-issuer"
    with ThreadPoolExecutor(max_workers=8) as pool:
        kids = set(
            pool.map(lambda _: DevIssuer.load_or_create(key_dir, GITHUB_ISSUER, alg="ES256").kid, range(8))
        )

    assert len(kids) == 1
    assert [path.name for path in key_dir.iterdir()] == ["signing-key-es256.pem"], (
        "temporary files left behind"
    )
