"""Reading the audit trail: filtered pages, export, charts, the service graph, and retention.

One class, :class:`AuditQuery`, answers both ``sts audit`` and the review page,
so they show the same thing for the same :class:`~sts.core.audit_filter.AuditFilter`.
It is put together from one module per concern:

* :mod:`.audit_tables` -- what every reader shares: records as exported, the
  facts of a decision extracted from its JSON by the database, the watermark;
* this module -- filters, pages, export and an identity's history;
* :mod:`.audit_charts` -- decisions over time, top signals, the service graph;
* :mod:`.audit_summaries` -- the summary tables of what lives inside the JSON
  record (fired signals, audiences, edges, hourly counts), and their refresh;
* :mod:`.audit_retention` -- ``sts audit prune``.

It stays fast on millions of records by never reading more rows than it shows:

* **Keyset pages by id.**  Newest first, ``id < before``; each column filter
  has an index that ends in ``id`` (see ``audit_events`` in :mod:`.sql`); a subject
  without its issuer is looked up issuer by issuer (:mod:`.sql.subject_lookup`).
* **Time bounds become id bounds.**  Records are written in about the order of
  their ``time`` (the start of the request): one is written when its request
  ends, so it can lag later ones by at most a request's duration plus clock
  skew between instances, bounded here by ``slack`` (5 minutes).  A time range
  is found on the time index in two lookups, then scanned by id; the exact
  time condition still applies, so results are exact within that bound.
* **Summaries of what lives inside the JSON record.**  A filter on a fired
  signal or an audience uses the summaries (:mod:`.audit_summaries`) for
  records up to the watermark and reads the JSON of the few records after it,
  so results are exact even when summaries lag.

The hash chains (docs/audit.md) are verified by ``sts audit verify``, not here;
retention moves their anchors as it deletes (:meth:`AuditQuery.prune`), and the
review page shows a chain status where :mod:`sts.http.review` is given one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, func, literal_column, select

from ..core.audit_filter import STEP_UP_ERROR, AuditFilter
from ..core.audit_views import COUNT_CAP, IdentitySummary, Page
from .audit_charts import AuditCharts
from .audit_retention import AuditRetention
from .audit_summaries import AuditSummaries
from .audit_tables import AUDIENCE, RECORD, SIGNAL, term_value
from .sql.group_commit import column_text
from .sql.schema import audit_events, audit_terms
from .sql.subject_lookup import subject_condition


class AuditQuery(AuditCharts, AuditSummaries, AuditRetention):
    """Queries over ``audit_events`` (and the summaries), for the CLI and the review page
    (:class:`sts.core.audit_views.AuditReader`).  Built with ``AuditQuery(engine, clock=...,
    settle=..., slack=...)`` (see :class:`~.audit_tables.AuditTables`)."""

    # -- filters ---------------------------------------------------------------------------

    def _column_conditions(self, conn: Connection, f: AuditFilter) -> list[ColumnElement[bool]] | None:
        """Conditions on columns, or None when the time range holds no record at all."""
        c = audit_events.c
        conditions: list[ColumnElement[bool]] = []
        # The sink stores these truncated and cleaned (column_text); a filter compares the same form.
        for column, value, limit in (
            (c.issuer, f.issuer, 64),
            (c.subject, f.subject if f.issuer is not None else None, 512),
            (c.client_id, f.client_id, 128),
            (c.rule, f.rule, 128),
        ):
            if value is not None:
                conditions.append(column == column_text(value, limit))
        if f.subject is not None and f.issuer is None:
            # No index on subject alone: the identity index, issuer by issuer (subject_lookup).
            conditions.append(subject_condition(conn, column_text(f.subject, 512) or ""))
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
            base = select(*RECORD).order_by(c.id.desc())
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
        found = self._rows(conn, select(*RECORD).where(c.id.in_(ids)))
        return sorted(found, key=lambda row: int(row["id"]), reverse=newest_first)

    def get(self, audit_id: int) -> dict[str, Any] | None:
        c = audit_events.c
        with self.engine.connect() as conn:
            rows = self._rows(conn, select(*RECORD).where(c.id == audit_id))
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
                    query = select(*RECORD).where(*conditions, c.id > after)
                    rows = self._rows(conn, query.order_by(c.id).limit(batch))
                elif after < watermark:
                    query = select(*RECORD).where(
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
            base = select(*RECORD).where(*who).order_by(c.id.desc()).limit(limit)
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
            signals = self._rows(conn, select(*RECORD).where(c.id.in_(ids)).order_by(c.id.desc()))
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
