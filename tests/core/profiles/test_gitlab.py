"""The ``gitlab-ci`` profile (``sts/core/profiles/gitlab.py``): GitLab CI ``id_tokens`` end to end,
and the facts it gives the policy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from sts.core.profiles import PROFILES, ProfileOptions, ProfileViolation
from sts.dev.issuer import DevIssuer
from tests.conftest import STS_ISSUER
from tests.core.profiles.conftest import (
    DEPLOY,
    GITLAB_ISS,
    PREVIEW,
    Mint,
    grant,
    granted,
    payload,
    refused,
)

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
    # Nor a number or a JSON boolean (1 and 1.0 read as true before: 1 == True; an outside audit).
    for value in (1, 1.0, True):
        odd = mint.remint("gitlab", mint.gitlab(), header={"typ": "JWT"}, ref_protected=value)
        refused(gitlab_app, odd, "subject_token.gitlab-ci.malformed_ref_protected", audience=DEPLOY)
        odd = mint.remint("gitlab", mint.gitlab(), header={"typ": "JWT"}, environment_protected=value)
        refused(gitlab_app, odd, "subject_token.gitlab-ci.malformed_environment_protected", audience=DEPLOY)


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
    for source in (["merge_request_event"], {"source": "merge_request_event"}, 1, ""):
        # ``is_merge_request`` is decided on it: not read as "not a merge request" (an outside audit).
        with pytest.raises(ProfileViolation) as caught:
            odd = {**claims, "pipeline_source": source}
            PROFILES["gitlab-ci"].facts(odd["sub"], odd, ProfileOptions())
        assert caught.value.reason == "gitlab-ci.malformed_pipeline_source"
    facts = PROFILES["gitlab-ci"].facts(claims["sub"], claims, ProfileOptions())
    assert facts["ref_protected"] is False, "an absent ref_protected is not protected"
    assert facts["environment_protected"] is True
