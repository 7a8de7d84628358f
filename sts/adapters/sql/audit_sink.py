"""The audit sink: every decision's record committed before its answer leaves (group commit).

A single-use subject token's replay entry is inserted in the same transaction as
the audit record of its grant (:meth:`SqlAuditSink.write_with_uses`, used by
:class:`sts.adapters.sql.single_use.SqlSingleUseLedger`), so a failed commit
leaves neither and the token stays usable.  Every record is linked into a hash
chain of its writer (:mod:`sts.adapters.sql.chain_heads`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select

from ...core.audit import AuditRecord
from ...core.audit_chain import canonical_record, genesis_hash, link_hash
from ...core.ports import AlreadyUsed, AuditUnavailable, SingleUse
from .chain_heads import ChainHead, ChainHeads
from .replay import first_use_statement, replay_key
from .schema import audit_events
from .statements import CommitOutcomeUnknown, RawStatement

log = logging.getLogger(__name__)


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


class _UseTaken(Exception):
    """Inside :meth:`SqlAuditSink.write_with_uses`: roll back, the use is someone else's."""


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
        self._chains = ChainHeads(1 if self._raw.sqlite else max_chains)
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

    def _registration(self, head: ChainHead) -> tuple[Any, ...]:
        """The ``audit_chains`` row of ``head``'s chain, committed with its first record."""
        genesis = genesis_hash(head.chain_id)
        return (head.chain_id, time.time(), f"{socket.gethostname()}:{head.pid}"[:200], genesis, genesis)

    def _link(self, head: ChainHead, batch: list[_PendingRow]) -> tuple[list[Any], int, str]:
        """Link ``batch`` onto ``head`` (in order): its parameters, and the new head's seq and hash.

        ``head`` itself moves only once the rows are committed (:meth:`ChainHead.advance`).
        """
        seq, prev = head.seq, head.hash
        for item in batch:
            seq += 1
            row = item.row
            digest = link_hash(prev, head.chain_id, seq, row["record"])
            row["chain_id"], row["seq"], row["prev_hash"], row["hash"] = head.chain_id, seq, prev, digest
            prev = digest
        return self._params(batch), seq, prev

    def _settle(self, head: ChainHead, last: int, count: int, digest: str) -> bool:
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

    def _commit_linked(self, head: ChainHead, batch: list[_PendingRow]) -> None:
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
