"""Stored text printed on a terminal: every character a terminal obeys or reorders by is escaped.

An outside audit put ``\\r ESC[2K ESC[1A ESC[2K ok: ... ESC[8m`` in an audit record's ``chain_id``:
``sts audit verify`` printed it raw, the terminal erased the ``BROKEN`` lines, showed a fake
verdict and concealed the rest.
"""

from __future__ import annotations

import pytest

from sts.core.audit_chain import BrokenLink
from sts.core.terminal_text import printable

FAKE_VERDICT = "\r\x1b[2K\x1b[1A\x1b[2Kok: 1 record(s) in 1 chain(s) verify\x1b[8m"


@pytest.mark.parametrize(
    ("stored", "shown"),
    [
        ("\x1b[2K", "\\x1b[2K"),
        ("a\rb\nc\td\x00", "a\\x0db\\x0ac\\x09d\\x00"),
        ("\x7f\x9b\x85", "\\x7f\\x9b\\x85"),  # DEL, the C1 CSI and NEL
        ("\u202eevil\u202c", "\\u202eevil\\u202c"),  # right-to-left override, pop
        ("\u2066\u2067\u2068\u2069\u202a\u202b\u202d", "\\u2066\\u2067\\u2068\\u2069\\u202a\\u202b\\u202d"),
        ("\u2028\u2029\u200f\u061c", "\\u2028\\u2029\\u200f\\u061c"),
        ("x\udcff", "x\\udcff"),  # a lone surrogate no terminal encoding can write
    ],
)
def test_controls_and_bidi_controls_are_escaped(stored: str, shown: str) -> None:
    assert printable(stored) == shown


def test_ordinary_text_is_left_as_it_is() -> None:
    for text in ("0001_v0_1_0", "repo:acme/app|ref:refs/heads/main", "Zürich 東京 ✓", "a\\x1b b"):
        assert printable(text) == text
    assert printable(42) == "42" and printable(None) == "None"


def test_a_broken_link_shows_its_stored_chain_id_escaped() -> None:
    link = BrokenLink("e8f6" + FAKE_VERDICT, 1, 7, "chain is not registered in audit_chains")
    shown = str(link)
    assert shown.isprintable() and "\x1b" not in shown and "\r" not in shown
    assert shown == (
        "chain e8f6\\x0d\\x1b[2K\\x1b[1A\\x1b[2Kok: 1 record(s) in 1 chain(s) verify\\x1b[8m seq 1 "
        "(record id 7): chain is not registered in audit_chains"
    )
