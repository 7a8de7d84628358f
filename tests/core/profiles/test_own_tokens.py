"""Our own tokens (issuer ``self``) exchanged again, and upstream tokens that pretend to be ours."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask

from sts.dev.issuer import RunningServer
from sts.errors import ConfigurationError
from sts.settings import Settings
from tests.conftest import ACCESS_TOKEN_TYPE, STS_ISSUER
from tests.core.profiles.conftest import (
    DEPLOY,
    GITHUB_RULES,
    Mint,
    grant,
    granted,
    issuer_entries,
    last_record,
    payload,
    refused,
)


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
