"""Summaries of what lives inside the JSON record, kept up to date from a watermark.

Fired risk signals and audiences are not columns; reading the JSON of a million
records takes seconds.  :meth:`AuditSummaries.refresh` reads each new record once
(in id order, from a watermark) into small tables: ``audit_terms`` (one row per
fired signal and per audience of a decision), ``audit_edges`` (per
subject-to-audience edge: first and last seen, count) and ``audit_counts``
(decisions per hour and outcome, so charts over long windows stay cheap).  A
filter on signal or audience uses the terms for records up to the watermark and
reads the JSON of the few records after it (:mod:`.audit_query`), so results are
exact even when summaries lag.  On PostgreSQL, ids come from a sequence and a
transaction may commit after a later one, so records younger than ``settle``
seconds are left for the next refresh; SQLite has one writer at a time, so ids
are in commit order.  A record's ``time`` is its request's start, which may be up to
:data:`~.audit_tables.SLACK` before it is written: a slow request's record written after
another's id was drawn would pass for settled at once, move the watermark past that id
before it commits, and leave it out of the summaries for good (an outside review of the
summary check): so PostgreSQL's ``settle`` is ``SLACK`` and a minute more.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from sqlalchemy import Connection, case, delete, func, select, update

from ..core.audit_views import SummaryStatus
from .audit_tables import AUDIENCE, SIGNAL, SUMMARY_STATE, AuditTables, DecisionFacts, term_value
from .sql.engines import transaction
from .sql.group_commit import column_text
from .sql.schema import audit_counts, audit_edges, audit_events, audit_summary_state, audit_terms


def edge_key(issuer: str | None, subject: str | None, audience: str) -> str:
    raw = json.dumps([issuer, subject, audience])
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


Terms = dict[tuple[str, str, int], float]
Edges = dict[str, dict[str, Any]]
Hourly = dict[tuple[int, str], int]


def aggregate(facts: list[DecisionFacts]) -> tuple[Terms, Edges, Hourly]:
    """What ``facts`` add to the summaries: their terms (kind, value, record id: time), their
    subject-to-audience edges (by key: the row, first and last seen within ``facts`` and how
    many grants), and their decisions per hour and outcome.  :mod:`.audit_summary_check` compares
    the tables with what the records themselves say through this same function."""
    terms: Terms = {}
    edges: Edges = {}
    hourly: Hourly = {}
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
            key = edge_key(fact.issuer, fact.subject, audience)
            edge = edges.get(key)
            if edge is None:
                edges[key] = edge = {"edge": key, "issuer": fact.issuer, "subject": fact.subject,
                                     "audience": column_text(audience, 512), "first_seen": fact.time,
                                     "last_seen": fact.time, "decisions": 0}  # fmt: skip
            edge["first_seen"] = min(edge["first_seen"], fact.time)
            edge["last_seen"] = max(edge["last_seen"], fact.time)
            edge["decisions"] += 1
    return terms, edges, hourly


class AuditSummaries(AuditTables):
    """Keeps ``audit_terms``, ``audit_edges`` and ``audit_counts`` up to date."""

    def status(self) -> SummaryStatus:
        with self.engine.connect() as conn:
            newest = conn.execute(select(func.max(audit_events.c.id))).scalar() or 0
            return SummaryStatus(self._watermark(conn), int(newest))

    def forget_summaries(self) -> None:
        """Delete every summary and the watermark, in one transaction, so that :meth:`refresh` makes
        them again from the records.  A refresh running elsewhere meanwhile finds the watermark
        gone and drops its batch (see :meth:`refresh`)."""

        def work(conn: Connection) -> None:
            for table in (audit_summary_state, audit_terms, audit_edges, audit_counts):
                conn.execute(delete(table))

        transaction(self.engine, work)

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

    def _summarise(self, last: int, facts: list[DecisionFacts]) -> bool:
        terms, edges, hourly = aggregate(facts)
        new_last = facts[-1].id

        def work(conn: Connection) -> bool:
            state = audit_summary_state.c
            moved = conn.execute(
                update(audit_summary_state)
                .where(state.name == SUMMARY_STATE, state.last_id == last)
                .values(last_id=new_last)
            ).rowcount
            if moved == 0:
                if last != 0 or self._watermark(conn) != 0:
                    return False  # another process summarised this batch first
                first = self._insert(audit_summary_state).values(name=SUMMARY_STATE, last_id=new_last)
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
