"""The profile interface and registry."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ...errors import ConfigurationError


@dataclass(frozen=True)
class ProfileOptions:
    """Per-issuer profile settings (``issuers[].profile_options`` in the configuration)."""

    claim_mappings: Mapping[str, str] = field(default_factory=dict)
    trust_domain: str | None = None


class Profile(Protocol):
    name: str

    def check_options(self, issuer_name: str, options: ProfileOptions) -> None:
        """Raise ConfigurationError when the issuer's settings do not fit this profile."""
        ...

    def facts(self, subject: str, claims: Mapping[str, Any], options: ProfileOptions) -> dict[str, Any]:
        """Normalised facts of a verified token, or raise ``invalid_request`` naming the broken rule."""
        ...


PROFILES: dict[str, Profile] = {}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigurationError(
            f"unknown attestation profile {name!r}; known: {', '.join(sorted(PROFILES))}"
        ) from None


class ProfileViolation(Exception):
    """A verified token breaks its profile's rules; attestation turns it into ``invalid_request``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def refuse(profile: str, reason: str, detail: str = "") -> ProfileViolation:
    return ProfileViolation(f"{profile}.{reason}", detail)


def string_claim(claims: Mapping[str, Any], name: str, profile: str, *, required: bool = True) -> str | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise refuse(profile, f"missing_{name}")
        return None
    if not isinstance(value, str) or not value:
        raise refuse(profile, f"malformed_{name}")
    return value
