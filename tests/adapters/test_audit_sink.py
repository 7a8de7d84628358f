"""Group commit in the SQL audit sink: every writer returns only after its own record is committed."""

from __future__ import annotations

import sqlite3
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select
from sqlalchemy.exc import DBAPIError

from sts.adapters.sql.audit_sink import SqlAuditSink
from sts.adapters.sql.engines import make_engine
from sts.adapters.sql.replay import replay_key
from sts.adapters.sql.schema import audit_events, replay_entries
from sts.adapters.sql.sqlite_local import local_connections
from sts.adapters.sql.statements import failure_text
from sts.core.audit import AuditRecord
from sts.core.ports import AlreadyUsed, AuditUnavailable, SingleUse
from sts.migrations import upgrade


def _record(event_id: str | None = None) -> AuditRecord:
    return AuditRecord(
        event_id=event_id or str(uuid.uuid4()), time=time.time(), request_id="r", endpoint="token"
    )


def _count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(audit_events)).scalar_one())


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    upgrade(engine)
    return engine


def test_concurrent_writers_share_commits_and_each_sees_its_own(engine: Engine) -> None:
    commits = []
    event.listen(engine, "commit", lambda conn: commits.append(1))
    sink = SqlAuditSink(engine)
    seen_after_write: list[bool] = []
    lock = threading.Lock()

    def writer() -> None:
        for _ in range(20):
            rec = _record()
            sink.write(rec)
            # Once write() returns, the record must be readable by anyone.
            with engine.connect() as conn:
                found = conn.execute(
                    select(audit_events.c.id).where(audit_events.c.event_id == rec.event_id)
                ).first()
            with lock:
                seen_after_write.append(found is not None)

    threads = [threading.Thread(target=writer) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _count(engine) == 320
    assert all(seen_after_write) and len(seen_after_write) == 320
    # Commits were shared: fewer transactions than records (each writer waits for a commit).
    assert len(commits) < 320


def test_one_bad_row_fails_only_its_writer(engine: Engine) -> None:
    sink = SqlAuditSink(engine)
    sink.write(_record())
    bad = _record()
    bad.request_id = None  # type: ignore[assignment]  # NOT NULL: the insert fails for real
    with pytest.raises(AuditUnavailable):
        sink.write(bad)
    sink.write(_record())
    assert _count(engine) == 2


def test_a_failed_commit_says_what_sqlite_said_and_the_next_one_recovers(engine: Engine) -> None:
    """A read-only connection (a file opened while it was not writable): the failure names
    SQLite's message, which says why (a class name alone did not), and the next record is
    committed on a new connection (sts.adapters.sql.sqlite_local.read_only)."""
    sink = SqlAuditSink(engine)
    sink.write(_record())
    connections = local_connections(engine)
    assert connections is not None
    with connections.cursor() as cur:
        cur.execute("PRAGMA query_only=1")
    with pytest.raises(AuditUnavailable, match=r"^OperationalError: attempt to write a readonly database$"):
        sink.write(_record())
    sink.write(_record())
    assert _count(engine) == 2
    # Only SQLite's own message: SQLAlchemy's wrapper quotes the statement and its values.
    wrapped = DBAPIError("INSERT ...", {"record": "secret"}, sqlite3.OperationalError("disk I/O error"))
    assert failure_text(wrapped) == "OperationalError: disk I/O error"
    assert failure_text(ValueError("value 'secret'")) == "ValueError"


def test_unreachable_database_raises(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'gone.sqlite'}")
    sink = SqlAuditSink(engine)  # schema never created: the insert fails for real
    with pytest.raises(AuditUnavailable):
        sink.write(_record())


def _modes(database: Path) -> dict[str, int]:
    return {
        suffix: stat.S_IMODE(Path(f"{database}{suffix}").stat().st_mode) for suffix in ("", "-wal", "-shm")
    }


@pytest.mark.usefixtures("permissive_umask")
def test_database_wal_and_shm_are_created_owner_only(tmp_path: Path) -> None:
    database = tmp_path / "data" / "audit.sqlite"
    engine = make_engine(f"sqlite:///{database}")
    upgrade(engine)
    SqlAuditSink(engine).write(_record())
    # The connection is still open, so the WAL and shared-memory files exist now.
    assert _modes(database) == {"": 0o600, "-wal": 0o600, "-shm": 0o600}
    engine.dispose()


@pytest.mark.usefixtures("permissive_umask")
def test_database_files_made_world_readable_before_are_restricted(tmp_path: Path) -> None:
    database = tmp_path / "audit.sqlite"
    # An older version's file, 0644 under umask 022, with its WAL files (the connection is open).
    conn = sqlite3.connect(database, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        assert _modes(database) == {"": 0o644, "-wal": 0o644, "-shm": 0o644}
        engine = make_engine(f"sqlite:///{database}")
        assert _modes(database) == {"": 0o600, "-wal": 0o600, "-shm": 0o600}
    finally:
        conn.close()
    upgrade(engine)
    SqlAuditSink(engine).write(_record())
    assert _count(engine) == 1
    engine.dispose()


# -- a grant's single uses: one statement, in the record's transaction -------------------------------

NOW = 1_700_000_000.0


def _use(purpose: str, key: str) -> SingleUse:
    return SingleUse(purpose, key, NOW + 300, None)


def _entries(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return {row[0] for row in conn.execute(select(replay_entries.c.key))}


def test_a_grant_commits_in_one_statement_with_its_uses(engine: Engine) -> None:
    """SQLite: the uses, the baseline and the record of a grant are one statement, its own
    transaction (:mod:`sts.adapters.sql.sqlite_grants`); before: ``BEGIN``, the entries, the record
    and ``COMMIT``."""
    statements: list[str] = []
    event.listen(engine, "connect", lambda conn, _record: conn.set_trace_callback(statements.append))
    engine.dispose()
    sink = SqlAuditSink(engine)
    sink.write_with_uses(_record(), [_use("dpop:k", "a")], NOW)  # registers the chain
    statements.clear()
    sink.write_with_uses(_record(), [_use("dpop:k", "b"), _use("subject_token:github", "b")], NOW)
    reads = {"SELECT", "PRAGMA"}
    # Python's trace callback names the statement again for each statement of a trigger it runs.
    ran = [s for n, s in enumerate(statements) if n == 0 or s != statements[n - 1]]
    written = [" ".join(s.split()[:3]) for s in ran if s.split()[0].upper() not in reads]
    assert written == ["INSERT INTO sts_grants"]
    assert _entries(engine) == {"dpop:k:a", "dpop:k:b", "subject_token:github:b"}


@pytest.mark.parametrize("taken", [0, 1])
def test_a_taken_use_among_several_is_named_and_nothing_is_committed(engine: Engine, taken: int) -> None:
    sink = SqlAuditSink(engine)
    uses = [_use("dpop:k", "p"), _use("subject_token:github", "t")]
    sink.write_with_uses(_record(), [uses[taken]], NOW)
    before = _count(engine)
    with pytest.raises(AlreadyUsed) as raised:
        sink.write_with_uses(_record(), uses, NOW)
    assert raised.value.use == uses[taken]
    assert _count(engine) == before
    assert _entries(engine) == {replay_key(uses[taken].purpose, uses[taken].key)}
    # An expired entry is no longer a use: it is replaced.
    sink.write_with_uses(_record(), uses, NOW + 301)
    assert _count(engine) == before + 1


def test_one_use_twice_in_one_grant_is_a_replay_of_the_second(engine: Engine) -> None:
    sink = SqlAuditSink(engine)
    first, second = _use("dpop:k", "x"), _use("dpop:k", "x")
    with pytest.raises(AlreadyUsed) as raised:
        sink.write_with_uses(_record(), [first, second], NOW)
    assert raised.value.use is second
    assert _count(engine) == 0 and not _entries(engine)


def test_timestamps_are_written_without_the_drivers_default_adapter(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.12 deprecates ``sqlite3``'s default datetime adapter: without it, records are still
    written (a plain one and a grant, which takes the one-statement path), with the same text."""
    import datetime as dt

    monkeypatch.delitem(sqlite3.adapters, (dt.datetime, sqlite3.PrepareProtocol))
    sink = SqlAuditSink(engine)
    plain, granted = _record(), _record()
    sink.write(plain)
    sink.write_with_uses(granted, [_use("subject_token:github", "jti-adapter")], NOW)
    with engine.connect() as conn:
        stored = dict(conn.exec_driver_sql("SELECT event_id, time FROM audit_events").all())
    for record in (plain, granted):
        expected = dt.datetime.fromtimestamp(record.time, tz=dt.UTC).isoformat(" ")
        assert stored[record.event_id] == expected


def test_no_grant_is_committed_past_its_deadline_and_its_uses_stay_unspent(
    engine: Engine, tmp_path: Path
) -> None:
    """``database_deadline`` on SQLite: a grant that would wait for a write lock held elsewhere past
    its request's start plus the deadline is refused unwritten, and one already that late is not
    tried (an outside audit had a lock held 15 s commit grants 13 to 14.5 s after their requests
    began, after their clients had given up: sent again, they found their tokens spent)."""
    sink = SqlAuditSink(engine, commit_deadline=1.0)
    now = time.time()
    use = SingleUse("subject_token", "k1", now + 300, None)
    holder = sqlite3.connect(tmp_path / "audit.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a backup, or a sqlite3 shell left in a transaction
    try:
        started = time.monotonic()
        with pytest.raises(AuditUnavailable, match=r"(?i)deadline"):
            sink.write_with_uses(_record(), [use], now)
        assert time.monotonic() - started < 3.0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert _count(engine) == 0
    # A request already older than the deadline is refused without a commit, lock or no lock.
    late = AuditRecord(event_id=str(uuid.uuid4()), time=time.time() - 2, request_id="r", endpoint="token")
    with pytest.raises(AuditUnavailable, match=r"(?i)deadline"):
        sink.write_with_uses(late, [use], time.time())
    assert _count(engine) == 0
    # The use was never spent: sent again in time, it is granted.
    sink.write_with_uses(_record(), [use], time.time())
    assert _count(engine) == 1
    with pytest.raises(AlreadyUsed):
        sink.write_with_uses(_record(), [use], time.time())


def test_a_record_without_uses_is_not_committed_past_its_deadline_either(
    engine: Engine, tmp_path: Path
) -> None:
    """A grant with no single-use credential and no DPoP proof has no uses: it waited out a write
    lock held by another process and was issued 8 s after its request arrived (an outside audit)."""
    sink = SqlAuditSink(engine, commit_deadline=1.0)

    def granted(age: float = 0.0) -> AuditRecord:
        record = AuditRecord(
            event_id=str(uuid.uuid4()), time=time.time() - age, request_id="r", endpoint="token"
        )
        record.outcome = "granted"
        return record

    holder = sqlite3.connect(tmp_path / "audit.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        for record in (granted(), _record()):  # a refusal waits no longer for the lock either
            started = time.monotonic()
            with pytest.raises(AuditUnavailable, match=r"(?i)deadline"):
                sink.write(record)
            assert time.monotonic() - started < 3.0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with pytest.raises(AuditUnavailable, match=r"(?i)deadline"):
        sink.write(granted(age=2))
    assert _count(engine) == 0
    sink.write(granted())
    assert _count(engine) == 1


def test_a_refusal_decided_late_is_still_written(engine: Engine) -> None:
    """A record that grants nothing gets the whole deadline from its write: a refusal that waited 6 s
    for an issuer's key server (its limit) was past a 5 s deadline counted from its arrival, and
    never written while the database was fine (an outside audit)."""
    sink = SqlAuditSink(engine, commit_deadline=1.0)
    late = AuditRecord(event_id=str(uuid.uuid4()), time=time.time() - 6, request_id="r", endpoint="token")
    assert late.outcome == "refused"
    sink.write(late)
    assert _count(engine) == 1


def test_the_commit_deadline_counts_the_time_a_request_queued_for_a_thread(engine: Engine) -> None:
    """The deadline runs from the request's arrival: a grant that waited 6 s for a request thread
    (``request_queue_timeout`` allows 10) is already late (a re-run of the fault audit had grants
    committed 10 s after they were sent, counted from their start on a thread)."""
    from sts.adapters import request_threads

    sink = SqlAuditSink(engine, commit_deadline=5.0)
    now = time.time()
    request_threads._local.waited = 6.0
    try:
        assert request_threads.queue_wait() == 6.0
        with pytest.raises(AuditUnavailable, match=r"(?i)deadline"):
            sink.write_with_uses(_record(), [SingleUse("subject_token", "q1", now + 300, None)], now)
        assert _count(engine) == 0
        request_threads._local.waited = 1.0
        sink.write_with_uses(_record(), [SingleUse("subject_token", "q1", now + 300, None)], now)
        assert _count(engine) == 1
    finally:
        request_threads._local.waited = 0.0


def _session_ended_after(monkeypatch: pytest.MonkeyPatch, table: str) -> list[bool]:
    """Have the first statement on ``table`` run (and, being its own transaction, commit), then
    fail as psycopg reports ``pg_terminate_backend`` (SQLSTATE 57P01); the list says it happened."""
    import psycopg

    real = psycopg.Cursor.execute
    ended: list[bool] = []

    def then_ended(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        result = real(self, query, *args, **kwargs)
        if not ended and table in str(query):
            ended.append(True)
            raise psycopg.errors.AdminShutdown("terminating connection due to administrator command")
        return result

    monkeypatch.setattr(psycopg.Cursor, "execute", then_ended)
    return ended


def test_a_session_ended_after_its_commit_is_an_unknown_outcome_not_a_refusal(
    pg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: ``pg_terminate_backend`` (SQLSTATE 57P01) may be read after ``COMMIT`` went
    through, before psycopg finds the connection closed.  Taken for "the server refused, nothing
    committed", the grant ran again and found its own uses there: refused as a replay, its
    single-use token spent and no token sent (an outside fault-injection audit).  It is an unknown
    outcome: the record is found committed, and the grant stands."""
    engine = make_engine(pg.url)
    upgrade(engine)
    ended = _session_ended_after(monkeypatch, "audit_events")  # a grant alone is one statement
    sink = SqlAuditSink(engine)
    use = SingleUse("subject_token", "ended-1", time.time() + 300, None)
    sink.write_with_uses(_record(), [use], time.time())  # granted: its record was committed
    assert ended == [True] and _count(engine) == 1
    with pytest.raises(AlreadyUsed):
        sink.write_with_uses(_record(), [use], time.time())
    engine.dispose()


def test_a_session_ended_after_a_first_use_is_no_replay_but_unavailable(
    pg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for a single statement outside the grant (a replay entry of its own, its own
    transaction): run again on a fresh connection, it found its own entry and said "replayed"."""
    from sts.adapters.sql.replay import SqlReplayCache
    from sts.core.ports import StoreUnavailable

    engine = make_engine(pg.url)
    upgrade(engine)
    ended = _session_ended_after(monkeypatch, "replay_entries")
    replay = SqlReplayCache(engine)
    now = time.time()
    with pytest.raises(StoreUnavailable):
        replay.first_use("dpop:k", "jti-1", now + 300, now)  # unknown: refused 503, never "replayed"
    assert ended == [True]
    engine.dispose()
