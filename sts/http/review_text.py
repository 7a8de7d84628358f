"""How the review page writes text from records: every character an operator can see.

Records carry what callers sent (subjects, audiences, client ids, user agents).  A bidi
control (U+202E), a zero-width space or a no-break space shows nothing of itself, so two
identities that differ only by one look the same on the page, and a right-to-left override
reverses what follows it.  The page is read to tell workloads apart, so such characters are
written as their ``\\uXXXX`` escapes, as ``sts audit`` (JSON) and the log (``repr``) already
show them.  Jinja's autoescape still applies afterwards; text the templates mark safe is
left alone.
"""

from __future__ import annotations

from typing import Any

#: Written as they are: line breaks and tabs (the decision's JSON is shown as it is indented).
_KEPT = frozenset("\n\t")


def visible(value: Any) -> Any:
    """``value`` with each character that is not printable (``str.isprintable``: the format,
    control, separator other than the space, private-use, surrogate and unassigned code
    points) written as its escape; anything but a plain string is returned unchanged.
    Used as the review templates' ``finalize``, so it applies to every expression they print."""
    if type(value) is not str or value.isprintable():
        return value
    return "".join(c if c.isprintable() or c in _KEPT else _escape(c) for c in value)


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
