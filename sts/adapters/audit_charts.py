"""Charts and the service graph over the audit trail: decisions over time, top signals, edges.

Built on the summaries (:mod:`.audit_summaries`) so that their cost does not grow
with the number of records: hourly counts plus the records after the watermark,
the terms table for signals, the edges table for the graph.
"""

from __future__ import annotations

from sqlalchemy import Connection, func, literal, select, union_all

from ..core.audit_views import Bucket, Edge
from .audit_tables import SIGNAL, AuditTables
from .sql.schema import audit_counts, audit_edges, audit_events, audit_terms

#: Charts read at most this many unsummarised records; beyond, they count on the index instead.
_TAIL_LIMIT = 20_000


class AuditCharts(AuditTables):
    """Aggregates for the review page's charts and graph."""

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
