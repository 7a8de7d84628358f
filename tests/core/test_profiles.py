"""Attestation profiles (``sts/core/profiles``): real token formats end to end, and as functions.

Each upstream issuer is a development issuer serving its keys over real HTTP on
loopback, with the ``iss`` the real service uses (GitHub Actions, a GitLab
instance, a Kubernetes cluster, a SPIFFE trust domain, a corporate OpenID
Connect provider) and the claims it really sends (STANDARDS.md, "Real workload
tokens").  Tokens go through ``POST /token``; every refusal is checked for its
OAuth error *and*, through the audit record, for the exact reason, so a test
cannot pass because something else happened to refuse.  The Kubernetes
TokenReview API and a SPIFFE bundle endpoint are small local HTTP servers that
speak the real wire format.  The app's clock is fixed and tokens are minted at
it; nothing sleeps.

The last part runs the example policies that need profiles
(``policies/examples``) end to end, like ``tests/test_policy.py`` does for the
others, and checks ``sts policy check`` accepts them with a matching config.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import shutil
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flask import Flask
from joserfc.jwk import ECKey
from werkzeug.test import TestResponse

from sts.adapters.policy_files import load_policies
from sts.adapters.token_review import PATH as TOKEN_REVIEW_PATH
from sts.adapters.token_review import HttpTokenReviewer
from sts.app import create_app
from sts.cli import main
from sts.core.client_secrets import hash_secret
from sts.core.ports import TokenReviewUnavailable
from sts.core.profiles import PROFILES, ProfileOptions, ProfileViolation
from sts.core.profiles.spiffe import parse_spiffe_id
from sts.dev.issuer import DevIssuer, RunningServer
from sts.errors import ConfigurationError
from sts.settings import Settings
from tests.conftest import ACCESS_TOKEN_TYPE, DEFAULT_CLIENTS, STS_ISSUER, exchange_form
from tests.support.clock import Clock

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = REPO_ROOT / "policies" / "examples"

GITHUB_ISS = "https://token.actions.githubusercontent.com"
GITLAB_ISS = "https://gitlab.example.com"
KUBERNETES_ISS = "https://kubernetes.default.svc.cluster.local"
#: Only SVIDs that carry an ``iss`` (SPIRE's ``jwt_issuer``) name it; SPIRE's default sends none.
SPIFFE_ISS = "https://oidc.spire.example.org"
PARTNER_ISS = "https://oidc.spire.partner.example"
CORP_ISS = "https://idp.example.com/realms/corp"
TRUST_DOMAIN = "example.org"
PARTNER_DOMAIN = "partner.example"
BILLING_ID = "spiffe://example.org/ns/billing/sa/worker"

DEPLOY = "https://deploy.example.com"
PREVIEW = "https://preview.example.com"
LEDGER = "https://ledger.example.com/api"
LEDGER_AUDIENCE = "https://ledger.example.com"
REPORTS = "https://reports.example.com"
JOBS = "https://jobs.example.com"
YEAR = 365 * 86400

#: The Keycloak-style service account of the generic-oidc example (its stable ``sub``).
REPORTS_SA = "5b0c7f4e-2f7e-4d38-9a55-3f0f6c1d2e8a"
CORP_MAPPINGS = {
    "client": "azp",
    "realm_roles": "realm_access/roles",
    "reports_roles": "resource_access/reports-api/roles",
}
PAYMENTS_SECRET = "payments-gateway-secret-0123456789abcdef"


# -- upstream issuers, served over HTTP for the whole module ------------------------------------

UPSTREAMS = {
    "github-actions": (GITHUB_ISS, "RS256"),
    "gitlab": (GITLAB_ISS, "RS256"),
    "kubernetes": (KUBERNETES_ISS, "RS256"),
    "spiffe": (SPIFFE_ISS, "ES256"),
    "spiffe-partner": (PARTNER_ISS, "ES256"),
    "corp-oidc": (CORP_ISS, "RS256"),
}


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningServer]:
    """Overrides conftest's per-test issuer (only ``make_settings`` needs it): one for the module."""
    with DevIssuer.serve_ephemeral(alg="ES256") as server:
        yield server


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, RunningServer]]:
    """One development issuer per issuer name, each with the real service's ``iss``."""
    with contextlib.ExitStack() as stack:
        yield {
            name: stack.enter_context(DevIssuer.ephemeral(iss, alg).serve_in_thread())
            for name, (iss, alg) in UPSTREAMS.items()
        }


def issuer_entries(
    servers: Mapping[str, RunningServer], changes: Mapping[str, Mapping[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """The ``issuers`` setting for every upstream; ``changes[name]`` is merged in (``None`` removes)."""
    base: dict[str, dict[str, Any]] = {
        "github-actions": {
            "profile": "github-actions",
            "algorithms": ["RS256"],
            "max_token_age": 900,
            "require_jti": True,
        },
        "gitlab": {"profile": "gitlab-ci", "algorithms": ["RS256"], "max_token_age": 900},
        # No max_token_age: the kubernetes profile's default (3600 s) is under test.
        "kubernetes": {
            "profile": "kubernetes",
            "algorithms": ["RS256"],
            "jwks_uri": f"{servers['kubernetes'].url}/openid/v1/jwks",
        },
        "spiffe": {"profile": "spiffe", "trust_domain": TRUST_DOMAIN, "algorithms": ["ES256"]},
        "spiffe-partner": {"profile": "spiffe", "trust_domain": PARTNER_DOMAIN, "algorithms": ["ES256"]},
        "corp-oidc": {"algorithms": ["RS256"], "max_token_age": 600, "claim_mappings": CORP_MAPPINGS},
    }
    entries = []
    for name, server in servers.items():
        entry: dict[str, Any] = {
            "name": name,
            "issuer": server.issuer.issuer_url,
            "jwks_uri": server.jwks_uri,
            "audiences": [STS_ISSUER],
            **base[name],
        }
        for key, value in (changes or {}).get(name, {}).items():
            if value is None:
                entry.pop(key, None)
            else:
                entry[key] = value
        entries.append(entry)
    return entries


@pytest.fixture
def build(
    make_settings: Callable[..., Settings], upstreams: dict[str, RunningServer], clock: Clock
) -> Callable[..., Flask]:
    """An app trusting every upstream, with ``rules`` as its policy and the fixed clock."""

    def _build(
        rules: list[dict[str, Any]],
        *,
        changes: Mapping[str, Mapping[str, Any]] | None = None,
        **overrides: Any,
    ) -> Flask:
        settings = make_settings(
            {"version": 1, "rules": rules}, issuers=issuer_entries(upstreams, changes), **overrides
        )
        return create_app(settings, clock=clock)

    return _build


@dataclass
class Mint:
    """Mints realistic upstream tokens at the app's fixed time."""

    servers: Mapping[str, RunningServer]
    now: float

    def issuer(self, name: str) -> DevIssuer:
        return self.servers[name].issuer

    def github(self, **kwargs: Any) -> str:
        return self.issuer("github-actions").github_actions_token(
            **{"audience": STS_ISSUER, "now": self.now, **kwargs}
        )

    def gitlab(self, **kwargs: Any) -> str:
        return self.issuer("gitlab").gitlab_token(**{"audience": STS_ISSUER, "now": self.now, **kwargs})

    def kubernetes(self, **kwargs: Any) -> str:
        return self.issuer("kubernetes").kubernetes_token(
            **{"audience": STS_ISSUER, "now": self.now, **kwargs}
        )

    def svid(self, spiffe_id: str = BILLING_ID, *, issuer: str = "spiffe", **kwargs: Any) -> str:
        return self.issuer(issuer).spiffe_svid(spiffe_id, STS_ISSUER, **{"now": self.now, **kwargs})

    def corp(self, **changes: Any) -> str:
        return self.issuer("corp-oidc").mint(corp_claims(self.now, **changes), header={"typ": "JWT"})

    def remint(
        self, name: str, token: str, *, header: Mapping[str, Any] | None = None, **changes: Any
    ) -> str:
        """The claims of ``token`` (``changes`` applied, ``None`` removes), signed again by ``name``."""
        claims = {**payload(token), **changes}
        return self.issuer(name).mint({k: v for k, v in claims.items() if v is not None}, header=header)


@pytest.fixture
def mint(upstreams: dict[str, RunningServer], clock: Clock) -> Mint:
    return Mint(upstreams, clock.now)


def corp_claims(now: float, **changes: Any) -> dict[str, Any]:
    """A Keycloak client-credentials access token of the ``reports-batch`` service account."""
    iat = int(now)
    claims: dict[str, Any] = {
        "exp": iat + 300,
        "iat": iat,
        "jti": str(uuid.uuid4()),
        "iss": CORP_ISS,
        "aud": [STS_ISSUER, "account"],
        "sub": REPORTS_SA,
        "typ": "Bearer",
        "azp": "reports-batch",
        "acr": "1",
        "realm_access": {"roles": ["default-roles-corp", "offline_access", "batch-jobs"]},
        "resource_access": {"reports-api": {"roles": ["export"]}, "account": {"roles": ["view-profile"]}},
        "scope": "profile email",
        "clientId": "reports-batch",
        "preferred_username": "service-account-reports-batch",
        "email_verified": False,
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


# -- exchanging, and reading the decision back ------------------------------------------------------


def payload(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    loaded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return loaded


def post(app: Flask, token: str, headers: Mapping[str, str] | None = None, **form: Any) -> TestResponse:
    return app.test_client().post("/token", data=exchange_form(token, **form), headers=dict(headers or {}))


def last_record(app: Flask) -> dict[str, Any]:
    records: list[dict[str, Any]] = app.extensions["sts"].audit.recent(1)
    assert len(records) == 1
    return records[0]


def refused(
    app: Flask, token: str, reason: str, *, error: str = "invalid_request", status: int = 400, **form: Any
) -> dict[str, Any]:
    """Exchange ``token``; assert the refusal, its audited ``reason``, and return the audit record."""
    response = post(app, token, **form)
    body = response.get_json()
    assert response.status_code == status, body
    assert body["error"] == error, body
    assert "access_token" not in body
    record = last_record(app)
    assert record["outcome"] == "refused"
    assert reason in record["reasons"], record["reasons"]
    return record


def granted(app: Flask, token: str, rule: str, **form: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Exchange ``token``; assert ``rule`` granted it; return the response body and the issued claims."""
    response = post(app, token, **form)
    body = response.get_json()
    assert response.status_code == 200, (body, last_record(app)["reasons"])
    record = last_record(app)
    assert record["outcome"] == "granted"
    assert record["rule"] == rule
    return body, payload(body["access_token"])


def grant(audiences: list[str], scopes: list[str], max_lifetime: int = 300) -> dict[str, Any]:
    return {
        "audiences": audiences,
        "scopes": scopes,
        "default_scopes": scopes[:1],
        "max_lifetime": max_lifetime,
    }


# -- GitHub Actions -----------------------------------------------------------------------------

GITHUB_RULES: list[dict[str, Any]] = [
    {
        "name": "gh-deploy",
        "issuer": "github-actions",
        "facts": {
            "repository_id": "123456",
            "owner_id": "7890",
            "ref": "refs/heads/main",
            "is_pull_request": False,
        },
        "require_client_authentication": False,
        "grant": grant([DEPLOY], ["deploy:read", "deploy:write"]),
    },
    {
        "name": "gh-pull-request-preview",
        "issuer": "github-actions",
        "facts": {"repository_id": "123456", "is_pull_request": True},
        "require_client_authentication": False,
        "grant": grant([PREVIEW], ["preview:write"]),
    },
]


@pytest.fixture
def github_app(build: Callable[..., Flask]) -> Flask:
    return build(GITHUB_RULES)


@pytest.mark.parametrize(
    ("immutable", "subject"),
    [
        pytest.param(False, "repo:acme/app:ref:refs/heads/main", id="name-form"),
        pytest.param(True, "repo:acme@7890/app@123456:ref:refs/heads/main", id="immutable-form"),
    ],
)
def test_github_both_sub_forms_are_granted_by_a_policy_on_ids(
    github_app: Flask, mint: Mint, immutable: bool, subject: str
) -> None:
    token = mint.github(immutable_sub=immutable)
    assert payload(token)["sub"] == subject
    _, claims = granted(github_app, token, "gh-deploy", audience=DEPLOY, scope="deploy:write")
    assert claims["sub"] == subject
    assert claims["aud"] == DEPLOY and claims["scope"] == "deploy:write"
    assert last_record(github_app)["subject"] == subject


@pytest.mark.parametrize("immutable", [False, True], ids=["name-form", "immutable-form"])
def test_github_recreated_repository_with_the_same_name_is_refused(
    github_app: Flask, mint: Mint, immutable: bool
) -> None:
    """acme/app deleted and re-created (or re-registered by someone else): same name, new id."""
    token = mint.github(repository_id="999999", immutable_sub=immutable)
    refused(github_app, token, "policy.no_rule_for_identity", audience=DEPLOY)


@pytest.mark.parametrize(
    ("sub", "reason"),
    [
        pytest.param(
            "repo:acme/other:ref:refs/heads/main", "github-actions.sub_repository_mismatch", id="other-repo"
        ),
        pytest.param(
            "repo:evil/app:ref:refs/heads/main", "github-actions.sub_repository_mismatch", id="other-owner"
        ),
        pytest.param(
            "repo:acme@7890/app@111111:ref:refs/heads/main", "github-actions.sub_id_mismatch", id="repo-id"
        ),
        pytest.param(
            "repo:acme@1111/app@123456:ref:refs/heads/main", "github-actions.sub_id_mismatch", id="owner-id"
        ),
        pytest.param(
            "repo:acme@7890/app:ref:refs/heads/main", "github-actions.sub_id_mismatch", id="half-immutable"
        ),
        pytest.param("acme/app:ref:refs/heads/main", "github-actions.malformed_sub", id="no-repo-prefix"),
    ],
)
def test_github_sub_that_disagrees_with_the_claims_is_refused(
    github_app: Flask, mint: Mint, sub: str, reason: str
) -> None:
    refused(github_app, mint.github(sub=sub), f"subject_token.{reason}", audience=DEPLOY)


def test_github_ids_must_be_strings_of_digits(github_app: Flask, mint: Mint) -> None:
    refused(
        github_app,
        mint.github(repository_id=123456),
        "subject_token.github-actions.malformed_repository_id",
        audience=DEPLOY,
    )
    refused(
        github_app,
        mint.github(owner_id="acme"),
        "subject_token.github-actions.malformed_ids",
        audience=DEPLOY,
    )


def test_github_pull_request_events_are_exposed_as_is_pull_request(github_app: Flask, mint: Mint) -> None:
    # A pull_request run: sub "repo:acme/app:pull_request", ref refs/pull/N/merge.
    pull_request = mint.github(event_name="pull_request", ref="refs/pull/7/merge")
    assert payload(pull_request)["sub"] == "repo:acme/app:pull_request"
    refused(github_app, pull_request, "policy.target_not_allowed", error="invalid_target", audience=DEPLOY)
    granted(github_app, pull_request, "gh-pull-request-preview", audience=PREVIEW)

    # pull_request_target runs on the base branch (sub and ref say main) with the repository's
    # secrets, for a pull request from anyone: only event_name tells, and the fact says so.
    target = mint.github(event_name="pull_request_target")
    assert payload(target)["sub"] == "repo:acme/app:ref:refs/heads/main"
    refused(github_app, target, "policy.target_not_allowed", error="invalid_target", audience=DEPLOY)
    granted(github_app, target, "gh-pull-request-preview", audience=PREVIEW)

    # A push to main is not a pull request.
    push = mint.github()
    refused(github_app, push, "policy.target_not_allowed", error="invalid_target", audience=PREVIEW)


def _github_claims(issuer: DevIssuer, **kwargs: Any) -> dict[str, Any]:
    return payload(issuer.github_actions_token(audience=STS_ISSUER, **kwargs))


def test_github_profile_facts() -> None:
    issuer = DevIssuer.ephemeral(GITHUB_ISS, "ES256")
    profile = PROFILES["github-actions"]
    claims = _github_claims(issuer, environment="production", immutable_sub=True)
    facts = profile.facts(claims["sub"], claims, ProfileOptions())
    assert facts["repository"] == "acme/app" and facts["repository_id"] == "123456"
    assert facts["owner"] == "acme" and facts["owner_id"] == "7890"
    assert facts["immutable_sub"] is True
    assert facts["sub_context"] == "environment:production"
    assert facts["environment"] == "production"
    assert facts["runner_environment"] == "github-hosted"
    assert facts["is_pull_request"] is False
    assert facts["job_workflow_ref"] == claims["job_workflow_ref"]

    # GitHub names are case-insensitive; the sub and the claim may differ in case only.
    claims = _github_claims(issuer, event_name="pull_request")
    claims["sub"] = "repo:ACME/App:pull_request"
    facts = profile.facts(claims["sub"], claims, ProfileOptions())
    assert facts["immutable_sub"] is False and facts["is_pull_request"] is True

    for missing in ("repository", "repository_id", "repository_owner", "repository_owner_id"):
        claims = _github_claims(issuer)
        del claims[missing]
        with pytest.raises(ProfileViolation) as caught:
            profile.facts(claims["sub"], claims, ProfileOptions())
        assert caught.value.reason == f"github-actions.missing_{missing}"


# -- GitLab CI ------------------------------------------------------------------------------------

GITLAB_RULES: list[dict[str, Any]] = [
    {
        "name": "gl-deploy",
        "issuer": "gitlab",
        "facts": {"project_id": "4242", "ref_protected": True, "is_merge_request": False},
        "require_client_authentication": False,
        "grant": grant([DEPLOY], ["deploy:write"]),
    },
    {
        "name": "gl-merge-request-preview",
        "issuer": "gitlab",
        "facts": {"project_id": "4242", "is_merge_request": True},
        "require_client_authentication": False,
        "grant": grant([PREVIEW], ["preview:write"]),
    },
]


@pytest.fixture
def gitlab_app(build: Callable[..., Flask]) -> Flask:
    return build(GITLAB_RULES)


def test_gitlab_protected_branch_is_granted(gitlab_app: Flask, mint: Mint) -> None:
    token = mint.gitlab()
    assert payload(token)["ref_protected"] == "true"  # GitLab sends a string
    _, claims = granted(gitlab_app, token, "gl-deploy", audience=DEPLOY)
    assert claims["sub"] == "project_path:acme/app:ref_type:branch:ref:main"


def test_gitlab_ref_protected_is_a_boolean_fact(gitlab_app: Flask, mint: Mint) -> None:
    unprotected = mint.gitlab(ref="feature-x", ref_protected=False)
    assert payload(unprotected)["ref_protected"] == "false"
    refused(gitlab_app, unprotected, "policy.no_rule_for_identity", audience=DEPLOY)
    # GitLab sends "true" or "false"; anything else is not guessed at.
    odd = mint.remint("gitlab", mint.gitlab(), header={"typ": "JWT"}, ref_protected="yes")
    refused(gitlab_app, odd, "subject_token.gitlab-ci.malformed_ref_protected", audience=DEPLOY)


@pytest.mark.parametrize(
    ("claim", "value"),
    [("project_id", 4242), ("namespace_id", 77), ("project_id", "42a"), ("project_id", None)],
    ids=["integer-project-id", "integer-namespace-id", "not-digits", "missing"],
)
def test_gitlab_ids_must_be_strings(gitlab_app: Flask, mint: Mint, claim: str, value: Any) -> None:
    token = mint.gitlab(**{claim: value})
    assert payload(token).get(claim) == value
    refused(gitlab_app, token, f"subject_token.gitlab-ci.malformed_{claim}", audience=DEPLOY)


def test_gitlab_sub_must_name_the_project(gitlab_app: Flask, mint: Mint) -> None:
    token = mint.gitlab(sub="project_path:acme/other:ref_type:branch:ref:main")
    refused(gitlab_app, token, "subject_token.gitlab-ci.sub_project_mismatch", audience=DEPLOY)


def test_gitlab_fork_merge_request_names_the_fork_and_is_refused(gitlab_app: Flask, mint: Mint) -> None:
    """In a merge request pipeline from a fork, the project claims name the fork.

    The fork's owner controls everything else: they can protect their own ``main``, so
    ``ref_protected`` is true too.  Only the canonical ``project_id`` keeps them out.
    """
    fork = mint.gitlab(
        project_path="mallory/app",
        project_id="9999",
        namespace_id="555",
        ref="main",
        ref_protected=True,
        pipeline_source="merge_request_event",
    )
    claims = payload(fork)
    assert claims["project_id"] == "9999" and claims["sub"].startswith("project_path:mallory/app:")
    refused(gitlab_app, fork, "policy.no_rule_for_identity", audience=DEPLOY)
    refused(gitlab_app, fork, "policy.no_rule_for_identity", audience=PREVIEW)
    # The fork's own push pipelines are no better.
    refused(
        gitlab_app,
        mint.gitlab(project_path="mallory/app", project_id="9999", namespace_id="555"),
        "policy.no_rule_for_identity",
        audience=DEPLOY,
    )


def test_gitlab_merge_request_event_is_exposed_as_is_merge_request(gitlab_app: Flask, mint: Mint) -> None:
    # A merge request pipeline of the canonical project (e.g. a fork's MR run in the parent
    # project): the right project id, even a protected ref, but not a deploy.
    token = mint.gitlab(pipeline_source="merge_request_event")
    refused(gitlab_app, token, "policy.target_not_allowed", error="invalid_target", audience=DEPLOY)
    granted(gitlab_app, token, "gl-merge-request-preview", audience=PREVIEW)


def test_gitlab_profile_facts() -> None:
    issuer = DevIssuer.ephemeral(GITLAB_ISS, "ES256")
    claims = payload(issuer.gitlab_token(audience=STS_ISSUER, environment="production"))
    assert claims["runner_id"] == 1  # GitLab sends this one id as a JSON number
    facts = PROFILES["gitlab-ci"].facts(claims["sub"], claims, ProfileOptions())
    assert facts["project_path"] == "acme/app" and facts["namespace_path"] == "acme"
    assert facts["project_id"] == "4242" and facts["namespace_id"] == "77"
    assert facts["ref_protected"] is True
    assert facts["environment"] == "production" and facts["environment_protected"] is False
    assert facts["is_merge_request"] is False and facts["pipeline_source"] == "push"
    assert facts["runner_id"] == "1", "ids are normalised to strings"
    assert facts["runner_environment"] == "gitlab-hosted" and facts["user_login"] == "dev-user"

    del claims["ref_protected"]
    claims["environment_protected"] = "maybe"
    with pytest.raises(ProfileViolation) as caught:
        PROFILES["gitlab-ci"].facts(claims["sub"], claims, ProfileOptions())
    assert caught.value.reason == "gitlab-ci.malformed_environment_protected"
    claims["environment_protected"] = "true"
    facts = PROFILES["gitlab-ci"].facts(claims["sub"], claims, ProfileOptions())
    assert facts["ref_protected"] is False, "an absent ref_protected is not protected"
    assert facts["environment_protected"] is True


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


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class LocalHTTP:
    """A real HTTP(S) server on 127.0.0.1 whose ``respond(request) -> (status, json)`` decides answers."""

    def __init__(
        self, respond: Callable[[SeenRequest], tuple[int, Any]], *, tls: ssl.SSLContext | None = None
    ) -> None:
        self.respond = respond
        self.seen: list[SeenRequest] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = SeenRequest(
                    self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body
                )
                with outer._lock:
                    outer.seen.append(request)
                status, answer = outer.respond(request)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01})
        self.thread.daemon = True
        self.thread.start()
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


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


# -- SPIFFE JWT-SVIDs ---------------------------------------------------------------------------------

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


# -- generic OIDC: claim mappings ------------------------------------------------------------------------

CORP_RULES: list[dict[str, Any]] = [
    {
        "name": "corp-export",
        "issuer": "corp-oidc",
        "subject": REPORTS_SA,
        "facts": {"client": "reports-batch", "reports_roles": {"pattern": "never-a-list"}},
        "require_client_authentication": False,
        "grant": grant([REPORTS], ["reports:export"]),
    },
    {
        "name": "corp-export-by-role",
        "issuer": "corp-oidc",
        "subject": REPORTS_SA,
        "facts": {"client": "reports-batch"},
        "condition": '"export" in facts.reports_roles && "batch-jobs" in facts.realm_roles',
        "require_client_authentication": False,
        "grant": grant([REPORTS], ["reports:export"]),
    },
]


def test_generic_claim_mappings_feed_policy(build: Callable[..., Flask], mint: Mint) -> None:
    app = build(CORP_RULES)
    # A list-valued fact matches no `facts:` matcher (they compare strings, numbers, booleans),
    # so the first rule never applies; CEL's `in` reads lists, and the second rule decides.
    granted(app, mint.corp(), "corp-export-by-role", audience=REPORTS)
    # Nested path absent (no resource_access): the fact is absent and the condition fails.
    refused(app, mint.corp(resource_access=None), "policy.no_rule_for_identity", audience=REPORTS)
    refused(
        app,
        mint.corp(resource_access={"reports-api": {"roles": ["view"]}}),
        "policy.no_rule_for_identity",
        audience=REPORTS,
    )
    refused(app, mint.corp(azp="portal"), "policy.no_rule_for_identity", audience=REPORTS)
    # Only the configured mappings become facts: an unmapped claim is no fact.
    unmapped = [
        {
            "name": "by-unmapped-claim",
            "issuer": "corp-oidc",
            "facts": {"preferred_username": "service-account-reports-batch"},
            "require_client_authentication": False,
            "grant": grant([REPORTS], ["reports:export"]),
        }
    ]
    refused(build(unmapped), mint.corp(), "policy.no_rule_for_identity", audience=REPORTS)


def test_generic_profile_facts() -> None:
    claims = corp_claims(1_700_000_000)
    options = ProfileOptions(
        claim_mappings={**CORP_MAPPINGS, "missing": "resource_access/billing/roles", "x": "acr/y"}
    )
    facts = PROFILES["generic"].facts(REPORTS_SA, claims, options)
    assert facts == {
        "subject": REPORTS_SA,
        "client": "reports-batch",
        "realm_roles": ["default-roles-corp", "offline_access", "batch-jobs"],
        "reports_roles": ["export"],
    }
    # Without mappings, the only fact is the subject.
    assert PROFILES["generic"].facts(REPORTS_SA, claims, ProfileOptions()) == {"subject": REPORTS_SA}


# -- our own tokens, and tokens that pretend to be ------------------------------------------------------


def test_own_token_is_verified_as_issuer_self(build: Callable[..., Flask], mint: Mint) -> None:
    rules = [
        GITHUB_RULES[0],
        {
            "name": "narrow-own-token",
            "issuer": "self",
            "subject": "repo:acme/app:ref:refs/heads/main",
            "require_client_authentication": False,
            "grant": grant([DEPLOY], ["deploy:read", "deploy:write"]),
        },
    ]
    app = build(rules)
    github = mint.github()
    first_body, first = granted(app, github, "gh-deploy", audience=DEPLOY, scope="deploy:read deploy:write")
    own = first_body["access_token"]
    _, second = granted(
        app,
        own,
        "narrow-own-token",
        subject_token_type=ACCESS_TOKEN_TYPE,
        audience=DEPLOY,
        scope="deploy:read",
    )
    record = last_record(app)
    assert record["issuer"] == "self" and record["subject_token_type"] == ACCESS_TOKEN_TYPE
    assert second["iss"] == STS_ISSUER and second["sub"] == first["sub"]
    assert second["scope"] == "deploy:read"
    assert second["auth_time"] == payload(github)["iat"], (
        "the workload attested when the GitHub token was issued"
    )
    # An upstream issuer never accepts access_token as a subject token type.
    refused(app, github, "subject_token.token_type_not_accepted", subject_token_type=ACCESS_TOKEN_TYPE)


def test_upstream_token_typed_as_an_access_token_is_refused(github_app: Flask, mint: Mint) -> None:
    token = mint.remint("github-actions", mint.github(), header={"typ": "at+jwt"})
    refused(github_app, token, "subject_token.typ_not_accepted", audience=DEPLOY)


def test_upstream_token_claiming_our_issuer_is_refused(github_app: Flask, mint: Mint) -> None:
    # Routed to "self" by its iss: its typ is not ours...
    as_jwt = mint.remint("github-actions", mint.github(), header={"typ": "JWT"}, iss=STS_ISSUER)
    refused(github_app, as_jwt, "subject_token.typ_not_accepted", audience=DEPLOY)
    # ...and with ours, its key is not one of ours.
    as_ours = mint.remint("github-actions", mint.github(), header={"typ": "at+jwt"}, iss=STS_ISSUER)
    refused(github_app, as_ours, "subject_token.unknown_kid", audience=DEPLOY)


def test_an_issuer_entry_cannot_claim_our_issuer(
    make_settings: Callable[..., Settings], upstreams: dict[str, RunningServer]
) -> None:
    with pytest.raises(ConfigurationError, match="must not be this service's own issuer"):
        make_settings(issuers=issuer_entries(upstreams, {"corp-oidc": {"issuer": STS_ISSUER + "/"}}))


# -- the example policies, end to end ----------------------------------------------------------------------


def _basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


EXAMPLE_CLIENTS = [
    *DEFAULT_CLIENTS,
    {
        "client_id": "payments-gateway",
        "auth_method": "client_secret_basic",
        "secret_hash": hash_secret(PAYMENTS_SECRET),
    },
]
EXAMPLE_ISSUER_NAMES = ("github-actions", "gitlab", "kubernetes", "spiffe", "corp-oidc")


@pytest.fixture
def examples_app(
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    upstreams: dict[str, RunningServer],
    clock: Clock,
) -> Flask:
    """Every example policy file at once, with the issuers they name, each with its profile."""
    policies = tmp_path / "example-policies"
    policies.mkdir()
    for path in EXAMPLES_DIR.glob("*.yaml"):
        shutil.copy(path, policies / path.name)
    entries = [e for e in issuer_entries(upstreams) if e["name"] in EXAMPLE_ISSUER_NAMES]
    settings = make_settings(issuers=entries, clients=EXAMPLE_CLIENTS, policies_dir=str(policies))
    return create_app(settings, clock=clock)


@dataclass(frozen=True)
class Granted:
    rule: str
    audience: str
    scope: str
    lifetime: int


@dataclass(frozen=True)
class Refused:
    error: str
    reason: str


PRODUCTION_WORKFLOW = "acme/workflows/.github/workflows/deploy.yml@refs/heads/main"
GITLAB_PRODUCTION: dict[str, Any] = {"environment": "production", "environment_protected": "true"}
FORK: dict[str, Any] = {"project_path": "mallory/app", "project_id": "9999", "namespace_id": "555"}
PAYMENTS_GATEWAY = ("payments-gateway", PAYMENTS_SECRET)

# Each case: id, the example file it exercises, how to mint the token, form fields, client
# credentials, and what must happen.
EXAMPLE_CASES: list[tuple[str, str, Callable[[Mint], str], dict[str, str], tuple[str, str] | None, Any]] = [
    # gitlab-deploy.yaml
    (
        "gitlab-production-deploy",
        "gitlab-deploy",
        lambda m: m.gitlab(**GITLAB_PRODUCTION),
        {"scope": "deploy:write"},
        None,
        Granted("gitlab-deploy-production", DEPLOY, "deploy:write", 600),
    ),
    (
        "gitlab-production-deploy-by-web-pipeline",
        "gitlab-deploy",
        lambda m: m.gitlab(pipeline_source="web", **GITLAB_PRODUCTION),
        {},
        None,
        Granted("gitlab-deploy-production", DEPLOY, "deploy:read", 600),
    ),
    (
        "gitlab-fork-merge-request-with-everything-else-right",
        "gitlab-deploy",
        lambda m: m.gitlab(pipeline_source="merge_request_event", **FORK, **GITLAB_PRODUCTION),
        {"scope": "deploy:write"},
        None,
        Refused("invalid_request", "policy.no_rule_for_identity"),
    ),
    (
        "gitlab-fork-gets-not-even-read",
        "gitlab-deploy",
        lambda m: m.gitlab(**FORK),
        {},
        None,
        Refused("invalid_request", "policy.no_rule_for_identity"),
    ),
    (
        "gitlab-merge-request-in-parent-project-reads-only",
        "gitlab-deploy",
        lambda m: m.gitlab(pipeline_source="merge_request_event", **GITLAB_PRODUCTION),
        {"scope": "deploy:write"},
        None,
        Refused("invalid_scope", "policy.scope_not_allowed"),
    ),
    (
        "gitlab-merge-request-in-parent-project-read",
        "gitlab-deploy",
        lambda m: m.gitlab(pipeline_source="merge_request_event", **GITLAB_PRODUCTION),
        {},
        None,
        Granted("gitlab-ci-read", DEPLOY, "deploy:read", 300),
    ),
    (
        "gitlab-unprotected-environment",
        "gitlab-deploy",
        lambda m: m.gitlab(environment="production"),
        {"scope": "deploy:write"},
        None,
        Refused("invalid_scope", "policy.scope_not_allowed"),
    ),
    (
        "gitlab-unprotected-branch",
        "gitlab-deploy",
        lambda m: m.gitlab(ref="main", ref_protected=False, **GITLAB_PRODUCTION),
        {"scope": "deploy:write"},
        None,
        Refused("invalid_scope", "policy.scope_not_allowed"),
    ),
    (
        "gitlab-pipeline-source-not-allowed",
        "gitlab-deploy",
        lambda m: m.gitlab(pipeline_source="trigger", **GITLAB_PRODUCTION),
        {"scope": "deploy:write"},
        None,
        Refused("invalid_scope", "policy.scope_not_allowed"),
    ),
    (
        "gitlab-integer-project-id",
        "gitlab-deploy",
        lambda m: m.gitlab(project_id=4242, **GITLAB_PRODUCTION),
        {},
        None,
        Refused("invalid_request", "subject_token.gitlab-ci.malformed_project_id"),
    ),
    # spiffe-service.yaml
    (
        "spiffe-billing-writes-ledger",
        "spiffe-service",
        lambda m: m.svid(),
        {"resource": LEDGER, "scope": "ledger:write"},
        None,
        Granted("spiffe-billing-ledger", LEDGER, "ledger:write", 300),
    ),
    (
        "spiffe-billing-pushes-metrics",
        "spiffe-service",
        lambda m: m.svid(),
        {"audience": "metrics"},
        None,
        Granted("spiffe-metrics-push", "metrics", "metrics:write", 120),
    ),
    (
        "spiffe-sibling-workload-no-ledger",
        "spiffe-service",
        lambda m: m.svid("spiffe://example.org/ns/billing/sa/worker-2"),
        {"resource": LEDGER},
        None,
        Refused("invalid_target", "policy.target_not_allowed"),
    ),
    (
        "spiffe-longer-path-matches-nothing",
        "spiffe-service",
        lambda m: m.svid(BILLING_ID + "/extra"),
        {"audience": "metrics"},
        None,
        Refused("invalid_request", "policy.no_rule_for_identity"),
    ),
    (
        "spiffe-kube-system-no-metrics",
        "spiffe-service",
        lambda m: m.svid("spiffe://example.org/ns/kube-system/sa/coredns"),
        {"audience": "metrics"},
        None,
        Refused("invalid_request", "policy.no_rule_for_identity"),
    ),
    (
        "spiffe-other-trust-domain",
        "spiffe-service",
        lambda m: m.svid("spiffe://partner.example/ns/billing/sa/worker"),
        {"resource": LEDGER},
        None,
        Refused("invalid_request", "subject_token.missing_iss"),
    ),
    (
        "spiffe-access-token-typed",
        "spiffe-service",
        lambda m: m.remint("spiffe", m.svid(), header={"typ": "at+jwt"}),
        {"resource": LEDGER},
        None,
        Refused("invalid_request", "subject_token.typ_not_accepted"),
    ),
    # generic-oidc.yaml
    (
        "corp-reports-export",
        "generic-oidc",
        lambda m: m.corp(),
        {"audience": REPORTS, "scope": "reports:export"},
        None,
        Granted("corp-reports-export", REPORTS, "reports:export", 300),
    ),
    (
        "corp-batch-queue",
        "generic-oidc",
        lambda m: m.corp(sub=str(uuid.UUID(int=7)), azp="billing-batch"),
        {},
        None,
        Granted("corp-batch-queue", JOBS, "jobs:read", 120),
    ),
    (
        "corp-export-without-the-role",
        "generic-oidc",
        lambda m: m.corp(resource_access={"reports-api": {"roles": ["view"]}}),
        {"audience": REPORTS},
        None,
        Refused("invalid_target", "policy.target_not_allowed"),
    ),
    (
        "corp-another-client-renamed-reports-batch",
        "generic-oidc",
        lambda m: m.corp(sub=str(uuid.UUID(int=8)), realm_access={"roles": ["offline_access"]}),
        {"audience": REPORTS},
        None,
        Refused("invalid_request", "policy.no_rule_for_identity"),
    ),
    (
        "corp-human-user-no-queue",
        "generic-oidc",
        lambda m: m.corp(sub=str(uuid.UUID(int=9)), azp="portal", preferred_username="alice"),
        {"audience": JOBS},
        None,
        Refused("invalid_request", "policy.no_rule_for_identity"),
    ),
    # github-deploy.yaml and kubernetes-service.yaml, now with their profiles on
    (
        "github-production-deploy-with-profile",
        "github-deploy",
        lambda m: m.github(environment="production", job_workflow_ref=PRODUCTION_WORKFLOW),
        {"scope": "deploy:write"},
        None,
        Granted("github-deploy-production", DEPLOY, "deploy:write", 600),
    ),
    (
        "github-sub-names-another-repository",
        "github-deploy",
        lambda m: m.github(sub="repo:acme/app:environment:production", repository="acme/tools"),
        {"scope": "deploy:write"},
        None,
        Refused("invalid_request", "subject_token.github-actions.sub_repository_mismatch"),
    ),
    (
        "kubernetes-payments-api-with-profile",
        "kubernetes-service",
        lambda m: m.kubernetes(),
        {"scope": "ledger:write"},
        PAYMENTS_GATEWAY,
        Granted("payments-api-ledger", LEDGER, "ledger:write", 300),
    ),
    (
        "kubernetes-extended-expiry-too-old",
        "kubernetes-service",
        lambda m: m.kubernetes(now=m.now - 7200, lifetime=YEAR),
        {},
        PAYMENTS_GATEWAY,
        Refused("invalid_request", "subject_token.too_old"),
    ),
]


@pytest.mark.parametrize(
    ("mint_token", "form", "credentials", "expected"),
    [pytest.param(*case[2:], id=case[0]) for case in EXAMPLE_CASES],
)
def test_example_policies_end_to_end(
    examples_app: Flask,
    mint: Mint,
    mint_token: Callable[[Mint], str],
    form: dict[str, str],
    credentials: tuple[str, str] | None,
    expected: Granted | Refused,
) -> None:
    token = mint_token(mint)
    response = post(examples_app, token, headers=_basic(*credentials) if credentials else None, **form)
    body = response.get_json()
    record = last_record(examples_app)
    if isinstance(expected, Refused):
        assert response.status_code in (400, 401), body
        assert body["error"] == expected.error
        assert "access_token" not in body
        assert expected.reason in record["reasons"], record["reasons"]
        return
    assert response.status_code == 200, (body, record["reasons"])
    assert record["rule"] == expected.rule
    claims = payload(body["access_token"])
    assert claims["aud"] == expected.audience
    assert claims.get("scope") == expected.scope
    # The rule's max_lifetime, unless the subject token has less left.
    lifetime = min(expected.lifetime, int(payload(token)["exp"] - mint.now))
    assert body["expires_in"] == claims["exp"] - claims["iat"] == lifetime


def test_every_example_policy_is_exercised() -> None:
    """Every rule of every example file is granted by a case above, and every file refuses one.

    ``quickstart.yaml``, ``github-deploy.yaml`` and ``kubernetes-service.yaml`` are also run by
    ``tests/test_policy.py`` (without profiles); nothing in ``policies/examples`` may go untested.
    """
    files = sorted(EXAMPLES_DIR.glob("*.yaml"))
    assert {p.stem for p in files} >= {"gitlab-deploy", "spiffe-service", "generic-oidc"}
    compiled = load_policies(
        files,
        issuers=frozenset(EXAMPLE_ISSUER_NAMES),
        clients=frozenset({"payments-gateway"}),
        max_lifetime=3600,
    )
    assert all(rule.description for rule in compiled.rules), "every example rule says what it is for"
    granted_rules = {case[5].rule for case in EXAMPLE_CASES if isinstance(case[5], Granted)}
    refusing_files = {case[1] for case in EXAMPLE_CASES if isinstance(case[5], Refused)}
    for path in files:
        rules = {rule.name for rule in compiled.rules if path.name in rule.source}
        assert rules, path
        if path.stem in {"github-deploy", "kubernetes-service"}:
            assert rules & granted_rules, f"{path.name}: no case runs it with its profile"
        else:
            assert rules <= granted_rules, (
                f"{path.name}: rules never granted: {sorted(rules - granted_rules)}"
            )
        assert path.stem in refusing_files, f"{path.name}: no refusal case"


def test_sts_policy_check_passes_on_the_examples(tmp_path: Path, upstreams: dict[str, RunningServer]) -> None:
    config = {
        "issuer": STS_ISSUER,
        "database_url": f"sqlite:///{tmp_path / 'sts.sqlite'}",
        "keys_dir": str(tmp_path / "keys"),
        "policies_dir": str(EXAMPLES_DIR),
        "issuers": [e for e in issuer_entries(upstreams) if e["name"] in EXAMPLE_ISSUER_NAMES],
        "clients": [c for c in EXAMPLE_CLIENTS if c["client_id"] == "payments-gateway"],
    }
    config_path = tmp_path / "sts.yaml"
    config_path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["--config", str(config_path), "policy", "check"])
    assert result.exit_code == 0, result.output
    for name in (
        "gitlab-deploy-production",
        "gitlab-ci-read",
        "spiffe-billing-ledger",
        "corp-reports-export",
    ):
        assert name in result.output
    assert "no problems" in result.output
    checked = CliRunner().invoke(main, ["--config", str(config_path), "config", "check"])
    assert checked.exit_code == 0, checked.output

    # Without the issuers they name, they are refused, naming file, rule and issuer.
    config["issuers"] = [e for e in config["issuers"] if e["name"] != "gitlab"]
    config_path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["--config", str(config_path), "policy", "check"])
    assert result.exit_code != 0
    assert "gitlab-deploy.yaml" in result.output and "unknown issuer 'gitlab'" in result.output
