"""Finding a subject's audit records on the identity index, without an index on ``subject`` alone.

``audit_events`` is indexed on ``(issuer, subject, id)`` for one identity's records.  An
index on ``subject`` alone would serve only a filter that names a subject without its
issuer (``sts audit tail --subject``, the review page's subject filter), yet it was
written on every decision, at a random place of a b-tree as large as the trail.  Such a
filter instead finds the issuers that have records of the subject, each with one lookup
on the identity index, and becomes ``issuer IN (those) AND subject = ...``: for the usual
single issuer, a range of the identity index already in id order.

The distinct issuers come from a loose index scan (the next ``issuer`` above the last one,
``min`` over the index's leading column): one lookup per issuer ever recorded, however
many records there are.  PostgreSQL's planner turns such a ``min`` into an index scan that
stops at the first row (``ORDER BY issuer LIMIT 1`` with the query's conditions: its manual,
``CREATE AGGREGATE``, the ``SORTOP`` parameter; ``planagg.c``); SQLite does the same ("The
SQLite Query Optimizer Overview", the MIN/MAX optimization).  On a SQLite trail of a million
records, with half of it under each of two issuers, each lookup took 0.01 to 0.05 ms.
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import ColumnElement, Connection, and_, false, func, or_, select

from .schema import audit_events


def issuers_of_subject(conn: Connection, subject: str) -> list[str | None]:
    """Every ``issuer`` with a record of ``subject`` (None for records without an issuer), in order."""
    c = audit_events.c
    found: list[str | None] = []
    if _has(conn, c.issuer.is_(None), subject):
        found.append(None)
    previous: str | None = None
    while True:
        lowest = select(func.min(c.issuer))
        if previous is not None:
            lowest = lowest.where(c.issuer > previous)
        issuer = conn.execute(lowest).scalar()
        if issuer is None:
            return found
        if _has(conn, c.issuer == issuer, subject):
            found.append(issuer)
        previous = issuer


def subject_condition(conn: Connection, subject: str) -> ColumnElement[bool]:
    """``subject = :subject`` restricted to the issuers that have its records (see the module
    docstring); a condition no record meets when there are none."""
    c = audit_events.c
    issuers = issuers_of_subject(conn, subject)
    named = [issuer for issuer in issuers if issuer is not None]
    parts: list[ColumnElement[bool]] = []
    if len(named) == 1:
        parts.append(c.issuer == named[0])
    elif named:
        parts.append(c.issuer.in_(named))
    if None in issuers:
        parts.append(c.issuer.is_(None))
    if not parts:
        return false()
    who = parts[0] if len(parts) == 1 else or_(*parts)
    return and_(who, c.subject == subject)


def column_conditions(conn: Connection, filters: Mapping[str, str]) -> list[ColumnElement[bool]]:
    """``column = value`` for each of ``filters`` (column names of ``audit_events``); a subject
    without its issuer as :func:`subject_condition`."""
    return [
        subject_condition(conn, value)
        if name == "subject" and "issuer" not in filters
        else audit_events.c[name] == value
        for name, value in filters.items()
    ]


def _has(conn: Connection, issuer: ColumnElement[bool], subject: str) -> bool:
    c = audit_events.c
    return conn.execute(select(c.id).where(issuer, c.subject == subject).limit(1)).first() is not None
