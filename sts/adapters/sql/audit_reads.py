"""Reading back what the audit sink wrote: the newest records, or all of them in order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, select

from ...core.audit_views import readable_record
from .schema import STORED_RECORD, audit_events
from .subject_lookup import column_conditions


class AuditReads:
    """The audit sink's reads (``sts audit tail``, tests): each record as it is stored, or marked
    unreadable (:func:`~sts.core.audit_views.readable_record`)."""

    engine: Engine

    def recent(self, limit: int = 50, **filters: str) -> list[dict[str, Any]]:
        """Newest first; ``filters`` match columns exactly (``outcome="refused"``)."""
        query = select(STORED_RECORD).order_by(audit_events.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            query = query.where(*column_conditions(conn, filters))
            return [readable_record(r[0]) for r in conn.execute(query)]

    def iter_all(self) -> Iterator[dict[str, Any]]:
        with self.engine.connect() as conn:
            for row in conn.execute(select(STORED_RECORD).order_by(audit_events.c.id)):
                yield readable_record(row[0])
