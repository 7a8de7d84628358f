"""GitHub Actions OIDC tokens.

``sub`` comes in two forms (STANDARDS.md, "Real workload tokens")::

    repo:OWNER/REPO:ref:refs/heads/main              (names: renameable, re-registrable)
    repo:OWNER@OWNER_ID/REPO@REPO_ID:environment:prod  (immutable form, newer repositories)

followed by a context (``ref:...``, ``environment:...``, ``pull_request``,
or an organisation's custom template).  The profile checks that the
repository named in ``sub`` is the one in the ``repository`` claim and, in
the immutable form, that the ids agree with ``repository_id`` and
``repository_owner_id``, so a policy can safely match on ids.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .base import ProfileOptions, refuse, string_claim

NAME = "github-actions"
_SUB = re.compile(
    r"repo:(?P<owner>[^/@:]+)(?:@(?P<owner_id>\d+))?/(?P<repo>[^/@:]+)(?:@(?P<repo_id>\d+))?:(?P<context>.+)"
)
_OPTIONAL = (
    "ref", "ref_type", "environment", "runner_environment", "job_workflow_ref", "job_workflow_sha",
    "workflow_ref", "workflow_sha", "event_name", "sha", "run_id", "run_number", "run_attempt", "actor",
    "actor_id", "repository_visibility", "base_ref", "head_ref",
)  # fmt: skip
PULL_REQUEST_EVENTS = frozenset({"pull_request", "pull_request_target"})


def _digits(value: str) -> bool:
    """ASCII decimal digits only (``str.isdigit`` also takes fullwidth, superscript, Arabic-Indic)."""
    return value.isascii() and value.isdigit()


class GitHubActionsProfile:
    name = NAME

    def check_options(self, issuer_name: str, options: ProfileOptions) -> None:
        return None

    def facts(self, subject: str, claims: Mapping[str, Any], options: ProfileOptions) -> dict[str, Any]:
        repository = string_claim(claims, "repository", NAME)
        repository_id = string_claim(claims, "repository_id", NAME)
        owner = string_claim(claims, "repository_owner", NAME)
        owner_id = string_claim(claims, "repository_owner_id", NAME)
        assert repository and repository_id and owner and owner_id
        if not _digits(repository_id) or not _digits(owner_id):
            raise refuse(NAME, "malformed_ids")
        match = _SUB.fullmatch(subject)
        if match is None:
            raise refuse(NAME, "malformed_sub")
        if f"{match['owner']}/{match['repo']}".lower() != repository.lower():
            raise refuse(NAME, "sub_repository_mismatch")
        if owner.lower() != match["owner"].lower():
            raise refuse(NAME, "sub_owner_mismatch")
        immutable = match["owner_id"] is not None or match["repo_id"] is not None
        if immutable and (match["owner_id"] != owner_id or match["repo_id"] != repository_id):
            raise refuse(NAME, "sub_id_mismatch")
        facts: dict[str, Any] = {
            "repository": repository,
            "repository_id": repository_id,
            "owner": owner,
            "owner_id": owner_id,
            "sub_context": match["context"],
            "immutable_sub": immutable,
        }
        for name in _OPTIONAL:
            value = claims.get(name)
            if isinstance(value, str):
                facts[name] = value
        # ``is_pull_request`` is decided on it: one that is not a string (a list, an object) is
        # refused, not read as "not a pull request" (an outside audit; GitHub sends a string).
        string_claim(claims, "event_name", NAME, required=False)
        facts["is_pull_request"] = (
            facts.get("event_name") in PULL_REQUEST_EVENTS or match["context"] == "pull_request"
        )
        return facts
