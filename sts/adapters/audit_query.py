"""Reading the audit trail: filtered pages, export, charts, the service graph, and retention.

One module answers both ``sts audit`` and the review page, so they show the
same thing for the same :class:`~sts.core.audit_filter.AuditFilter`.  It
stays fast on millions of records by never reading more rows than it shows:

* **Keyset pages by id.**  Newest first, ``id < before``; each column filter
  has an index that ends in ``id`` (see ``audit_events`` in :mod:`.sql`).
* **Time bounds become id bounds.**  Records are written in about the order of
  their ``time`` (the start of the request): one is written when its request
  ends, so it can lag later ones by at most a request's duration plus clock
  skew between instances, bounded here by ``slack`` (5 minutes).  A time range
  is found on the time index in two lookups, then scanned by id; the exact
  time condition still applies, so results are exact within that bound.
* **Summaries of what lives inside the JSON record.**  Fired risk signals and
  audiences are not columns; reading the JSON of a million records takes
  seconds.  :meth:`AuditQuery.refresh` reads each new record once (in id
  order, from a watermark) into small tables: ``audit_terms`` (one row per
  fired signal and per audience of a decision), ``audit_edges`` (per
  subject-to-audience edge: first and last seen, count) and ``audit_counts``
  (decisions per hour and outcome, so charts over long windows stay cheap).  A filter on signal or
  audience uses the terms for records up to the watermark and reads the JSON
  of the few records after it, so results are exact even when summaries lag.
  On PostgreSQL, ids come from a sequence and a transaction may commit after a
  later one, so records younger than ``settle`` seconds are left for the next
  refresh; SQLite has one writer at a time, so ids are in commit order.

The hash chains (docs/audit.md) are verified by ``sts audit verify``, not here;
retention moves their anchors as it deletes (:meth:`AuditQuery.prune`), and the
review page shows a chain status where :mod:`sts.http.review` is given one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Select,
    String,
    Table,
    case,
    delete,
    func,
    literal,
    literal_column,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from ..core.audit_filter import STEP_UP_ERROR, AuditFilter
from ..core.audit_views import (
    COUNT_CAP,
    Bucket,
    Edge,
    IdentitySummary,
    Page,
    SummaryStatus,
)
from .sql.audit_sink import _text
from .sql.engines import transaction
from .sql.retention import record_prune_anchors
from .sql.schema import audit_counts, audit_edges, audit_events, audit_summary_state, audit_terms

log = logging.getLogger(__name__)

SIGNAL, AUDIENCE = "signal", "audience"
#: The columns a record is read with (see ``AuditQuery._rows``).
_RECORD = (
    audit_events.c.id,
    audit_events.c.record,
    audit_events.c.chain_id,
    audit_events.c.seq,
    audit_events.c.prev_hash,
    audit_events.c.hash,
)
_STATE = "v1"
#: How far a record's ``time`` may lag the order it was written in (request duration + clock skew).
SLACK = 300.0
_CHUNK = 400
#: Charts read at most this many unsummarised records; beyond, they count on the index instead.
_TAIL_LIMIT = 20_000


def term_value(value: str) -> str:
    """A term as stored: short printable values as they are, others as a digest (a primary key
    must stay small, and PostgreSQL refuses NUL in text)."""
    if len(value) <= 200 and value.isprintable():
        return value
    return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def _edge_key(issuer: str | None, subject: str | None, audience: str) -> str:
    raw = json.dumps([issuer, subject, audience])
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


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
class _Facts:
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
_POSTGRESQL_FACTS = (
    "(audit_events.record ->> 'time')",
    "(SELECT string_agg(s ->> 'name', chr(31)) FROM json_array_elements(CASE WHEN "
    "json_typeof(audit_events.record #> '{details,risk,signals}') = 'array' "
    "THEN audit_events.record #> '{details,risk,signals}' END) AS s WHERE s ->> 'fired' = 'true')",
    "(audit_events.record ->> 'requested_audience')",
    "(audit_events.record ->> 'requested_resource')",
    "(audit_events.record ->> 'granted_audience')",
)


class PruneAborted(Exception):
    """Records below the boundary changed while they were archived; nothing was deleted."""


@dataclass(frozen=True)
class PruneResult:
    records: int
    boundary_id: int | None
    archive: Path | None = None


class AuditQuery:
    """Queries over ``audit_events`` (and the summaries), for the CLI and the review page
    (:class:`sts.core.audit_views.AuditReader`)."""

    #: What a failing database raises (so callers need not import SQLAlchemy to catch it).
    errors: tuple[type[Exception], ...] = (SQLAlchemyError,)

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
        self.settle = settle if settle is not None else (0.0 if self.sqlite else 60.0)
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

    # -- filters ---------------------------------------------------------------------------

    def _column_conditions(self, conn: Connection, f: AuditFilter) -> list[ColumnElement[bool]] | None:
        """Conditions on columns, or None when the time range holds no record at all."""
        c = audit_events.c
        conditions: list[ColumnElement[bool]] = []
        # The sink stores these truncated and cleaned (sql._text); a filter compares the same form.
        for column, value, limit in (
            (c.issuer, f.issuer, 64),
            (c.subject, f.subject, 512),
            (c.client_id, f.client_id, 128),
            (c.rule, f.rule, 128),
        ):
            if value is not None:
                conditions.append(column == _text(value, limit))
        if f.outcome is not None:
            conditions.append(c.outcome == f.outcome)
        if f.error is not None:
            conditions.append(c.error == f.error)
        if f.since is not None or f.until is not None:
            bounds = self._id_bounds(conn, f.since, f.until)
            if bounds is None:
                return None
            low, high = bounds
            if low is not None:
                conditions.append(c.id > low)
            if high is not None:
                conditions.append(c.id < high)
            # Exact time conditions on top of the id range.  On SQLite, wrapping the column in a
            # no-op function keeps the planner on the id range (and the keyset order) rather than
            # on the time index, which would sort every record of the range.
            when: Any = func.unlikely(c.time) if self.sqlite else c.time
            if f.since is not None:
                conditions.append(when >= self._time(f.since))
            if f.until is not None:
                conditions.append(when < self._time(f.until))
        return conditions

    def _id_bounds(
        self, conn: Connection, since: float | None, until: float | None
    ) -> tuple[int | None, int | None] | None:
        """Ids outside of which no record of [since, until) can lie (see the module docstring).

        Below: the id of the latest record (by time) older than ``since - slack``; every record
        written before it started before ``since``.  Above: the id of the earliest record at or
        after ``until + slack``; every record written after it started at or after ``until``.
        """
        c = audit_events.c
        low = high = None
        if since is not None:
            low = conn.execute(
                select(c.id).where(c.time < self._time(since - self.slack)).order_by(c.time.desc()).limit(1)
            ).scalar()
        if until is not None:
            high = conn.execute(
                select(c.id).where(c.time >= self._time(until + self.slack)).order_by(c.time).limit(1)
            ).scalar()
        if low is not None and high is not None and high <= low:
            return None
        return low, high

    def _term_ids(self, kind: str, value: str) -> Select[Any]:
        return select(audit_terms.c.audit_id).where(
            audit_terms.c.kind == kind, audit_terms.c.value == term_value(value)
        )

    def _term_conditions(self, f: AuditFilter) -> list[ColumnElement[bool]]:
        conditions: list[ColumnElement[bool]] = []
        if f.signal is not None:
            conditions.append(audit_events.c.id.in_(self._term_ids(SIGNAL, f.signal)))
        if f.audience is not None:
            conditions.append(audit_events.c.id.in_(self._term_ids(AUDIENCE, f.audience)))
        return conditions

    @staticmethod
    def _needs_terms(f: AuditFilter) -> bool:
        return f.signal is not None or f.audience is not None

    # -- pages and export ------------------------------------------------------------------

    def _rows(self, conn: Connection, query: Select[Any]) -> list[dict[str, Any]]:
        """Records as exported: the audit record, its ``id``, and its link in the hash chain
        (``chain_id``, ``seq``, ``prev_hash``, ``hash``; None on records written before
        chaining), so that an archive verifies as the start of each chain (docs/audit.md)."""
        rows = []
        for audit_id, record, chain_id, seq, prev_hash, digest in conn.execute(query):
            data = dict(record) if isinstance(record, dict) else json.loads(record)
            link = {"chain_id": chain_id, "seq": seq, "prev_hash": prev_hash, "hash": digest}
            rows.append({"id": int(audit_id), **data, **link})
        return rows

    def _facts(
        self, conn: Connection, conditions: list[ColumnElement[bool]], *, newest_first: bool, limit: int
    ) -> list[_Facts]:
        c = audit_events.c
        extracted: list[ColumnElement[Any]] = [
            literal_column(e) for e in (_SQLITE_FACTS if self.sqlite else _POSTGRESQL_FACTS)
        ]
        query = select(c.id, c.outcome, c.issuer, c.subject, *extracted).where(*conditions)
        query = query.order_by(c.id.desc() if newest_first else c.id).limit(limit)
        facts = []
        for audit_id, outcome, issuer, subject, when, fired, *lists in conn.execute(query):
            requested, resources, granted = (_json_list(x) for x in lists)
            facts.append(
                _Facts(
                    id=int(audit_id),
                    time=float(when or 0),
                    outcome=str(outcome),
                    issuer=issuer,
                    subject=subject,
                    fired=tuple(str(fired).split("\x1f")) if fired else (),
                    audiences=tuple(dict.fromkeys(requested + resources + granted)),
                    granted=tuple(granted),
                )
            )
        return facts

    def page(self, f: AuditFilter, *, limit: int = 50, before: int | None = None) -> Page:
        """Up to ``limit`` decisions matching ``f`` with ``id < before``, newest first."""
        limit = max(1, min(limit, 1000))
        c = audit_events.c
        with self.engine.connect() as conn:
            conditions = self._column_conditions(conn, f)
            if conditions is None:
                return Page([], None)
            if before is not None:
                conditions.append(c.id < before)
            base = select(*_RECORD).order_by(c.id.desc())
            if not self._needs_terms(f):
                rows = self._rows(conn, base.where(*conditions).limit(limit + 1))
            else:
                watermark = self._watermark(conn)
                rows = self._tail(conn, f, conditions, watermark, limit + 1)
                if len(rows) <= limit:
                    summarised = base.where(*conditions, c.id <= watermark, *self._term_conditions(f))
                    rows += self._rows(conn, summarised.limit(limit + 1 - len(rows)))
        older = rows[limit - 1]["id"] if len(rows) > limit else None
        return Page(rows[:limit], older)

    def _tail(
        self,
        conn: Connection,
        f: AuditFilter,
        conditions: list[ColumnElement[bool]],
        watermark: int,
        wanted: int,
        *,
        newest_first: bool = True,
    ) -> list[dict[str, Any]]:
        """Records after the watermark that match ``f``, judged on facts the database extracts
        from their JSON (few records, unless summaries lag far behind: then slower, still exact)."""
        c = audit_events.c
        ids: list[int] = []
        cursor: int | None = None
        while len(ids) < wanted:
            window = [*conditions, c.id > watermark]
            if cursor is not None:
                window.append(c.id < cursor if newest_first else c.id > cursor)
            batch = self._facts(conn, window, newest_first=newest_first, limit=2000)
            if not batch:
                break
            ids += [fact.id for fact in batch if fact.matches(f)]
            cursor = batch[-1].id
        ids = ids[:wanted]
        if not ids:
            return []
        found = self._rows(conn, select(*_RECORD).where(c.id.in_(ids)))
        return sorted(found, key=lambda row: int(row["id"]), reverse=newest_first)

    def get(self, audit_id: int) -> dict[str, Any] | None:
        c = audit_events.c
        with self.engine.connect() as conn:
            rows = self._rows(conn, select(*_RECORD).where(c.id == audit_id))
        return rows[0] if rows else None

    def export(self, f: AuditFilter, *, batch: int = 1000) -> Iterator[dict[str, Any]]:
        """Every matching decision, oldest first, read in keyset batches (constant memory; no
        read transaction is held open between batches)."""
        c = audit_events.c
        after = 0
        watermark: int | None = None
        while True:
            with self.engine.connect() as conn:
                conditions = self._column_conditions(conn, f)
                if conditions is None:
                    return
                if watermark is None:
                    watermark = self._watermark(conn) if self._needs_terms(f) else 0
                if not self._needs_terms(f):
                    query = select(*_RECORD).where(*conditions, c.id > after)
                    rows = self._rows(conn, query.order_by(c.id).limit(batch))
                elif after < watermark:
                    query = select(*_RECORD).where(
                        *conditions, c.id > after, c.id <= watermark, *self._term_conditions(f)
                    )
                    rows = self._rows(conn, query.order_by(c.id).limit(batch))
                    if not rows:
                        after = watermark
                        continue
                else:
                    rows = self._tail(
                        conn, f, [*conditions, c.id > after], watermark, batch, newest_first=False
                    )
            if not rows:
                return
            yield from rows
            after = rows[-1]["id"]

    # -- identity --------------------------------------------------------------------------

    def identity_summary(self, issuer: str, subject: str, *, limit: int = 20) -> IdentitySummary:
        """An identity's recent fired signals, step-ups and issued tokens, newest first, and how
        many decisions it has (counted up to ``COUNT_CAP``: beyond, ``COUNT_CAP + 1``)."""
        c = audit_events.c
        ident = AuditFilter(issuer=issuer, subject=subject)
        with self.engine.connect() as conn:
            who = self._column_conditions(conn, ident) or []
            base = select(*_RECORD).where(*who).order_by(c.id.desc()).limit(limit)
            # The error as a literal: the partial step-up index is used only when the query names it.
            step_ups = self._rows(conn, base.where(c.error == literal_column(f"'{STEP_UP_ERROR}'")))
            tokens = self._rows(conn, base.where(c.issued_jti.is_not(None)))
            capped = select(c.id).where(*who).order_by(c.id.desc()).limit(COUNT_CAP + 1).subquery()
            decisions = conn.execute(select(func.count()).select_from(capped)).scalar() or 0
            watermark = self._watermark(conn)
            recent = self._facts(conn, [*who, c.id > watermark], newest_first=True, limit=5000)
            ids = [fact.id for fact in recent if fact.fired][:limit]
            if len(ids) < limit:
                ids += self._signalled(conn, [*who, c.id <= watermark], limit - len(ids))
            signals = self._rows(conn, select(*_RECORD).where(c.id.in_(ids)).order_by(c.id.desc()))
        return IdentitySummary(signals, step_ups, tokens, int(decisions))

    def _signalled(self, conn: Connection, who: list[ColumnElement[bool]], limit: int) -> list[int]:
        """Ids of the newest summarised records matching ``who`` in which a signal fired, looked
        for among the newest ``COUNT_CAP`` of them, 2,000 at a time: a bounded cost however many
        records the identity has and however the planner would join the two tables."""
        c, t = audit_events.c, audit_terms.c
        found: list[int] = []
        before: int | None = None
        for _ in range(COUNT_CAP // 2000):
            query = select(c.id).where(*who)
            if before is not None:
                query = query.where(c.id < before)
            ids = [int(r[0]) for r in conn.execute(query.order_by(c.id.desc()).limit(2000))]
            if not ids:
                break
            hits = {
                int(r[0])
                for r in conn.execute(select(t.audit_id).where(t.kind == SIGNAL, t.audit_id.in_(ids)))
            }
            found += [i for i in ids if i in hits]
            if len(found) >= limit:
                break
            before = ids[-1]
        return found[:limit]

    # -- charts and graph ------------------------------------------------------------------

    def decisions_over_time(self, since: float, until: float, step: float) -> list[Bucket]:
        """Decisions per outcome in buckets of ``step`` seconds (aligned to UTC) covering
        [since, until).

        With whole-hour buckets, from the hourly counts of the summaries plus the records
        after the watermark (so the cost does not grow with the number of records); with
        smaller buckets, or while summaries lag far behind, one grouped count per bucket on
        the (time, outcome) index.
        """
        start = since - since % step
        edges: list[tuple[float, float]] = []
        while start < until and len(edges) < 400:
            edges.append((start, start + step))
            start += step
        if not edges:
            return []
        counts: dict[int, dict[str, int]] = {i: {} for i in range(len(edges))}
        with self.engine.connect() as conn:
            if step % 3600 or not self._hourly(conn, edges, step, counts):
                self._counted(conn, edges, counts)
        return [Bucket(a, b, counts[i]) for i, (a, b) in enumerate(edges)]

    def _counted(
        self, conn: Connection, edges: list[tuple[float, float]], counts: dict[int, dict[str, int]]
    ) -> None:
        c = audit_events.c
        parts = [
            select(literal(i).label("bucket"), c.outcome, func.count().label("n"))
            .where(c.time >= self._time(a), c.time < self._time(b))
            .group_by(c.outcome)
            for i, (a, b) in enumerate(edges)
        ]
        for chunk in range(0, len(parts), 100):
            for bucket, outcome, n in conn.execute(union_all(*parts[chunk : chunk + 100])):
                counts[int(bucket)][str(outcome)] = int(n)

    def _hourly(
        self,
        conn: Connection,
        edges: list[tuple[float, float]],
        step: float,
        counts: dict[int, dict[str, int]],
    ) -> bool:
        """Fill ``counts`` from the hourly summary and the unsummarised tail; False (nothing
        filled) when the tail is too long to read quickly."""
        watermark = self._watermark(conn)
        tail = self._facts(conn, [audit_events.c.id > watermark], newest_first=False, limit=_TAIL_LIMIT + 1)
        if len(tail) > _TAIL_LIMIT:
            return False
        first, last = edges[0][0], edges[-1][1]

        def add(moment: float, outcome: str, n: int) -> None:
            if first <= moment < last:
                bucket = counts[int((moment - first) // step)]
                bucket[outcome] = bucket.get(outcome, 0) + n

        h = audit_counts.c
        query = select(h.hour, h.outcome, h.decisions).where(h.hour >= int(first), h.hour < int(last))
        for hour, outcome, n in conn.execute(query):
            add(float(hour), str(outcome), int(n))
        for fact in tail:
            add(fact.time, fact.outcome, 1)
        return True

    def top_signals(self, since: float, until: float, *, limit: int = 10) -> list[tuple[str, int]]:
        """The risk signals that fired most in [since, until) (summarised records)."""
        t = audit_terms.c
        query = (
            select(t.value, func.count().label("n"))
            .where(t.kind == SIGNAL, t.time >= since, t.time < until)
            .group_by(t.value)
            .order_by(func.count().desc(), t.value)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [(str(name), int(n)) for name, n in conn.execute(query)]

    def edges(self, *, since: float, new_since: float, limit: int = 200) -> tuple[list[Edge], int]:
        """Subject-to-audience edges of grants seen since ``since``, and how many there are.

        ``new`` marks an edge first seen at or after ``new_since``.  New edges come first (up
        to half of ``limit``, newest first), then the busiest.  First sightings are those of
        the summarised records; retention removes an edge only once it is unused for longer
        than what it keeps, so an edge in use keeps its first sighting.
        """
        e = audit_edges.c
        recent = e.last_seen >= since
        new_query = select(audit_edges).where(recent, e.first_seen >= new_since)
        new_query = new_query.order_by(e.first_seen.desc(), e.edge)
        busy_query = select(audit_edges).where(recent).order_by(e.decisions.desc(), e.edge).limit(limit)
        with self.engine.connect() as conn:
            chosen = {r.edge: r for r in conn.execute(new_query.limit(max(1, limit // 2)))}
            for r in conn.execute(busy_query):
                if len(chosen) >= limit:
                    break
                chosen.setdefault(r.edge, r)
            total = conn.execute(select(func.count()).select_from(audit_edges).where(recent)).scalar()
        edges = [
            Edge(
                r.issuer,
                r.subject,
                r.audience,
                r.first_seen,
                r.last_seen,
                int(r.decisions),
                r.first_seen >= new_since,
            )
            for r in chosen.values()
        ]
        return edges, int(total or 0)

    # -- summaries -------------------------------------------------------------------------

    def _watermark(self, conn: Connection) -> int:
        value = conn.execute(
            select(audit_summary_state.c.last_id).where(audit_summary_state.c.name == _STATE)
        ).scalar()
        return int(value or 0)

    def status(self) -> SummaryStatus:
        with self.engine.connect() as conn:
            newest = conn.execute(select(func.max(audit_events.c.id))).scalar() or 0
            return SummaryStatus(self._watermark(conn), int(newest))

    def refresh(self, *, budget: float | None = 0.25, batch: int = 5000) -> SummaryStatus:
        """Summarise records after the watermark, in id order, for about ``budget`` seconds
        (None: until caught up).  Safe to run from many processes at once: each batch moves the
        watermark only from the value it read, so a batch another process summarised first is
        dropped, never counted twice."""
        deadline = None if budget is None else time.monotonic() + budget
        c = audit_events.c
        while True:
            with self.engine.connect() as conn:
                last = self._watermark(conn)
                facts = self._facts(conn, [c.id > last], newest_first=False, limit=batch)
            ready = facts
            if self.settle:
                horizon = self.clock() - self.settle
                cut = next((i for i, fact in enumerate(facts) if fact.time > horizon), None)
                ready = facts if cut is None else facts[:cut]
            if not ready or not self._summarise(last, ready):
                break
            if len(ready) < batch or (deadline is not None and time.monotonic() > deadline):
                break
        return self.status()

    def _summarise(self, last: int, facts: list[_Facts]) -> bool:
        terms: dict[tuple[str, str, int], float] = {}
        edges: dict[str, dict[str, Any]] = {}
        hourly: dict[tuple[int, str], int] = {}
        for fact in facts:
            hour = (int(fact.time) // 3600 * 3600, fact.outcome)
            hourly[hour] = hourly.get(hour, 0) + 1
            for name in fact.fired:
                terms[(SIGNAL, term_value(name), fact.id)] = fact.time
            for audience in fact.audiences:
                terms[(AUDIENCE, term_value(audience), fact.id)] = fact.time
            if fact.outcome != "granted":
                continue
            for audience in fact.granted:
                key = _edge_key(fact.issuer, fact.subject, audience)
                edge = edges.get(key)
                if edge is None:
                    edges[key] = edge = {"edge": key, "issuer": fact.issuer, "subject": fact.subject,
                                         "audience": _text(audience, 512), "first_seen": fact.time,
                                         "last_seen": fact.time, "decisions": 0}  # fmt: skip
                edge["first_seen"] = min(edge["first_seen"], fact.time)
                edge["last_seen"] = max(edge["last_seen"], fact.time)
                edge["decisions"] += 1
        new_last = facts[-1].id

        def work(conn: Connection) -> bool:
            state = audit_summary_state.c
            moved = conn.execute(
                update(audit_summary_state)
                .where(state.name == _STATE, state.last_id == last)
                .values(last_id=new_last)
            ).rowcount
            if moved == 0:
                if last != 0 or self._watermark(conn) != 0:
                    return False  # another process summarised this batch first
                first = self._insert(audit_summary_state).values(name=_STATE, last_id=new_last)
                if conn.execute(first.on_conflict_do_nothing(index_elements=["name"])).rowcount == 0:
                    return False
            term_rows = [{"kind": k, "value": v, "audit_id": i, "time": t} for (k, v, i), t in terms.items()]
            # executemany of one statement: compiled once, and batched by the driver.
            if term_rows:
                conn.execute(self._insert(audit_terms).on_conflict_do_nothing(), term_rows)
            stmt = self._insert(audit_counts)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["hour", "outcome"],
                    set_={"decisions": audit_counts.c.decisions + stmt.excluded.decisions},
                ),
                [{"hour": h, "outcome": o, "decisions": n} for (h, o), n in hourly.items()],
            )
            if edges:
                stmt = self._insert(audit_edges)
                old, new = audit_edges.c, stmt.excluded
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=["edge"],
                        set_={
                            "first_seen": case((new.first_seen < old.first_seen, new.first_seen),
                                               else_=old.first_seen),
                            "last_seen": case((new.last_seen > old.last_seen, new.last_seen),
                                              else_=old.last_seen),
                            "decisions": old.decisions + new.decisions,
                        },
                    ),
                    list(edges.values()),
                )  # fmt: skip
            return True

        return bool(transaction(self.engine, work))

    def _insert(self, table: Table) -> Any:
        return sqlite.insert(table) if self.sqlite else postgresql.insert(table)

    # -- retention -------------------------------------------------------------------------

    def prune_boundary(self, cutoff: float) -> tuple[int, int]:
        """``(count, boundary)``: records with ``id < boundary`` are all older than ``cutoff``
        (boundary is the smallest id of any record at or after it), and their count."""
        c = audit_events.c
        with self.engine.connect() as conn:
            if self.sqlite:
                # ``+id`` keeps SQLite from answering min(id) by walking the table from its start.
                boundary = conn.execute(
                    select(func.min(c.id + 0)).where(c.time >= self._time(cutoff))
                ).scalar()
            else:
                boundary = conn.execute(select(func.min(c.id)).where(c.time >= self._time(cutoff))).scalar()
            if boundary is None:
                boundary = (conn.execute(select(func.max(c.id))).scalar() or 0) + 1
            count = conn.execute(
                select(func.count()).select_from(audit_events).where(c.id < boundary)
            ).scalar()
        return int(count or 0), int(boundary)

    def prune(
        self, *, cutoff: float, archive: Path | None = None, dry_run: bool = False, batch: int = 5000
    ) -> PruneResult:
        """Remove the records older than ``cutoff``: a contiguous oldest prefix in id order.

        Only ids below the smallest id of any record at or after ``cutoff`` go, so what
        remains is always a contiguous run of ids (a record older than the cutoff that was
        written after a newer one stays until a later prune).  Within a hash chain ids grow
        with ``seq``, so this removes each chain's oldest records; each batch moves the chains'
        anchors past what it removes (:func:`sql.record_prune_anchors`), so what remains
        verifies from there (docs/audit.md, Retention).  The whole range is checked first:
        when it is not the oldest run of some chain (the trail is damaged already),
        :class:`sql.PruneWouldBreakChain` is raised and nothing is deleted.

        With ``archive``, every record to remove is first written to that file as JSON lines
        (the export format, with each record's chain link), flushed and fsynced with its
        directory, before anything is deleted.  Deletion runs oldest first, ``batch`` records
        per transaction, so a crash leaves a shorter prefix removed, never a hole.  Records
        still being written cannot fall below the boundary: it is at least a day old (the
        CLI refuses less).
        """
        count, boundary = self.prune_boundary(cutoff)
        if dry_run or count == 0:
            return PruneResult(count, boundary, None)
        with self.engine.connect() as conn, conn.begin() as checking:
            # The anchors the whole prune would set, computed and thrown away: a refusal now
            # leaves everything in place.
            record_prune_anchors(conn, boundary, self.clock())
            checking.rollback()
        if archive is not None:
            written = self._archive(archive, boundary)
            again, _ = self.prune_boundary(cutoff)
            if written != count or again != count:
                # Never delete a record the archive does not hold.
                raise PruneAborted(f"{count} records to archive, {written} archived, {again} now")
        c = audit_events.c
        removed = 0
        while True:
            with self.engine.connect() as conn:
                oldest = conn.execute(select(func.min(c.id))).scalar()
            if oldest is None or oldest >= boundary:
                break
            upper = min(boundary, int(oldest) + batch)

            def work(conn: Connection, upper: int = upper) -> int:
                # Each hash chain's anchor moves to the last record removed, in the same transaction
                # (docs/audit.md, Retention); a chain whose oldest run this is not refuses the batch.
                record_prune_anchors(conn, upper, self.clock())
                conn.execute(delete(audit_terms).where(audit_terms.c.audit_id < upper))
                return int(conn.execute(delete(audit_events).where(c.id < upper)).rowcount or 0)

            removed += transaction(self.engine, work)

        def forget(conn: Connection) -> None:
            # Edges unused since the cutoff, and hours that ended before it.
            conn.execute(delete(audit_edges).where(audit_edges.c.last_seen < cutoff))
            conn.execute(delete(audit_counts).where(audit_counts.c.hour <= int(cutoff) - 3600))

        transaction(self.engine, forget)
        return PruneResult(removed, boundary, archive)

    def _archive(self, path: Path, boundary: int) -> int:
        """Write records with ``id < boundary`` to a new file (mode 0600), then fsync it and its
        directory.  An existing file is never overwritten; a failed write removes the file."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        written = 0
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                for row in self.export(AuditFilter(), batch=1000):
                    if row["id"] >= boundary:
                        break
                    out.write(json.dumps(row, sort_keys=True, default=str) + "\n")
                    written += 1
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return written


def _chunks(rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(rows), _CHUNK):
        yield rows[start : start + _CHUNK]
