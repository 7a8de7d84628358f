"""SQLAlchemy adapters: the audit trail and the embedded replay store.

SQLite by default (WAL journal, so readers do not block the writer and
commits survive a process crash), PostgreSQL from a ``postgresql+psycopg://``
URL.  The replay store is correct across processes on one machine: an
``INSERT ... ON CONFLICT DO UPDATE ... WHERE expired`` is one atomic
statement, so of two concurrent first uses exactly one succeeds.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    event,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from ..core.audit import AuditRecord
from ..core.ports import AuditUnavailable, StoreUnavailable

log = logging.getLogger(__name__)

metadata = MetaData()

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("time", DateTime(timezone=True), nullable=False, index=True),
    Column("request_id", String(128), nullable=False),
    Column("endpoint", String(32), nullable=False),
    Column("outcome", String(16), nullable=False, index=True),
    Column("error", String(64)),
    Column("client_id", String(128), index=True),
    Column("client_auth_method", String(32)),
    Column("issuer", String(64)),
    Column("subject", String(512), index=True),
    Column("subject_token_type", String(128)),
    Column("subject_token_sha256", String(64), index=True),
    Column("subject_token_jti", String(256)),
    Column("actor_issuer", String(64)),
    Column("actor_subject", String(512)),
    Column("actor_token_sha256", String(64)),
    Column("rule", String(128)),
    Column("issued_jti", String(64), index=True),
    Column("issued_exp", Float),
    Column("issued_kid", String(128)),
    Column("source_ip", String(64)),
    Column("record", JSON, nullable=False),
)

replay_entries = Table(
    "replay_entries",
    metadata,
    Column("key", String(200), primary_key=True),
    Column("expires_at", Float, nullable=False, index=True),
)


def make_engine(url: str) -> Engine:
    """One engine (and pool) per process, created at start."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 10, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10, pool_timeout=5)


def create_schema(engine: Engine) -> None:
    metadata.create_all(engine)


def _utc(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, tz=dt.UTC)


class SqlAuditSink:
    """Commits each audit record in its own transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def write(self, record: AuditRecord) -> None:
        row = {
            "event_id": record.event_id,
            "time": _utc(record.time),
            "request_id": record.request_id[:128],
            "endpoint": record.endpoint,
            "outcome": record.outcome,
            "error": record.error,
            "client_id": (record.client_id or None) and record.client_id[:128],
            "client_auth_method": record.client_auth_method,
            "issuer": record.issuer,
            "subject": record.subject and record.subject[:512],
            "subject_token_type": record.subject_token_type,
            "subject_token_sha256": record.subject_token_sha256,
            "subject_token_jti": record.subject_token_jti and record.subject_token_jti[:256],
            "actor_issuer": record.actor_issuer,
            "actor_subject": record.actor_subject and record.actor_subject[:512],
            "actor_token_sha256": record.actor_token_sha256,
            "rule": record.rule,
            "issued_jti": record.issued_jti,
            "issued_exp": record.issued_exp,
            "issued_kid": record.issued_kid,
            "source_ip": record.source_ip,
            "record": record.as_dict(),
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(audit_events.insert().values(**row))
        except SQLAlchemyError as exc:
            raise AuditUnavailable(type(exc).__name__) from None

    def recent(self, limit: int = 50, **filters: str) -> list[dict[str, Any]]:
        """Newest first; ``filters`` match columns exactly (``outcome="refused"``)."""
        query = select(audit_events.c.record).order_by(audit_events.c.id.desc()).limit(limit)
        for name, value in filters.items():
            query = query.where(audit_events.c[name] == value)
        with self.engine.connect() as conn:
            return [dict(r[0]) for r in conn.execute(query)]

    def iter_all(self) -> Iterator[dict[str, Any]]:
        with self.engine.connect() as conn:
            for row in conn.execute(select(audit_events.c.record).order_by(audit_events.c.id)):
                yield dict(row[0])


class SqlReplayCache:
    """The embedded replay store (ports.ReplayCache) on the same database."""

    def __init__(self, engine: Engine, *, purge_probability: float = 0.001) -> None:
        self.engine = engine
        self.purge_probability = purge_probability
        dialect = engine.dialect.name
        self._insert = postgresql.insert if dialect == "postgresql" else sqlite.insert

    def first_use(self, purpose: str, key: str, expires_at: float, now: float) -> bool:
        full_key = f"{purpose}:{key}"[:200]
        stmt = self._insert(replay_entries).values(key=full_key, expires_at=expires_at)
        # An existing entry is only replaced once it has expired; a live one makes this a replay.
        stmt = stmt.on_conflict_do_update(
            index_elements=[replay_entries.c.key],
            set_={"expires_at": stmt.excluded.expires_at},
            where=replay_entries.c.expires_at <= now,
        )
        try:
            with self.engine.begin() as conn:
                result = conn.execute(stmt)
                if random.random() < self.purge_probability:  # noqa: S311 - not security relevant
                    conn.execute(delete(replay_entries).where(replay_entries.c.expires_at <= now))
        except SQLAlchemyError as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        return bool(result.rowcount == 1)
