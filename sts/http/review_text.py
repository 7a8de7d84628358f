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

import re
from typing import Any

#: Written as they are: line breaks and tabs (the decision's JSON is shown as it is indented).
_KEPT = frozenset("\n\t")


#: Printable by Python's reckoning, yet showing nothing: Unicode's Default_Ignorable_Code_Point
#: characters (DerivedCoreProperties.txt: the combining grapheme joiner, the Hangul fillers,
#: Khmer inherent vowels, Mongolian variation selectors, variation selectors, tag characters...)
#: and the blank-looking Braille pattern U+2800.
_BLANK = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\u2800\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)


def visible(value: Any) -> Any:
    """``value`` with each character that shows nothing of itself written as its escape: those
    that are not printable (``str.isprintable``: the format, control, separator other than the
    space, private-use, surrogate and unassigned code points) and the default-ignorable ones
    (:data:`_BLANK`); anything but a plain string is returned unchanged.  Used as the review
    templates' ``finalize``, so it applies to every expression they print."""
    if type(value) is not str or (value.isprintable() and not _BLANK.search(value)):
        return value
    return "".join(
        c if (c.isprintable() and not _BLANK.match(c)) or c in _KEPT else _escape(c) for c in value
    )


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def identity_issuer_ok(issuer: str) -> bool:
    """Whether ``issuer`` can name an identity on the review page: an issuer name (which holds no
    ``:``), or ``self:<name>``, the baseline of a workload's re-exchanges (a review: ``:x`` was a
    ``503`` and a traceback, ``upstream:bogus`` showed upstream's decisions under another title)."""
    name = issuer.removeprefix("self:")
    return bool(name) and ":" not in name
