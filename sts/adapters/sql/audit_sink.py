"""The audit sink: every decision's record committed before its answer leaves (group commit).

The replay entries of a grant's single uses (its subject token, its DPoP proof's
``jti``) and its baseline update are written in the same transaction as the audit
record of the grant (:meth:`SqlAuditSink.write_with_uses`, used by
:class:`sts.adapters.sql.single_use.SqlSingleUseLedger`): one write transaction
per exchange, and a failed commit leaves none of them, so the token stays usable.
Every record is linked into a hash chain of its writer (:mod:`sts.adapters.sql.chain_heads`).
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Engine

from ...core.audit import AuditRecord
from ...core.audit_chain import genesis_hash, link_hash
from ...core.canonical_json import canonical_record
from ...core.ports import AlreadyUsed, AuditOutcomeUnknown, AuditUnavailable, BaselineUpdate, SingleUse
from ..request_threads import queue_wait
from .audit_reads import AuditReads
from .baseline_writes import BaselineWrite
from .chain_heads import ChainHead, ChainHeads
from .deadline import DeadlinePassed
from .engines import commit_by
from .files_in_use import WatchedFile, sqlite_file
from .group_commit import (
    GroupCommit,
    P,
    PendingRow,
    PendingUses,
    UseTaken,
    audit_row,
    newest_committed,
    sqlite_timestamp,
    within_deadline,
)
from .key_value import baseline_params
from .ledger_mark import ledger_mark
from .pg_exchange import pipelined_uses
from .replay import first_uses_statement, replay_key
from .schema import audit_events
from .sqlite_grants import SqliteGrants
from .statements import CommitOutcomeUnknown, RawStatement, failure_text

log = logging.getLogger(__name__)

#: PostgreSQL: the SQLSTATE (``division_by_zero``) with which a pipelined replay entry's insert
#: fails the transaction when the entry is taken, so that the ``COMMIT`` behind it is skipped.
_USE_TAKEN = "22012"


class SqlAuditSink(AuditReads):
    """Commits audit records; the caller returns only once its record is committed.

    Group commit: while one thread commits, records from other threads queue up, and the next
    committer writes them all in one transaction.  Each caller still waits for its own record's
    commit, so "no token leaves unless its audit record is committed" holds, and under load the
    cost of a commit is shared (as PostgreSQL's own group commit).  If a batch fails, its rows
    are retried one by one so one bad row cannot fail the others (not when the database did not
    answer: each would wait out a statement deadline of its own).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int = 128,
        timeout: float = 10.0,
        max_chains: int = 8,
        commit_deadline: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.timeout = timeout
        #: Seconds after its request's start past which no record is committed (see _commit_batch).
        self.commit_deadline, self.clock = commit_deadline, clock
        # Each transaction of the sink starts with a write (see RawStatement.transaction).
        self._raw = RawStatement(engine, writes_first=True)
        self._chains = ChainHeads(1 if self._raw.sqlite else max_chains)
        self.mark = ledger_mark(engine)  # SQLite: its lost commits noticed (see .ledger_mark)
        # SQLite: no commit into files deleted or replaced under the process (lost at its restart).
        file = sqlite_file(engine) if self.mark is None else None
        self._file = self.mark.watched if self.mark is not None else WatchedFile(file) if file else None
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
        if self._raw.sqlite:
            # The same text the driver's (deprecated) default adapter gave, which the trail holds.
            self._processors["time"] = sqlite_timestamp
        #: Each converted column's position among ``_columns``, and its conversion.
        self._conversions = [
            (index, self._processors[name])
            for index, name in enumerate(self._columns)
            if name in self._processors
        ]
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
        self._save_baseline = BaselineWrite(p, grant=True)
        self._count_links = (
            f"SELECT count(*) FROM audit_events WHERE chain_id = {p} AND seq >= {p} AND seq <= {p}"  # noqa: S608
        )
        #: SQLite: a batch of grants in one statement.
        self._grants = SqliteGrants(self._raw, self._columns) if self._raw.sqlite else None
        self._writes = GroupCommit(self._commit, max_batch, timeout, gather=True)
        self._writes_with_uses = GroupCommit(self._commit_with_uses, max_batch, timeout, gather=True)

    def _stored_row(self, record: AuditRecord) -> dict[str, Any]:
        """The row of ``record``, with the record as its canonical JSON text (what the chain hashes).

        The columns are taken from the record as stored, so a verifier that reads the
        stored record back finds them equal (they differ from ``record`` only where
        it held something JSON cannot carry, see :func:`canonical_record`).
        """
        row = audit_row(record)
        stored_text, stored = canonical_record(row["record"])
        if stored is not row["record"]:
            with contextlib.suppress(TypeError, ValueError, OverflowError):
                row = audit_row(AuditRecord(**stored))
        row["record"] = stored_text
        return row

    def write(self, record: AuditRecord) -> None:
        # A grant's deadline counts from its arrival, queue included; any other record's from now
        # (outside audits; see within_deadline).  ``started`` stays the arrival: the mark reads it.
        started = record.time - queue_wait()
        due = started if record.outcome == "granted" else self.clock()
        item = PendingRow(self._stored_row(record), started=started, deadline_from=due)
        self._writes.join(item)
        if item.error is not None:
            raise (AuditOutcomeUnknown if item.unknown else AuditUnavailable)(item.error)

    def write_with_uses(
        self,
        record: AuditRecord,
        uses: Sequence[SingleUse],
        now: float,
        baseline: BaselineUpdate | None = None,
    ) -> None:
        """Commit ``record``, the replay entries of ``uses`` and ``baseline`` in one transaction.

        Either all are committed or none: a failed commit leaves the single-use
        credentials unused.  Raises :class:`AlreadyUsed` naming the first of ``uses``
        that has a live entry (a concurrent request committed first; on PostgreSQL
        the insert waits for that request's transaction), :class:`AuditUnavailable`
        when the transaction cannot be committed.

        Group-committed like :meth:`write`: concurrent callers in this process share one
        transaction, each in a savepoint of its own, so a use found taken rolls back only
        its own record, entries and baseline; the hash chain links only the records that
        stay, in commit order.
        """
        entries = [(use, replay_key(use.purpose, use.key)) for use in uses]
        if len({key for _, key in entries}) < len(entries):
            # One use twice in one grant (one statement cannot insert a key twice): the second is a replay.
            keys = [key for _, key in entries]
            raise AlreadyUsed(next(use for i, (use, key) in enumerate(entries) if key in keys[:i]))
        item = PendingUses(
            self._stored_row(record),
            started=record.time - queue_wait(),  # counted from its arrival, queue included
            entries=entries,
            entry_params=[*(v for use, key in entries for v in (key, use.expires_at)), now],
            baseline=baseline_params(baseline, now) if baseline is not None else None,
        )
        self._writes_with_uses.join(item)
        if item.taken is not None:
            raise AlreadyUsed(item.taken)
        if item.error is not None:
            raise (AuditOutcomeUnknown if item.unknown else AuditUnavailable)(item.error)
        if item.settled:
            log.warning("audit commit confirmed after its connection broke (event %s)", record.event_id)

    def _commit_with_uses(self, batch: list[PendingUses]) -> None:
        live = self._commit_batch(batch, self._commit_uses_linked)
        if live and self.mark is not None:
            self.mark.granted(newest_committed(live))

    def _commit_uses_linked(self, head: ChainHead, batch: list[PendingUses]) -> None:
        """Commit ``batch`` in one transaction on ``head``'s chain, each item in a savepoint of its
        own (when there are several); if the transaction fails, each item alone, so one bad row
        fails only its own writer."""
        savepoints = len(batch) > 1

        def work(cur: Any) -> tuple[list[PendingUses], int, str]:
            kept: list[PendingUses] = []
            seq, prev, registered = head.seq, head.hash, head.registered
            for item in batch:
                item.taken = None
                if savepoints:
                    cur.execute("SAVEPOINT item")
                try:
                    if item.entries:
                        # One statement for all the uses; a use whose key it did not write is taken.
                        entries = first_uses_statement(self._raw.placeholder, len(item.entries))
                        cur.execute(entries, item.entry_params)
                        written = {row[0] for row in cur.fetchall()}
                        for use, key in item.entries:
                            if key not in written:
                                raise UseTaken(use)
                except UseTaken as taken:
                    if not savepoints:
                        raise
                    cur.execute("ROLLBACK TO SAVEPOINT item")
                    cur.execute("RELEASE SAVEPOINT item")
                    item.taken = taken.use
                    continue
                # Linked only now, so the chain holds the records that stay, in commit order.
                seq += 1
                prev = self._write_item(cur.execute, head, item, seq, prev, registered)
                registered = True
                if savepoints:
                    cur.execute("RELEASE SAVEPOINT item")
                kept.append(item)
            return kept, seq, prev

        try:
            if self._grants is not None:  # In one statement if every use is free; else by ``work``.
                kept, seq, digest = self._grants.commit(head, batch, self._linked, work)
            else:
                kept, seq, digest = pipelined_uses(self._raw, head, batch, self._write_item, work, _USE_TAKEN)
        except UseTaken as taken:  # One item, no savepoint: nothing was committed.
            batch[0].taken = taken.use
            return
        except CommitOutcomeUnknown as exc:
            # The connection broke during COMMIT.  Ask again on a fresh one: if the records are
            # there, so are their uses, and their tokens may leave; else none was committed.
            kept = [item for item in batch if item.taken is None]
            if not kept or self._settle(head, head.seq + len(kept), len(kept), kept[-1].row["hash"]):
                for item in kept:
                    item.settled = True
            else:
                for item in kept:
                    item.error, item.unknown = f"commit outcome unknown: {exc}", True
            return
        except self._integrity_errors as exc:
            head.restart()  # Perhaps a link taken by a commit thought lost: go on on a new chain.
            failure = failure_text(exc)
            silent = False
        except self._raw.failures as exc:
            failure = failure_text(exc)
            silent = isinstance(exc, DeadlinePassed)
        else:
            if kept:
                head.advance(seq, digest)
            return
        for item in batch:
            item.taken = None
        if len(batch) == 1 or silent:
            # The database is not answering: each item alone would wait out a deadline of its own.
            for item in batch:
                item.error = failure
        else:
            for item in batch:
                self._commit_uses_linked(head, [item])

    def _write_item(
        self,
        execute: Callable[..., Any],
        head: ChainHead,
        item: PendingUses,
        seq: int,
        prev: str,
        registered: bool,
    ) -> str:
        """Write ``item``: its baseline, the chain's row with its first record, the record as ``seq``."""
        if item.baseline is not None:
            execute(self._save_baseline.sql, self._save_baseline.params(item.baseline))
        if not registered:
            execute(self._register_chain, self._registration(head))
        digest, params = self._linked(head, item, seq, prev)
        execute(self._sql(1), params)
        return digest

    def _linked(self, head: ChainHead, item: PendingRow, seq: int, prev: str) -> tuple[str, list[Any]]:
        """Link ``item`` as ``seq`` of ``head``'s chain, after ``prev``: its hash and its parameters."""
        row = item.row
        digest = link_hash(prev, head.chain_id, seq, row["record"])
        row["chain_id"], row["seq"], row["prev_hash"], row["hash"] = head.chain_id, seq, prev, digest
        return digest, self._params([item])

    def _registration(self, head: ChainHead) -> tuple[Any, ...]:
        """The ``audit_chains`` row of ``head``'s chain, committed with its first record."""
        genesis = genesis_hash(head.chain_id)
        return (head.chain_id, time.time(), f"{socket.gethostname()}:{head.pid}"[:200], genesis, genesis)

    def _link(self, head: ChainHead, batch: list[PendingRow]) -> tuple[list[Any], int, str]:
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
            raise AuditOutcomeUnknown(f"commit outcome unknown: {type(exc).__name__}") from None
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

    def _params(self, batch: list[PendingRow]) -> list[Any]:
        params: list[Any] = []
        for item in batch:
            values = list(map(item.row.get, self._columns))  # (one call per row, not per column)
            for index, convert in self._conversions:
                if values[index] is not None:
                    values[index] = convert(values[index])
            params += values
        return params

    def _commit(self, batch: list[PendingRow]) -> None:
        self._commit_batch(batch, self._commit_linked)

    def _commit_batch(self, batch: list[P], commit: Callable[[ChainHead, list[P]], None]) -> list[P]:
        """Run ``commit`` on a borrowed chain head, on the items within :attr:`commit_deadline`
        (:func:`~.group_commit.within_deadline`), and mark each done: an unavailable audit fails
        those not already refused (a use taken by another request).  Returns the items tried."""
        batch, by = within_deadline(batch, self.commit_deadline, self.clock())
        if not batch:
            return batch
        try:
            problem = self._file.problem(before_commit=True) if self._file is not None else None
            if problem is not None:
                if self.mark is not None:
                    self.mark.lost(self.clock())  # the commits in those files are lost
                raise AuditUnavailable(f"the audit database: {problem} (restart the process)")
            with commit_by(by), self._chains.borrow(self.timeout) as head:
                commit(head, batch)
        except AuditUnavailable as exc:
            for item in batch:
                if getattr(item, "taken", None) is None and item.error is None:
                    item.error, item.unknown = str(exc), isinstance(exc, AuditOutcomeUnknown)
        except BaseException:
            for item in batch:
                item.error = item.error or "interrupted"
                item.done = True
            raise
        for item in batch:
            item.done = True
        return batch

    def _commit_linked(self, head: ChainHead, batch: list[PendingRow]) -> None:
        """Commit ``batch`` on ``head``'s chain; if it fails, each alone (one bad row fails one)."""
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
            # Not there now; the server may yet finish the commit (see _settle).
            for item in batch:
                item.error, item.unknown = f"commit outcome unknown: {failure_text(exc)}", True
            return
        except self._integrity_errors as exc:
            head.restart()  # Perhaps a link taken by a commit thought lost: go on on a new chain.
            failure = failure_text(exc)
            silent = False
        except self._raw.failures as exc:
            failure = failure_text(exc)
            silent = isinstance(exc, DeadlinePassed)
        if len(batch) == 1 or silent:
            # The database is not answering: each record alone would wait out a deadline of its own.
            for item in batch:
                item.error = failure
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
