"""Stored text made safe to print on an operator's terminal, as one line.

Whoever can write the audit database (the very party ``sts audit verify`` is there to catch)
chooses what its columns hold.  Printed raw, a control sequence in one is obeyed by the
terminal: ``ESC [2K`` erases the line, ``ESC [1A`` moves up, ``ESC [8m`` conceals whatever
follows, so a stored ``chain_id`` erased the ``BROKEN`` lines of ``sts audit verify`` and
printed a fake ``ok:`` verdict in their place (an outside audit).  Bidirectional controls
reorder what follows them on screen ("Trojan Source", CVE-2021-42574).  The commands that print
a value read from the database as text (not JSON, whose encoder escapes them already) pass it
through :func:`printable`.
"""

from __future__ import annotations

import re

#: C0 controls, DEL and C1 controls (Unicode category Cc: ECMA-48's ESC and CSI among them); the
#: line and paragraph separators; the bidirectional marks, embeddings, overrides and isolates
#: (Unicode UAX #9); and lone surrogates (no terminal encoding can write them).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(value: object) -> str:
    """``str(value)`` with each character a terminal would obey or reorder by written as its
    Python-style escape (``\\x1b``, ``\\u202e``); everything else, other scripts included, is
    left as it is.  Tabs and line breaks are escaped too: a value stays on its line."""
    return _UNSAFE.sub(_escape, str(value))
