"""What a reviewer asks of the audit trail: one filter, shared by ``sts audit`` and the review page.

A filter is plain data: each field left ``None`` matches everything, the
fields given must all match.  Times are epoch seconds; :func:`parse_time`
reads what a person types (ISO-8601, or ``24h``-style ages relative to
``now``).  Parsing and checking happen here, once, so the command line and
the page refuse the same things with the same message; the query itself is
built by :mod:`sts.adapters.audit_query`.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields

from .risk import DEFAULT_WEIGHTS

OUTCOMES = ("granted", "refused", "error")
#: The error of a refusal that asks the workload for fresh attestation (RFC 9470 §3).
STEP_UP_ERROR = "insufficient_user_authentication"
#: The risk signals a decision can record as fired (see :mod:`sts.core.risk`).
SIGNAL_NAMES = tuple(DEFAULT_WEIGHTS)
#: Longest value accepted for a text field: the widest audit column is 512 characters.
MAX_VALUE_LENGTH = 600

#: The times a filter can name: from the epoch to the start of the year 9000.  An ISO time or an
#: age outside them is taken as the bound (no record is older or newer), so that ``--since
#: 0001-01-01`` means "from the first record" instead of a date the database cannot compare.
EARLIEST = 0.0
LATEST = dt.datetime(9000, 1, 1, tzinfo=dt.UTC).timestamp()
#: The largest record id: ``audit_events.id`` is a signed 64-bit integer.
MAX_RECORD_ID = 2**63 - 1

_RELATIVE = re.compile(r"(\d{1,6})([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class FilterError(ValueError):
    """A filter value that cannot be used; the message names the field and what is wrong."""


def parse_time(value: str, now: float, *, field: str = "time") -> float:
    """``2025-06-01``, ``2025-06-01T12:00:00Z`` (ISO-8601; no offset means UTC) or an age
    relative to ``now``: ``90s``, ``15m``, ``24h``, ``7d``, ``2w``."""
    text = value.strip()
    relative = _RELATIVE.fullmatch(text)
    if relative:
        return _bounded(now - int(relative.group(1)) * _UNIT_SECONDS[relative.group(2)])
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise FilterError(
            f"{field}: {value[:40]!r} is neither an ISO-8601 time nor an age such as 24h or 7d"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    try:
        return _bounded(parsed.timestamp())
    except (OverflowError, ValueError):  # an offset that moves 0001-01-01 or 9999-12-31 off the calendar
        return EARLIEST if parsed.year < 1970 else LATEST


def _bounded(epoch: float) -> float:
    return min(max(epoch, EARLIEST), LATEST)


def parse_record_id(value: str, *, field: str = "before") -> int:
    """A record id as typed in a query string: digits, 1 to :data:`MAX_RECORD_ID`."""
    text = value.strip()
    if not (text.isascii() and text.isdecimal()) or len(text) > 19 or not 1 <= int(text) <= MAX_RECORD_ID:
        raise FilterError(f"{field}: must be a record id (1 to {MAX_RECORD_ID})")
    return int(text)


def format_time(epoch: float) -> str:
    """ISO-8601 in UTC to the second, as the page and links show times."""
    return dt.datetime.fromtimestamp(epoch, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class AuditFilter:
    """Decisions matching every field given.

    ``issuer`` + ``subject`` name an identity (the upstream issuer's configured
    name and the token's ``sub``); ``audience`` matches a requested or granted
    audience; ``signal`` a risk signal that fired; ``since`` is inclusive,
    ``until`` exclusive.
    """

    issuer: str | None = None
    subject: str | None = None
    client_id: str | None = None
    audience: str | None = None
    outcome: str | None = None
    signal: str | None = None
    rule: str | None = None
    error: str | None = None
    since: float | None = None
    until: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str) and (not value or len(value) > MAX_VALUE_LENGTH):
                raise FilterError(f"{f.name}: must be 1 to {MAX_VALUE_LENGTH} characters")
        if self.outcome is not None and self.outcome not in OUTCOMES:
            raise FilterError(f"outcome: must be one of {', '.join(OUTCOMES)}")
        if self.signal is not None and self.signal not in SIGNAL_NAMES:
            raise FilterError(f"signal: must be one of {', '.join(SIGNAL_NAMES)}")
        for name in ("since", "until"):
            value = getattr(self, name)
            # Also refuses NaN (no comparison holds for it).
            if value is not None and not EARLIEST <= value <= LATEST:
                bounds = f"{format_time(EARLIEST)} and {format_time(LATEST)}"
                raise FilterError(f"{name}: must be between {bounds}")
        if self.since is not None and self.until is not None and self.since > self.until:
            raise FilterError("since: must not be later than until")

    @property
    def identity(self) -> tuple[str, str] | None:
        return (self.issuer, self.subject) if self.issuer is not None and self.subject is not None else None

    def as_params(self) -> dict[str, str]:
        """The filter as query parameters (times as ISO-8601), for links that keep it."""
        params: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            params[f.name] = format_time(value) if f.name in ("since", "until") else str(value)
        return params


#: The text fields of a filter, by the name they have in a query string or on the command line.
TEXT_FIELDS = ("issuer", "subject", "client_id", "audience", "outcome", "signal", "rule", "error")


def filter_from_params(params: Mapping[str, str], now: float) -> AuditFilter:
    """A filter from query parameters: empty values are ignored, unknown names are not read."""
    values: dict[str, object] = {}
    for name in TEXT_FIELDS:
        value = (params.get(name) or "").strip()
        if value:
            values[name] = value
    for name in ("since", "until"):
        value = (params.get(name) or "").strip()
        if value:
            values[name] = parse_time(value, now, field=name)
    return AuditFilter(**values)  # type: ignore[arg-type]
