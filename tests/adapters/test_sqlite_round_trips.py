"""What one exchange costs on SQLite, counted: statements run, and the process ids asked of the kernel.

Each statement is a call into SQLite that releases the GIL and, for a write, holds the write
lock every worker process shares; so the exchange's cost on SQLite is pinned here as counts of
statements (every statement a connection runs is traced, ``sqlite3.Connection.set_trace_callback``),
as :mod:`tests.adapters.test_pg_round_trips` pins round trips on PostgreSQL.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event

from sts.adapters import audit_integrity
from sts.adapters.sql import process_id
from sts.adapters.sql.audit_sink import SqlAuditSink
from sts.adapters.sql.engines import make_engine
from sts.adapters.sql.statements import RawStatement
from sts.core.audit import AuditRecord
from sts.core.baseline import Baseline
from sts.core.ports import AlreadyUsed, AuditUnavailable, BaselineUpdate, SingleUse
from sts.dev.issuer import DevIssuer
from sts.migrations import upgrade
from tests.adapters.test_pg_round_trips import Exchanges, bench, bench_app

NOW = 1_700_000_000.0


class Statements:
    """Every statement the connections of ``engine`` run from now on (those open are reopened)."""

    def __init__(self, engine: Engine) -> None:
        self.traced: list[str] = []
        self._lock = threading.Lock()
        event.listen(engine, "connect", self._connect)
        engine.dispose()

    def _connect(self, dbapi_connection: Any, _record: Any) -> None:
        last = [""]

        def traced(sql: str) -> None:
            # Python's callback names the statement again for each statement of a trigger it runs.
            if sql != last[0]:
                last[0] = sql
                with self._lock:
                    self.traced.append(sql)

        dbapi_connection.set_trace_callback(traced)

    def ran(self) -> list[str]:
        """The statements run (their first three words), leaving out each connection's set-up."""
        setup = ("PRAGMA", "CREATE TEMP")
        return [" ".join(s.split()[:3]) for s in self.traced if not s.startswith(setup)]

    def clear(self) -> None:
        with self._lock:
            self.traced.clear()


@pytest.fixture
def no_purges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Housekeeping (purging expired replay entries) runs at random, now and then: not here."""
    monkeypatch.setattr(random, "random", lambda: 0.5)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    upgrade(engine)
    yield engine
    engine.dispose()


def record(n: int) -> AuditRecord:
    return AuditRecord(
        event_id=str(uuid.uuid4()), time=NOW + n, request_id=f"req-{n}", endpoint="token", outcome="granted"
    )


def use(purpose: str, key: str) -> SingleUse:
    return SingleUse(purpose, key, NOW + 60, None)


def test_a_full_exchange_runs_two_statements(tmp_path: Path, no_purges: None) -> None:
    """A granted exchange of the benchmark on the default store: its baseline read, and its writes
    (two replay entries, the baseline, the audit record) in one statement, its own transaction.
    The subject's state is cached in the process (:class:`SqlSubjectStateStore`).  Before: 6
    (the read, then ``BEGIN``, three inserts and ``COMMIT``)."""
    issuer = DevIssuer.ephemeral(bench.GITHUB_ISS, alg="RS256")
    app = bench_app(tmp_path / "app", issuer, f"sqlite:///{tmp_path / 'sts.sqlite'}")
    runtime = app.extensions["sts"]
    exchanges = Exchanges(app, issuer)
    statements = Statements(runtime.engine)
    try:
        assert [exchanges.send(*form) for form in exchanges.forms(3)] == [200] * 3
        statements.clear()
        assert [exchanges.send(*form) for form in exchanges.forms(10)] == [200] * 10
        ran = statements.ran()
        assert ran == ["SELECT identity, baseline,", "INSERT INTO sts_grants"] * 10, ran[:8]
    finally:
        runtime.engine.dispose()


def test_a_batch_of_grants_commits_in_one_statement_and_chains_in_order(engine: Engine) -> None:
    """Grants queued behind a commit in flight go in one statement, a row each (before: ``BEGIN``,
    per grant a savepoint, the entries and the record, and ``COMMIT``); the chain links them all."""
    sink = SqlAuditSink(engine)
    sink.write_with_uses(record(0), [use("subject_token", "first")], NOW)  # registers the chain
    statements = Statements(engine)
    group = sink._writes_with_uses
    with group._cond:
        group._committing = True
    failures: list[BaseException] = []

    def write(n: int) -> None:
        try:
            update = BaselineUpdate("github|alice", Baseline(scopes=(f"s{n}",)), 3600)
            uses = [use("subject_token", f"t{n}"), use("dpop:jkt", f"p{n}")]
            sink.write_with_uses(record(n), uses, NOW, update)
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(1, 8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while len(group._pending) < 7 and time.monotonic() < deadline:
        time.sleep(0.005)
    last = group._pending[-1].baseline
    with group._cond:
        group._committing = False
        group._cond.notify_all()
    for thread in threads:
        thread.join(10)
    assert not failures
    assert statements.ran() == ["INSERT INTO sts_grants"]
    report, _ = audit_integrity.verify_trail(engine, ())
    assert [(h.seq, h.records) for h in report.heads.values()] == [(8, 8)]
    raw = RawStatement(engine)
    assert raw.query("SELECT count(*) FROM replay_entries", ()) == [(15,)]
    # The batch's last grant wrote the baseline last.
    assert last is not None and raw.query("SELECT baseline FROM baselines", ()) == [(last[1],)]


def test_a_replay_fails_the_one_statement_and_keeps_nothing_of_its_grant(engine: Engine) -> None:
    """A use already taken fails the grant's statement, which then writes nothing (its other use
    stays free); the slower path, statement by statement, then names the use."""
    sink = SqlAuditSink(engine)
    uses = [use("subject_token", "a"), use("dpop:jkt", "b")]
    sink.write_with_uses(record(0), [use("subject_token", "first")], NOW)
    sink.write_with_uses(record(1), uses, NOW)
    statements = Statements(engine)
    replayed = record(2)
    with pytest.raises(AlreadyUsed) as refused:
        sink.write_with_uses(replayed, [use("dpop:jkt", "c"), uses[0]], NOW)
    assert refused.value.use == uses[0]
    assert statements.ran()[:2] == ["INSERT INTO sts_grants", "BEGIN"]
    stored = [r["event_id"] for r in sink.iter_all()]
    assert replayed.event_id not in stored and len(stored) == 2
    sink.write_with_uses(record(3), [use("dpop:jkt", "c")], NOW)


def test_grants_commit_again_once_a_table_another_connection_took_away_is_back(engine: Engine) -> None:
    """While ``audit_events`` is renamed away (by another connection) a grant fails and writes
    nothing; once it is back, the next grant commits.  (A trigger's statement that misses a table
    does not have SQLite reload the schema: on its own, the connection would keep failing.)"""
    sink = SqlAuditSink(engine)
    sink.write_with_uses(record(0), [], NOW)

    def rename(old: str, new: str) -> None:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"ALTER TABLE {old} RENAME TO {new}")

    rename("audit_events", "audit_events_away")
    with pytest.raises(AuditUnavailable):
        sink.write_with_uses(record(1), [use("subject_token", "a")], NOW)
    rename("audit_events_away", "audit_events")
    sink.write_with_uses(record(2), [use("subject_token", "a")], NOW)
    sink.write_with_uses(record(3), [use("subject_token", "b")], NOW)
    assert [r["request_id"] for r in sink.iter_all()] == ["req-0", "req-2", "req-3"]


def _grant_keys(url: str, keys: list[str], barrier: Any, results: Any) -> None:
    """In a process of its own: 4 threads try to grant every key once each (one use per grant)."""
    try:
        engine = make_engine(url)
        sink = SqlAuditSink(engine)
        sink.write_with_uses(record(0), [], NOW)  # the chain's registration, before the race
        won: list[str] = []
        barrier.wait(timeout=60)

        def grant(part: list[str]) -> None:
            for key in part:
                try:
                    sink.write_with_uses(record(1), [use("subject_token", key)], NOW)
                    won.append(key)
                except AlreadyUsed:
                    pass

        threads = [threading.Thread(target=grant, args=(keys[n::4],)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        engine.dispose()
        results.put((won, ""))
    except Exception as exc:  # reported to the parent
        results.put(([], repr(exc)))


def test_grants_racing_from_processes_and_threads_take_each_use_once(tmp_path: Path) -> None:
    """Four processes of four threads each grant the same 200 uses (their statements batched by the
    group commit, a batch with a taken use decided again statement by statement): each use is
    granted exactly once, and only the granted decisions are recorded, on chains that verify."""
    url = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    engine = make_engine(url)
    upgrade(engine)
    keys = [f"token-{n}" for n in range(200)]
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(4), context.Queue()
    processes = [context.Process(target=_grant_keys, args=(url, keys, barrier, results)) for _ in range(4)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(60)
    assert [error for _, error in outcomes] == [""] * 4
    wins = Counter(key for won, _ in outcomes for key in won)
    assert wins == Counter(keys)
    raw = RawStatement(engine)
    assert raw.query("SELECT count(*) FROM audit_events WHERE request_id = 'req-1'", ()) == [(200,)]
    report, _ = audit_integrity.verify_trail(engine, ())
    assert sorted(h.records for h in report.heads.values()) == sorted(len(won) + 1 for won, _ in outcomes)


def _stored(engine: Engine, event_id: str) -> list[Any]:
    """Each column of the record's row as SQLite quotes it: its type and its exact value."""
    raw = RawStatement(engine)
    columns = [row[1] for row in raw.query("PRAGMA table_info(audit_events)", ())]
    keep = [c for c in columns if c not in ("id", "chain_id", "prev_hash", "hash")]
    quoted = ", ".join(f"quote({c})" for c in keep)
    rows = raw.query(f"SELECT {quoted} FROM audit_events WHERE event_id = ?", (event_id,))  # noqa: S608
    return list(rows[0])


def test_the_one_statement_stores_the_record_as_the_statements_did(engine: Engine) -> None:
    """The audit row written through the view's trigger is the one the plain insert writes, value
    and type of every column (the chain's columns aside: each sink has a chain of its own)."""
    fast, slow = SqlAuditSink(engine), SqlAuditSink(engine)
    assert fast._grants is not None and slow._grants is not None
    slow._grants.ready = False
    for sink in (fast, slow):
        sink.write_with_uses(record(0), [], NOW)
    detailed = record(1)
    detailed.issuer, detailed.subject, detailed.details = "github", "repo:a/b", {"ü": [1.5, None, "\u2028"]}
    copy = AuditRecord(**json.loads(json.dumps(detailed.as_dict())))
    copy.event_id = str(uuid.uuid4())
    fast.write_with_uses(detailed, [use("subject_token", "x")], NOW)
    slow.write_with_uses(copy, [use("subject_token", "y")], NOW)
    first, second = _stored(engine, detailed.event_id), _stored(engine, copy.event_id)
    differing = [n for n, (a, b) in enumerate(zip(first, second, strict=True)) if a != b]
    assert len(differing) == 2  # event_id, and the record's JSON, which holds it
    assert first[differing[1]].replace(detailed.event_id, copy.event_id) == second[differing[1]]


def test_statements_ask_the_kernel_for_no_process_id(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether a connection was inherited over fork() is checked on every statement, with the id
    kept by :mod:`sts.adapters.sql.process_id` (before: ``os.getpid()``, a system call, each time)."""
    raw = RawStatement(engine)
    sink = SqlAuditSink(engine)
    raw.query("SELECT 1", ())
    sink.write_with_uses(record(0), [], NOW)
    asked: list[int] = []
    real = os.getpid
    monkeypatch.setattr(os, "getpid", lambda: asked.append(1) or real())
    for n in range(1, 11):
        raw.query("SELECT count(*) FROM audit_events", ())
        sink.write_with_uses(record(n), [use("subject_token", f"k{n}")], NOW)
    assert asked == []


def _child_pid(queue: Any) -> None:
    queue.put((process_id.current_pid(), os.getpid()))


def test_a_forked_child_has_its_own_process_id() -> None:
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_pid, args=(queue,))
    child.start()
    kept, actual = queue.get(timeout=60)
    child.join(60)
    assert kept == actual == child.pid != process_id.current_pid() == os.getpid()
