"""Policy: compiled rules that turn verified facts into a grant, or a refusal.

Rules are compiled once at start (patterns anchored and compiled, CEL
conditions compiled, cross-references checked) and frozen.  Evaluation is a
pure function of the request, the facts, the client and ``now``.

Selection: rules are tried in order.  A rule applies when it matches the
identity (issuer, subject, claims, condition), the client, and every
requested audience and resource.  The first such rule decides scope and
lifetime.  No applicable rule means deny.  Refusals follow RFC 8693 §2.2.2
and RFC 6749 §5.2:

* no rule for this identity: ``invalid_request`` (RFC 8693 §2.2.2, a subject
  token "unacceptable based on policy"); rules for it, but none for the
  requested target: ``invalid_target``;
* rules for this identity exist but only for authenticated clients and none
  authenticated: ``invalid_client`` (401);
* the authenticated client is not one the rules allow: ``unauthorized_client``;
* none of the requested scopes may be granted: ``invalid_scope``; some may:
  the token is narrowed to those and the response says so (RFC 6749 §5.1).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cel

from ..errors import (
    ConfigurationError,
    InvalidClient,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    UnauthorizedClient,
)
from ..protocol.token_exchange import check_resource
from .assurance import LEVELS, Requirement
from .attest import VerifiedToken
from .drift import EVIDENCE_KINDS, EVIDENCE_POSTURE, DriftSettings
from .rate_limit import Limit
from .risk import DEFAULT_STABLE_FACTS, RiskSettings

DEFAULT_MAX_LIFETIME = 300
CEL_VARIABLES = frozenset({"claims", "facts", "subject", "issuer", "client_id", "request", "actor"})
#: The hard ceiling on delegation chains, whatever a rule says (RFC 8693 §4.1 nested ``act``).
MAX_DELEGATION_DEPTH = 5
_MAX_MATCHED_LENGTH = 4096


@dataclass(frozen=True)
class ClaimMatcher:
    name: str
    values: tuple[Any, ...] = ()
    pattern: re.Pattern[str] | None = None

    def matches(self, claims: Mapping[str, Any]) -> bool:
        if self.name not in claims:
            return False
        value = claims[self.name]
        if self.pattern is not None:
            return (
                isinstance(value, str)
                and len(value) <= _MAX_MATCHED_LENGTH
                and self.pattern.fullmatch(value) is not None
            )
        # Type-sensitive: "123" does not match 123, and True does not match 1.
        return any(type(value) is type(v) and value == v for v in self.values)


@dataclass(frozen=True)
class IdentityMatcher:
    """Who a token names: issuer, subject (exact or anchored pattern), claims and profile facts."""

    issuer: str
    subject: str | None = None
    subject_pattern: re.Pattern[str] | None = None
    claims: tuple[ClaimMatcher, ...] = ()
    facts: tuple[ClaimMatcher, ...] = ()

    def mismatch(self, token: VerifiedToken) -> str | None:
        if self.issuer != token.issuer_name:
            return f"issuer is {token.issuer_name!r}, rule wants {self.issuer!r}"
        if self.subject is not None and token.subject != self.subject:
            return "subject differs"
        if self.subject_pattern is not None and (
            len(token.subject) > _MAX_MATCHED_LENGTH or self.subject_pattern.fullmatch(token.subject) is None
        ):
            return "subject does not match subject_pattern"
        for matcher in self.claims:
            if not matcher.matches(token.claims):
                return f"claim {matcher.name!r} does not match"
        for matcher in self.facts:
            if not matcher.matches(token.facts):
                return f"fact {matcher.name!r} does not match"
        return None


@dataclass(frozen=True)
class Rule:
    name: str
    source: str
    issuer: str
    subject: str | None = None
    subject_pattern: re.Pattern[str] | None = None
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


#: Characters that end a regular expression's literal prefix.
_REGEX_SPECIAL = frozenset(".^$*+?{}[]\\|()")
_QUANTIFIERS = frozenset("*+?{")


def literal_prefix(pattern: str) -> str:
    """The text every string that ``re.fullmatch(pattern, s)`` accepts starts with.

    Conservative: a pattern with any alternation, a leading group or inline flags has no
    prefix (``""``), and so does a character made optional by a quantifier.  Only escapes of
    punctuation (``\\.``, ``\\:``) count as literals.
    """
    if "|" in pattern:
        return ""
    prefix: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        step = 1
        if char == "\\":
            if i + 1 >= len(pattern) or pattern[i + 1].isalnum() or pattern[i + 1] == "_":
                break
            char, step = pattern[i + 1], 2
        elif char in _REGEX_SPECIAL:
            break
        if i + step < len(pattern) and pattern[i + step] in _QUANTIFIERS:
            # ``ab*``: the b may be absent (and ``ab+``: the rest is not literal any more).
            break
        prefix.append(char)
        i += step
    return "".join(prefix)


@dataclass(frozen=True)
class _IssuerRules:
    """One issuer's rules, by position in the policy, indexed by what their subject must be."""

    exact: Mapping[str, tuple[int, ...]]
    prefixes: Mapping[str, tuple[int, ...]]
    prefix_lengths: tuple[int, ...]
    #: Rules that name no subject (claims, facts or a condition only) or whose pattern has no prefix.
    others: tuple[int, ...]

    def candidates(self, subject: str) -> list[int]:
        found = list(self.others)
        found.extend(self.exact.get(subject, ()))
        for length in self.prefix_lengths:
            if length <= len(subject):
                found.extend(self.prefixes.get(subject[:length], ()))
        return found


def index_rules(rules: Sequence[Rule]) -> dict[str, _IssuerRules]:
    """Rules by issuer, then by exact subject or the literal prefix of their subject pattern.

    A request then tests only the rules that could match its subject, in policy order,
    instead of every rule: 10,000 rules cost about what ten do.
    """
    grouped: dict[str, tuple[dict[str, list[int]], dict[str, list[int]], list[int]]] = {}
    for position, rule in enumerate(rules):
        exact, prefixes, others = grouped.setdefault(rule.issuer, ({}, {}, []))
        prefix = literal_prefix(rule.subject_pattern.pattern) if rule.subject_pattern is not None else ""
        if rule.subject is not None:
            exact.setdefault(rule.subject, []).append(position)
        elif prefix:
            prefixes.setdefault(prefix, []).append(position)
        else:
            others.append(position)
    return {
        issuer: _IssuerRules(
            exact={k: tuple(v) for k, v in exact.items()},
            prefixes={k: tuple(v) for k, v in prefixes.items()},
            prefix_lengths=tuple(sorted({len(k) for k in prefixes})),
            others=tuple(others),
        )
        for issuer, (exact, prefixes, others) in grouped.items()
    }


@dataclass(frozen=True)
class PolicySet:
    rules: tuple[Rule, ...] = ()
    files: tuple[str, ...] = field(default=())
    _index: Mapping[str, _IssuerRules] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", index_rules(self.rules))

    @property
    def allows_anonymous(self) -> bool:
        return any(not r.require_client_authentication for r in self.rules)

    def candidates(self, token: VerifiedToken) -> list[Rule]:
        """The rules that may match ``token``'s issuer and subject, in policy order."""
        issuer_rules = self._index.get(token.issuer_name)
        if issuer_rules is None:
            return []
        return [self.rules[i] for i in sorted(issuer_rules.candidates(token.subject))]


# -- compilation ---------------------------------------------------------------------------------


def _pattern(source: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(source)
    except re.error as exc:
        raise ConfigurationError(f"{where}: invalid regular expression: {exc}") from None


def _condition(source: str, where: str) -> Any:
    try:
        program = cel.compile(source)
    except ValueError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise ConfigurationError(f"{where}: invalid CEL condition: {first}") from None
    unknown = sorted(set(program.variables()) - CEL_VARIABLES - _comprehension_names(source))
    if unknown:
        raise ConfigurationError(
            f"{where}: CEL condition uses unknown variable(s) {', '.join(unknown)}; "
            f"available: {', '.join(sorted(CEL_VARIABLES))}"
        )
    return program


def _comprehension_names(source: str) -> set[str]:
    """Names bound by CEL macros such as ``list.exists(x, ...)``, which are not free variables."""
    return set(re.findall(r"\.(?:all|exists|exists_one|map|filter)\(\s*([A-Za-z_]\w*)\s*,", source))


def _matchers(specs: Mapping[str, Any] | None, where: str, kind: str) -> tuple[ClaimMatcher, ...]:
    matchers = []
    for claim, spec in (specs or {}).items():
        if isinstance(spec, dict):
            matchers.append(
                ClaimMatcher(claim, pattern=_pattern(spec["pattern"], f"{where}: {kind} {claim!r}"))
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
        subject_pattern=_pattern(raw["subject_pattern"], f"{where}: subject_pattern")
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


def compile_risk(raw: Mapping[str, Any], where: str, scopes: tuple[str, ...]) -> RiskSettings:
    """A rule's ``risk`` section, checked: thresholds ordered, networks valid, scopes known."""
    networks = []
    for value in raw.get("networks", ()):
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
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
    settings = RiskSettings(
        mode=raw.get("mode", "enforce"),
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
        subject_pattern=_pattern(raw["subject_pattern"], f"{where}: subject_pattern")
        if "subject_pattern" in raw
        else None,
        claims=tuple(matchers),
        facts=fact_matchers,
        condition=_condition(condition_source, where) if condition_source else None,
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
        risk=compile_risk(raw["risk"], where, scopes) if "risk" in raw else None,
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


# -- evaluation ----------------------------------------------------------------------------------


def _token_view(token: VerifiedToken | None) -> dict[str, Any] | None:
    if token is None:
        return None
    return {
        "issuer": token.issuer_name,
        "subject": token.subject,
        "claims": dict(token.claims),
        "facts": dict(token.facts),
    }


def _identity_mismatch(rule: Rule, facts: VerifiedToken, request: PolicyRequest) -> str | None:
    """None when the rule matches the identity; else why not."""
    mismatch = rule.identity.mismatch(facts)
    if mismatch is not None:
        return mismatch
    if rule.condition is not None:
        variables = {
            "claims": dict(facts.claims),
            "facts": dict(facts.facts),
            "subject": facts.subject,
            "issuer": facts.issuer_name,
            "client_id": request.client_id or "",
            "request": {
                "audiences": list(request.audiences),
                "resources": list(request.resources),
                "scopes": list(request.scopes or ()),
            },
            "actor": _token_view(request.actor),
        }
        try:
            result = rule.condition.execute(variables)
        except Exception as exc:  # noqa: BLE001 - a failing condition is a non-match, never a grant
            return f"condition could not be evaluated ({type(exc).__name__})"
        if result is not True:
            return "condition is false"
    return None


def _actor_mismatch(rule: Rule, request: PolicyRequest) -> str | None:
    """RFC 8693 §1.1: delegation (an actor) or impersonation (none), as the rule allows."""
    if request.delegation_depth > MAX_DELEGATION_DEPTH:
        # The hard ceiling holds for every token issued, also for a presented chain carried over.
        return "delegation chain too deep"
    if request.actor is None:
        return "an actor token is required (delegation only)" if rule.require_actor else None
    if not rule.actors:
        return "rule allows no actor"
    if all(m.mismatch(request.actor) is not None for m in rule.actors):
        return "actor not allowed"
    if request.delegation_depth > rule.max_delegation_depth:
        return "delegation chain too deep"
    return None


def _client_mismatch(rule: Rule, client_id: str | None) -> str | None:
    if client_id is None:
        return "client authentication required" if rule.require_client_authentication else None
    if rule.clients and client_id not in rule.clients:
        return f"client {client_id!r} not allowed"
    return None


def _targets(rule: Rule, request: PolicyRequest) -> tuple[str, ...] | None:
    """The audiences to grant, or None when the rule does not cover what was asked."""
    if not request.audiences and not request.resources:
        # Nothing asked: a rule with exactly one target implies it; otherwise the caller must say.
        return rule.targets if len(rule.targets) == 1 else None
    if set(request.audiences) <= rule.audiences and set(request.resources) <= rule.resources:
        return tuple(dict.fromkeys(request.resources + request.audiences))
    return None


def trace(policy: PolicySet, facts: VerifiedToken, request: PolicyRequest) -> list[RuleTrace]:
    """Every rule with whether it applies and why (for ``sts policy explain`` and the audit record)."""
    traces = []
    for rule in policy.rules:
        reason = (
            _identity_mismatch(rule, facts, request)
            or _client_mismatch(rule, request.client_id)
            or _actor_mismatch(rule, request)
            or (None if _targets(rule, request) is not None else "requested audience/resource not granted")
        )
        traces.append(RuleTrace(rule.name, rule.source, reason is None, reason or "applies"))
    return traces


def evaluate(policy: PolicySet, facts: VerifiedToken, request: PolicyRequest) -> Grant:
    """Decide what may be granted, or raise the OAuth error (see the module docstring)."""
    identity = [r for r in policy.candidates(facts) if _identity_mismatch(r, facts, request) is None]
    if not identity:
        # RFC 8693 §2.2.2: a subject token "unacceptable based on policy" is invalid_request.
        raise InvalidRequest("policy.no_rule_for_identity")
    clients_ok = [r for r in identity if _client_mismatch(r, request.client_id) is None]
    if not clients_ok:
        if request.client_id is None:
            raise InvalidClient("policy.client_authentication_required")
        raise UnauthorizedClient("policy.client_not_allowed", request.client_id)
    actors_ok = [r for r in clients_ok if _actor_mismatch(r, request) is None]
    if not actors_ok:
        mismatches = {_actor_mismatch(r, request) for r in clients_ok}
        if mismatches == {"delegation chain too deep"}:
            raise InvalidRequest("policy.delegation_too_deep", str(request.delegation_depth))
        if request.actor is None:
            raise InvalidRequest("policy.actor_required")
        raise InvalidRequest("policy.actor_not_allowed", request.actor.subject[:200])
    for rule in actors_ok:
        targets = _targets(rule, request)
        if targets is None:
            continue
        if request.scopes is None:
            scopes, narrowed = rule.default_scopes, False
        else:
            scopes = tuple(s for s in request.scopes if s in rule.scopes)
            if not scopes:
                raise InvalidScope("policy.scope_not_allowed", rule.name)
            narrowed = len(scopes) != len(request.scopes)
        reasons = ("policy.rule_matched",) + (("policy.scope_narrowed",) if narrowed else ())
        return Grant(
            rule.name,
            targets,
            scopes,
            rule.max_lifetime,
            narrowed,
            reasons,
            single_use=rule.single_use,
            max_attestation_age=rule.max_attestation_age,
            risk=rule.risk,
            require_dpop=rule.require_dpop,
            actor_may_bind_key=rule.actor_may_bind_key,
            assurance=rule.assurance,
            rate_limit=rule.rate_limit,
        )
    raise InvalidTarget("policy.target_not_allowed")
