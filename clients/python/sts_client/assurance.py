"""The STS's assurance levels (``acr``, RFC 9470) as the client libraries see them.

Lowest first; the STS advertises them as ``acr_values_supported`` and writes
the level a token reached in its ``acr`` claim:

=================================  ==================================================================
``urn:workload-sts:acr:attested``  the workload's platform credential was verified (bearer)
``urn:workload-sts:acr:pop``       and the token is bound to a key (DPoP or client certificate) that
                                   continues the identity's key
``urn:workload-sts:acr:posture``   and verified posture evidence (a posture token, a live TokenReview)
=================================  ==================================================================

A resource server names the levels a route accepts (``acr_values``) and how
old the attestation may be (``max_age``); a workload answers by renewing
with what reaches one of them (:class:`~sts_client.workload.StsAuth`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "ACR_ATTESTED",
    "ACR_POP",
    "ACR_POSTURE",
    "LEVELS",
    "StepUpRequest",
    "at_least",
    "parse_acr_values",
    "rank",
    "satisfies",
]

ACR_ATTESTED: Final = "urn:workload-sts:acr:attested"
ACR_POP: Final = "urn:workload-sts:acr:pop"
ACR_POSTURE: Final = "urn:workload-sts:acr:posture"
LEVELS: Final = (ACR_ATTESTED, ACR_POP, ACR_POSTURE)


def rank(level: str | None) -> int:
    """The level's position, lowest 0; -1 for None or an unknown value."""
    return LEVELS.index(level) if level in LEVELS else -1


def at_least(level: str) -> tuple[str, ...]:
    """The levels that satisfy ``level``, lowest first."""
    return LEVELS[max(rank(level), 0) :]


def parse_acr_values(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """``acr_values`` as a tuple: a space-separated string (RFC 9470 §3) or already a list."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v for v in value.split(" ") if v)
    return tuple(value)


def satisfies(acr: Any, acceptable: Iterable[str]) -> bool:
    """Whether a token's ``acr`` meets any of ``acceptable``: equal to one, or above a known one."""
    values = tuple(acceptable)
    if not values:
        return True
    if not isinstance(acr, str):
        return False
    if acr in values:
        return True
    known = [rank(v) for v in values if v in LEVELS]
    return acr in LEVELS and bool(known) and rank(acr) >= min(known)


@dataclass(frozen=True)
class StepUpRequest:
    """What a step-up asked for, and who asked (for messages): RFC 9470 ``acr_values`` and ``max_age``."""

    acr_values: tuple[str, ...] = ()
    max_age: int | None = None
    asked_by: str = "the STS"

    def describe(self) -> str:
        parts = []
        if self.acr_values:
            parts.append(f"acr_values={' '.join(self.acr_values)}")
        if self.max_age is not None:
            parts.append(f"max_age={self.max_age}")
        return ", ".join(parts) or "fresh attestation"
