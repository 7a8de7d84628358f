"""Compilation: schema-valid policy documents to frozen rules, checked once at load.

Every pattern is compiled (and matched whole, see :mod:`.matching`), every CEL
condition compiled and its variables checked, every issuer, client, resource,
scope and assurance level cross-checked against what the service knows.  A bad
rule is refused with its file, its name and the reason (ConfigurationError);
the service does not start on it.  Reading the files and checking them against
the JSON Schema is :mod:`sts.adapters.policy_files`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import cel
import re2

from ...errors import ConfigurationError, InvalidTarget
from ...protocol.token_exchange import check_resource
from ..assurance import LEVELS, Requirement
from ..drift import EVIDENCE_KINDS, EVIDENCE_POSTURE, DriftSettings
from ..networks import parse_network
from ..rate_limit import Limit
from ..risk import DEFAULT_STABLE_FACTS, RiskSettings
from .index import PolicySet
from .matching import ClaimMatcher, IdentityMatcher, Pattern
from .rules import DEFAULT_MAX_LIFETIME, MAX_DELEGATION_DEPTH, Rule

CEL_VARIABLES = frozenset({"claims", "facts", "subject", "issuer", "client_id", "request", "actor"})


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # the error is raised, with the rule's name, not logged by RE2


def compile_pattern(source: str) -> Pattern:
    """``source`` compiled by RE2 (https://github.com/google/re2/wiki/Syntax), which matches in
    time linear in the text, whatever the pattern: Python's backtracking engine spent 3.5 s of a
    worker's CPU, holding its every request, on one 70-character subject against a pattern an
    operator would write (``refs/tags/v([0-9]+\\.?)+``; an outside audit).  RE2 has no
    backreferences and no look-around (such a pattern is refused), and its ``\\d``, ``\\w`` and
    ``\\s`` are ASCII.  Raises ``re2.error``."""
    compiled: Pattern = re2.compile(source, _RE2_OPTIONS)
    return compiled


def _pattern(source: str, where: str) -> Pattern:
    try:
        return compile_pattern(source)
    except re2.error as exc:
        reason = (
            exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        )
        raise ConfigurationError(f"{where}: invalid regular expression (RE2 syntax): {reason}") from None


#: CEL string literals in a condition's source (quoted, optionally raw), for :func:`_re_matches_patterns`.
_CEL_STRING = re.compile(r"""[rR]?(?:"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')""")


class Condition:
    """A compiled CEL condition and the regular expressions its ``re_matches`` may use.

    CEL's own ``matches()`` compiles its regular expression again on every call (the library's
    Rust ``regex``, whose Unicode ``\\w`` builds large automata): 15 to 50 ms a call, holding the
    worker, so a 2 KB token with 256 group names held it 5 s under a plausible
    ``claims.groups.exists(g, g.matches("^team-[\\w-]{1,64}$"))`` (an outside audit).  It is
    refused at load; ``re_matches(value, pattern)`` replaces it: RE2 (linear time, ASCII ``\\w``,
    as patterns elsewhere in policies), searched like ``matches``, each pattern compiled once when
    the policy is read.  Each pattern must be a string literal RE2 compiles: anything else is
    refused at load (:func:`_re_matches_patterns`)."""

    def __init__(self, program: Any, patterns: dict[str, Pattern], *, re_matches: bool = False) -> None:
        self.program = program
        self.patterns = patterns
        self._functions = {"re_matches": self._re_matches} if re_matches else {}

    def _re_matches(self, value: Any, pattern: Any) -> bool:
        compiled = self.patterns.get(pattern) if isinstance(pattern, str) else None
        if compiled is None or not isinstance(value, str):
            raise ValueError("re_matches: a string, and a pattern written in the condition")
        return compiled.search(value) is not None

    def execute(self, variables: dict[str, Any]) -> Any:
        if not self._functions:
            return self.program.execute(variables)
        return self.program.execute(cel.Context(variables=variables, functions=self._functions))


def _condition(source: str, where: str) -> Condition:
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
    functions = set(program.functions())
    rooted = sorted(f for f in functions if f.startswith("."))
    if rooted:
        # CEL's root-scoped name (``.re_matches(...)``) names no function of ours nor a built-in:
        # every evaluation would fail, and the rule never apply, without a word (an outside
        # re-check loaded a pattern RE2 refuses that way).
        raise ConfigurationError(
            f"{where}: CEL condition calls {', '.join(rooted)}: no such function (drop the leading dot)"
        )
    if "matches" in functions:
        raise ConfigurationError(
            f"{where}: CEL condition uses matches(), which compiles its regular expression again on "
            "every call (seconds for one crafted token): use re_matches(value, pattern) (RE2, "
            'compiled once), e.g. claims.groups.exists(g, re_matches(g, "^team-[a-z-]+$"))'
        )
    patterns = _re_matches_patterns(source, where) if "re_matches" in functions else {}
    return Condition(program, patterns, re_matches="re_matches" in functions)


def _re_matches_patterns(source: str, where: str) -> dict[str, Pattern]:
    """The pattern of every ``re_matches(value, pattern)`` call in ``source``, compiled: each must
    be a string literal RE2 compiles, else :class:`ConfigurationError`.  A pattern RE2 refuses (a
    look-ahead, a backreference) was skipped at load, and the rule then never applied, without a
    word (an outside re-check); one computed at evaluation could never apply either."""
    # String literals and comments blanked out (same length), as CEL reads them: their brackets,
    # commas and words do not count (an outside re-check hid a call behind r"C:\" and behind a
    # triple-quoted string, and had one named in a comment refused).
    blank, uncommented, literals = _blank_literals(source)
    patterns: dict[str, Pattern] = {}
    for call in re.finditer(r"(\.\s*)?\bre_matches\s*\(", blank):
        if call.group(1):
            raise ConfigurationError(f"{where}: write re_matches(value, pattern), not value.re_matches(...)")
        args = _arguments(blank, call.end())
        # The argument without the white space and comments around it (a comment beside the
        # pattern was taken for part of the argument, and a valid condition refused).
        span = _stripped(uncommented, *args[1]) if len(args) == 2 else None
        if span not in literals:
            raise ConfigurationError(
                f"{where}: re_matches takes two arguments, the second a string literal: the pattern, "
                "compiled once when the policy is read"
            )
        value = cel.evaluate(source[span[0] : span[1]])
        if not isinstance(value, str):
            raise ConfigurationError(f"{where}: re_matches: the pattern must be a string, not bytes")
        patterns[value] = _pattern(value, f"{where}: re_matches")
    return patterns


def _stripped(source: str, start: int, end: int) -> tuple[int, int]:
    """The span ``start:end`` of ``source`` without the white space around it."""
    while start < end and source[start].isspace():
        start += 1
    while end > start and source[end - 1].isspace():
        end -= 1
    return start, end


#: Where a CEL string literal starts: an optional prefix (raw, bytes), then its quotes.
_LITERAL_START = re.compile(r"(?i:rb|br|r|b)?(\"\"\"|'''|\"|')")


def _blank_literals(source: str) -> tuple[str, str, set[tuple[int, int]]]:
    """``source`` with its string literals and ``//`` comments replaced by spaces, as CEL's lexer
    reads them (a raw string's backslash escapes nothing; triple quotes may span lines); the same
    with only its comments so replaced; and the spans of its string literals."""
    out = list(source)
    uncommented = list(source)
    literals: set[tuple[int, int]] = set()
    index, size = 0, len(source)
    while index < size:
        if source.startswith("//", index):
            end = source.find("\n", index)
            end = size if end < 0 else end
            uncommented[index:end] = " " * (end - index)
        else:
            start = _LITERAL_START.match(source, index)
            follows_name = index > 0 and (source[index - 1].isalnum() or source[index - 1] == "_")
            if start is None or (follows_name and start.start(1) > index):
                index += 1
                continue
            quote = start.group(1)
            raw = "r" in source[index : start.start(1)].lower()
            end = start.end()
            while end < size and not source.startswith(quote, end):
                end += 2 if source[end] == "\\" and not raw else 1
            end = min(end + len(quote), size)
            literals.add((index, end))
        out[index:end] = " " * (end - index)
        index = end
    return "".join(out), "".join(uncommented), literals


def _arguments(blank: str, start: int) -> list[tuple[int, int]]:
    """The spans of the top-level arguments of the call whose ``(`` ends just before ``start`` in
    ``blank`` (its string literals blanked out)."""
    spans: list[tuple[int, int]] = []
    depth, begin = 0, start
    for index in range(start, len(blank)):
        char = blank[index]
        if char in "([{":
            depth += 1
        elif char in ")]}":
            if depth == 0:
                spans.append((begin, index))
                return spans
            depth -= 1
        elif char == "," and depth == 0:
            spans.append((begin, index))
            begin = index + 1
    return spans  # unbalanced: CEL compiled it, so not reached


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
