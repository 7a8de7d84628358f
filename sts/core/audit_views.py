"""What the audit trail's queries answer, and the read port the review page uses.

The values (a page of decisions, outcome buckets, subject-to-audience edges, an
identity's summary, how far the summaries have read) are plain data; the queries
that produce them run in :class:`sts.adapters.audit_query.AuditQuery`, behind
:class:`AuditReader`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from .audit_filter import AuditFilter

#: An identity's decisions are counted up to this many (beyond, ``COUNT_CAP + 1``).
COUNT_CAP = 10_000


#: The reason a record that cannot be read as a JSON object is listed with.
UNREADABLE = "audit.record_unreadable"


def readable_record(stored: Any) -> dict[str, Any]:
    """A stored record (its JSON text, or what the driver parsed it to) as a dictionary.  One that
    is not a JSON object (a trail edited by hand) reads as an ``unreadable`` decision, so that
    every page and command still lists it rather than failing (an outside audit had the review
    pages answer 500); ``sts audit verify`` tells what changed."""
    value = stored
    if isinstance(stored, str | bytes):
        try:
            value = json.loads(stored)
        except (ValueError, RecursionError):  # nested too deeply to decode (an outside review)
            value = None
    if isinstance(value, dict):
        return dict(value)
    return {"outcome": "unreadable", "reasons": [UNREADABLE]}


def fired_signals(record: dict[str, Any]) -> list[str]:
    """Names of the risk signals that fired in a decision (``details.risk.signals``)."""
    details = record.get("details")
    risk = details.get("risk") if isinstance(details, dict) else None
    signals = risk.get("signals") if isinstance(risk, dict) else None
    if not isinstance(signals, list):
        return []
    return [
        s["name"]
        for s in signals
        if isinstance(s, dict) and s.get("fired") and isinstance(s.get("name"), str)
    ]


@dataclass(frozen=True)
class Page:
    """Decisions newest first; ``older`` is the ``before`` id of the next page, None at the end."""

    rows: list[dict[str, Any]]
    older: int | None


@dataclass(frozen=True)
class Bucket:
    start: float
    end: float
    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class Edge:
    issuer: str | None
    subject: str | None
    audience: str
    first_seen: float
    last_seen: float
    decisions: int
    new: bool


@dataclass(frozen=True)
class SummaryStatus:
    """How far summaries have read: ``behind`` records (about; ids may have gaps) are not yet in."""

    last_id: int
    newest_id: int

    @property
    def behind(self) -> int:
        return max(0, self.newest_id - self.last_id)


@dataclass(frozen=True)
class IdentitySummary:
    signals: list[dict[str, Any]] = field(default_factory=list)
    step_ups: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[dict[str, Any]] = field(default_factory=list)
    decisions: int = 0


class AuditReader(Protocol):
    """Reads over the audit trail and its summaries (:class:`sts.adapters.audit_query.AuditQuery`)."""

    #: What a failing database raises (so callers need not import the database library to catch it).
    errors: tuple[type[Exception], ...]

    def page(self, f: AuditFilter, *, limit: int = 50, before: int | None = None) -> Page: ...

    def get(self, audit_id: int) -> dict[str, Any] | None: ...

    def identity_summary(self, issuer: str, subject: str, *, limit: int = 20) -> IdentitySummary: ...

    def decisions_over_time(self, since: float, until: float, step: float) -> list[Bucket]: ...

    def top_signals(self, since: float, until: float, *, limit: int = 10) -> list[tuple[str, int]]: ...

    def edges(self, *, since: float, new_since: float, limit: int = 200) -> tuple[list[Edge], int]: ...

    def status(self) -> SummaryStatus: ...

    def refresh(self, *, budget: float | None = 0.25, batch: int = 5000) -> SummaryStatus: ...
