"""Rule conditions: CEL expressions, compiled and checked once, when the policy is read.

A condition may use the variables :data:`CEL_VARIABLES`, CEL's type names, CEL's own functions
(:data:`CEL_FUNCTIONS`) except ``matches()``, and ``re_matches(value, pattern)``, whose patterns
are string literals RE2 compiles (see :class:`Condition`).  Anything else is refused with the
rule's name and the reason (:class:`~sts.errors.ConfigurationError`).  Pure: no I/O.
"""

from __future__ import annotations

import re
from typing import Any

import cel

from ...errors import ConfigurationError
from .matching import Pattern, pattern_or_refusal

_NAME = re.compile(r"[A-Za-z_]\w*")
CEL_VARIABLES = frozenset({"claims", "facts", "subject", "issuer", "client_id", "request", "actor"})
#: CEL's type names, which the implementation reports as variables: ``type(claims.x) == string``
#: (the guard docs/policies.md recommends) was refused as an unknown variable ``string``.  (Its
#: ``timestamp`` and ``duration`` are functions only: ``== timestamp`` fails at evaluation.)
CEL_TYPES = frozenset(
    {"bool", "int", "uint", "double", "string", "bytes", "list", "map", "null_type", "type"}
)
#: The functions a condition may call by name: those the CEL implementation (the Rust ``cel``
#: crate of ``common-expression-language`` 0.10, without its opt-in Python ``stdlib``) defines
#: (a test evaluates each), and ours.  (Its optional values need ``optional.``, refused as an
#: unknown variable, or ``.?``, which it cannot parse.)  Any other
#: name (``max``, ``lowerAscii``, a misspelling) loaded and failed at every evaluation, and the
#: rule never applied, without a word.  Operators (``_&&_``, ``@in``, ``!_``) are not names.
CEL_FUNCTIONS = frozenset(
    {
        *("size", "contains", "startsWith", "endsWith", "type", "dyn"),
        *("int", "uint", "double", "string", "bytes", "timestamp", "duration"),
        *("getFullYear", "getMonth", "getDayOfYear", "getDayOfMonth", "getDate", "getDayOfWeek"),
        *("getHours", "getMinutes", "getSeconds", "getMilliseconds"),
        "re_matches",
    }
)


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


def compile_condition(source: str, where: str) -> Condition:
    """``source`` compiled, its variables and functions checked, its ``re_matches`` patterns compiled."""
    try:
        program = cel.compile(source)
    except ValueError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise ConfigurationError(f"{where}: invalid CEL condition: {first}") from None
    unknown = sorted(set(program.variables()) - CEL_VARIABLES - CEL_TYPES - _comprehension_names(source))
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
    # Every name (operators, ``_&&_``, ``@in``, ``!_``, are not names; ``_lower`` is one).
    unknown = sorted(f for f in functions if _NAME.fullmatch(f) and f not in CEL_FUNCTIONS)
    if unknown:
        raise ConfigurationError(
            f"{where}: CEL condition calls {', '.join(unknown)}: no such function here (every "
            "evaluation would fail and the rule never apply); see docs/policies.md, condition"
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
        patterns[value] = pattern_or_refusal(value, f"{where}: re_matches")
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
