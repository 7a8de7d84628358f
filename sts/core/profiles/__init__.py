"""Attestation profiles: turn a verified token into normalised facts, per kind of issuer.

Each profile knows the traps of one real token format (see STANDARDS.md,
"Real workload tokens") and refuses tokens that break its rules, but none of
them grants anything: the facts go to the policy.  Profiles are registered
by name; an issuer's ``profile`` setting picks one (``generic`` by default).
Cf. SPIRE's node attestors, which emit selectors and decide nothing.
"""

from __future__ import annotations

from .base import PROFILES, Profile, ProfileOptions, ProfileViolation, get_profile
from .generic import GenericProfile
from .github import GitHubActionsProfile
from .gitlab import GitLabCIProfile
from .kubernetes import KubernetesProfile
from .spiffe import SpiffeProfile

for _profile in (
    GenericProfile(),
    GitHubActionsProfile(),
    GitLabCIProfile(),
    KubernetesProfile(),
    SpiffeProfile(),
):
    PROFILES[_profile.name] = _profile

__all__ = ["PROFILES", "Profile", "ProfileOptions", "ProfileViolation", "get_profile"]
