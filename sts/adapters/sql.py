"""SQLAlchemy adapters: the audit trail and the embedded replay store.

SQLite by default (WAL journal, so readers do not block the writer and
commits survive a process crash), PostgreSQL from a ``postgresql+psycopg://``
URL.  The replay store is correct across processes on one machine: an
``INSERT ... ON CONFLICT DO UPDATE ... WHERE expired`` is one atomic
statement, so of two concurrent first uses exactly one succeeds.  A
single-use subject token's entry is inserted in the same transaction as the
audit record of its grant (:class:`SqlSingleUseLedger`), so a failed commit
leaves neither and the token stays usable.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import mmap
import os
import random
import secrets
import socket
import sqlite3
import stat
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from ..core.audit import AuditRecord
from ..core.audit_chain import canonical_record, genesis_hash, link_hash
from ..core.baseline import Baseline
from ..core.ports import AlreadyUsed, AuditUnavailable, SingleUse, StoreUnavailable
from ..core.subject_state import SubjectState

log = logging.getLogger(__name__)

metadata = MetaData()

_STEP_UP = text("error = 'insufficient_user_authentication'")
audit_events = Table(
    "audit_events",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    # The hash chain (sts/core/audit_chain.py): ``hash`` commits to ``prev_hash``, the chain, ``seq``
    # and the record.  NULL on records written before the trail was chained.
    Column("chain_id", String(32)),
    Column("seq", BigInteger),
    Column("prev_hash", String(64)),
    Column("hash", String(64)),
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
    # What `sts audit` and the review page filter and aggregate by (sts/adapters/audit_query.py):
    # keyset pages by id within an identity, client, outcome or rule; decisions over time by outcome.
    Index("ix_audit_events_identity", "issuer", "subject", "id"),
    Index("ix_audit_events_client", "client_id", "id"),
    Index("ix_audit_events_outcome", "outcome", "id"),
    Index("ix_audit_events_rule", "rule", "id"),
    Index("ix_audit_events_time_outcome", "time", "outcome"),
    # Step-ups per identity: a partial index, so only those refusals pay for it.
    Index(
        "ix_audit_events_step_ups",
        "issuer",
        "subject",
        "id",
        sqlite_where=_STEP_UP,
        postgresql_where=_STEP_UP,
    ),
)

# Summaries of the audit trail for `sts audit` and the review page (sts/adapters/audit_query.py),
# filled after the records are written: what their JSON holds that reviewers filter and chart by.
#: The watermark: every record with ``id <= last_id`` is summarised.
audit_summary_state = Table(
    "audit_summary_state",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("last_id", BigInteger, nullable=False),
)

#: What a decision's JSON holds that reviewers filter by: ``signal`` (fired) and ``audience`` terms.
audit_terms = Table(
    "audit_terms",
    metadata,
    Column("kind", String(16), primary_key=True),
    Column("value", String(256), primary_key=True),
    Column("audit_id", BigInteger, primary_key=True),
    Column("time", Float, nullable=False),
    Index("ix_audit_terms_time", "kind", "time", "value"),
    Index("ix_audit_terms_audit_id", "audit_id"),
)

#: Subject-to-audience edges of granted decisions, keyed by a digest of (issuer, subject, audience).
audit_edges = Table(
    "audit_edges",
    metadata,
    Column("edge", String(64), primary_key=True),
    Column("issuer", String(64)),
    Column("subject", String(512)),
    Column("audience", String(512), nullable=False),
    Column("first_seen", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("decisions", BigInteger, nullable=False),
    Index("ix_audit_edges_last_seen", "last_seen"),
)

#: Decisions per hour (epoch seconds of its start, UTC) and outcome, for charts over long windows.
audit_counts = Table(
    "audit_counts",
    metadata,
    Column("hour", BigInteger, primary_key=True),
    Column("outcome", String(16), primary_key=True),
    Column("decisions", BigInteger, nullable=False),
)


#: Verification walks each chain in ``seq`` order; being unique, it also keeps two records off one link.
Index("ux_audit_events_chain_seq", audit_events.c.chain_id, audit_events.c.seq, unique=True)

audit_chains = Table(
    "audit_chains",
    metadata,
    # One row per hash chain of the audit trail, committed with the chain's first record.  Every
    # writer (an audit sink in one process) appends to chains of its own.
    Column("chain_id", String(32), primary_key=True),
    Column("started_at", Float, nullable=False),
    Column("writer", String(200), nullable=False),
    Column("genesis_hash", String(64), nullable=False),
    # Where verification starts: seq 0 and the genesis hash, or, once retention has removed the
    # chain's oldest records, the seq and hash of the last one removed.
    Column("anchor_seq", BigInteger, nullable=False),
    Column("anchor_hash", String(64), nullable=False),
    Column("pruned_at", Float),
)

replay_entries = Table(
    "replay_entries",
    metadata,
    Column("key", String(200), primary_key=True),
    Column("expires_at", Float, nullable=False, index=True),
)


heartbeats = Table(
    "heartbeats",
    metadata,
    # One row per serving process (host:pid), rewritten by each readiness check: a commit
    # proves the audit database takes writes, which a SELECT does not.
    Column("instance", String(200), primary_key=True),
    Column("checked_at", Float, nullable=False),
)


@dataclass(frozen=True)
class PoolOptions:
    """The connection pools of a PostgreSQL engine (SQLite opens files, and ignores these).

    A process has two pools of this shape: the engine's own (transactions and reads, with
    a liveness check on checkout) and one for the single-statement writes of every request
    (:class:`RawStatement`).  Each keeps at most ``size`` connections open while idle and
    opens up to ``max_overflow`` more under load; a request waits at most ``timeout``
    seconds for one, then fails closed.
    """

    size: int = 2
    max_overflow: int = 8
    timeout: float = 5.0

    def engine_arguments(self) -> dict[str, Any]:
        return {"pool_size": self.size, "max_overflow": self.max_overflow, "pool_timeout": self.timeout}


#: Seconds to wait for a PostgreSQL server to accept a connection (libpq waits forever by default),
#: unless the URL sets ``connect_timeout`` itself.
CONNECT_TIMEOUT = 5
#: SQLite: an execution option that opens the connection's transaction with ``BEGIN IMMEDIATE``.
_IMMEDIATE = "sts_sqlite_immediate"
#: The keyword arguments each PostgreSQL engine was made with, for its statement pool.
_ENGINE_ARGUMENTS: weakref.WeakKeyDictionary[Engine, dict[str, Any]] = weakref.WeakKeyDictionary()
_STATEMENT_ENGINES: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()
_STATEMENT_ENGINES_LOCK = threading.Lock()


def make_engine(url: str, pool: PoolOptions | None = None) -> Engine:
    """One engine (and pool) per process, created at start; no connection is opened here."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        _private_sqlite_files(url.removeprefix("sqlite:///"))
        # busy_timeout 0: SQLite's own busy handler sleeps 1 ms, then 2, 5, 10... on any lock
        # collision between worker processes, though a write holds the lock for ~30 us.
        # The callers retry instead, with sleeps of a tenth of a millisecond upward.
        engine = create_engine(url, connect_args={"timeout": 0, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            # SQLAlchemy's documented pysqlite recipe: the driver never opens transactions by
            # itself (a statement outside one commits alone); the "begin" hook below opens them.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            _retry_locked(lambda: cur.execute("PRAGMA journal_mode=WAL"))
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=0")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # IMMEDIATE takes the write lock at once (for a read-then-write such as the schema check).
            conn.exec_driver_sql(
                "BEGIN IMMEDIATE" if conn.get_execution_options().get(_IMMEDIATE) else "BEGIN"
            )

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    arguments = (pool or PoolOptions()).engine_arguments()
    if "connect_timeout" not in make_url(url).query:
        arguments["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
    engine = create_engine(url, pool_pre_ping=True, **arguments)
    _ENGINE_ARGUMENTS[engine] = arguments
    return engine


def _statement_engine(engine: Engine) -> Engine:
    """PostgreSQL: the pool for single statements, one per engine and shared by every
    :class:`RawStatement` on it, shaped like the engine's own but without pre-ping."""
    with _STATEMENT_ENGINES_LOCK:
        statements = _STATEMENT_ENGINES.get(engine)
        if statements is None:
            statements = create_engine(
                engine.url, **_ENGINE_ARGUMENTS.get(engine, PoolOptions().engine_arguments())
            )
            _STATEMENT_ENGINES[engine] = statements
            # Disposing of the engine (tests, the CLI) closes the statement pool's connections too.
            event.listen(engine, "engine_disposed", lambda _engine, pool=statements: pool.dispose())
        return statements


def _private_sqlite_files(database: str) -> None:
    """Create the SQLite file ``0600``, as the keys are, and restrict one made wider before.

    The audit trail names subjects, clients and addresses: only the service
    account may read it.  SQLite creates the ``-wal`` and ``-shm`` files with
    the database file's permission bits, so creating the database file first,
    ``0600``, covers them too; existing ones are restricted here as well.
    """
    if database in ("", ":memory:") or database.startswith("file:"):
        return
    try:
        fd = os.open(database, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return  # SQLite reports the problem when it opens the file, with its own message.
    os.close(fd)
    for path in (database, database + "-wal", database + "-shm"):
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            if mode & 0o077:
                os.chmod(path, mode & 0o700)
                log.warning("database file %s had mode %o; restricted to %o", path, mode, mode & 0o700)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("database file %s cannot be restricted to its owner: %s", path, exc.strerror)


_LOCK_DEADLINE = 10.0
T = TypeVar("T")


def _is_locked(exc: BaseException) -> bool:
    text = str(getattr(exc, "orig", exc))
    return isinstance(exc, sqlite3.OperationalError | OperationalError) and (
        "locked" in text or "busy" in text
    )


def _retry_locked(work: Callable[[], T], *, deadline: float = _LOCK_DEADLINE) -> T:
    """Run ``work``; on a SQLite lock collision, retry with short, jittered sleeps.

    A write holds the lock for tens of microseconds (one statement inside SQLite),
    so sleeps stay near that: a long back-off would leave the lock idle while a
    whole batch of requests waits behind this one.
    """
    delay, end = 0.00005, time.monotonic() + deadline
    while True:
        try:
            return work()
        except (sqlite3.OperationalError, OperationalError) as exc:
            if not _is_locked(exc) or time.monotonic() > end:
                raise
            time.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter, not security
            delay = min(delay * 1.5, 0.0005)


def transaction(engine: Engine, work: Callable[[Connection], T]) -> T:
    """Run ``work`` in one SQLAlchemy transaction, retrying SQLite lock collisions."""

    def attempt() -> T:
        with engine.begin() as conn:
            return work(conn)

    return _retry_locked(attempt)


class RawStatement:
    """One prepared write statement run on the DBAPI connection, outside SQLAlchemy's compiler.

    The hot writes (an audit record, a replay entry) are a single statement each.
    On SQLite the connection is in autocommit mode, so the statement is its own
    transaction and the write lock is taken and released inside one call into
    SQLite with the GIL released: a thread never holds the lock while it waits
    for the GIL, which would stall every other worker process.  On PostgreSQL
    it is followed by a commit.
    """

    def __init__(self, engine: Engine) -> None:
        self.sqlite = engine.dialect.name == "sqlite"
        # PostgreSQL: a pool without pre-ping (a round trip on every checkout), shared by every
        # statement on this engine; a connection found dead is replaced and the statement tried
        # once more instead.
        self.engine = engine if self.sqlite else _statement_engine(engine)
        self.placeholder = "?" if self.sqlite else "%s"
        dbapi = engine.dialect.loaded_dbapi
        self.errors: tuple[type[BaseException], ...] = (dbapi.Error,)
        #: Every failure a statement can end in: the driver's errors and SQLAlchemy's (the pool's).
        self.failures: tuple[type[BaseException], ...] = (dbapi.Error, SQLAlchemyError)
        self._disconnects: tuple[type[BaseException], ...] = (dbapi.OperationalError, dbapi.InterfaceError)

    def run(self, sql: str, params: list[Any] | tuple[Any, ...]) -> int:
        """Execute and commit; return the row count.  DBAPI errors propagate."""
        return int(self._execute(sql, params, fetch=False))

    def query(self, sql: str, params: list[Any] | tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Execute a read; return the rows.  DBAPI errors propagate."""
        rows: list[tuple[Any, ...]] = self._execute(sql, params, fetch=True)
        return rows

    def _execute(self, sql: str, params: list[Any] | tuple[Any, ...], *, fetch: bool) -> Any:
        def attempt() -> Any:
            raw = self.engine.raw_connection()
            try:
                cur = raw.cursor()
                cur.execute(sql, params)
                result = [tuple(r) for r in cur.fetchall()] if fetch else int(cur.rowcount)
                if not self.sqlite:
                    raw.commit()
                return result
            except BaseException:
                if not self.sqlite:
                    # A connection with a failed statement is not reused as it is.
                    raw.invalidate()
                raise
            finally:
                raw.close()

        if self.sqlite:
            return _retry_locked(attempt)
        try:
            return attempt()
        except self._disconnects:
            # Nothing was committed on a connection that died; one fresh try.
            return attempt()

    def transaction(self, work: Callable[[Any], T]) -> T:
        """Run ``work(cursor)`` in one transaction and commit it; on any error, roll back.

        SQLite: ``BEGIN IMMEDIATE`` takes the write lock up front (a lock collision is
        retried like any other); PostgreSQL: the driver's implicit transaction.  A
        connection found dead before anything was sent is replaced and the work tried
        once more.  On PostgreSQL a failure during ``COMMIT`` (the connection broke) is
        :class:`CommitOutcomeUnknown`: the server may have committed.  Other DBAPI
        errors, and whatever ``work`` raises, propagate.
        """
        stage = ["connect"]

        def attempt() -> T:
            stage[0] = "connect"
            raw = self.engine.raw_connection()
            try:
                cur = raw.cursor()
                if self.sqlite:
                    cur.execute("BEGIN IMMEDIATE")
                stage[0] = "work"
                result = work(cur)
                stage[0] = "commit"
                if self.sqlite:
                    cur.execute("COMMIT")
                else:
                    raw.commit()
                return result
            except BaseException as exc:
                with contextlib.suppress(*self.errors):
                    raw.rollback()
                if not self.sqlite and isinstance(exc, self.errors):
                    # A connection with a failed statement is not reused as it is.
                    raw.invalidate()
                raise
            finally:
                raw.close()

        if self.sqlite:
            return _retry_locked(attempt)
        try:
            try:
                return attempt()
            except self._disconnects:
                if stage[0] == "commit":
                    raise
                # The server drops an uncommitted transaction with its connection: one fresh try
                # (typically a pooled connection that died while idle).
                return attempt()
        except self.errors as exc:
            if stage[0] == "commit":
                raise CommitOutcomeUnknown(type(exc).__name__) from exc
            raise


class CommitOutcomeUnknown(Exception):
    """``COMMIT`` was sent, and no answer came back: the transaction may or may not be committed."""


def schema_transaction(engine: Engine, work: Callable[[Connection], T]) -> T:
    """Run ``work`` in one transaction under the schema lock, safely from any number of processes at once.

    Schema migrations (:mod:`sts.migrations`) run here: reading the schema's revision and
    changing it happen in one transaction under a database lock, so that of several workers
    or instances starting together one migrates and the others find the schema current: on
    PostgreSQL a transaction-scoped advisory lock (per database and schema), on SQLite
    ``BEGIN IMMEDIATE`` (the write lock; a collision is retried).
    """

    def attempt() -> T:
        with engine.connect() as conn, conn.execution_options(**{_IMMEDIATE: True}).begin():
            if conn.dialect.name == "postgresql":
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(hashtext('sts.schema'), hashtext(current_schema()))")
                )
            return work(conn)

    return _retry_locked(attempt)


def create_schema(engine: Engine) -> None:
    """Bring the schema to this version's newest revision: :func:`sts.migrations.upgrade`."""
    from ..migrations import upgrade  # The migrations read this module's metadata.

    upgrade(engine)


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


class _ChainHead:
    """One hash chain of an audit sink, and its last *committed* link.

    Used by one thread at a time (see :class:`_ChainHeads`), from before its next
    records are linked until their commit has succeeded or failed: so the head
    moves only over committed records, and a record that never commits leaves
    no gap.  When a commit's outcome cannot be known, the chain is abandoned for
    a new one (:meth:`restart`): whatever the old one's last record is, nothing
    follows it.
    """

    __slots__ = ("chain_id", "hash", "pid", "registered", "seq")

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.chain_id = secrets.token_hex(16)
        self.seq = 0
        self.hash = genesis_hash(self.chain_id)
        #: Whether the chain's ``audit_chains`` row is committed (it goes with the first record).
        self.registered = False
        self.pid = os.getpid()

    def advance(self, seq: int, digest: str) -> None:
        self.seq, self.hash, self.registered = seq, digest, True


class _ChainHeads:
    """The chains of one audit sink: each commit borrows one for as long as it runs.

    Commits on one chain follow each other; commits on different chains run
    side by side.  SQLite runs one write at a time anyway, so a sink there has one
    chain; on PostgreSQL up to ``size``, made when concurrent commits need them.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._made = 0
        self._free: list[_ChainHead] = []
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def borrow(self, timeout: float) -> Iterator[_ChainHead]:
        """A chain for this thread alone; :class:`AuditUnavailable` if none is free within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._free and self._made >= self._size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AuditUnavailable("timeout waiting for an audit chain")
                self._cond.wait(remaining)
            head = self._free.pop() if self._free else None
            if head is None:
                self._made += 1
        if head is None:
            head = _ChainHead()
        elif head.pid != os.getpid():
            head.restart()  # A forked child never appends to its parent's chain.
        try:
            yield head
        finally:
            with self._cond:
                self._free.append(head)
                self._cond.notify()


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

    def __init__(
        self, engine: Engine, *, max_batch: int = 128, timeout: float = 10.0, max_chains: int = 8
    ) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.timeout = timeout
        self._raw = RawStatement(engine)
        self._chains = _ChainHeads(1 if self._raw.sqlite else max_chains)
        dbapi = engine.dialect.loaded_dbapi
        self._integrity_errors: tuple[type[BaseException], ...] = (dbapi.IntegrityError,)
        self._columns = [c.name for c in audit_events.columns if c.name != "id"]
        # SQLAlchemy's own conversions (datetime and JSON storage), applied without its compiler.
        self._processors: dict[str, Callable[[Any], Any]] = {}
        for column in audit_events.columns:
            processor = column.type.bind_processor(engine.dialect)
            if processor is not None and column.name != "id":
                self._processors[column.name] = processor
        # The record is stored as its canonical JSON text, the text its hash covers.
        self._processors.pop("record", None)
        self._sql_by_size: dict[int, str] = {}
        p = self._raw.placeholder
        # Table and column names are constants of this module; values are parameters.
        self._heartbeat = (
            f"INSERT INTO heartbeats (instance, checked_at) VALUES ({p}, {p}) "  # noqa: S608
            "ON CONFLICT (instance) DO UPDATE SET checked_at = excluded.checked_at"
        )
        self._forget_heartbeats = f"DELETE FROM heartbeats WHERE checked_at < {p}"  # noqa: S608
        columns = "chain_id, started_at, writer, genesis_hash, anchor_seq, anchor_hash"
        self._register_chain = f"INSERT INTO audit_chains ({columns}) VALUES ({p}, {p}, {p}, {p}, 0, {p})"  # noqa: S608
        self._count_links = (
            f"SELECT count(*) FROM audit_events WHERE chain_id = {p} AND seq >= {p} AND seq <= {p}"  # noqa: S608
        )
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

    def _stored_row(self, record: AuditRecord) -> dict[str, Any]:
        """The row of ``record``, with the record as its canonical JSON text (what the chain hashes).

        The columns are taken from the record as stored, so a verifier that reads the
        stored record back finds them equal (they differ from ``record`` only where
        it held something JSON cannot carry, see :func:`canonical_record`).
        """
        row = self._row(record)
        stored_text, stored = canonical_record(row["record"])
        if stored is not row["record"]:
            with contextlib.suppress(TypeError, ValueError, OverflowError):
                row = self._row(AuditRecord(**stored))
        row["record"] = stored_text
        return row

    def write(self, record: AuditRecord) -> None:
        item = _PendingRow(self._stored_row(record))
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

    def write_with_uses(self, record: AuditRecord, uses: Sequence[SingleUse], now: float) -> None:
        """Commit ``record`` and the replay entries of ``uses`` in one transaction.

        Either both are committed or neither: a failed commit leaves the single-use
        credential unused.  Raises :class:`AlreadyUsed` when one of ``uses`` has a
        live entry (a concurrent request committed first; on PostgreSQL the insert
        waits for that request's transaction), :class:`AuditUnavailable` when the
        transaction cannot be committed.  Not group-committed: the entries must
        succeed or fail with this record alone.
        """
        entry_sql = first_use_statement(self._raw.placeholder)
        entries = [(replay_key(u.purpose, u.key), u.expires_at, now) for u in uses]
        item = _PendingRow(self._stored_row(record))
        with self._chains.borrow(self.timeout) as head:
            register = not head.registered
            row, seq, digest = self._link(head, [item])

            def work(cur: Any) -> bool:
                for params in entries:
                    cur.execute(entry_sql, params)
                    if cur.rowcount != 1:
                        raise _UseTaken
                if register:
                    cur.execute(self._register_chain, self._registration(head))
                cur.execute(self._sql(1), row)
                return True

            try:
                self._raw.transaction(work)
            except _UseTaken:
                raise AlreadyUsed from None
            except CommitOutcomeUnknown as exc:
                # The connection broke during COMMIT.  Ask again on a fresh one: if the record is
                # there, so is the use, and the token may leave; else neither was committed.
                if not self._settle(head, seq, 1, digest):
                    raise AuditUnavailable(f"commit outcome unknown: {exc}") from None
                log.warning("audit commit confirmed after its connection broke (event %s)", record.event_id)
                return
            except self._integrity_errors as exc:
                head.restart()  # Perhaps a link taken by a commit thought lost: go on on a new chain.
                raise AuditUnavailable(type(exc).__name__) from None
            except self._raw.failures as exc:
                raise AuditUnavailable(type(exc).__name__) from None
            head.advance(seq, digest)

    def _registration(self, head: _ChainHead) -> tuple[Any, ...]:
        """The ``audit_chains`` row of ``head``'s chain, committed with its first record."""
        genesis = genesis_hash(head.chain_id)
        return (head.chain_id, time.time(), f"{socket.gethostname()}:{head.pid}"[:200], genesis, genesis)

    def _link(self, head: _ChainHead, batch: list[_PendingRow]) -> tuple[list[Any], int, str]:
        """Link ``batch`` onto ``head`` (in order): its parameters, and the new head's seq and hash.

        ``head`` itself moves only once the rows are committed (:meth:`_ChainHead.advance`).
        """
        seq, prev = head.seq, head.hash
        for item in batch:
            seq += 1
            row = item.row
            digest = link_hash(prev, head.chain_id, seq, row["record"])
            row["chain_id"], row["seq"], row["prev_hash"], row["hash"] = head.chain_id, seq, prev, digest
            prev = digest
        return self._params(batch), seq, prev

    def _settle(self, head: _ChainHead, last: int, count: int, digest: str) -> bool:
        """After a commit whose outcome is unknown: whether its ``count`` records up to ``last`` are there.

        If they are, the head moves past them.  Otherwise the chain is abandoned for a new
        one, since the commit may yet show up (PostgreSQL finishes a commit whose client
        went away); if nobody can tell, :class:`AuditUnavailable`.
        """
        try:
            found = self._raw.query(self._count_links, (head.chain_id, last - count + 1, last))[0][0]
        except self._raw.failures as exc:
            head.restart()
            raise AuditUnavailable(f"commit outcome unknown: {type(exc).__name__}") from None
        if found == count:
            head.advance(last, digest)
            return True
        head.restart()
        return False

    def _sql(self, rows: int) -> str:
        sql = self._sql_by_size.get(rows)
        if sql is None:
            one = "(" + ", ".join([self._raw.placeholder] * len(self._columns)) + ")"
            # Built from the table's own column names and placeholders only; values are parameters.
            columns = ", ".join(self._columns)
            sql = f"INSERT INTO audit_events ({columns}) VALUES " + ", ".join([one] * rows)  # noqa: S608
            self._sql_by_size[rows] = sql
        return sql

    def _params(self, batch: list[_PendingRow]) -> list[Any]:
        params: list[Any] = []
        for item in batch:
            row = item.row
            for name in self._columns:
                value = row.get(name)
                convert = self._processors.get(name)
                params.append(convert(value) if convert is not None and value is not None else value)
        return params

    def _commit(self, batch: list[_PendingRow]) -> None:
        try:
            with self._chains.borrow(self.timeout) as head:
                self._commit_linked(head, batch)
        except AuditUnavailable as exc:
            for item in batch:
                item.error = item.error or str(exc)
        except BaseException:
            for item in batch:
                item.error = item.error or "interrupted"
                item.done = True
            raise
        for item in batch:
            item.done = True

    def _commit_linked(self, head: _ChainHead, batch: list[_PendingRow]) -> None:
        """Commit ``batch`` on ``head``'s chain; if it fails, each record alone, so one bad row
        fails only its own writer."""
        params, seq, digest = self._link(head, batch)
        register = not head.registered
        sql = self._sql(len(batch))
        try:
            if self._raw.sqlite and not register:
                # One multi-row INSERT: a single statement, so a single short lock on SQLite.
                self._raw.run(sql, params)
            else:

                def work(cur: Any) -> None:
                    if register:
                        cur.execute(self._register_chain, self._registration(head))
                    cur.execute(sql, params)

                self._raw.transaction(work)
            head.advance(seq, digest)
            return
        except CommitOutcomeUnknown as exc:
            if self._settle(head, seq, len(batch), digest):
                return
            failure = type(exc).__name__
        except self._integrity_errors as exc:
            head.restart()  # Perhaps a link taken by a commit thought lost: go on on a new chain.
            failure = type(exc).__name__
        except self._raw.failures as exc:
            failure = type(exc).__name__
        if len(batch) == 1:
            batch[0].error = failure
        else:
            for item in batch:
                self._commit_linked(head, [item])

    def check_commit(self, instance: str, now: float) -> None:
        """Commit one small write through the audit's own connections (a readiness check).

        Upserts this process's row in ``heartbeats``: a database that answers reads but
        cannot commit (read-only, out of space, permissions revoked) fails here, as the
        audit record of a grant would.  Rows of processes silent for a day are removed.
        Raises :class:`AuditUnavailable`.
        """
        try:
            self._raw.run(self._heartbeat, (instance[:200], now))
            if random.random() < 0.01:  # noqa: S311 - housekeeping, not security relevant
                self._raw.run(self._forget_heartbeats, (now - 86400,))
        except self._raw.failures as exc:
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


class PruneWouldBreakChain(Exception):
    """Removing these records would leave a chain that no longer verifies from its anchor."""


def record_prune_anchors(conn: Connection, below_id: int, now: float) -> int:
    """Before the audit records with ``id < below_id`` are deleted: move each chain's anchor past them.

    Call it in the transaction that deletes them.  Retention removes the oldest records;
    within a chain ids grow with ``seq`` (a chain's records are committed one after the
    other), so the removed records of each chain are its oldest ones, ``anchor_seq + 1``
    up to some ``seq``, and the rest verifies from that ``seq`` and its hash, recorded here.
    Raises :class:`PruneWouldBreakChain` (delete nothing then) when a chain's removed
    records are not such a run: the trail is damaged already, and ``sts audit verify``
    says where.  Records written before chaining (no ``chain_id``) need no anchor.
    Returns the number of chains whose anchor moved.
    """
    c, chains = audit_events.c, audit_chains.c
    cuts = conn.execute(
        select(c.chain_id, func.min(c.seq), func.max(c.seq), func.count())
        .where(c.id < below_id, c.chain_id.is_not(None))
        .group_by(c.chain_id)
    ).all()
    for chain_id, low, high, count in cuts:
        anchor = conn.execute(select(chains.anchor_seq).where(chains.chain_id == chain_id)).scalar()
        if anchor is None or low != anchor + 1 or count != high - low + 1:
            raise PruneWouldBreakChain(
                f"chain {chain_id}: the records to remove (seq {low} to {high}, {count} of them) are not "
                f"the oldest run after its anchor (seq {anchor}); run `sts audit verify`"
            )
        digest = conn.execute(select(c.hash).where(c.chain_id == chain_id, c.seq == high)).scalar_one()
        conn.execute(
            update(audit_chains)
            .where(chains.chain_id == chain_id)
            .values(anchor_seq=high, anchor_hash=digest, pruned_at=now)
        )
    return len(cuts)


def replay_key(purpose: str, key: str) -> str:
    """The ``replay_entries`` key of ``key`` under ``purpose``."""
    full_key = f"{purpose}:{key}"
    if len(full_key) > 200 or not full_key.isprintable():
        # Truncating would make distinct keys collide, and a text column refuses NUL and lone
        # surrogates; a digest keeps every such key distinct and storable.
        digest = hashlib.sha256(full_key.encode("utf-8", "surrogatepass")).hexdigest()
        full_key = f"{purpose[:120]}:sha256:{digest}"
    return full_key


def first_use_statement(placeholder: str) -> str:
    """``INSERT`` a replay entry unless a live one exists: one row changed on a first use, none on a
    replay.  An existing entry is only replaced once it has expired.  One statement, atomic on both
    databases: of concurrent first uses exactly one inserts (on PostgreSQL, a second one waits for
    the first one's transaction, and wins only if that rolls back)."""
    p = placeholder
    return (
        f"INSERT INTO replay_entries (key, expires_at) VALUES ({p}, {p}) "  # noqa: S608 - placeholders
        "ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at "
        f"WHERE replay_entries.expires_at <= {p}"
    )


class _UseTaken(Exception):
    """Inside :meth:`SqlAuditSink.write_with_uses`: roll back, the use is someone else's."""


class SqlSingleUseLedger:
    """ports.SingleUseLedger on the embedded database: the use and the audit record commit together.

    ``reserve`` only looks (a committed use refuses the request before a token is
    minted); the entry itself is inserted by :meth:`commit`, in the transaction that
    commits the grant's audit record.  Two concurrent requests with one token both
    get that far; the database lets exactly one insert the entry, and the other
    is refused as a replay.
    """

    def __init__(self, audit: SqlAuditSink) -> None:
        # The audit sink's connections: the same database, and no pool of its own.
        self._raw = audit._raw
        self._audit = audit
        p = self._raw.placeholder
        self._seen = f"SELECT 1 FROM replay_entries WHERE key = {p} AND expires_at > {p}"  # noqa: S608

    def reserve(self, use: SingleUse, now: float) -> SingleUse:
        try:
            seen = self._raw.query(self._seen, (replay_key(use.purpose, use.key), now))
        except self._raw.failures as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        if seen:
            raise AlreadyUsed
        return use

    def commit(self, record: AuditRecord, uses: Sequence[SingleUse], now: float) -> None:
        self._audit.write_with_uses(record, uses, now)

    def cancel(self, uses: Sequence[SingleUse]) -> None:
        """Nothing to undo: nothing is written before :meth:`commit`."""


class SqlReplayCache:
    """The embedded replay store (ports.ReplayCache) on the same database.

    It lives in the database, so it never forgets: ``valid_from`` is not needed.
    """

    def __init__(self, engine: Engine, *, purge_probability: float = 0.001) -> None:
        self.engine = engine
        self.purge_probability = purge_probability
        self._raw = RawStatement(engine)
        p = self._raw.placeholder
        self._first_use = first_use_statement(p)
        self._release = f"DELETE FROM replay_entries WHERE key = {p}"  # noqa: S608 - placeholder only
        self._purge = f"DELETE FROM replay_entries WHERE expires_at <= {p}"  # noqa: S608 - placeholder only

    @staticmethod
    def _key(purpose: str, key: str) -> str:
        return replay_key(purpose, key)

    def release(self, purpose: str, key: str) -> None:
        try:
            self._raw.run(self._release, (self._key(purpose, key),))
        except self._raw.failures as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    def first_use(
        self, purpose: str, key: str, expires_at: float, now: float, *, valid_from: float | None = None
    ) -> bool:
        try:
            first = self._raw.run(self._first_use, (self._key(purpose, key), expires_at, now)) == 1
            if random.random() < self.purge_probability:  # noqa: S311 - not security relevant
                self._raw.run(self._purge, (now,))
        except self._raw.failures as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        return first


subject_states = Table(
    "subject_states",
    metadata,
    Column("identity", String(600), primary_key=True),
    Column("state", String(4000), nullable=False),
    Column("expires_at", Float, nullable=False),
)

baselines = Table(
    "baselines",
    metadata,
    Column("identity", String(600), primary_key=True),
    Column("baseline", String(16000), nullable=False),
    Column("expires_at", Float, nullable=False),
)


def _store_key(identity: str) -> str:
    """Identity keys are ``issuer|subject``; a digest keeps oversized or odd ones storable."""
    if len(identity) <= 600 and identity.isprintable():
        return identity
    return "sha256:" + hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()


class _KeyValueTable:
    """A small expiring key-value table, read and written with single raw statements."""

    def __init__(self, engine: Engine, table: str, column: str, clock: Callable[[], float]) -> None:
        self._raw = RawStatement(engine)
        self._engine = engine
        self._clock = clock
        p = self._raw.placeholder
        # Table and column names are constants of this module; values are parameters.
        self._put = (
            f"INSERT INTO {table} (identity, {column}, expires_at) VALUES ({p}, {p}, {p}) "  # noqa: S608
            f"ON CONFLICT (identity) DO UPDATE SET {column} = excluded.{column}, "
            "expires_at = excluded.expires_at"
        )
        self._get = f"SELECT identity, {column} FROM {table} WHERE identity IN "  # noqa: S608
        self._table, self._p = table, p

    def put(self, identity: str, value: str, ttl: int) -> None:
        try:
            self._raw.run(self._put, (_store_key(identity), value, self._clock() + ttl))
        except self._raw.failures as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    def get(self, identities: list[str]) -> dict[str, str]:
        keys = [_store_key(i) for i in identities]
        sql = self._get + "(" + ", ".join([self._p] * len(keys)) + f") AND expires_at > {self._p}"
        try:
            rows = self._raw.query(sql, (*keys, self._clock()))
        except self._raw.failures as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        found = {str(k): str(v) for k, v in rows}
        return {i: found[k] for i, k in zip(identities, keys, strict=True) if k in found}


class ChangeCounter:
    """A value in a memory-mapped file that every process on this machine sees change at once.

    Writers of subject state store a new random value after each commit; readers
    compare it with the value their cached entries were read under.  Reading it is
    a memory load: no system call, no lock, no GIL hand-off.  Only for SQLite,
    where every writer is on this machine.
    """

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < 8:
                os.pwrite(fd, secrets.token_bytes(8), 0)
            self._map = mmap.mmap(fd, 8)
        finally:
            os.close(fd)

    def value(self) -> bytes:
        return bytes(self._map[0:8])

    def changed(self) -> None:
        self._map[0:8] = secrets.token_bytes(8)


class SqlSubjectStateStore:
    """ports.SubjectStateStore on the embedded database.

    On SQLite, reads are cached per process and revalidated against a
    :class:`ChangeCounter` that every write changes, so the exchange's state
    lookup costs no database call while nothing has changed.  A cached entry is
    also re-read after ``max_cache_age`` seconds, so rows that expire by age go.
    """

    def __init__(
        self, engine: Engine, *, clock: Callable[[], float] = time.time, max_cache_age: float = 30.0
    ) -> None:
        self._kv = _KeyValueTable(engine, "subject_states", "state", clock)
        self._engine = engine
        self._clock = clock
        self._counter: ChangeCounter | None = None
        database = engine.url.database if engine.dialect.name == "sqlite" else None
        if database and database != ":memory:":
            self._counter = ChangeCounter(Path(f"{database}.state-generation"))
        self._cache: OrderedDict[str, tuple[bytes, float, SubjectState]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._max_cache_age = max_cache_age

    def get(self, identities: Sequence[str]) -> list[SubjectState]:
        if self._counter is None:
            found = self._kv.get(list(identities))
            return [SubjectState.from_json_dict(_loads(found.get(i))) for i in identities]
        # Read the counter before the rows: a write racing with this read changes it, so the
        # entries cached below are re-read next time rather than kept.
        generation, now = self._counter.value(), time.monotonic()
        with self._cache_lock:
            cached = [self._cache.get(i) for i in identities]
        if all(c is not None and c[0] == generation and now - c[1] < self._max_cache_age for c in cached):
            return [c[2] for c in cached if c is not None]
        found = self._kv.get(list(identities))
        states = [SubjectState.from_json_dict(_loads(found.get(i))) for i in identities]
        with self._cache_lock:
            for identity, state in zip(identities, states, strict=True):
                self._cache[identity] = (generation, now, state)
                self._cache.move_to_end(identity)
            while len(self._cache) > _STATE_CACHE_SIZE:
                self._cache.popitem(last=False)
        return states

    def _changed(self) -> None:
        if self._counter is not None:
            self._counter.changed()

    def put(self, identity: str, state: SubjectState, ttl: int) -> None:
        self._kv.put(identity, json.dumps(state.to_json_dict()), ttl)
        self._changed()

    def update(self, identity: str, change: Callable[[SubjectState], SubjectState], ttl: int) -> SubjectState:
        """Read and write in one transaction: SQLite serialises writers (a conflicting one is
        retried by :func:`transaction`); PostgreSQL takes a transaction-scoped advisory lock."""
        key = _store_key(identity)
        table = subject_states

        def work(conn: Connection) -> SubjectState:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": key})
            row = conn.execute(
                select(table.c.state).where(table.c.identity == key, table.c.expires_at > self._clock())
            ).first()
            state = change(SubjectState.from_json_dict(_loads(row[0]) if row else None))
            values = {"state": json.dumps(state.to_json_dict()), "expires_at": self._clock() + ttl}
            if conn.execute(update(table).where(table.c.identity == key).values(**values)).rowcount == 0:
                conn.execute(table.insert().values(identity=key, **values))
            return state

        try:
            state = transaction(self._engine, work)
        except SQLAlchemyError as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        self._changed()
        return state


_STATE_CACHE_SIZE = 10_000


class SqlBaselineStore:
    """ports.BaselineStore on the embedded database."""

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        self._kv = _KeyValueTable(engine, "baselines", "baseline", clock)

    def load(self, identity: str) -> Baseline:
        return Baseline.from_json(self._kv.get([identity]).get(identity))

    def save(self, identity: str, baseline: Baseline, ttl: int) -> None:
        self._kv.put(identity, baseline.to_json(), ttl)


def _loads(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


revoked_tokens = Table(
    "revoked_tokens",
    metadata,
    Column("identity", String(600), primary_key=True),
    Column("revoked", String(16), nullable=False),
    Column("expires_at", Float, nullable=False),
)


class SqlRevokedTokens:
    """ports.RevokedTokens on the embedded database."""

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        self._kv = _KeyValueTable(engine, "revoked_tokens", "revoked", clock)
        self._clock = clock

    def revoke(self, jti: str, expires_at: float) -> None:
        self._kv.put(jti, "1", max(1, int(expires_at - self._clock()) + 1))

    def revoked(self, jti: str) -> bool:
        return bool(self._kv.get([jti]))


ledger_epochs = Table(
    "ledger_epochs",
    metadata,
    Column("identity", String(600), primary_key=True),
    Column("epoch", String(600), nullable=False),
    Column("expires_at", Float, nullable=False),
)

#: How long the last known epoch of a replay store is remembered (a store unused for longer is new).
_EPOCH_MEMORY_TTL = 366 * 24 * 3600


class SqlLedgerEpochMemory:
    """Remembers, in the durable database, which epoch of the Redis replay store was last seen.

    A process that starts after Redis restarted empty has no memory of its own of
    the old epoch; this is how it still knows the records were lost (see
    :class:`sts.adapters.redis_store.LedgerEpoch`).
    """

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        self._kv = _KeyValueTable(engine, "ledger_epochs", "epoch", clock)

    def load(self, name: str) -> str | None:
        return self._kv.get([name]).get(name)

    def save(self, name: str, epoch_id: str) -> None:
        self._kv.put(name, epoch_id, _EPOCH_MEMORY_TTL)


#: Rate-limit state (:mod:`sts.adapters.sql_rate_limits`): one GCRA theoretical arrival time per key.
#: A row whose ``tat`` has passed means nothing any more and is purged now and then.
rate_limits = Table(
    "rate_limits",
    metadata,
    Column("key", String(200), primary_key=True),
    Column("tat", Float, nullable=False),
    Column("tolerance", Float, nullable=False),
)
