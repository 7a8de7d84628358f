"""``WWW-Authenticate`` challenges (RFC 9110 §11.6.1): rendered at a resource server, read by a client.

A resource server answers a request it refuses with one or more challenges
(RFC 6750 §3, RFC 9449 §7.1, RFC 9470 §3)::

    HTTP/1.1 401 Unauthorized
    WWW-Authenticate: Bearer error="insufficient_user_authentication",
      error_description="More recent attestation is required.", max_age="60"

    HTTP/1.1 401 Unauthorized
    WWW-Authenticate: DPoP error="invalid_dpop_proof",
      error_description="The DPoP proof is invalid.", algs="ES256 PS256"

Several challenges may share one header line, separated by commas, and an
HTTP client library such as ``requests`` joins repeated header lines the same
way; :func:`parse_challenges` splits them again.  The grammar (RFC 9110
§11.2)::

    challenge  = auth-scheme [ 1*SP ( token68 / #auth-param ) ]
    auth-param = token BWS "=" BWS ( token / quoted-string )

This small parser exists because the workload side must not depend on a web
framework (werkzeug has one); it is lenient in what it reads and strict in
what it writes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["Challenge", "parse_challenges", "quote"]

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_SCHEME = re.compile(_TOKEN)
_PARAM = re.compile(rf"({_TOKEN})[ \t]*=[ \t]*")
_TOKEN_VALUE = re.compile(_TOKEN)
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*(?=[ \t]*(?:,|$))")
_UNESCAPE = re.compile(r"\\(.)", re.DOTALL)
_WHITESPACE_AND_COMMAS = re.compile(r"[ \t,]*")
_WHITESPACE = re.compile(r"[ \t]*")
#: Control characters never go into a header (RFC 9110 §5.5); they are dropped when rendering.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def quote(value: str) -> str:
    """A quoted-string (RFC 9110 §5.6.4): backslash and double quote escaped, controls dropped."""
    cleaned = _CONTROL.sub("", value)
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Challenge:
    """One challenge: an auth scheme and its parameters (names lower-cased, values unquoted)."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)
    token68: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    @property
    def error(self) -> str | None:
        return self.params.get("error")

    def is_scheme(self, name: str) -> bool:
        """Auth schemes compare case-insensitively (RFC 9110 §11.1)."""
        return self.scheme.lower() == name.lower()

    def render(self) -> str:
        """``Scheme name="value", ...``; every value quoted, which every reader accepts."""
        if self.token68 is not None:
            return f"{self.scheme} {self.token68}"
        if not self.params:
            return self.scheme
        return self.scheme + " " + ", ".join(f"{name}={quote(value)}" for name, value in self.params.items())


def parse_challenges(values: str | Iterable[str] | None) -> list[Challenge]:
    """Every challenge in one or more ``WWW-Authenticate`` field values, in order.

    Malformed parts are skipped rather than failing the whole header: the
    caller only ever acts on challenges it recognises.
    """
    if values is None:
        return []
    lines = [values] if isinstance(values, str) else list(values)
    challenges: list[Challenge] = []
    for line in lines:
        challenges.extend(_parse_line(line))
    return challenges


def _parse_line(text: str) -> list[Challenge]:
    challenges: list[Challenge] = []
    pos = 0
    end = len(text)
    while True:
        pos = _WHITESPACE_AND_COMMAS.match(text, pos).end()  # type: ignore[union-attr]
        if pos >= end:
            return challenges
        scheme = _SCHEME.match(text, pos)
        if scheme is None:
            # Not a token where a scheme must be: skip to the next comma and try again.
            comma = text.find(",", pos)
            if comma < 0:
                return challenges
            pos = comma + 1
            continue
        pos = _WHITESPACE.match(text, scheme.end()).end()  # type: ignore[union-attr]
        token68 = _TOKEN68.match(text, pos)
        if token68 is not None:
            challenges.append(Challenge(scheme.group(0), {}, token68.group(0)))
            pos = token68.end()
            continue
        params: dict[str, str] = {}
        while True:
            param = _PARAM.match(text, pos)
            if param is None:
                break
            pos = param.end()
            quoted = _QUOTED.match(text, pos)
            if quoted is not None:
                value = _UNESCAPE.sub(r"\1", quoted.group(1))
                pos = quoted.end()
            else:
                bare = _TOKEN_VALUE.match(text, pos)
                value = bare.group(0) if bare is not None else ""
                pos = bare.end() if bare is not None else pos
            # RFC 9110 §11.2: each parameter name appears once; the first one counts.
            params.setdefault(param.group(1).lower(), value)
            after = _WHITESPACE_AND_COMMAS.match(text, pos)
            assert after is not None
            if not _PARAM.match(text, after.end()):
                # What follows (if anything) is the next challenge's scheme.
                pos = after.end()
                break
            pos = after.end()
        challenges.append(Challenge(scheme.group(0), params))
