"""GitLab CI ``id_tokens``.

``sub`` is ``project_path:GROUP/PROJECT:ref_type:branch:ref:main``; ids are
strings (``runner_id``, the one GitLab sends as a number, is made a string
too).  ``ref_protected`` (``"true"``/``"false"``) becomes a boolean fact.

Caveat for policy authors: in a merge request pipeline from a fork, the
project claims name the *fork* (``project_path``, ``project_id``,
``namespace_id``), so match on ``project_id`` of the canonical project and,
for anything sensitive, require ``ref_protected: true`` and a
``pipeline_source`` other than ``merge_request_event``.  See
``policies/examples/gitlab-deploy.yaml``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import ProfileOptions, refuse, string_claim

NAME = "gitlab-ci"
_OPTIONAL = (
    "namespace_path", "ref", "ref_type", "environment", "environment_protected", "deployment_tier",
    "pipeline_source", "pipeline_id", "runner_environment", "runner_id", "user_login", "user_id",
    "user_email", "job_id", "sha", "ci_config_ref_uri", "ci_config_sha", "project_visibility",
)  # fmt: skip


def _boolean(value: Any, name: str) -> bool | None:
    """``"true"``/``"false"``, as GitLab sends them; anything else is refused (compared by type:
    ``1 in ("true", True)`` held, so ``1`` and ``1.0`` read as true; an outside audit)."""
    if value is None:
        return None
    if value == "true" and type(value) is str:
        return True
    if value == "false" and type(value) is str:
        return False
    raise refuse(NAME, f"malformed_{name}")


class GitLabCIProfile:
    name = NAME

    def check_options(self, issuer_name: str, options: ProfileOptions) -> None:
        return None

    def facts(self, subject: str, claims: Mapping[str, Any], options: ProfileOptions) -> dict[str, Any]:
        project_path = string_claim(claims, "project_path", NAME)
        facts: dict[str, Any] = {"project_path": project_path}
        for name in ("project_id", "namespace_id"):
            value = claims.get(name)
            # GitLab sends ids as strings; refuse anything else rather than guess.
            if not isinstance(value, str) or not (value.isascii() and value.isdigit()):
                raise refuse(NAME, f"malformed_{name}")
            facts[name] = value
        if not subject.startswith(f"project_path:{project_path}:"):
            raise refuse(NAME, "sub_project_mismatch")
        for name in _OPTIONAL:
            value = claims.get(name)
            if isinstance(value, str):
                facts[name] = value
        for name in ("environment_protected", "pipeline_source"):
            # Not a string: refused, not left out quietly (``is_merge_request`` is decided on
            # ``pipeline_source``: a list would read as "not a merge request").
            if claims.get(name) is not None and name not in facts:
                raise refuse(NAME, f"malformed_{name}")
        if facts.get("pipeline_source") == "":
            # Empty is no source GitLab sends: refused as GitHub's empty ``event_name`` is.
            raise refuse(NAME, "malformed_pipeline_source")
        # The one id GitLab sends as a JSON integer; normalised to a string like every other id.
        runner_id = claims.get("runner_id")
        if isinstance(runner_id, int) and not isinstance(runner_id, bool):
            facts["runner_id"] = str(runner_id)
        facts["ref_protected"] = _boolean(claims.get("ref_protected"), "ref_protected") or False
        if "environment_protected" in facts:
            facts["environment_protected"] = _boolean(facts["environment_protected"], "environment_protected")
        facts["is_merge_request"] = facts.get("pipeline_source") == "merge_request_event"
        return facts
