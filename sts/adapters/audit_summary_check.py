"""Whether the summary tables say what the records say.

The hash chains cover the records (``audit_events``), not the summaries read from them
(:mod:`.audit_summaries`): ``audit_terms``, ``audit_edges``, ``audit_counts`` and the watermark
in ``audit_summary_state``.  Those drive the review page's charts, its service graph and its
*new* edges, and the ``signal``/``audience`` filters of the timeline and of ``sts audit query``.
Someone who can write to the database could blind them and leave every record, and so every
chain, intact (an outside audit moved the watermark past the newest record: every later
decision left the charts, the graph and the filters, while the page said *verified*).

:meth:`SummaryCheck.check` summarises the records again, with the same function the summaries
are kept with (:func:`.audit_summaries.aggregate`), and compares:

- the watermark is at most the newest record's id;
- each record up to the watermark has exactly its terms (signal and audience, with its time);
- each edge a granted record up to the watermark makes is there, first seen no later and last seen
  no earlier than the record, with at least as many grants;
- each hour's count of decisions by outcome is the number of records of that hour up to the
  watermark, for every hour whose records are all in the part checked; over the whole trail, the
  hours before too (see :func:`_count_problems`).

Over the whole trail (``sts audit verify``) it also finds edges and counts that no record
accounts for, and, while nothing has been pruned (every chain still starts at its genesis, and
every record written before chaining is still there: :func:`_pruned`), edges first seen
earlier, or holding more grants, than their records say.  Retention deletes records but keeps
the edges and counts they made until the edge or the hour is past its cutoff: once something
was pruned, an edge may rightly be older and bigger than its records.  The review page checks
the newest records only, as it verifies their chains, in a fraction of a second.
"""

from __future__ import annotations

from sqlalchemy import Connection, func, select

from ..core.audit_filter import format_time
from .audit_integrity import chain_starts, snapshot
from .audit_summaries import Edges, Hourly, Terms, aggregate
from .audit_tables import AuditTables, DecisionFacts
from .audit_unchained import trail_facts
from .sql.schema import audit_counts, audit_edges, audit_events, audit_terms, audit_trail

#: Seconds two stored times may differ by and be the same time (a float through a REAL column).
_SAME_TIME = 1e-3
#: How many problems are reported: the first ones say what happened.
MAX_PROBLEMS = 20


class SummaryCheck(AuditTables):
    """See the module docstring."""

    def check(self, newest: int | None = None, *, batch: int = 5000) -> list[str]:
        """What the summaries say that the records do not, for the newest ``newest`` records
        (None: the whole trail); at most :data:`MAX_PROBLEMS`, empty when they agree."""
        c = audit_events.c
        problems: list[str] = []
        with snapshot(self.engine) as conn:
            top = conn.execute(select(func.max(c.id))).scalar()
            if top is None:
                return []
            watermark = self._watermark(conn)
            if watermark > int(top):
                problems.append(
                    f"summaries claim records up to id {watermark}, the newest record is {top} "
                    "(the records after it would never be summarised)"
                )
                return problems
            oldest = int(conn.execute(select(func.min(c.id))).scalar() or 0)
            lowest = oldest
            if newest is not None:
                nth = select(c.id).order_by(c.id.desc()).offset(newest - 1).limit(1)
                start = conn.execute(nth).scalar()
                lowest = max(lowest, int(start)) if start is not None else lowest
            whole = newest is None or lowest == oldest
            edges: Edges = {}
            hourly: Hourly = {}
            first_hour: int | None = None
            oldest_time: float | None = None
            after = lowest - 1
            while after < watermark and len(problems) < MAX_PROBLEMS:
                span = [c.id > after, c.id <= watermark]
                facts = self._facts(conn, span, newest_first=False, limit=batch)
                if not facts:
                    break
                terms, found_edges, found_hourly = aggregate(facts)
                problems += self._terms(conn, facts, terms)
                _merge_edges(edges, found_edges)
                for key, count in found_hourly.items():
                    hourly[key] = hourly.get(key, 0) + count
                if first_hour is None:
                    # Records before the part checked (or pruned) may be up to ``slack`` later than
                    # its first: the hours that may hold them are not compared.
                    first_hour = int(facts[0].time + self.slack) // 3600 * 3600
                    oldest_time = facts[0].time if facts[0].id == oldest else None
                after = facts[-1].id
            if first_hour is not None and len(problems) < MAX_PROBLEMS:
                pruned = _pruned(conn)
                pruned_before, wrong = _pruned_before(conn, oldest, oldest_time) if whole else (None, [])
                problems += wrong
                problems += _edge_problems(conn, edges, exact=whole and not pruned)
                problems += _count_problems(
                    conn, hourly, first_hour, every=whole, pruned=pruned, pruned_before=pruned_before
                )
        return problems[:MAX_PROBLEMS]

    @staticmethod
    def _terms(conn: Connection, facts: list[DecisionFacts], expected: Terms) -> list[str]:
        t = audit_terms.c
        rows = conn.execute(
            select(t.kind, t.value, t.audit_id, t.time).where(
                t.audit_id >= facts[0].id, t.audit_id <= facts[-1].id
            )
        ).all()
        stored = {(str(kind), str(value), int(audit_id)): float(when) for kind, value, audit_id, when in rows}
        problems = []
        for key in sorted(expected.keys() - stored.keys(), key=lambda k: k[2]):
            problems.append(f"record {key[2]}: its {key[0]} {key[1]!r} is not in the summaries")
        for key in sorted(stored.keys() - expected.keys(), key=lambda k: k[2]):
            problems.append(f"record {key[2]}: the summaries give it the {key[0]} {key[1]!r}, not on record")
        for key in sorted(expected.keys() & stored.keys(), key=lambda k: k[2]):
            if abs(expected[key] - stored[key]) > _SAME_TIME:
                problems.append(f"record {key[2]}: its {key[0]} {key[1]!r} is summarised at another time")
        return problems


def _pruned(conn: Connection) -> bool:
    """Whether records were removed: a chain's anchor moved, or fewer records written before
    chaining are left than ``audit_trail`` counted (revision 0011; a checkpoint signs the count).

    Not what ``audit_trail.pruned_below`` or ``pruned_before`` say: an outside audit set them on a
    trail never pruned, nothing deleted, and the oldest hours' counts were compared no more (the
    oldest hour's refusals zeroed unseen).  A prune of nothing moves no anchor either."""
    if any(chain.anchor_seq > 0 for chain in chain_starts(conn)):
        return True
    facts = trail_facts(conn)
    if facts is None or facts.prechain_highest_id is None:
        return False
    c = audit_events.c
    left = conn.execute(
        select(func.count()).where(c.chain_id.is_(None), c.id <= facts.prechain_highest_id)
    ).scalar()
    return int(left or 0) < facts.prechain_records


def _pruned_before(
    conn: Connection, oldest: int, oldest_time: float | None
) -> tuple[float | None, list[str]]:
    """The newest prune's cutoff time (``audit_trail.pruned_before``) where it can be one, and the
    problem found when it cannot.

    A prune removes the records below the first one at or after its cutoff, which stays (a later
    prune with an earlier cutoff removes nothing more; after a prune of every record the next
    ones come later): the oldest record left (``oldest``, from ``oldest_time``) is never older
    than the cutoff.  When it is, the cutoff was set by hand (an outside audit set it to now, so
    that the oldest hours' counts could be zeroed): reported, and not used.
    """
    before = conn.execute(select(audit_trail.c.pruned_before)).scalar()
    if before is None:
        return None, []
    if oldest_time is None or oldest_time >= float(before) - _SAME_TIME:
        return float(before), []
    problem = (
        f"audit_trail says the newest prune cut at {format_time(float(before))}, yet the oldest record "
        f"left (id {oldest}) is from {format_time(oldest_time)}, before it: not what a prune does (edited)"
    )
    return None, [problem]


def _merge_edges(into: Edges, found: Edges) -> None:
    for key, edge in found.items():
        kept = into.get(key)
        if kept is None:
            into[key] = dict(edge)
        else:
            kept["first_seen"] = min(kept["first_seen"], edge["first_seen"])
            kept["last_seen"] = max(kept["last_seen"], edge["last_seen"])
            kept["decisions"] += edge["decisions"]


def _edge_problems(conn: Connection, expected: Edges, *, exact: bool) -> list[str]:
    """The edges ``expected`` (from the records checked) against ``audit_edges``: see the module
    docstring; ``exact`` over the whole trail while nothing was pruned."""
    e = audit_edges.c
    columns = select(e.edge, e.issuer, e.subject, e.audience, e.first_seen, e.last_seen, e.decisions)
    if exact:
        stored = {str(row.edge): row for row in conn.execute(columns)}
    else:
        # Only the edges of the records checked: the table may hold far more (a subject per branch).
        keys = sorted(expected)
        stored = {
            str(row.edge): row
            for start in range(0, len(keys), 500)
            for row in conn.execute(columns.where(e.edge.in_(keys[start : start + 500])))
        }
    problems = []
    for key, edge in expected.items():
        row = stored.get(key)
        name = f"the edge {edge['subject']!r} to {edge['audience']!r}"
        if row is None:
            problems.append(f"{name} ({edge['decisions']} grant(s) on record) is not in the summaries")
            continue
        if (row.issuer, row.subject, row.audience) != (edge["issuer"], edge["subject"], edge["audience"]):
            # What the service graph shows: the key is a digest of these, so they cannot change.
            problems.append(f"{name}: summarised under other names ({row.subject!r} to {row.audience!r})")
        if row.first_seen > edge["first_seen"] + _SAME_TIME or (
            exact and row.first_seen < edge["first_seen"] - _SAME_TIME
        ):
            problems.append(f"{name}: summarised as first seen at another time than its first grant")
        if row.last_seen < edge["last_seen"] - _SAME_TIME or (
            exact and row.last_seen > edge["last_seen"] + _SAME_TIME
        ):
            problems.append(f"{name}: summarised as last seen at another time than its last grant")
        if row.decisions < edge["decisions"] or (exact and row.decisions != edge["decisions"]):
            held = edge["decisions"]
            problems.append(f"{name}: summarised with {row.decisions} grant(s), the records hold {held}")
    if exact:
        for key in sorted(stored.keys() - expected.keys()):
            problems.append(f"the summaries hold an edge no record makes ({key[:16]})")
    return problems


def _count_problems(
    conn: Connection,
    expected: Hourly,
    first_hour: int,
    *,
    every: bool,
    pruned: bool = False,
    pruned_before: float | None = None,
) -> list[str]:
    """Decisions per hour and outcome: each hour after ``first_hour`` (the earliest hour checked,
    which may hold records before the part checked, or pruned ones) exactly.

    Over the whole trail (``every``) the earlier hours too, which an outside audit found were never
    read (the oldest hour's refusals zeroed, every count deleted, thousands of decisions made up in
    hours before the first record, all unseen): exactly while nothing was pruned; after a prune,
    an hour whose count retention removed (before ``pruned_before``, its cutoff time, less an hour)
    holds no more than the records left in it, and a later hour, which may count pruned records
    too, no fewer.  What pruned records added to the hours in between cannot be checked.
    """
    n = audit_counts.c
    query = select(n.hour, n.outcome, n.decisions)
    rows = conn.execute(query if every else query.where(n.hour > first_hour)).all()
    stored = {(int(hour), str(outcome)): int(decisions) for hour, outcome, decisions in rows}
    forgotten = None if pruned_before is None else int(pruned_before) - 3600
    problems = []
    for key in sorted(expected.keys() | (stored.keys() if every else set())):
        have, want = stored.get(key, 0), expected.get(key, 0)
        if key[0] > first_hour or (every and not pruned):
            wrong = have != want
        elif not every:
            continue
        elif forgotten is not None and key[0] <= forgotten:
            wrong = have > want
        else:
            wrong = have < want
        if wrong:
            problems.append(
                f"the hour from {key[0]} (epoch seconds): {have} {key[1]} decision(s) summarised, "
                f"{want} on record"
            )
    return problems
