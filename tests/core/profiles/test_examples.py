"""The example policies that need profiles (``policies/examples``) end to end, and
``sts policy check`` on them with a matching configuration."""

from __future__ import annotations

import base64
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from flask import Flask

from sts.adapters.policy_files import load_policies
from sts.app import create_app
from sts.cli import main
from sts.core.client_secrets import hash_secret
from sts.dev.issuer import RunningServer
from sts.settings import Settings
from tests.conftest import DEFAULT_CLIENTS, STS_ISSUER
from tests.core.profiles.conftest import (
    BILLING_ID,
    DEPLOY,
    LEDGER,
    REPORTS,
    YEAR,
    Mint,
    issuer_entries,
    last_record,
    payload,
    post,
)
from tests.support.clock import Clock

REPO_ROOT = Path(__file__).resolve().parents[3]
EXAMPLES_DIR = REPO_ROOT / "policies" / "examples"
JOBS = "https://jobs.example.com"
PAYMENTS_SECRET = "payments-gateway-secret-0123456789abcdef"


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
    (
        "gitlab-fullwidth-project-id",
        "gitlab-deploy",
        lambda m: m.gitlab(project_id="\uff14\uff12\uff14\uff12", **GITLAB_PRODUCTION),
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
    ``tests/core/test_policy.py`` (without profiles); nothing in ``policies/examples`` may go untested.
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
