"""Group commit for the audit sink: the rows waiting to be committed, and the queue they wait in.

While one caller commits a batch, others queue behind it and the next committer
takes them all in one transaction (:class:`~sts.adapters.sql.audit_sink.SqlAuditSink`);
each caller returns only once its own row is committed, or refuses.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ...core.audit import AuditRecord
from ...core.ports import AuditUnavailable, SingleUse
from ..request_threads import waiting, yield_turn

#: Seconds a committer may spend gathering (see :class:`GroupCommit`'s ``gather``).
GATHER_SECONDS = 0.005


def column_text(value: str | None, limit: int) -> str | None:
    """A value safe for any text column: PostgreSQL refuses NUL and lone surrogates."""
    if value is None:
        return None
    value = value[:limit]
    if value.isprintable():
        return value
    return value.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\N{REPLACEMENT CHARACTER}")


def utc(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, tz=dt.UTC)


def sqlite_timestamp(value: dt.datetime) -> str:
    """A timestamp as SQLite stores it here: the text ``sqlite3``'s default datetime adapter
    writes (``isoformat`` with a space, ``2026-12-06 22:34:06.470474+00:00``), written by this
    package instead, since Python 3.12 deprecates the default adapters
    (https://docs.python.org/3/library/sqlite3.html#default-adapters-and-converters-deprecated).
    """
    return value.isoformat(" ")


def audit_row(record: AuditRecord) -> dict[str, Any]:
    """The ``audit_events`` row of ``record`` (its ``record`` column the record's dictionary)."""
    return {
        "event_id": record.event_id,
        "time": utc(record.time),
        "request_id": column_text(record.request_id, 128),
        "endpoint": record.endpoint,
        "outcome": record.outcome,
        "error": record.error,
        "client_id": column_text(record.client_id or None, 128),
        "client_auth_method": column_text(record.client_auth_method, 32),
        "issuer": column_text(record.issuer, 64),
        "subject": column_text(record.subject, 512),
        "subject_token_type": column_text(record.subject_token_type, 128),
        "subject_token_sha256": record.subject_token_sha256,
        "subject_token_jti": column_text(record.subject_token_jti, 256),
        "actor_issuer": column_text(record.actor_issuer, 64),
        "actor_subject": column_text(record.actor_subject, 512),
        "actor_token_sha256": record.actor_token_sha256,
        "rule": column_text(record.rule, 128),
        "issued_jti": record.issued_jti,
        "issued_exp": record.issued_exp,
        "issued_kid": record.issued_kid,
        "source_ip": column_text(record.source_ip, 64),
        "record": record.as_dict(),
    }


@dataclass(eq=False)
class PendingRow:
    row: dict[str, Any]
    done: bool = False
    error: str | None = None
    #: With ``error``: the commit was sent and no answer came; the record may yet be committed.
    unknown: bool = False
    #: When its request started (epoch seconds; :attr:`AuditRecord.time`), for a commit deadline.
    started: float | None = None
    #: When the commit deadline starts, if not at ``started`` (a record that grants nothing).
    deadline_from: float | None = None


@dataclass(eq=False)
class PendingUses(PendingRow):
    """A record to commit with the replay entries of its uses and its baseline update."""

    #: Each use with its ``replay_entries`` key, and the parameters of the statement inserting them.
    entries: list[tuple[SingleUse, str]] = field(default_factory=list)
    entry_params: list[Any] = field(default_factory=list)
    baseline: tuple[Any, ...] | None = None
    #: The use a concurrent request had committed first: this record was not written.
    taken: SingleUse | None = None
    #: Committed, but known only after its connection broke during COMMIT.
    settled: bool = False


class GroupCommit:
    """Group commit: while one caller commits a batch, others queue, and the next committer
    takes them all.  Each caller returns once its own item is done (or it timed out queued).

    ``gather``: before it takes its batch, the committer lets the requests waiting for this
    worker's turn run first (:func:`~sts.adapters.request_threads.yield_turn`), each up to its
    own commit, where it joins the batch; for at most :data:`GATHER_SECONDS`, ``max_batch``
    items, and only while requests wait and each turn given up brings one more.  On SQLite a
    commit runs in the process and holds the turn, so without it the requests queued behind a
    commit reached the group only after it (batches of one); a batch of grants is one statement
    there (:mod:`.sqlite_grants`), and most of a grant's cost is per statement, not per row:
    every commit re-reads the pages it needs (a commit by another connection empties a
    connection's page cache) and writes a WAL frame for each page it changed (page 1, the audit
    table's last leaf and the leaves of its indexes, shared by the batch).  Measured with
    ``strace -c`` on ``benchmarks/exchange_cpu.py --processes 2 --in-flight 4``: 26.5
    ``pwrite64`` and 19.6 ``pread64`` per request without it, 19.6 and 14.9 with it.  On
    PostgreSQL requests run during the commit's round trip anyway, but a bigger batch shares one
    round trip, one ``BEGIN``/``COMMIT`` and one WAL flush among more grants.
    """

    def __init__(
        self, commit: Callable[[Any], None], max_batch: int, timeout: float, *, gather: bool = False
    ) -> None:
        self._commit = commit
        self.max_batch = max_batch
        self.timeout = timeout
        self.gather = gather
        self._cond = threading.Condition()
        self._pending: list[PendingRow] = []
        self._committing = False

    def join(self, item: PendingRow) -> None:
        deadline = time.monotonic() + self.timeout
        with self._cond:
            self._pending.append(item)
            lead = not self._committing
            self._committing = True
        if not lead:
            # Another thread commits: its round trip (or SQLite's) is a wait, so this request
            # thread gives up its turn meanwhile (and takes one back only after the lock).
            with waiting(), self._cond:
                while not item.done and self._committing:
                    remaining = deadline - time.monotonic()
                    if remaining > 0:
                        self._cond.wait(remaining)
                    elif item in self._pending:
                        # Too slow: withdraw the record while it is still queued, and refuse.
                        self._pending.remove(item)
                        raise AuditUnavailable("timeout waiting for the audit commit")
                    else:
                        # A commit holds it: its outcome is this request's (refusing now would
                        # leave in the trail a grant whose token was never sent, and its single-use
                        # token spent).  Commits end: statement deadlines on PostgreSQL, the lock
                        # deadline on SQLite.
                        self._cond.wait()
                if item.done:
                    return
                self._committing = True  # the commit before took other items: this one leads
        try:
            if self.gather:
                try:
                    self._gather()
                except BaseException:
                    with self._cond:  # never committed after its caller was told otherwise
                        if item in self._pending:
                            self._pending.remove(item)
                    raise
            while not item.done:  # (more than max_batch queued ahead of it: one batch more)
                with self._cond:
                    batch = self._pending[: self.max_batch]
                    del self._pending[: self.max_batch]
                self._commit(batch)
        finally:
            with self._cond:
                self._committing = False
                self._cond.notify_all()

    def _gather(self) -> None:
        """Let the requests waiting for a turn join the batch first (see the class docstring), as
        long as each turn given up brings one: a request that gave the turn back without joining
        went to wait on something else (a Redis round trip before its record), and the next
        would most likely do the same."""
        end = time.monotonic() + GATHER_SECONDS
        pending = len(self._pending)
        while pending < self.max_batch and time.monotonic() < end and yield_turn():
            joined, pending = len(self._pending) - pending, len(self._pending)
            if joined <= 0:
                return


class UseTaken(Exception):
    """Inside :meth:`SqlAuditSink.write_with_uses`: roll back, the use is someone else's."""

    def __init__(self, use: SingleUse) -> None:
        super().__init__()
        self.use = use


#: Why a grant past its commit deadline is refused (see :func:`within_deadline`).
LATE = "not committed within database_deadline of the request's start"

P = TypeVar("P", bound=PendingRow)


def _deadline_start(item: PendingRow) -> float | None:
    return item.started if item.deadline_from is None else item.deadline_from


def within_deadline(batch: list[P], deadline: float | None, now: float) -> tuple[list[P], float | None]:
    """The items of ``batch`` whose request started at most ``deadline`` seconds before ``now``, and
    the moment (``time.monotonic()``) their commit must end by: the earliest of their starts plus
    ``deadline`` (None, and every item, without a deadline).  An item's ``deadline_from``, when
    set, stands for its start: a record that grants nothing is given the whole deadline from its
    write, however long its request took to decide.

    The others are refused now, unwritten (:data:`LATE`): a grant committed after its client
    gave up spends its single-use token on an answer nobody reads (an outside audit: a write
    lock held elsewhere for 15 s had grants committed 13 to 14.5 s after their requests began,
    their clients gone after 10 s).
    """
    if deadline is None:
        return batch, None
    live = []
    for item in batch:
        start = _deadline_start(item)
        if start is not None and now > start + deadline:
            item.error, item.done = LATE, True
        else:
            live.append(item)
    earliest = min((_deadline_start(item) or now for item in live), default=now)
    return live, time.monotonic() + (earliest + deadline - now)


def newest_committed(batch: list[P]) -> float:
    """The latest start of the requests of ``batch`` whose record was committed (0.0: none)."""
    return max(
        (item.started or 0.0 for item in batch if item.done and item.error is None and not _taken(item)),
        default=0.0,
    )


def _taken(item: PendingRow) -> bool:
    return getattr(item, "taken", None) is not None
