"""The audit sink's group commit when a commit is slow or the database does not answer.

A record a commit holds must get that commit's outcome: a request that gave up on it after its
timeout was refused ``503`` while its record (and its single-use token) was committed, so the
trail showed a grant whose token was never sent.  And a batch whose database did not answer (a
statement past its deadline) is not tried again record by record: each record would wait out a
deadline of its own while the requests behind them wait (seen under a PostgreSQL ``LOCK TABLE``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from sts.adapters import request_threads
from sts.adapters.sql import group_commit
from sts.adapters.sql.audit_sink import SqlAuditSink
from sts.adapters.sql.deadline import DeadlinePassed
from sts.adapters.sql.engines import make_engine
from sts.adapters.sql.group_commit import GroupCommit, PendingRow, PendingUses
from sts.core.ports import AuditUnavailable, SingleUse
from sts.migrations import upgrade
from tests.core.test_audit_chain import decision


def test_a_record_held_by_a_slow_commit_gets_its_outcome_not_a_timeout() -> None:
    committed: list[int] = []

    def commit(batch: list[PendingRow]) -> None:
        time.sleep(0.3)
        committed.extend(item.row["n"] for item in batch)
        for item in batch:
            item.done = True

    group = GroupCommit(commit, max_batch=16, timeout=0.4)
    outcomes: dict[int, str] = {}

    def write(n: int) -> None:
        try:
            group.join(PendingRow({"n": n}))
            outcomes[n] = "committed"
        except AuditUnavailable as exc:
            outcomes[n] = str(exc)

    first = threading.Thread(target=write, args=(0,))
    first.start()
    time.sleep(0.05)  # the first commits; the next two queue behind it
    others = [threading.Thread(target=write, args=(n,)) for n in (1, 2)]
    for thread in others:
        thread.start()
    for thread in [first, *others]:
        thread.join(5)
    # When the first commit ends (0.3 s), one of the two takes both records into its batch (until
    # 0.6 s); the other, past its timeout (0.45 s), waits for that batch: it gave up, and was
    # refused, while its record was committed.
    assert sorted(committed) == [0, 1, 2]
    assert outcomes == {0: "committed", 1: "committed", 2: "committed"}


def test_a_queued_record_past_its_timeout_is_withdrawn_and_refused() -> None:
    release = threading.Event()
    committed: list[int] = []

    def commit(batch: list[PendingRow]) -> None:
        release.wait(5)
        committed.extend(item.row["n"] for item in batch)
        for item in batch:
            item.done = True

    group = GroupCommit(commit, max_batch=16, timeout=0.2)
    first = threading.Thread(target=group.join, args=(PendingRow({"n": 0}),))
    first.start()
    time.sleep(0.05)
    with pytest.raises(AuditUnavailable, match="timeout waiting for the audit commit"):
        group.join(PendingRow({"n": 1}))  # still queued behind the first commit at its timeout
    release.set()
    first.join(5)
    assert committed == [0]  # withdrawn: never committed


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    made = make_engine(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    upgrade(made)
    yield made
    made.dispose()


def test_a_batch_the_database_did_not_answer_is_not_retried_record_by_record(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = SqlAuditSink(engine)
    calls: list[str] = []

    def silent(*_args: Any, **_kwargs: Any) -> Any:
        calls.append("statement")
        raise DeadlinePassed("no answer from PostgreSQL within 5 s")

    monkeypatch.setattr(sink._raw, "run", silent)
    monkeypatch.setattr(sink._raw, "transaction", silent)
    batch = [PendingRow(sink._stored_row(decision(n))) for n in range(4)]
    sink._commit(batch)
    assert calls == ["statement"]  # it was tried again for each of the four records
    assert all(item.done and item.error == "DeadlinePassed" for item in batch)


def test_a_batch_with_one_bad_row_is_still_retried_record_by_record(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the record-by-record retry is for (one bad row must not fail the others) still holds."""
    sink = SqlAuditSink(engine)
    sink.write(decision(100))  # the chain is registered: a batch is then one statement
    run = sink._raw.run
    calls: list[int] = []

    def failing_once(sql: str, params: Any) -> int:
        calls.append(len(params))
        if len(calls) == 1:
            raise engine.dialect.loaded_dbapi.OperationalError("disk I/O error")
        return run(sql, params)

    monkeypatch.setattr(sink._raw, "run", failing_once)
    batch = [PendingRow(sink._stored_row(decision(n))) for n in range(3)]
    sink._commit(batch)
    assert len(calls) == 4 and all(item.done and item.error is None for item in batch)


def test_a_batch_of_grants_failing_on_integrity_is_retried_grant_by_grant(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An integrity error (a chain link taken by a commit thought lost) still sends the grants of
    a batch one by one, on a new chain (the branch once left ``silent`` unset: an UnboundLocalError)."""
    sink = SqlAuditSink(engine)
    assert sink._grants is not None
    commit = sink._grants.commit
    calls: list[int] = []

    def failing_once(head: Any, batch: list[PendingUses], *rest: Any) -> Any:
        calls.append(len(batch))
        if len(calls) == 1:
            raise engine.dialect.loaded_dbapi.IntegrityError("UNIQUE constraint failed")
        return commit(head, batch, *rest)

    monkeypatch.setattr(sink._grants, "commit", failing_once)
    now = time.time()
    batch = [
        PendingUses(
            sink._stored_row(decision(n)),
            entries=[(SingleUse("subject_token", f"t{n}", now + 300, None), f"subject_token:t{n}")],
            entry_params=[f"subject_token:t{n}", now + 300, now],
        )
        for n in range(2)
    ]
    sink._commit_with_uses(batch)
    assert calls == [2, 1, 1]
    assert all(item.done and item.error is None and item.taken is None for item in batch)


def _recording(sizes: list[int], pause: float = 0.0) -> Callable[[list[PendingRow]], None]:
    """A commit that records each batch's size, holds the thread ``pause`` seconds (as SQLite's
    commit holds its turn: no wait marked) and marks the batch done."""

    def commit(batch: list[PendingRow]) -> None:
        sizes.append(len(batch))
        time.sleep(pause)
        for item in batch:
            item.done = True

    return commit


def _batches_of_concurrent_requests(monkeypatch: pytest.MonkeyPatch, *, gather: bool) -> list[int]:
    """Four requests on one worker's request threads (one turn), each committing one record; the
    commit holds the turn as SQLite's does (no wait marked).  The sizes of the batches committed."""
    monkeypatch.setattr(group_commit, "GATHER_SECONDS", 5.0)  # the turns decide, not the machine's speed
    sizes: list[int] = []
    group = GroupCommit(_recording(sizes, pause=0.01), max_batch=16, timeout=5, gather=gather)
    items = [PendingRow({"n": n}) for n in range(4)]

    async def body() -> None:
        threads = request_threads.RequestThreads(asyncio.get_running_loop(), 4, 1)
        try:
            await asyncio.gather(*(threads.run(group.join, item) for item in items))
        finally:
            threads.shutdown()

    asyncio.run(body())
    assert all(item.done and item.error is None for item in items)
    return sizes


def test_a_committer_that_gathers_lets_the_waiting_requests_join_its_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _batches_of_concurrent_requests(monkeypatch, gather=True) == [4]


def test_without_gathering_each_request_commits_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # The commit holds the turn: the queued requests reach the group only after it.
    assert _batches_of_concurrent_requests(monkeypatch, gather=False) == [1, 1, 1, 1]


def test_a_committer_outside_request_threads_does_not_wait_to_gather() -> None:
    assert request_threads.yield_turn() is False
    sizes: list[int] = []
    started = time.monotonic()
    GroupCommit(_recording(sizes), max_batch=16, timeout=5, gather=True).join(PendingRow({}))
    assert sizes == [1] and time.monotonic() - started < 0.1


def test_gathering_stops_when_a_request_given_the_turn_goes_to_wait_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a Redis store a request makes a round trip before its record: given the turn, it
    gives it back from that wait without joining.  One such turn is enough to stop gathering."""
    monkeypatch.setattr(group_commit, "GATHER_SECONDS", 5.0)
    sizes: list[int] = []
    yields: list[tuple[int, bool]] = []  # (commits before it, whether the turn was given up)

    def counted_yield() -> bool:
        given = request_threads.yield_turn()
        yields.append((len(sizes), given))
        return given

    monkeypatch.setattr(group_commit, "yield_turn", counted_yield)
    group = GroupCommit(_recording(sizes), max_batch=16, timeout=5, gather=True)

    def request(n: int) -> None:
        if n:
            with request_threads.waiting():
                time.sleep(0.2)  # a round trip before its record
        group.join(PendingRow({"n": n}))

    async def body() -> None:
        threads = request_threads.RequestThreads(asyncio.get_running_loop(), 4, 1)
        try:
            await asyncio.gather(*(threads.run(request, n) for n in range(4)))
        finally:
            threads.shutdown()

    asyncio.run(body())
    # The first committer gave its turn up once, nobody joined, and it committed alone (it gave
    # the turn to each request in turn, all three going to wait, before).
    assert [given for before, given in yields if before == 0] == [True]
    assert sizes[0] == 1 and sum(sizes) == 4
