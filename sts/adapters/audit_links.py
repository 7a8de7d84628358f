"""The audit trail's chained records read back, as :mod:`sts.core.audit_chain` checks them.

Each row becomes a :class:`~sts.core.audit_chain.StoredLink`: its links, its record parsed (a
repeated member name refused), and the first indexed column that differs from what the record
says.  Split from :mod:`.audit_integrity` (which verifies the trail and its checkpoints) to keep
each module readable.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterator, Mapping
from typing import Any

from sqlalchemy import Connection, Select, Text, cast, select

from ..core.audit import AuditRecord
from ..core.audit_chain import StoredLink
from .sql.group_commit import audit_row
from .sql.schema import audit_events

_FIELDS = frozenset(f.name for f in dataclasses.fields(AuditRecord))


def chained_rows(conn: Connection) -> Select[Any]:
    c = audit_events.c
    columns = [*(col for col in c if col.name != "record"), cast(c.record, Text).label("record_text")]
    if conn.dialect.name == "sqlite":
        # SQLite keeps a time as text, and queries compare the text: see _column_mismatch.
        columns.append(cast(c.time, Text).label("time_text"))
    return select(*columns).where(c.chain_id.is_not(None))


def stored_links(conn: Connection, *, batch: int = 2000, below_id: int | None = None) -> Iterator[StoredLink]:
    """Every chained record (with ``below_id``: those with a lower id), ordered by ``(chain_id,
    seq)``, streamed ``batch`` rows at a time."""
    c = audit_events.c
    query = chained_rows(conn).order_by(c.chain_id, c.seq)
    if below_id is not None:
        query = query.where(c.id < below_id)
    for row in conn.execution_options(yield_per=batch).execute(query):
        yield link_of(row)


def link_of(row: Any) -> StoredLink:
    record, problem = _parse_record(row.record_text)
    return StoredLink(
        record_id=int(row.id),
        chain_id=row.chain_id,
        seq=int(row.seq) if row.seq is not None else 0,
        prev_hash=row.prev_hash or "",
        hash=row.hash or "",
        record=record,
        column_mismatch=problem or _column_mismatch(row._mapping, record),
        text=row.record_text,
    )


def _parse_record(text: str | None) -> tuple[Any, str | None]:
    """The stored record, and what is wrong with its text (a repeated member name: two readers
    could disagree about what it says)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate member name")
        return dict(pairs)

    if text is None:
        return None, "record (empty)"
    try:
        return json.loads(text, object_pairs_hook=no_duplicates, parse_int=_integer), None
    except (ValueError, RecursionError) as exc:
        return None, f"record (not JSON: {exc})"[:120]


def _integer(literal: str) -> int | float:
    """An integer literal as the writer meant it.  The writer never stores an integer beyond 2**53
    (RFC 8785 refuses them: they become strings), but it writes an integral float of 2**53 or more
    as digits (``1e20`` as ``100000000000000000000``, JCS's number form); read back as an ``int`` it
    would not canonicalise again, and an intact record would look edited."""
    value = int(literal)
    return value if -_SAFE_INTEGER <= value <= _SAFE_INTEGER else float(value)


_SAFE_INTEGER = 2**53 - 1


def _column_mismatch(row: Mapping[Any, Any], record: Any) -> str | None:
    """The first indexed column whose value is not what the record says, or None.

    The sink fills the columns from the record (:func:`~sts.adapters.sql.group_commit.audit_row`); doing it
    again here catches a column edited alone (an ``outcome`` turned from ``refused``
    into ``granted`` changes what a query finds, not the record's hash).
    """
    if not isinstance(record, dict):
        return None  # The hash check reports it.
    try:
        expected = audit_row(AuditRecord(**{k: v for k, v in record.items() if k in _FIELDS}))
    except (TypeError, ValueError, OverflowError, AttributeError):
        return "record (not a decision record)"
    for name, value in expected.items():
        if name != "record" and not _same(row[name], value):
            return name
    text = row.get("time_text")
    if text is not None and text not in _sqlite_time_texts(expected["time"]):
        # The same instant written otherwise (another offset, a "T"): equal as times, but queries
        # by time compare the text, so such a record drops out of time-bounded views.
        return "time"
    return None


def _sqlite_time_texts(when: dt.datetime) -> tuple[str, str]:
    """The texts SQLite holds for ``when``: as the sink writes it (the driver's ``isoformat(" ")``),
    and as SQLAlchemy's SQLite ``DATETIME`` does (UTC, no offset, six-digit microseconds)."""
    naive = when.astimezone(dt.UTC).replace(tzinfo=None)
    return when.isoformat(" "), naive.strftime("%Y-%m-%d %H:%M:%S.%f")


def _same(stored: Any, expected: Any) -> bool:
    if isinstance(stored, dt.datetime) and isinstance(expected, dt.datetime):
        if stored.tzinfo is None:
            stored = stored.replace(tzinfo=dt.UTC)
        return bool(stored == expected)
    return bool(stored == expected)
