"""W3C Trace Context (Level 1) ``traceparent``: parse strictly, format, start a trace.

The header on the wire (§3.2)::

    traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01
                 ^^ ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^ ^^^^^^^^^^^^^^^^ ^^
                 version       trace-id               parent-id     trace-flags

Lower-case hex only; an all-zero trace-id or parent-id is invalid, and so is
version ``ff`` (§3.2.2.1).  Version ``00`` is exactly 55 characters.  A later
version is read as version ``00`` where its first four fields fit (§3.2.4:
at least 55 characters, and a dash or the end after the flags).  Anything
else, including a repeated header (which WSGI joins with a comma), is
invalid: the caller then starts a new trace (§3.2.4, "restart the trace").
This module only reads and writes the header; it decides nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .identifiers import random_hex

_VERSION_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_LATER_VERSION = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-.*)?", re.DOTALL)
SAMPLED = 0x01
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


@dataclass(frozen=True)
class TraceContext:
    """A position in a trace: the trace, the span that is the parent of what comes next, and flags."""

    trace_id: str
    span_id: str
    flags: int = 0

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def traceparent(self) -> str:
        """The header value (version ``00``) naming ``span_id`` as the parent of the next call."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags & 0xFF:02x}"

    def child(self) -> TraceContext:
        """The same trace, with a new span id (this service's part of the trace)."""
        return TraceContext(self.trace_id, new_span_id(), self.flags)


def parse_traceparent(value: str | None) -> TraceContext | None:
    """The incoming context, or None when the header is absent or invalid (start a new trace)."""
    if value is None:
        return None
    value = value.strip(" \t")
    match = _VERSION_00.fullmatch(value)
    if match is None:
        later = _LATER_VERSION.fullmatch(value)
        if later is None or later.group(1) in ("00", "ff"):
            return None
        match = later
        trace_id, parent_id, flags = later.group(2, 3, 4)
    else:
        trace_id, parent_id, flags = match.group(1, 2, 3)
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return TraceContext(trace_id, parent_id, int(flags, 16))


def new_trace_id() -> str:
    """16 random bytes, lower-case hex, never all zero (§3.2.2.3)."""
    while True:
        value = random_hex(16)
        if value != _ZERO_TRACE:
            return value


def new_span_id() -> str:
    """8 random bytes, lower-case hex, never all zero (§3.2.2.4)."""
    while True:
        value = random_hex(8)
        if value != _ZERO_SPAN:
            return value


def new_trace(flags: int = 0) -> TraceContext:
    return TraceContext(new_trace_id(), new_span_id(), flags)
