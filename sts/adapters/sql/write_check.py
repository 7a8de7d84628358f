"""PostgreSQL: whether a grant's writes could go in now, without writing them (a readiness check).

The readiness commit writes the ``heartbeats`` table; a grant writes ``audit_events`` and
``replay_entries``.  A lock held on those (``LOCK TABLE``, a long migration) or the right to
insert into them revoked leaves the heartbeat committing while every grant waits or fails.
So, in a transaction that is rolled back: the ``INSERT`` privilege on each, and the lock an
``INSERT`` takes (``ROW EXCLUSIVE``), asked for with ``NOWAIT`` so that a conflicting lock is
an error at once, not a wait (PostgreSQL's documentation, "LOCK" and "Explicit Locking").
"""

from __future__ import annotations

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from ...core.ports import AuditUnavailable

#: The tables a grant's one statement writes (sts/adapters/sql/pg_exchange.py).
GRANT_TABLES = ("audit_events", "replay_entries")


def check_grant_tables(engine: Engine) -> None:
    """Raise :class:`AuditUnavailable` naming what would stop a grant's writes (PostgreSQL only)."""
    if engine.dialect.name != "postgresql":
        return
    try:
        with engine.connect() as conn, conn.begin() as transaction:
            for table in GRANT_TABLES:
                # Constant table names of this package, never input.
                allowed = conn.exec_driver_sql(f"SELECT has_table_privilege('{table}', 'INSERT')").scalar()
                if not allowed:
                    raise AuditUnavailable(f"no INSERT privilege on {table}")
                conn.exec_driver_sql(f"LOCK TABLE {table} IN ROW EXCLUSIVE MODE NOWAIT")
            transaction.rollback()
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        raise AuditUnavailable(type(cause).__name__) from None
