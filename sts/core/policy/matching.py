"""Who a rule names: claim matchers and identity matchers (issuer, subject, claims, facts).

Patterns are compiled once, when the policy is (:mod:`.compile`), by RE2, and always
matched whole (``fullmatch``), so ``repo:acme/.*`` cannot match
``xrepo:acme/app``.  RE2 matches in time linear in the value, whatever the
pattern (no backtracking); and a value longer than :data:`MAX_MATCHED_LENGTH`
never matches a pattern.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import re2

from ...errors import ConfigurationError
from ..attest import VerifiedToken

MAX_MATCHED_LENGTH = 4096


class Pattern(Protocol):
    """A compiled pattern (:func:`compile_pattern`)."""

    @property
    def pattern(self) -> str: ...

    def fullmatch(self, string: str) -> object | None: ...

    def search(self, string: str) -> object | None: ...


@dataclass(frozen=True)
class ClaimMatcher:
    name: str
    values: tuple[Any, ...] = ()
    pattern: Pattern | None = None

    def matches(self, claims: Mapping[str, Any]) -> bool:
        if self.name not in claims:
            return False
        value = claims[self.name]
        if self.pattern is not None:
            return (
                isinstance(value, str)
                and len(value) <= MAX_MATCHED_LENGTH
                and self.pattern.fullmatch(value) is not None
            )
        # Type-sensitive: "123" does not match 123, and True does not match 1.
        return any(type(value) is type(v) and value == v for v in self.values)


@dataclass(frozen=True)
class IdentityMatcher:
    """Who a token names: issuer, subject (exact or anchored pattern), claims and profile facts."""

    issuer: str
    subject: str | None = None
    subject_pattern: Pattern | None = None
    claims: tuple[ClaimMatcher, ...] = ()
    facts: tuple[ClaimMatcher, ...] = ()

    def mismatch(self, token: VerifiedToken) -> str | None:
        if self.issuer != token.issuer_name:
            return f"issuer is {token.issuer_name!r}, rule wants {self.issuer!r}"
        if self.subject is not None and token.subject != self.subject:
            return "subject differs"
        if self.subject_pattern is not None and (
            len(token.subject) > MAX_MATCHED_LENGTH or self.subject_pattern.fullmatch(token.subject) is None
        ):
            return "subject does not match subject_pattern"
        for matcher in self.claims:
            if not matcher.matches(token.claims):
                return f"claim {matcher.name!r} does not match"
        for matcher in self.facts:
            if not matcher.matches(token.facts):
                return f"fact {matcher.name!r} does not match"
        return None


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


def pattern_or_refusal(source: str, where: str) -> Pattern:
    """``source`` compiled (:func:`compile_pattern`), or :class:`ConfigurationError` naming ``where``."""
    try:
        return compile_pattern(source)
    except re2.error as exc:
        reason = (
            exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        )
        raise ConfigurationError(f"{where}: invalid regular expression (RE2 syntax): {reason}") from None
