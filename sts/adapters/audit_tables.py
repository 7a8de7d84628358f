"""The audit tables as their readers see them: records, facts read from their JSON, the watermark.

:class:`AuditTables` is what every reader of the audit trail shares (pages and export in
:mod:`.audit_query`, charts in :mod:`.audit_charts`, summaries in :mod:`.audit_summaries`,
retention in :mod:`.audit_retention`): the engine and its dialect, stored values, records as
exported, and the few facts of a decision that reviewers filter by, extracted by the database.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Select,
    String,
    Table,
    literal,
    literal_column,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from ..core.audit_filter import AuditFilter
from ..core.audit_views import readable_record
from .sql.schema import STORED_RECORD, audit_events, audit_summary_state

SIGNAL, AUDIENCE = "signal", "audience"
#: The columns a record is read with (see ``AuditTables._rows``).
RECORD = (
    audit_events.c.id,
    STORED_RECORD.label("record"),
    audit_events.c.chain_id,
    audit_events.c.seq,
    audit_events.c.prev_hash,
    audit_events.c.hash,
)
#: The name of the summaries' watermark row in ``audit_summary_state``.
SUMMARY_STATE = "v1"
#: How far a record's ``time`` may lag the order it was written in (request duration + clock skew).
SLACK = 300.0


def term_value(value: str) -> str:
    """A term as stored: short printable values as they are, others as a digest (a primary key
    must stay small, and PostgreSQL refuses NUL in text)."""
    if len(value) <= 200 and value.isprintable():
        return value
    return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def _seconds(value: Any) -> float:
    """A record's ``time`` as read from its JSON; 0 for one that is not a number (edited by hand)."""
    try:
        seconds = float(value or 0)
    except (TypeError, ValueError):
        return 0.0
    return seconds if math.isfinite(seconds) else 0.0


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _json_list(text: Any) -> list[str]:
    if isinstance(text, list):
        return _strings(text)
    if not isinstance(text, str) or not text:
        return []
    try:
        return _strings(json.loads(text))
    except ValueError:
        return []


@dataclass(frozen=True)
class DecisionFacts:
    """What a decision's JSON says that reviewers filter by, read without parsing the whole record."""

    id: int
    time: float
    outcome: str
    issuer: str | None
    subject: str | None
    fired: tuple[str, ...]
    audiences: tuple[str, ...]
    granted: tuple[str, ...]

    def matches(self, f: AuditFilter) -> bool:
        if f.signal is not None and f.signal not in self.fired:
            return False
        return f.audience is None or f.audience in self.audiences


# The fired signals' names (joined by the unit separator) and the audience lists as JSON text,
# extracted by the database: parsing each whole record in Python costs ten times more.
_SQLITE_FACTS = (
    "json_extract(audit_events.record, '$.time')",
    "(SELECT group_concat(json_extract(s.value, '$.name'), char(31)) "
    "FROM json_each(audit_events.record, '$.details.risk.signals') AS s "
    "WHERE json_extract(s.value, '$.fired') = 1)",
    "json_extract(audit_events.record, '$.requested_audience')",
    "json_extract(audit_events.record, '$.requested_resource')",
    "json_extract(audit_events.record, '$.granted_audience')",
)
#: The same, for a trail holding a record that is not JSON, or a signal that is no object (edited by
#: hand): SQLite's JSON functions fail on either, so each reads it as NULL (a second try only, as
#: ``json_valid`` parses each record again).  (An item that is a string made the summaries and every
#: filter by signal fail on each run: an outside audit.)
_SQLITE_GUARDED_FACTS = tuple(
    e.replace(
        "json_each(audit_events.record, '$.details.risk.signals')",
        "json_each(CASE WHEN json_valid(audit_events.record) AND json_type(audit_events.record,"
        " '$.details.risk.signals') = 'array' THEN audit_events.record END, '$.details.risk.signals')",
    )
    .replace("audit_events.record", "CASE WHEN json_valid(audit_events.record) THEN audit_events.record END")
    .replace("json_extract(s.value,", "json_extract(CASE WHEN s.type = 'object' THEN s.value END,")
    for e in _SQLITE_FACTS
)
_POSTGRESQL_FACTS = (
    "(audit_events.record ->> 'time')",
    "(SELECT string_agg(s ->> 'name', chr(31)) FROM json_array_elements(CASE WHEN "
    "json_typeof(audit_events.record #> '{details,risk,signals}') = 'array' "
    "THEN audit_events.record #> '{details,risk,signals}' END) AS s WHERE s ->> 'fired' = 'true')",
    "(audit_events.record ->> 'requested_audience')",
    "(audit_events.record ->> 'requested_resource')",
    "(audit_events.record ->> 'granted_audience')",
)


class AuditTables:
    """The engine, its dialect, and reads every query over ``audit_events`` shares.

    ``clock`` gives the time; ``settle`` is how young a record may be and still be left for the
    next summary refresh (PostgreSQL: :data:`SLACK` + 60 s, SQLite: 0, see :mod:`.audit_summaries`);
    ``slack``
    is how far a record's ``time`` may lag the order it was written in (see :mod:`.audit_query`).
    """

    #: What a failing database raises (so callers need not import SQLAlchemy to catch it).
    #: What reading the trail may raise: the database's errors, and what a record edited by hand
    #: into something the service never writes makes the readers raise (the review page answers
    #: "cannot be read" for each, never a 500; ``sts audit verify`` tells what changed).
    errors: tuple[type[Exception], ...] = (SQLAlchemyError, ValueError, TypeError, OverflowError)

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], float] = time.time,
        settle: float | None = None,
        slack: float = SLACK,
    ) -> None:
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        self.clock = clock
        self.settle = settle if settle is not None else (0.0 if self.sqlite else SLACK + 60.0)
        self.slack = slack

    # -- values as stored ------------------------------------------------------------------

    def _time(self, epoch: float) -> Any:
        """A bound time comparable with the stored column.

        The audit sink writes through the DBAPI, where SQLite's adapter stores
        ``datetime.isoformat(" ")`` (``2025-06-01 12:00:00.250000+00:00``); SQLAlchemy's own
        SQLite format differs, so on SQLite the same string is bound (it sorts in time order).
        """
        moment = dt.datetime.fromtimestamp(epoch, tz=dt.UTC)
        if self.sqlite:
            return literal(moment.isoformat(" "), String())
        return moment

    # -- records and facts -----------------------------------------------------------------

    def _rows(self, conn: Connection, query: Select[Any]) -> list[dict[str, Any]]:
        """Records as exported: the audit record, its ``id``, and its link in the hash chain
        (``chain_id``, ``seq``, ``prev_hash``, ``hash``; None on records written before
        chaining), so that an archive verifies as the start of each chain (docs/audit.md)."""
        rows = []
        for audit_id, record, chain_id, seq, prev_hash, digest in conn.execute(query):
            data = readable_record(record)
            link = {"chain_id": chain_id, "seq": seq, "prev_hash": prev_hash, "hash": digest}
            rows.append({"id": int(audit_id), **data, **link})
        return rows

    def _facts(
        self, conn: Connection, conditions: list[ColumnElement[bool]], *, newest_first: bool, limit: int
    ) -> list[DecisionFacts]:
        c = audit_events.c

        def query(expressions: tuple[str, ...]) -> Select[Any]:
            extracted: list[ColumnElement[Any]] = [literal_column(e) for e in expressions]
            chosen = select(c.id, c.outcome, c.issuer, c.subject, *extracted).where(*conditions)
            return chosen.order_by(c.id.desc() if newest_first else c.id).limit(limit)

        if not self.sqlite:
            rows = conn.execute(query(_POSTGRESQL_FACTS)).all()
        else:
            try:
                rows = conn.execute(query(_SQLITE_FACTS)).all()
            except OperationalError as exc:
                if "malformed JSON" not in str(exc):
                    raise
                rows = conn.execute(query(_SQLITE_GUARDED_FACTS)).all()
        facts = []
        for audit_id, outcome, issuer, subject, when, fired, *lists in rows:
            requested, resources, granted = (_json_list(x) for x in lists)
            facts.append(
                DecisionFacts(
                    id=int(audit_id),
                    time=_seconds(when),
                    outcome=str(outcome),
                    issuer=issuer,
                    subject=subject,
                    fired=tuple(str(fired).split("\x1f")) if fired else (),
                    audiences=tuple(dict.fromkeys(requested + resources + granted)),
                    granted=tuple(granted),
                )
            )
        return facts

    def _watermark(self, conn: Connection) -> int:
        value = conn.execute(
            select(audit_summary_state.c.last_id).where(audit_summary_state.c.name == SUMMARY_STATE)
        ).scalar()
        return int(value or 0)

    def _insert(self, table: Table) -> Any:
        return sqlite.insert(table) if self.sqlite else postgresql.insert(table)
