"""SQLite's request statements: one connection per thread, and WAL checkpoints off the request path."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event
from sqlalchemy.exc import OperationalError

from sts.adapters.sql import sqlite_local
from sts.adapters.sql.engines import make_engine
from sts.adapters.sql.replay import SqlReplayCache
from sts.adapters.sql.sqlite_local import checkpoint, local_connections
from sts.adapters.sql.statements import RawStatement
from sts.migrations import upgrade

NOW = 1_700_000_000.0


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'state.sqlite'}")
    upgrade(engine)
    yield engine
    engine.dispose()


def _traced(engine: Engine) -> list[str]:
    """Every statement of every connection the engine opens from now on."""
    statements: list[str] = []
    event.listen(engine, "connect", lambda conn, _record: conn.set_trace_callback(statements.append))
    engine.dispose()
    return statements


def test_statements_of_a_thread_share_one_connection_without_pool_checkouts(engine: Engine) -> None:
    checkouts: list[int] = []
    event.listen(engine, "checkout", lambda *_: checkouts.append(1))
    replay = SqlReplayCache(engine)
    raw = RawStatement(engine)
    for i in range(20):
        assert replay.first_use("p", f"k{i}", NOW + 60, NOW)
        assert raw.query("SELECT count(*) FROM replay_entries", ()) == [(i + 1,)]
    assert not replay.first_use("p", "k0", NOW + 60, NOW)
    # One connection taken from the pool for this thread, then kept: not one checkout per statement.
    assert len(checkouts) == 1


def test_the_threads_of_a_process_share_one_connection_one_at_a_time(engine: Engine) -> None:
    """One connection per process (a commit by another connection of the process would empty its
    page cache): each thread's statement waits while another thread uses it."""
    connections = local_connections(engine)
    assert connections is not None
    replay = SqlReplayCache(engine)
    seen: list[int] = []

    def use() -> None:
        replay.first_use("p", threading.current_thread().name, NOW + 60, NOW)
        held = connections._slot.held
        assert held is not None
        seen.append(id(held.conn))

    threads = [threading.Thread(target=use, name=f"t{i}") for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 4
    assert len(set(seen)) == 1
    assert len(connections._held) == 1

    # While one thread holds the connection, another's statement waits for it.
    holding, release = threading.Event(), threading.Event()
    done: list[float] = []

    def hold() -> None:
        with connections.cursor():
            holding.set()
            release.wait(10)

    def query() -> None:
        RawStatement(engine).query("SELECT count(*) FROM replay_entries", ())
        done.append(time.monotonic())

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(10)
    other = threading.Thread(target=query)
    other.start()
    time.sleep(0.2)
    assert not done
    released = time.monotonic()
    release.set()
    holder.join(10)
    other.join(10)
    assert done and done[0] >= released


def test_dispose_closes_the_connections_and_the_next_statement_opens_a_new_one(engine: Engine) -> None:
    replay = SqlReplayCache(engine)
    assert replay.first_use("p", "a", NOW + 60, NOW)
    connections = local_connections(engine)
    assert connections is not None
    before = connections._slot.held.conn
    statements = _traced(engine)  # disposes of the engine
    with pytest.raises(sqlite3.ProgrammingError):
        before.execute("SELECT 1")  # closed
    assert not replay.first_use("p", "a", NOW + 60, NOW)
    assert any("INSERT INTO replay_entries" in s for s in statements)


def test_a_failed_transaction_is_rolled_back_and_the_connection_stays_usable(engine: Engine) -> None:
    raw = RawStatement(engine)

    def work(cur: Any) -> None:
        cur.execute("INSERT INTO replay_entries (key, expires_at) VALUES ('x', 1)")
        raise RuntimeError("refused")

    with pytest.raises(RuntimeError):
        raw.transaction(work)
    assert raw.query("SELECT count(*) FROM replay_entries", ()) == [(0,)]
    insert = "INSERT INTO replay_entries VALUES ('y', 1)"
    assert raw.transaction(lambda cur: cur.execute(insert).rowcount) == 1
    assert raw.query("SELECT key FROM replay_entries", ()) == [("y",)]


def test_a_connection_opened_read_only_is_replaced(engine: Engine) -> None:
    """SQLite opens a file it cannot write read-only, silently, and the connection stays so once
    the file is writable again (found from outside: after a chmod fault, one worker failed every
    write until restarted).  Such a connection is closed on its first SQLITE_READONLY, this
    thread's and the pool's alike, and the next statement runs on a new one.  (``query_only``
    makes one here: the tests run as root, whom file modes do not stop.)"""
    raw = RawStatement(engine)
    insert = "INSERT INTO replay_entries (key, expires_at) VALUES (?, ?)"
    raw.run(insert, ("before", NOW))
    connections = local_connections(engine)
    assert connections is not None
    with connections.cursor() as cur:
        cur.execute("PRAGMA query_only=1")
    with pytest.raises(sqlite3.OperationalError, match="readonly database") as failed:
        raw.run(insert, ("during", NOW))
    assert sqlite_local.read_only(failed.value)
    raw.run(insert, ("after", NOW))
    # The pool's connections (transactions, migrations, the audit queries) too.
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA query_only=1")
    with pytest.raises(OperationalError, match="readonly database"), engine.begin() as conn:
        conn.exec_driver_sql(insert, ("pooled-during", NOW))
    with engine.begin() as conn:
        conn.exec_driver_sql(insert, ("pooled-after", NOW))
    keys = {row[0] for row in raw.query("SELECT key FROM replay_entries", ())}
    assert keys == {"before", "after", "pooled-after"}
    assert not sqlite_local.read_only(sqlite3.OperationalError("database is locked"))


def test_a_statement_inside_a_transaction_of_the_same_thread_runs_on_its_own_connection(
    engine: Engine,
) -> None:
    """A nested statement (run from a transaction's work) does not join that transaction."""
    raw = RawStatement(engine)

    def work(cur: Any) -> int:
        cur.execute("INSERT INTO replay_entries VALUES ('outer', 1)")
        # Another connection sees nothing uncommitted.
        return len(raw.query("SELECT key FROM replay_entries", ()))

    assert raw.transaction(work) == 0
    assert raw.query("SELECT key FROM replay_entries", ()) == [("outer",)]


def test_request_connections_leave_checkpoints_to_the_checkpoint_thread(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    connections = local_connections(engine)
    assert connections is not None
    statements = _traced(engine)
    connections.checkpoints.every = 5
    replay = SqlReplayCache(engine)
    for i in range(20):
        assert replay.first_use("p", f"k{i}", NOW + 60, NOW)
    request_thread = [s for s in statements if "wal_autocheckpoint" in s]
    assert request_thread == [f"PRAGMA wal_autocheckpoint={sqlite_local.AUTOCHECKPOINT_PAGES}"]
    deadline = time.monotonic() + 30
    while connections.checkpoints.runs == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert connections.checkpoints.runs >= 1
    assert "PRAGMA wal_checkpoint(PASSIVE)" in statements


class _BusyCheckpoints:
    """A connection whose passive checkpoints run while a reader holds a snapshot and a write
    lands after it, as under load: the checkpoint cannot copy that write."""

    def __init__(self, path: Path, writer: sqlite3.Connection) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.reader = sqlite3.connect(path, isolation_level=None)
        self.writer = writer

    def execute(self, sql: str) -> sqlite3.Cursor:
        if "PASSIVE" not in sql:
            return self.conn.execute(sql)
        self.reader.execute("BEGIN")
        self.reader.execute("SELECT count(*) FROM t").fetchall()
        self.writer.execute("INSERT INTO t VALUES (randomblob(3000))")
        cur = self.conn.execute(sql)
        self.reader.execute("COMMIT")
        return cur


def test_a_long_wal_is_restarted_though_writes_keep_coming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write during every passive checkpoint keeps the WAL from starting over on its own."""
    path = tmp_path / "wal.sqlite"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("CREATE TABLE t (v BLOB)")
    checkpointer = _BusyCheckpoints(path, writer)

    def frames_after_rounds(restart_frames: int) -> int:
        monkeypatch.setattr(sqlite_local, "RESTART_FRAMES", restart_frames)
        for _ in range(5):
            for _ in range(20):
                writer.execute("INSERT INTO t VALUES (randomblob(3000))")
            checkpoint(checkpointer)  # type: ignore[arg-type]
        writer.execute("INSERT INTO t VALUES (randomblob(3000))")
        return int(checkpointer.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])

    passive_only = frames_after_rounds(10**9)
    restarted = frames_after_rounds(10)
    assert passive_only >= 100
    assert restarted < 10


def test_writes_returning_rows_count_towards_the_next_checkpoint(engine: Engine) -> None:
    connections = local_connections(engine)
    assert connections is not None
    raw = RawStatement(engine)
    raw.query("SELECT count(*) FROM replay_entries", ())
    assert connections.checkpoints._writes == 0
    raw.query("INSERT INTO replay_entries VALUES ('r', 1) RETURNING key", ())
    raw.run("INSERT INTO replay_entries VALUES ('s', 1)", ())
    assert connections.checkpoints._writes == 2


def _write_in_child(raw: RawStatement) -> None:
    raw.run("INSERT INTO replay_entries VALUES ('child', 1)", ())


def test_a_forked_child_opens_a_connection_of_its_own(engine: Engine) -> None:
    raw = RawStatement(engine)
    raw.run("INSERT INTO replay_entries VALUES ('parent', 1)", ())
    connections = local_connections(engine)
    assert connections is not None
    before = connections._slot.held
    child = multiprocessing.get_context("fork").Process(target=_write_in_child, args=(raw,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    # The parent's connection is untouched by the child, and still its own.
    assert raw.query("SELECT key FROM replay_entries ORDER BY key", ()) == [("child",), ("parent",)]
    assert connections._slot.held is before


def _query_in_child(raw: RawStatement) -> None:
    import signal

    signal.alarm(20)  # a child that inherited a held lock would wait for ever
    assert raw.query("SELECT count(*) FROM replay_entries", ()) == [(0,)]


def test_a_child_forked_while_another_thread_holds_the_connection_can_use_its_own(engine: Engine) -> None:
    """A forked child has only the forking thread: the lock of the connection, held in the parent by
    another thread at the time, would be held for ever in the child."""
    raw = RawStatement(engine)
    connections = local_connections(engine)
    assert connections is not None
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with connections.cursor():
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(10)
        child = multiprocessing.get_context("fork").Process(target=_query_in_child, args=(raw,))
        child.start()
        child.join(60)
        assert child.exitcode == 0
    finally:
        release.set()
        holder.join(10)


def test_an_engine_let_go_is_garbage_and_its_checkpoint_thread_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process's connection (and the checkpoint thread's) held its pool, the pool its engine,
    and the registry keyed weakly by that engine kept it for ever, with a checkpoint thread waking
    every few seconds: a test run's thousand apps left a thousand threads fighting for the
    interpreter lock (the suite ran 25 minutes instead of 10; so did the ledger mark's map)."""
    import gc
    import weakref

    from sts.adapters.sql.audit_sink import SqlAuditSink
    from sts.adapters.sql.ledger_mark import ledger_mark

    monkeypatch.setattr(sqlite_local, "_MAX_INTERVAL", 0.05)
    before = {t for t in threading.enumerate() if t.name == "sts-wal-checkpoint"}
    engine = make_engine(f"sqlite:///{tmp_path / 'state.sqlite'}")
    upgrade(engine)
    assert ledger_mark(engine) is not None  # the mark's map, keyed by the engine, too
    SqlAuditSink(engine)
    cache = SqlReplayCache(engine)
    for n in range(3):
        assert cache.first_use("dpop", f"jti-{n}", NOW + 60, NOW)
    started = {t for t in threading.enumerate() if t.name == "sts-wal-checkpoint"} - before
    assert started, "no checkpoint thread started"
    gone = weakref.ref(engine)
    del engine, cache
    deadline = time.monotonic() + 5
    while (gone() is not None or any(t.is_alive() for t in started)) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert gone() is None, "the engine is still referenced"
    assert not any(t.is_alive() for t in started)
