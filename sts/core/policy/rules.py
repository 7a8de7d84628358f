"""The compiled policy's values: rules, what is asked of them and what they grant.

All frozen: built once by :mod:`.compile`, read by :mod:`.evaluate`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..assurance import Requirement
from ..attest import VerifiedToken
from ..rate_limit import Limit
from ..risk import RiskSettings
from .matching import ClaimMatcher, IdentityMatcher, Pattern

DEFAULT_MAX_LIFETIME = 300
#: The hard ceiling on delegation chains, whatever a rule says (RFC 8693 §4.1 nested ``act``).
MAX_DELEGATION_DEPTH = 5


@dataclass(frozen=True)
class Rule:
    name: str
    source: str
    issuer: str
    subject: str | None = None
    subject_pattern: Pattern | None = None
    claims: tuple[ClaimMatcher, ...] = ()
    facts: tuple[ClaimMatcher, ...] = ()
    condition: Any = None  # a compiled cel.Program
    condition_source: str | None = None
    require_client_authentication: bool = True
    clients: frozenset[str] = frozenset()
    audiences: frozenset[str] = frozenset()
    resources: frozenset[str] = frozenset()
    scopes: tuple[str, ...] = ()
    default_scopes: tuple[str, ...] = ()
    max_lifetime: int = DEFAULT_MAX_LIFETIME
    description: str = ""
    actors: tuple[IdentityMatcher, ...] = ()
    max_delegation_depth: int = 1
    require_actor: bool = False
    single_use: bool = False
    max_attestation_age: int | None = None
    risk: RiskSettings | None = None
    require_dpop: bool = False
    actor_may_bind_key: bool = False
    assurance: tuple[Requirement, ...] = ()
    #: This rule's own limit, per identity (``rate_limit``), applied once the rule is chosen.
    rate_limit: Limit | None = None

    @functools.cached_property
    def identity(self) -> IdentityMatcher:
        # Built once per rule (not per rule per request: that was two thirds of a 10,000-rule
        # evaluation).  cached_property writes the instance dict directly, so it works on a
        # frozen dataclass.
        return IdentityMatcher(self.issuer, self.subject, self.subject_pattern, self.claims, self.facts)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(sorted(self.audiences)) + tuple(sorted(self.resources))

    def grant(self, audiences: tuple[str, ...], scopes: tuple[str, ...], narrowed: bool) -> Grant:
        """What this rule grants for ``audiences`` and ``scopes`` (``narrowed``: fewer scopes than
        asked).  A grant is a frozen value, so the same one is given for the same request (the
        most recent ones are remembered: a workload asks for the same again and again)."""
        return self._grants(audiences, scopes, narrowed)

    def _build_grant(self, audiences: tuple[str, ...], scopes: tuple[str, ...], narrowed: bool) -> Grant:
        reasons = ("policy.rule_matched",) + (("policy.scope_narrowed",) if narrowed else ())
        return Grant(
            self.name,
            audiences,
            scopes,
            self.max_lifetime,
            narrowed,
            reasons,
            single_use=self.single_use,
            max_attestation_age=self.max_attestation_age,
            risk=self.risk,
            require_dpop=self.require_dpop,
            actor_may_bind_key=self.actor_may_bind_key,
            assurance=self.assurance,
            rate_limit=self.rate_limit,
        )

    @functools.cached_property
    def _grants(self) -> Callable[[tuple[str, ...], tuple[str, ...], bool], Grant]:
        return functools.lru_cache(maxsize=64)(self._build_grant)


@dataclass(frozen=True)
class PolicyRequest:
    """What the caller asked for, as the policy sees it."""

    audiences: tuple[str, ...]
    resources: tuple[str, ...]
    scopes: tuple[str, ...] | None
    client_id: str | None
    actor: VerifiedToken | None = None
    #: How many actors the issued token's ``act`` chain will hold (0 without delegation).
    delegation_depth: int = 0


@dataclass(frozen=True)
class Grant:
    rule: str
    audiences: tuple[str, ...]
    scopes: tuple[str, ...]
    max_lifetime: int
    scope_narrowed: bool
    reasons: tuple[str, ...] = ()
    single_use: bool = False
    max_attestation_age: int | None = None
    risk: RiskSettings | None = None
    require_dpop: bool = False
    actor_may_bind_key: bool = False
    #: Minimum assurance levels and attestation ages for some scopes or audiences (``assurance``).
    assurance: tuple[Requirement, ...] = ()
    rate_limit: Limit | None = None


@dataclass(frozen=True)
class RuleTrace:
    """Why one rule did or did not apply (``sts policy explain``)."""

    rule: str
    source: str
    applies: bool
    reason: str
