"""The frozen policy: its rules, indexed by issuer and by what their subject must be.

A request then tries only the rules that could match its issuer and subject,
in policy order, instead of every rule: 10,000 rules cost about what ten do.
The index is built once, when the :class:`PolicySet` is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..attest import VerifiedToken
from .rules import Rule

#: Characters that end a regular expression's literal prefix.
_REGEX_SPECIAL = frozenset(".^$*+?{}[]\\|()")
_QUANTIFIERS = frozenset("*+?{")


def literal_prefix(pattern: str) -> str:
    """The text every string that ``re.fullmatch(pattern, s)`` accepts starts with.

    Conservative: a pattern with any alternation, a leading group or inline flags has no
    prefix (``""``), and so does a character made optional by a quantifier; the prefix ends
    before the character in front of any group or escape of a letter.  Only escapes of
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
        after = pattern[i + step : i + step + 2]
        if after[:1] in _QUANTIFIERS or after[:1] == "(" or (after[:1] == "\\" and after[1:].isalnum()):
            # ``ab*``: the b may be absent (and ``ab+``: the rest is not literal any more).  So may
            # it before a group or an escape that can be empty, such as RE2's inline flags or an
            # empty quote: ``ab(?i)?`` and ``ab\Q\E?`` quantify the ``b`` (an outside audit).
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
    """Rules by issuer, then by exact subject or the literal prefix of their subject pattern."""
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
    _allows_anonymous: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", index_rules(self.rules))
        # Asked on every exchange without client authentication: found once, not per request.
        object.__setattr__(
            self, "_allows_anonymous", any(not r.require_client_authentication for r in self.rules)
        )

    @property
    def allows_anonymous(self) -> bool:
        """Some rule takes a request without client authentication."""
        return self._allows_anonymous

    def candidates(self, token: VerifiedToken) -> list[Rule]:
        """The rules that may match ``token``'s issuer and subject, in policy order."""
        return list(self._candidates(token.issuer_name, token.subject))

    def _candidates_of(self, issuer: str, subject: str) -> tuple[Rule, ...]:
        issuer_rules = self._index.get(issuer)
        if issuer_rules is None:
            return ()
        return tuple(self.rules[i] for i in sorted(issuer_rules.candidates(subject)))

    @functools.cached_property
    def _candidates(self) -> Callable[[str, str], tuple[Rule, ...]]:
        """:meth:`_candidates_of`, remembered for the most recent identities: a workload exchanges
        again and again, and the policy is frozen.  (``cached_property`` writes the instance dict
        directly, so it works on a frozen dataclass.)"""
        return functools.lru_cache(maxsize=4096)(self._candidates_of)
