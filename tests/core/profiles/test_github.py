"""The ``github-actions`` profile (``sts/core/profiles/github.py``): GitHub Actions OIDC tokens
end to end, and the facts it gives the policy."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask

from sts.core.profiles import PROFILES, ProfileOptions, ProfileViolation
from sts.dev.issuer import DevIssuer
from tests.conftest import STS_ISSUER
from tests.core.profiles.conftest import (
    DEPLOY,
    GITHUB_ISS,
    PREVIEW,
    Mint,
    granted,
    last_record,
    payload,
    refused,
)


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
    # Digits of other scripts are digits to str.isdigit, not decimal ids (fullwidth, superscript,
    # Arabic-Indic).
    for other in ("\uff11\uff12\uff13", "\u00b2", "\u0661\u0662\u0663"):
        refused(
            github_app,
            mint.github(repository_id=other),
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


@pytest.mark.parametrize("event_name", [["pull_request_target"], {"name": "pull_request"}, 1, True, ""])
def test_github_an_event_name_that_is_not_a_string_is_refused(event_name: object) -> None:
    """``is_pull_request`` is decided on ``event_name``: a list or an object read as "not a pull
    request", which a rule on ``is_pull_request: false`` then granted (an outside audit)."""
    issuer = DevIssuer.ephemeral(GITHUB_ISS, "ES256")
    claims = _github_claims(issuer)
    claims["event_name"] = event_name
    with pytest.raises(ProfileViolation) as caught:
        PROFILES["github-actions"].facts(claims["sub"], claims, ProfileOptions())
    assert caught.value.reason == "github-actions.malformed_event_name"
