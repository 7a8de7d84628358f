"""SQLAlchemy adapters: the audit trail and the embedded replay store.

SQLite by default (WAL journal, so readers do not block the writer and
commits survive a process crash), PostgreSQL from a ``postgresql+psycopg://``
URL.  The replay store is correct across processes on one machine: an
``INSERT ... ON CONFLICT DO UPDATE ... WHERE expired`` is one atomic
statement, so of two concurrent first uses exactly one succeeds.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
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
    # Indexes only where a reviewer looks things up (by time, subject, token hash, issued jti):
    # each index is paid for on every decision.
    Column("event_id", String(36), nullable=False),
    Column("time", DateTime(timezone=True), nullable=False, index=True),
    Column("request_id", String(128), nullable=False),
    Column("endpoint", String(32), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("error", String(64)),
    Column("client_id", String(128)),
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


def _text(value: str | None, limit: int) -> str | None:
    """A value safe for any text column: PostgreSQL refuses NUL and lone surrogates."""
    if value is None:
        return None
    value = value[:limit]
    if value.isprintable():
        return value
    return value.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\N{REPLACEMENT CHARACTER}")


def _utc(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, tz=dt.UTC)


@dataclass
class _PendingRow:
    row: dict[str, Any]
    done: bool = False
    error: str | None = None


class SqlAuditSink:
    """Commits audit records; the caller returns only once its record is committed.

    Group commit: while one thread commits, records arriving from other
    threads queue up, and the next committer writes them all in one
    transaction.  Each caller still waits for its own record's commit, so
    "no token leaves unless its audit record is committed" holds, and under
    load the cost of a commit is shared (the same idea as PostgreSQL's own
    group commit).  If a batch fails, its rows are retried one by one so one
    bad row cannot fail the others.
    """

    def __init__(self, engine: Engine, *, max_batch: int = 128, timeout: float = 10.0) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.timeout = timeout
        self._insert = audit_events.insert()
        self._cond = threading.Condition()
        self._pending: list[_PendingRow] = []
        self._committing = False

    @staticmethod
    def _row(record: AuditRecord) -> dict[str, Any]:
        return {
            "event_id": record.event_id,
            "time": _utc(record.time),
            "request_id": _text(record.request_id, 128),
            "endpoint": record.endpoint,
            "outcome": record.outcome,
            "error": record.error,
            "client_id": _text(record.client_id or None, 128),
            "client_auth_method": _text(record.client_auth_method, 32),
            "issuer": _text(record.issuer, 64),
            "subject": _text(record.subject, 512),
            "subject_token_type": _text(record.subject_token_type, 128),
            "subject_token_sha256": record.subject_token_sha256,
            "subject_token_jti": _text(record.subject_token_jti, 256),
            "actor_issuer": _text(record.actor_issuer, 64),
            "actor_subject": _text(record.actor_subject, 512),
            "actor_token_sha256": record.actor_token_sha256,
            "rule": _text(record.rule, 128),
            "issued_jti": record.issued_jti,
            "issued_exp": record.issued_exp,
            "issued_kid": record.issued_kid,
            "source_ip": _text(record.source_ip, 64),
            "record": record.as_dict(),
        }

    def write(self, record: AuditRecord) -> None:
        item = _PendingRow(self._row(record))
        deadline = time.monotonic() + self.timeout
        with self._cond:
            self._pending.append(item)
            while not item.done and self._committing:
                remaining = deadline - time.monotonic()
                if (remaining <= 0 or not self._cond.wait(remaining)) and not item.done:
                    # Too slow: withdraw the record if it is still queued and refuse. (If a
                    # commit already holds it, the trail shows a token that was never sent.)
                    if item in self._pending:
                        self._pending.remove(item)
                    raise AuditUnavailable("timeout waiting for the audit commit")
            if not item.done:
                self._committing = True
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
        if not item.done:
            try:
                self._commit(batch)
            finally:
                with self._cond:
                    self._committing = False
                    self._cond.notify_all()
        if item.error is not None:
            raise AuditUnavailable(item.error)

    def _commit(self, batch: list[_PendingRow]) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(self._insert, [p.row for p in batch])
        except SQLAlchemyError as exc:
            if len(batch) == 1:
                batch[0].error = type(exc).__name__
            else:
                for item in batch:
                    self._commit([item])
        except BaseException:
            for item in batch:
                item.error = item.error or "interrupted"
                item.done = True
            raise
        for item in batch:
            item.done = True

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

    @staticmethod
    def _key(purpose: str, key: str) -> str:
        full_key = f"{purpose}:{key}"
        if len(full_key) > 200 or not full_key.isprintable():
            # Truncating would make distinct keys collide, and a text column refuses NUL and lone
            # surrogates; a digest keeps every such key distinct and storable.
            digest = hashlib.sha256(full_key.encode("utf-8", "surrogatepass")).hexdigest()
            full_key = f"{purpose[:120]}:sha256:{digest}"
        return full_key

    def release(self, purpose: str, key: str) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(delete(replay_entries).where(replay_entries.c.key == self._key(purpose, key)))
        except SQLAlchemyError as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    def first_use(self, purpose: str, key: str, expires_at: float, now: float) -> bool:
        full_key = self._key(purpose, key)
        stmt = self._insert(replay_entries).values(key=full_key, expires_at=expires_at)
        # An existing entry is only replaced once it has expired; a live one makes this a replay.
        stmt = stmt.on_conflict_do_update(
            index_elements=[replay_entries.c.key],
            set_={"expires_at": stmt.excluded.expires_at},
            where=replay_entries.c.expires_at <= now,
        )
        try:
            with self.engine.begin() as conn:
                # SQLAlchemy keeps an INSERT's rowcount only when asked (psycopg reports -1 otherwise).
                result = conn.execute(stmt.execution_options(preserve_rowcount=True))
                if random.random() < self.purge_probability:  # noqa: S311 - not security relevant
                    conn.execute(delete(replay_entries).where(replay_entries.c.expires_at <= now))
        except SQLAlchemyError as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        return bool(result.rowcount == 1)
