"""Generic OIDC issuer: facts are the claims, optionally renamed by ``claim_mappings``.

``claim_mappings`` maps a fact name to a claim path with dots for nesting
(``namespace: kubernetes.io.namespace`` would be ambiguous, so nested names
are written with ``/``: ``namespace: kubernetes.io/namespace``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import ProfileOptions


def _lookup(claims: Mapping[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("/"):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


class GenericProfile:
    name = "generic"

    def check_options(self, issuer_name: str, options: ProfileOptions) -> None:
        return None

    def facts(self, subject: str, claims: Mapping[str, Any], options: ProfileOptions) -> dict[str, Any]:
        facts: dict[str, Any] = {"subject": subject}
        for fact, path in options.claim_mappings.items():
            value = _lookup(claims, path)
            if value is not None:
                facts[fact] = value
        return facts
