"""Compilation: schema-valid policy documents to frozen rules, checked once at load.

Every pattern is compiled (and matched whole, see :mod:`.matching`), every CEL
condition compiled and its variables checked, every issuer, client, resource,
scope and assurance level cross-checked against what the service knows.  A bad
rule is refused with its file, its name and the reason (ConfigurationError);
the service does not start on it.  Reading the files and checking them against
the JSON Schema is :mod:`sts.adapters.policy_files`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ...errors import ConfigurationError, InvalidTarget
from ...protocol.token_exchange import check_resource
from ..assurance import LEVELS, Requirement
from ..drift import EVIDENCE_KINDS, EVIDENCE_POSTURE, DriftSettings
from ..networks import parse_network
from ..rate_limit import Limit
from ..risk import DEFAULT_STABLE_FACTS, RiskSettings
from .conditions import compile_condition
from .index import PolicySet
from .matching import ClaimMatcher, IdentityMatcher, pattern_or_refusal
from .rules import DEFAULT_MAX_LIFETIME, MAX_DELEGATION_DEPTH, Rule


def _matchers(specs: Mapping[str, Any] | None, where: str, kind: str) -> tuple[ClaimMatcher, ...]:
    matchers = []
    for claim, spec in (specs or {}).items():
        if isinstance(spec, dict):
            matchers.append(
                ClaimMatcher(claim, pattern=pattern_or_refusal(spec["pattern"], f"{where}: {kind} {claim!r}"))
            )
        elif isinstance(spec, list):
            matchers.append(ClaimMatcher(claim, values=tuple(spec)))
        else:
            matchers.append(ClaimMatcher(claim, values=(spec,)))
    return tuple(matchers)


def _issuer_name(raw: Mapping[str, Any], where: str, issuers: frozenset[str]) -> str:
    name: str = raw["issuer"]
    if name not in issuers:
        raise ConfigurationError(
            f"{where}: unknown issuer {name!r} (configured: {', '.join(sorted(issuers)) or 'none'})"
        )
    return name


def _actor(raw: Mapping[str, Any], where: str, issuers: frozenset[str]) -> IdentityMatcher:
    matcher = IdentityMatcher(
        issuer=_issuer_name(raw, where, issuers),
        subject=raw.get("subject"),
        subject_pattern=pattern_or_refusal(raw["subject_pattern"], f"{where}: subject_pattern")
        if "subject_pattern" in raw
        else None,
        claims=_matchers(raw.get("claims"), where, "claim"),
        facts=_matchers(raw.get("facts"), where, "fact"),
    )
    if (
        matcher.subject is None
        and matcher.subject_pattern is None
        and not matcher.claims
        and not matcher.facts
    ):
        raise ConfigurationError(
            f"{where}: an actor must be named by subject, subject_pattern, claims or facts"
        )
    return matcher


def compile_risk(
    raw: Mapping[str, Any], where: str, scopes: tuple[str, ...], issuers: frozenset[str] | None = None
) -> RiskSettings:
    """A rule's ``risk`` section, checked: thresholds ordered, networks valid, scopes known, posture
    issuers configured (``issuers``: the configured names; None checks nothing, for a file alone)."""
    networks = []
    for value in raw.get("networks", ()):
        try:
            # An IPv4-mapped network is the IPv4 one it maps, as sources are compared (an outside
            # re-check: ``::ffff:127.0.0.0/104`` never admitted 127.0.0.1).
            networks.append(parse_network(value))
        except ValueError:
            raise ConfigurationError(f"{where}: risk.networks: {value!r} is not a network") from None
    privileged = frozenset(raw.get("privileged_scopes", ()))
    unknown = sorted(privileged - set(scopes))
    if unknown:
        raise ConfigurationError(f"{where}: risk.privileged_scopes not in grant.scopes: {', '.join(unknown)}")
    defaults = RiskSettings()
    evidence = frozenset(raw.get("drift_evidence", ()))
    unknown_evidence = sorted(evidence - EVIDENCE_KINDS)
    if unknown_evidence:
        raise ConfigurationError(f"{where}: risk.drift_evidence: unknown {', '.join(unknown_evidence)}")
    if EVIDENCE_POSTURE in evidence and not raw.get("posture_fact"):
        raise ConfigurationError(f"{where}: risk.drift_evidence posture_token needs risk.posture_fact")
    posture_issuers = tuple(raw.get("posture_issuers", ()))
    for name in posture_issuers:
        if name == "self" or (issuers is not None and name not in issuers):
            shown = ", ".join(sorted(issuers or ())) or "none"
            raise ConfigurationError(
                f"{where}: risk.posture_issuers: unknown issuer {name!r} (configured: {shown})"
            )
    settings = RiskSettings(
        mode=raw.get("mode", "enforce"),
        posture_issuers=frozenset(posture_issuers),
        networks=tuple(networks),
        privileged_scopes=privileged,
        stable_facts=tuple(raw.get("stable_facts", DEFAULT_STABLE_FACTS)),
        posture_fact=raw.get("posture_fact"),
        posture_good=frozenset(raw.get("posture_good", defaults.posture_good)),
        posture_max_age=raw.get("posture_max_age"),
        max_failures=int(raw.get("max_failures", defaults.max_failures)),
        failure_window=int(raw.get("failure_window", defaults.failure_window)),
        burst_factor=float(raw.get("burst_factor", defaults.burst_factor)),
        intent_claim=raw.get("intent_claim"),
        weights=dict(raw.get("weights", {})),
        narrow_at=int(raw.get("narrow_at", defaults.narrow_at)),
        step_up_at=int(raw.get("step_up_at", defaults.step_up_at)),
        deny_at=int(raw.get("deny_at", defaults.deny_at)),
        step_up_max_age=int(raw.get("step_up_max_age", defaults.step_up_max_age)),
        min_lifetime_factor=float(raw.get("min_lifetime_factor", defaults.min_lifetime_factor)),
        drift=DriftSettings(
            probation_exchanges=int(raw.get("probation_exchanges", defaults.drift.probation_exchanges)),
            probation_period=int(raw.get("probation_period", defaults.drift.probation_period)),
            evidence=evidence,
        ),
    )
    if not settings.narrow_at <= settings.step_up_at <= settings.deny_at:
        raise ConfigurationError(f"{where}: risk thresholds must satisfy narrow_at <= step_up_at <= deny_at")
    return settings


def compile_assurance(
    entries: Sequence[Mapping[str, Any]], where: str, scopes: tuple[str, ...], targets: frozenset[str]
) -> tuple[Requirement, ...]:
    """A rule's ``assurance`` section: known levels, scopes and audiences the rule grants."""
    requirements = []
    for i, entry in enumerate(entries):
        at = f"{where}: assurance[{i}]"
        acr = entry.get("acr")
        if acr is not None and acr not in LEVELS:
            raise ConfigurationError(f"{at}: unknown acr {acr!r} (known: {', '.join(LEVELS)})")
        max_age = entry.get("max_attestation_age")
        if acr is None and max_age is None:
            raise ConfigurationError(f"{at}: names neither acr nor max_attestation_age")
        wanted_scopes = frozenset(entry.get("scopes", ()))
        unknown = sorted(wanted_scopes - set(scopes))
        if unknown:
            raise ConfigurationError(f"{at}: scopes not in grant.scopes: {', '.join(unknown)}")
        audiences = frozenset(entry.get("audiences", ()))
        unknown = sorted(audiences - targets)
        if unknown:
            raise ConfigurationError(f"{at}: audiences not granted by the rule: {', '.join(unknown)}")
        requirements.append(
            Requirement(
                acr=acr,
                max_attestation_age=int(max_age) if max_age is not None else None,
                scopes=wanted_scopes,
                audiences=audiences,
            )
        )
    return tuple(requirements)


def compile_rule(
    raw: Mapping[str, Any],
    *,
    source: str,
    issuers: frozenset[str],
    clients: frozenset[str],
    max_lifetime: int,
    default_lifetime: int = DEFAULT_MAX_LIFETIME,
) -> Rule:
    """Compile one schema-valid rule mapping; raise ConfigurationError with ``source`` and the rule name."""
    name = raw["name"]
    where = f"{source}: rule {name!r}"
    _issuer_name(raw, where, issuers)
    matchers = list(_matchers(raw.get("claims"), where, "claim"))
    fact_matchers = _matchers(raw.get("facts"), where, "fact")
    delegation = raw.get("delegation") or {}
    actors = tuple(
        _actor(actor, f"{where}: delegation.actors[{i}]", issuers)
        for i, actor in enumerate(delegation.get("actors", ()))
    )
    max_depth = int(delegation.get("max_depth", 1))
    if max_depth > MAX_DELEGATION_DEPTH:
        raise ConfigurationError(f"{where}: delegation.max_depth {max_depth} exceeds {MAX_DELEGATION_DEPTH}")
    require_actor = bool(raw.get("require_actor", False))
    if require_actor and not actors:
        raise ConfigurationError(f"{where}: require_actor needs delegation.actors")
    grant = raw["grant"]
    audiences = frozenset(grant.get("audiences", ()))
    resources = frozenset(grant.get("resources", ()))
    for resource in resources:
        try:
            check_resource(resource)
        except InvalidTarget:
            raise ConfigurationError(
                f"{where}: resource {resource!r} is not an absolute URI without a fragment (RFC 8707 §2)"
            ) from None
    if not audiences and not resources:
        raise ConfigurationError(f"{where}: grant names no audience or resource")
    scopes = tuple(grant.get("scopes", ()))
    default_scopes = tuple(grant.get("default_scopes", ()))
    if not set(default_scopes) <= set(scopes):
        raise ConfigurationError(f"{where}: default_scopes must be a subset of scopes")
    lifetime = int(grant.get("max_lifetime", min(default_lifetime, max_lifetime)))
    if lifetime > max_lifetime:
        raise ConfigurationError(
            f"{where}: max_lifetime {lifetime} exceeds the service's max_lifetime {max_lifetime}"
        )
    require_client = bool(raw.get("require_client_authentication", True))
    allowed_clients = frozenset(raw.get("clients", ()))
    if allowed_clients and not require_client:
        raise ConfigurationError(f"{where}: clients requires require_client_authentication: true")
    unknown_clients = sorted(allowed_clients - clients)
    if unknown_clients:
        raise ConfigurationError(f"{where}: unknown client(s) {', '.join(unknown_clients)}")
    # An empty condition ("") constrains nothing, so it does not count.
    if (
        "subject" not in raw
        and "subject_pattern" not in raw
        and not matchers
        and not fact_matchers
        and not raw.get("condition")
    ):
        raise ConfigurationError(
            f"{where}: matches every token of the issuer; "
            "add subject, subject_pattern, claims, facts or condition"
        )
    condition_source = raw.get("condition")
    return Rule(
        name=name,
        source=source,
        issuer=raw["issuer"],
        subject=raw.get("subject"),
        subject_pattern=pattern_or_refusal(raw["subject_pattern"], f"{where}: subject_pattern")
        if "subject_pattern" in raw
        else None,
        claims=tuple(matchers),
        facts=fact_matchers,
        condition=compile_condition(condition_source, where) if condition_source else None,
        condition_source=condition_source,
        require_client_authentication=require_client,
        clients=allowed_clients,
        audiences=audiences,
        resources=resources,
        scopes=scopes,
        default_scopes=default_scopes,
        max_lifetime=lifetime,
        description=raw.get("description", ""),
        actors=actors,
        max_delegation_depth=max_depth,
        require_actor=require_actor,
        single_use=bool(raw.get("single_use", False)),
        max_attestation_age=raw.get("max_attestation_age"),
        risk=compile_risk(raw["risk"], where, scopes, issuers) if "risk" in raw else None,
        require_dpop=bool(raw.get("require_dpop", False)),
        actor_may_bind_key=bool(raw.get("actor_may_bind_key", False)),
        assurance=compile_assurance(raw.get("assurance", ()), where, scopes, audiences | resources),
        rate_limit=compile_rate_limit(raw["rate_limit"]) if "rate_limit" in raw else None,
    )


def compile_rate_limit(raw: Mapping[str, Any]) -> Limit:
    """A schema-valid ``{requests, period, burst}`` mapping; ``burst`` defaults to ``requests``."""
    requests = int(raw["requests"])
    return Limit(requests=requests, period=float(raw["period"]), burst=int(raw.get("burst", requests)))


def compile_policy(
    documents: Sequence[tuple[str, Mapping[str, Any]]],
    *,
    issuers: frozenset[str],
    clients: frozenset[str],
    max_lifetime: int,
    default_lifetime: int = DEFAULT_MAX_LIFETIME,
) -> PolicySet:
    """Compile schema-valid policy documents ``(source, mapping)`` into a frozen set of rules."""
    rules: list[Rule] = []
    seen: dict[str, str] = {}
    for source, doc in documents:
        for raw in doc.get("rules", ()):
            rule = compile_rule(
                raw,
                source=raw.get("__source__", source),
                issuers=issuers,
                clients=clients,
                max_lifetime=max_lifetime,
                default_lifetime=default_lifetime,
            )
            if rule.name in seen:
                raise ConfigurationError(
                    f"{rule.source}: rule {rule.name!r}: name already used in {seen[rule.name]}"
                )
            seen[rule.name] = rule.source
            rules.append(rule)
    return PolicySet(rules=tuple(rules), files=tuple(s for s, _ in documents))
