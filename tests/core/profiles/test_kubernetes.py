"""The ``kubernetes`` profile (``sts/core/profiles/kubernetes.py``): projected service-account
tokens end to end, the facts it gives the policy, and its liveness check: the TokenReview API
(``sts/adapters/token_review.py``) asked whether the pod is still alive."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flask import Flask

from sts.adapters.token_review import PATH as TOKEN_REVIEW_PATH
from sts.adapters.token_review import HttpTokenReviewer
from sts.core.ports import TokenReviewUnavailable
from sts.core.profiles import PROFILES, ProfileOptions, ProfileViolation
from sts.dev.issuer import DevIssuer, RunningServer
from sts.errors import ConfigurationError
from sts.settings import Settings
from tests.conftest import JWT_TYPE, STS_ISSUER
from tests.core.profiles.conftest import (
    KUBERNETES_ISS,
    LEDGER_AUDIENCE,
    YEAR,
    LocalHTTP,
    Mint,
    SeenRequest,
    grant,
    granted,
    issuer_entries,
    last_record,
    payload,
    post,
    refused,
)

# -- Kubernetes -------------------------------------------------------------------------------------

KUBERNETES_RULES: list[dict[str, Any]] = [
    {
        "name": "k8s-ledger",
        "issuer": "kubernetes",
        "facts": {
            "namespace": "payments",
            "service_account": "api",
            "pod": {"pattern": "api-[a-z0-9]+"},
            "node": {"pattern": "node-[a-z]"},
        },
        "condition": "facts.pod_uid != null && facts.service_account_uid != null",
        "require_client_authentication": False,
        "grant": grant([LEDGER_AUDIENCE], ["ledger:read"], max_lifetime=3600),
    },
]


@pytest.fixture
def kubernetes_app(build: Callable[..., Flask]) -> Flask:
    return build(KUBERNETES_RULES)


def test_kubernetes_facts_are_available_to_policy(kubernetes_app: Flask, mint: Mint) -> None:
    body, claims = granted(kubernetes_app, mint.kubernetes(), "k8s-ledger")
    assert claims["sub"] == "system:serviceaccount:payments:api"
    assert body["expires_in"] == 600, "bounded by what is left of the projected token"
    for kwargs in (
        {"namespace": "billing"},
        {"service_account": "admin"},
        {"pod": "worker-1"},
        {"node": "gpu-node-7"},
        {"pod": None},  # bound to no pod (kubectl create token): pod and node facts are null
    ):
        refused(kubernetes_app, mint.kubernetes(**kwargs), "policy.no_rule_for_identity")


def test_kubernetes_sub_must_match_the_kubernetes_io_claims(kubernetes_app: Flask, mint: Mint) -> None:
    token = mint.kubernetes(sub="system:serviceaccount:payments:admin")
    refused(kubernetes_app, token, "subject_token.kubernetes.sub_mismatch")
    refused(
        kubernetes_app,
        mint.kubernetes(**{"kubernetes.io": None}),
        "subject_token.kubernetes.missing_kubernetes_claim",
    )


def _legacy_claims(**changes: Any) -> dict[str, Any]:
    """A secret-based service-account token (before projected tokens): no exp, no aud, flat claims."""
    claims = {
        "iss": "kubernetes/serviceaccount",
        "kubernetes.io/serviceaccount/namespace": "payments",
        "kubernetes.io/serviceaccount/secret.name": "api-token-x7k2p",
        "kubernetes.io/serviceaccount/service-account.name": "api",
        "kubernetes.io/serviceaccount/service-account.uid": "0b4ac1a6-3f0b-4a36-9f57-93d0d1b0e7f3",
        "sub": "system:serviceaccount:payments:api",
    }
    claims.update(changes)
    return claims


def test_kubernetes_legacy_secret_token_is_refused(
    build: Callable[..., Flask], kubernetes_app: Flask, mint: Mint
) -> None:
    cluster = mint.issuer("kubernetes")  # the same key signs both kinds of token in a cluster
    legacy = cluster.mint(_legacy_claims())
    refused(kubernetes_app, legacy, "subject_token.untrusted_issuer")

    # Even an issuer entry that names the legacy iss does not take them: no aud, no exp...
    app = build(KUBERNETES_RULES, changes={"kubernetes": {"issuer": "kubernetes/serviceaccount"}})
    refused(app, legacy, "subject_token.missing_aud")
    # ...and with them added, the profile still knows the format.
    dressed = cluster.mint(_legacy_claims(aud=[STS_ISSUER], iat=int(mint.now), exp=int(mint.now) + 600))
    refused(app, dressed, "subject_token.kubernetes.legacy_token")


def test_kubernetes_extended_expiry_is_bounded_by_max_token_age(kubernetes_app: Flask, mint: Mint) -> None:
    """A cluster extends a 1-hour token to a year (``warnafter`` marks the hour); the profile's
    default ``max_token_age`` of 3600 s refuses it two hours after it was issued."""
    iat = int(mint.now) - 7200
    token = mint.kubernetes(now=iat, lifetime=YEAR, warnafter=iat + 3607)
    assert payload(token)["exp"] > mint.now + 300 * 86400
    refused(kubernetes_app, token, "subject_token.too_old")


def test_kubernetes_warnafter_bounds_the_issued_lifetime(kubernetes_app: Flask, mint: Mint) -> None:
    iat = int(mint.now) - 600
    warnafter = iat + 3607
    token = mint.kubernetes(now=iat, lifetime=YEAR, warnafter=warnafter)
    body, claims = granted(kubernetes_app, token, "k8s-ledger")
    # The rule allows 3600 s and exp is a year away: warnafter decides.
    assert body["expires_in"] == warnafter - mint.now == 3007
    assert claims["exp"] == warnafter
    # Past warnafter (but within exp and max_token_age) the pod should have a fresh token.
    stale = mint.kubernetes(now=iat, lifetime=YEAR, warnafter=int(mint.now) - 1)
    refused(kubernetes_app, stale, "subject_token.expired")
    # So is an actor token past it (it was taken, for up to max_token_age more; an outside audit).
    fresh = mint.kubernetes(now=iat, lifetime=YEAR, warnafter=warnafter)
    refused(kubernetes_app, fresh, "actor_token.expired", actor_token=stale, actor_token_type=JWT_TYPE)


def test_kubernetes_warnafter_of_the_actor_bounds_the_issued_lifetime(
    build: Callable[..., Flask], mint: Mint
) -> None:
    """A delegated token never outlives the actor's token either: its ``warnafter`` decides as the
    subject's does (docs/configuration.md: an issued token never outlives it; an outside audit)."""
    rule = {
        **KUBERNETES_RULES[0],
        "delegation": {"actors": [{"issuer": "kubernetes", "facts": {"service_account": "planner"}}]},
    }
    app = build([rule])
    iat = int(mint.now) - 600
    subject = mint.kubernetes(now=iat, lifetime=YEAR, warnafter=iat + 3607)
    actor_warnafter = int(mint.now) + 90
    actor = mint.kubernetes(
        now=iat, lifetime=YEAR, warnafter=actor_warnafter, service_account="planner", pod="planner-5c2b"
    )
    body, claims = granted(app, subject, "k8s-ledger", actor_token=actor, actor_token_type=JWT_TYPE)
    assert body["expires_in"] <= 90
    assert claims["exp"] <= actor_warnafter


@pytest.mark.parametrize("warnafter", [10**400, "1800000000", True], ids=["huge", "string", "true"])
def test_kubernetes_warnafter_that_is_not_a_numeric_date_is_refused(
    kubernetes_app: Flask, mint: Mint, warnafter: Any
) -> None:
    """``warnafter`` is a NumericDate like ``exp``: one too large for a float is refused, not a 500."""
    token = mint.kubernetes(warnafter=warnafter)
    refused(kubernetes_app, token, "subject_token.kubernetes.malformed_warnafter")


def test_kubernetes_max_token_age_default_and_override(
    make_settings: Callable[..., Settings], upstreams: dict[str, RunningServer]
) -> None:
    settings = make_settings(issuers=issuer_entries(upstreams))
    by_name = {i.name: i for i in settings.issuers}
    assert by_name["kubernetes"].max_token_age == 3600
    assert by_name["corp-oidc"].max_token_age == 600
    settings = make_settings(issuers=issuer_entries(upstreams, {"kubernetes": {"max_token_age": 600}}))
    assert {i.name: i for i in settings.issuers}["kubernetes"].max_token_age == 600


def test_kubernetes_profile_facts() -> None:
    issuer = DevIssuer.ephemeral(KUBERNETES_ISS, "ES256")
    claims = payload(issuer.kubernetes_token(audience=STS_ISSUER, warnafter=1_800_000_000))
    facts = PROFILES["kubernetes"].facts(claims["sub"], claims, ProfileOptions())
    details = claims["kubernetes.io"]
    assert facts == {
        "namespace": "payments",
        "service_account": "api",
        "service_account_uid": details["serviceaccount"]["uid"],
        "pod": "api-7d9f",
        "pod_uid": details["pod"]["uid"],
        "node": "node-a",
        "node_uid": details["node"]["uid"],
        "warnafter": 1_800_000_000,
    }
    for broken, reason in (
        ({"warnafter": True}, "malformed_warnafter"),
        ({"warnafter": "soon"}, "malformed_warnafter"),
        ({"pod": {"uid": "x"}}, "malformed_pod"),
        ({"serviceaccount": "api"}, "malformed_serviceaccount"),
        ({"namespace": ""}, "malformed_namespace"),
    ):
        bad = {**claims, "kubernetes.io": {**details, **broken}}
        with pytest.raises(ProfileViolation) as caught:
            PROFILES["kubernetes"].facts(bad["sub"], bad, ProfileOptions())
        assert caught.value.reason == f"kubernetes.{reason}"
    legacy = _legacy_claims(iss=KUBERNETES_ISS, **{"kubernetes.io": details})
    with pytest.raises(ProfileViolation, match=r"kubernetes\.legacy_token"):
        PROFILES["kubernetes"].facts(legacy["sub"], legacy, ProfileOptions())


# -- Kubernetes TokenReview: is the pod still alive? -----------------------------------------------


class FakeKubeAPI:
    """The part of a kube-apiserver the STS uses: ``POST /apis/authentication.k8s.io/v1/tokenreviews``.

    Like the real one it authenticates its caller by bearer token (401 otherwise) and
    answers a review with 201: ``status.authenticated`` and ``status.user`` for a token
    whose pod still exists and whose ``aud`` intersects ``spec.audiences``; for any other,
    no ``authenticated`` and an ``error``.  It reads the token without verifying it (the
    STS has done that already); ``live_pods`` is the cluster's state.
    """

    def __init__(self, credential: str, *, tls: ssl.SSLContext | None = None) -> None:
        self.credential = credential
        self.live_pods: set[str] = {"api-7d9f"}
        self.username_override: str | None = None
        self.raw_answer: tuple[int, Any] | None = None
        self.http = LocalHTTP(self._respond, tls=tls)
        self.url = self.http.url

    @property
    def reviews(self) -> list[SeenRequest]:
        return list(self.http.seen)

    def _respond(self, request: SeenRequest) -> tuple[int, Any]:
        if self.raw_answer is not None:
            return self.raw_answer
        if request.method != "POST" or request.path != TOKEN_REVIEW_PATH:
            return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404}
        if request.headers.get("authorization") != f"Bearer {self.credential}":
            return 401, {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "message": "Unauthorized",
                "reason": "Unauthorized",
                "code": 401,
            }
        spec = json.loads(request.body)["spec"]
        claims = payload(spec["token"])
        details = claims["kubernetes.io"]
        pod = (details.get("pod") or {}).get("name")
        audiences = [a for a in spec.get("audiences") or [] if a in claims["aud"]]
        if pod in self.live_pods and audiences:
            namespace = details["namespace"]
            status: dict[str, Any] = {
                "authenticated": True,
                "user": {
                    "username": self.username_override or claims["sub"],
                    "uid": details["serviceaccount"]["uid"],
                    "groups": [
                        "system:serviceaccounts",
                        f"system:serviceaccounts:{namespace}",
                        "system:authenticated",
                    ],
                    "extra": {
                        "authentication.kubernetes.io/pod-name": [pod],
                        "authentication.kubernetes.io/pod-uid": [details["pod"]["uid"]],
                    },
                },
                "audiences": audiences,
            }
        else:
            status = {
                "user": {},
                "error": "[invalid bearer token, service account token has been invalidated]",
            }
        return 201, {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }


@pytest.fixture
def kube_api(tmp_path: Path) -> Iterator[tuple[FakeKubeAPI, Path]]:
    credential = tmp_path / "reviewer-token"
    credential.write_text("reviewer-token-1\n")
    api = FakeKubeAPI("reviewer-token-1")
    yield api, credential
    api.http.stop()


@pytest.fixture
def reviewed_app(build: Callable[..., Flask], kube_api: tuple[FakeKubeAPI, Path]) -> Flask:
    api, credential = kube_api
    return build(
        KUBERNETES_RULES,
        changes={"kubernetes": {"token_review_url": api.url, "token_review_token_file": str(credential)}},
    )


def test_token_review_live_pod_is_granted(
    reviewed_app: Flask, kube_api: tuple[FakeKubeAPI, Path], mint: Mint
) -> None:
    api, credential = kube_api
    token = mint.kubernetes(audience=[STS_ISSUER, "https://vault.example.com"])
    granted(reviewed_app, token, "k8s-ledger")
    [review] = api.reviews
    assert review.method == "POST" and review.path == TOKEN_REVIEW_PATH
    assert review.headers["authorization"] == "Bearer reviewer-token-1"
    assert review.headers["content-type"] == "application/json"
    sent = json.loads(review.body)
    assert sent["apiVersion"] == "authentication.k8s.io/v1" and sent["kind"] == "TokenReview"
    assert sent["spec"]["token"] == token
    # Only the audience the STS requires is asked about, not whatever else the token names.
    assert sent["spec"]["audiences"] == [STS_ISSUER]

    # Kubernetes rotates the reviewer's own projected token in place: it is read on every call.
    credential.write_text("reviewer-token-2\n")
    api.credential = "reviewer-token-2"
    granted(reviewed_app, mint.kubernetes(), "k8s-ledger")
    assert api.reviews[-1].headers["authorization"] == "Bearer reviewer-token-2"


def test_token_review_deleted_pod_is_refused(
    reviewed_app: Flask, kube_api: tuple[FakeKubeAPI, Path], mint: Mint
) -> None:
    api, _ = kube_api
    token = mint.kubernetes()
    api.live_pods.clear()  # the pod was deleted; its token still verifies
    refused(reviewed_app, token, "subject_token.kubernetes.not_live")
    assert len(api.reviews) == 1


def test_token_review_username_must_be_the_subject(
    reviewed_app: Flask, kube_api: tuple[FakeKubeAPI, Path], mint: Mint
) -> None:
    api, _ = kube_api
    api.username_override = "system:serviceaccount:payments:other"
    refused(reviewed_app, mint.kubernetes(), "subject_token.kubernetes.not_live")


def test_token_review_is_not_asked_before_the_token_verifies(
    reviewed_app: Flask, kube_api: tuple[FakeKubeAPI, Path], mint: Mint
) -> None:
    """A forged or foreign token never reaches the cluster (and never leaks to it)."""
    api, _ = kube_api
    forger = DevIssuer.ephemeral(KUBERNETES_ISS, "RS256")
    refused(
        reviewed_app, forger.kubernetes_token(audience=STS_ISSUER, now=mint.now), "subject_token.unknown_kid"
    )
    refused(reviewed_app, mint.github(), "policy.no_rule_for_identity")
    assert api.reviews == []


@pytest.mark.parametrize("audiences", [None, [], ["https://kubernetes.default.svc"], "x"])
def test_token_review_must_name_an_audience_asked_for(
    reviewed_app: Flask, kube_api: tuple[FakeKubeAPI, Path], mint: Mint, audiences: Any
) -> None:
    """TokenReviewStatus.audiences: authenticated for none of the audiences asked for (the API
    server's own, or a server unaware of audiences) is not live for us (an outside audit had such
    answers granted)."""
    api, _ = kube_api
    token = mint.kubernetes()
    claims = payload(token)
    status: dict[str, Any] = {"authenticated": True, "user": {"username": claims["sub"]}}
    if audiences is not None:
        status["audiences"] = audiences
    api.raw_answer = (201, {"kind": "TokenReview", "status": status})
    refused(reviewed_app, token, "subject_token.kubernetes.not_live")


def test_token_review_with_an_error_is_not_live(
    reviewed_app: Flask, kube_api: tuple[FakeKubeAPI, Path], mint: Mint
) -> None:
    """TokenReviewStatus.error ("the token couldn't be checked") beside authenticated: true leaves
    the answer in doubt, so the token is not live (fail closed); without the error it is."""
    api, _ = kube_api
    token = mint.kubernetes()
    claims = payload(token)
    status: dict[str, Any] = {
        "authenticated": True,
        "user": {"username": claims["sub"]},
        "audiences": [STS_ISSUER],
        "error": "webhook authenticator timed out",
    }
    api.raw_answer = (201, {"kind": "TokenReview", "status": status})
    refused(reviewed_app, token, "subject_token.kubernetes.not_live")
    status["error"] = ""
    granted(reviewed_app, mint.kubernetes(), "k8s-ledger")


@pytest.mark.parametrize(
    "answer",
    [
        (500, {"kind": "Status", "status": "Failure", "code": 500}),
        (401, {"kind": "Status", "status": "Failure", "code": 401}),
        (201, {"kind": "TokenReview", "status": "authenticated"}),
        (201, {"kind": "TokenReview", "status": {"authenticated": True, "user": "system:anonymous"}}),
        (201, ["not", "an", "object"]),
    ],
    ids=["http-500", "reviewer-not-authorised", "status-not-an-object", "user-not-an-object", "body-a-list"],
)
def test_token_review_broken_answers_are_temporarily_unavailable(
    reviewed_app: Flask, kube_api: tuple[FakeKubeAPI, Path], mint: Mint, answer: tuple[int, Any]
) -> None:
    api, _ = kube_api
    api.raw_answer = answer
    refused(
        reviewed_app,
        mint.kubernetes(),
        "subject_token.token_review_unavailable",
        error="temporarily_unavailable",
        status=503,
    )


def test_token_review_api_down_is_503(
    reviewed_app: Flask, kube_api: tuple[FakeKubeAPI, Path], mint: Mint
) -> None:
    api, _ = kube_api
    api.http.stop()
    response = post(reviewed_app, mint.kubernetes())
    assert response.status_code == 503
    assert response.get_json()["error"] == "temporarily_unavailable"
    assert response.headers["Retry-After"]
    assert "subject_token.token_review_unavailable" in last_record(reviewed_app)["reasons"]


def test_token_review_unreadable_credential_is_503(
    reviewed_app: Flask, kube_api: tuple[FakeKubeAPI, Path], mint: Mint
) -> None:
    api, credential = kube_api
    credential.unlink()
    refused(
        reviewed_app,
        mint.kubernetes(),
        "subject_token.token_review_unavailable",
        error="temporarily_unavailable",
        status=503,
    )
    assert api.reviews == [], "no request without the reviewer's credential"


def _self_signed_tls(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server TLS context for 127.0.0.1 and the file of its (self-signed) certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "apiserver-ca.crt", directory / "apiserver.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, cert_file


def test_token_review_over_tls_trusts_only_the_configured_ca(
    build: Callable[..., Flask], tmp_path: Path, mint: Mint
) -> None:
    context, ca_file = _self_signed_tls(tmp_path)
    credential = tmp_path / "reviewer-token"
    credential.write_text("reviewer-token-1")
    api = FakeKubeAPI("reviewer-token-1", tls=context)
    try:
        review = {"token_review_url": api.url, "token_review_token_file": str(credential)}
        with_ca = build(
            KUBERNETES_RULES, changes={"kubernetes": {**review, "token_review_ca_file": str(ca_file)}}
        )
        granted(with_ca, mint.kubernetes(), "k8s-ledger")
        assert len(api.reviews) == 1
        # Without the cluster's CA, the API server's certificate is not trusted: nothing is sent.
        without_ca = build(KUBERNETES_RULES, changes={"kubernetes": review})
        refused(
            without_ca,
            mint.kubernetes(),
            "subject_token.token_review_unavailable",
            error="temporarily_unavailable",
            status=503,
        )
        assert len(api.reviews) == 1
    finally:
        api.http.stop()


def test_http_token_reviewer_directly(kube_api: tuple[FakeKubeAPI, Path], mint: Mint) -> None:
    api, credential = kube_api
    reviewer = HttpTokenReviewer(api.url + "/", token_file=credential)
    token = mint.kubernetes()
    assert reviewer.review(token, (STS_ISSUER,)) == "system:serviceaccount:payments:api"
    assert reviewer.review(token, ("https://elsewhere.example.com",)) is None, "audiences are the API's check"
    api.live_pods.clear()
    assert reviewer.review(token, (STS_ISSUER,)) is None
    api.raw_answer = (302, {})
    with pytest.raises(TokenReviewUnavailable, match="HTTP 302"):
        reviewer.review(token, (STS_ISSUER,))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"token_review_url": "http://kubernetes.example.com:6443"}, "must use https"),
        ({"token_review_url": "https://10.0.0.1:6443?x=1"}, "no query or fragment"),
        ({"token_review_url": "kubernetes.default.svc"}, "not an absolute http(s) URL"),
        ({"token_review_token_file": "/var/run/secrets/token"}, "only with token_review_url"),
        ({"token_review_ca_file": "/var/run/secrets/ca.crt"}, "only with token_review_url"),
        (
            {"profile": "generic", "token_review_url": "https://10.0.0.1:6443"},
            "only for the kubernetes profile",
        ),
    ],
    ids=["plain-http", "query", "not-a-url", "credential-without-url", "ca-without-url", "wrong-profile"],
)
def test_token_review_settings_are_checked(
    make_settings: Callable[..., Settings],
    upstreams: dict[str, RunningServer],
    changes: dict[str, Any],
    message: str,
) -> None:
    with pytest.raises(ConfigurationError, match=r"issuers\.kubernetes") as caught:
        make_settings(issuers=issuer_entries(upstreams, {"kubernetes": changes}))
    assert message in str(caught.value)


def test_token_review_settings_accepted(
    make_settings: Callable[..., Settings], upstreams: dict[str, RunningServer]
) -> None:
    for url in (
        "https://10.0.0.1:6443",
        "http://127.0.0.1:6443",
        "http://[::1]:6443",
        "http://localhost:8001",
    ):
        settings = make_settings(
            issuers=issuer_entries(
                upstreams, {"kubernetes": {"token_review_url": url, "token_review_ca_file": "ca.crt"}}
            )
        )
        kubernetes = {i.name: i for i in settings.issuers}["kubernetes"]
        assert kubernetes.token_review_url == url
        assert kubernetes.token_review_ca_file is not None and kubernetes.token_review_ca_file.is_absolute()


def test_token_review_checks_the_actor_token_too(
    build: Callable[..., Flask], kube_api: tuple[FakeKubeAPI, Path], mint: Mint
) -> None:
    """``token_review_url`` checks every token, the actor's too: a token a deleted pod left behind
    must not act for another workload (an outside audit: only the subject's pod was reviewed)."""
    api, credential = kube_api
    rule = {
        **KUBERNETES_RULES[0],
        "delegation": {"actors": [{"issuer": "kubernetes", "facts": {"service_account": "planner"}}]},
    }
    app = build(
        [rule],
        changes={"kubernetes": {"token_review_url": api.url, "token_review_token_file": str(credential)}},
    )
    actor = mint.kubernetes(service_account="planner", pod="planner-5c2b")
    delegated = {"actor_token": actor, "actor_token_type": JWT_TYPE}
    refused(app, mint.kubernetes(), "actor_token.kubernetes.not_live", **delegated)
    assert [json.loads(r.body)["spec"]["token"] for r in api.reviews][-1] == actor
    api.live_pods.add("planner-5c2b")
    _, claims = granted(app, mint.kubernetes(), "k8s-ledger", **delegated)
    assert claims["act"]["sub"] == "system:serviceaccount:payments:planner"
