"""Generic OpenID Connect issuers (``sts/core/profiles/generic.py``): claim mappings feed policy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask

from sts.core.profiles import PROFILES, ProfileOptions
from tests.core.profiles.conftest import (
    CORP_MAPPINGS,
    REPORTS,
    REPORTS_SA,
    Mint,
    corp_claims,
    grant,
    granted,
    refused,
)

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
