"""What one exchange costs on PostgreSQL, counted: round trips to the server and connections opened.

The exchange is latency-bound on PostgreSQL (threads wait for the server, not for the
CPU), so its cost is pinned here as counts rather than timings: every message the
client sends is traced by libpq (``PQtrace``, through psycopg's ``PGconn.trace``), and
a round trip is one ``Sync`` (the end of an extended-protocol exchange, or of a
pipeline) or one simple ``Query``.  Connections opened are counted by the pools'
``connect`` events.  Each test has its own schema in a private database
(:mod:`tests.adapters.test_stores`).
"""

from __future__ import annotations

import json
import random
import sys
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlencode

import pytest
import yaml
from flask import Flask
from sqlalchemy import Engine, event, text

from sts.adapters.sql.audit_sink import SqlAuditSink
from sts.adapters.sql.engines import make_engine, open_request_pool, statement_engine
from sts.adapters.sql.key_value import SqlBaselineStore
from sts.adapters.sql.statements import RawStatement
from sts.adapters.sql.subject_state import SqlSubjectStateStore
from sts.app import create_app
from sts.cli.serve import worker_app
from sts.core.audit import AuditRecord
from sts.core.baseline import Baseline
from sts.core.ports import AlreadyUsed, SingleUse
from sts.core.subject_state import SubjectState
from sts.dev.issuer import DevIssuer
from sts.migrations import upgrade
from sts.settings import Settings
from sts.settings.load import load_settings
from tests.support.postgres import PG_SERVER, PgSchema, admin_engine, private_database

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
import bench  # noqa: E402 - the benchmark's own request, policy and configuration

NOW = 1_700_000_000.0


class Wire:
    """Counts what the pools of ``engine`` (its own and the request pool) send and open."""

    def __init__(self, engine: Engine, directory: Path) -> None:
        self.directory = directory
        self.opened = 0
        self._files: list[TextIO] = []
        self._traced: set[int] = set()
        self._lock = threading.Lock()
        self._pools = [engine.pool, statement_engine(engine).pool]
        for pool in self._pools:
            event.listen(pool, "connect", self._connect)
            event.listen(pool, "checkout", self._checkout)

    def close(self) -> None:
        for pool in self._pools:
            event.remove(pool, "connect", self._connect)
            event.remove(pool, "checkout", self._checkout)
        for file in self._files:
            file.close()

    def _connect(self, _dbapi_connection: Any, _record: Any) -> None:
        with self._lock:
            self.opened += 1

    def _checkout(self, dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        with self._lock:
            if id(dbapi_connection) in self._traced:
                return
            self._traced.add(id(dbapi_connection))
            file = (self.directory / f"{len(self._files)}.trace").open("w")
            self._files.append(file)
        dbapi_connection.pgconn.trace(file.fileno())

    def round_trips(self) -> int:
        """Round trips so far, on every connection traced: each ``Sync`` and each simple ``Query``."""
        return self._sent("Sync", "Query")

    def statements(self) -> int:
        """Statements run so far (``BEGIN``, ``COMMIT`` too): each ``Execute`` and each simple ``Query``."""
        return self._sent("Execute", "Query")

    def _sent(self, *kinds: str) -> int:
        count = 0
        for file in self._files:
            file.flush()
        for path in self.directory.glob("*.trace"):
            for line in path.read_text(errors="replace").splitlines():
                fields = line.split("\t")
                # timestamp, direction (F: from the client), length, message type and its contents
                if len(fields) >= 4 and fields[1] == "F" and fields[3].split(" ")[0] in kinds:
                    count += 1
        return count


@pytest.fixture
def no_purges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Housekeeping (purging expired replay entries) runs at random, now and then: not here."""
    monkeypatch.setattr(random, "random", lambda: 0.5)


def bench_app(tmp_path: Path, issuer: DevIssuer, database_url: str, **overrides: Any) -> Flask:
    """The application ``benchmarks/bench.py`` measures as ``exchange-pg``."""
    return create_app(bench_settings(tmp_path, issuer, database_url, **overrides))


def bench_settings(tmp_path: Path, issuer: DevIssuer, database_url: str, **overrides: Any) -> Settings:
    tmp_path.mkdir()
    (tmp_path / "jwks.json").write_text(json.dumps(issuer.jwks()))
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "bench.yaml").write_text(
        yaml.safe_dump({"version": 1, "rules": bench.rule_set(10)})
    )
    config = {
        "issuer": bench.STS_ISSUER,
        "database_url": database_url,
        "keys_dir": str(tmp_path / "keys"),
        "policies_dir": str(tmp_path / "policies"),
        "rate_limits": {"enabled": False},
        "issuers": [bench.github_issuer(tmp_path / "jwks.json")],
        **overrides,
    }
    return load_settings(config_file=None, environ={}, overrides=config)


class Exchanges:
    """The benchmark's request: a fresh single-use subject token and DPoP proof each time."""

    def __init__(self, app: Flask, issuer: DevIssuer) -> None:
        self.app, self.issuer = app, issuer
        self.proofs = bench.Proofs()

    def forms(self, count: int) -> list[tuple[str, str]]:
        tokens = [self.issuer.github_actions_token(audience=bench.SUBJECT_AUDIENCE) for _ in range(count)]
        return list(zip(tokens, self.proofs.make(count), strict=True))

    def send(self, token: str, proof: str) -> int:
        form = {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "audience": bench.AUDIENCE,
            "scope": bench.SCOPE,
            "subject_token": token,
        }
        answer = self.app.test_client().post(
            "/token",
            data=urlencode(form),
            headers={"Content-Type": "application/x-www-form-urlencoded", "DPoP": proof},
        )
        return answer.status_code


@pytest.fixture(scope="module")
def issuer() -> DevIssuer:
    return DevIssuer.ephemeral(bench.GITHUB_ISS, alg="RS256")


def test_a_full_exchange_costs_two_round_trips_and_opens_no_connection(
    tmp_path: Path, pg: PgSchema, issuer: DevIssuer, no_purges: None
) -> None:
    """A granted exchange: its two reads (the subject's state and its baseline) in one statement,
    one round trip (autocommit: no ``BEGIN``/``COMMIT`` around it), and its writes (two replay
    entries, the baseline, the audit record) in one statement, its own transaction, one round trip.
    Nothing is read from the replay table first: the insert in the transaction decides.  Before:
    18 round trips, then 3 (each read one, and ``BEGIN``, the statements and ``COMMIT`` pipelined)."""
    app = bench_app(tmp_path / "app", issuer, pg.url)
    runtime = app.extensions["sts"]
    exchanges = Exchanges(app, issuer)
    # psycopg prepares a statement once it has run 5 times on a connection (a round trip of its own,
    # once);
    # the first grant's statement, which registers the audit chain, is another statement.
    warm, measured = exchanges.forms(8), exchanges.forms(10)
    assert [exchanges.send(*form) for form in warm] == [200] * 8
    (tmp_path / "wire").mkdir()
    wire = Wire(runtime.engine, tmp_path / "wire")
    try:
        assert [exchanges.send(*form) for form in measured] == [200] * 10
        round_trips = wire.round_trips()
        # The reads, and the commit.
        assert round_trips == 2 * len(measured), round_trips / len(measured)
        # One statement each (before: 7, two reads and BEGIN, three writes and COMMIT).
        assert wire.statements() == 2 * len(measured), wire.statements() / len(measured)
        assert wire.opened == 0
    finally:
        wire.close()
        runtime.engine.dispose()


def test_concurrent_exchanges_keep_their_connections(tmp_path: Path, pg: PgSchema, issuer: DevIssuer) -> None:
    """With the default pool (a connection for each of the 8 threads and one more, kept), requests
    on every thread at once open no connection beyond the pool's: none is closed on its return and
    opened again for the next request (PostgreSQL forks a backend for each one)."""
    app = bench_app(tmp_path / "app", issuer, pg.url, threads=8)
    try:
        opened = connections_opened_by_concurrent_exchanges(app, issuer, tmp_path / "wire", 160)
    finally:
        app.extensions["sts"].engine.dispose()
    # At most one connection per thread, and the one the application opened at start; the
    # old pools (2 kept, 7 more closed on return) opened hundreds here.
    assert opened <= 9, opened


def connections_opened_by_concurrent_exchanges(
    app: Flask, issuer: DevIssuer, wire_dir: Path, count: int
) -> int:
    """Send ``count`` exchanges on 8 threads at once, each granted; the connections the pools opened."""
    runtime = app.extensions["sts"]
    exchanges = Exchanges(app, issuer)
    forms = exchanges.forms(count)
    wire_dir.mkdir()
    wire = Wire(runtime.engine, wire_dir)
    try:
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda form: exchanges.send(*form), forms))
        assert statuses == [200] * len(forms)
        return wire.opened
    finally:
        wire.close()


def test_a_worker_opens_its_request_pool_before_the_first_request(
    tmp_path: Path, pg: PgSchema, issuer: DevIssuer
) -> None:
    """``sts serve`` builds each worker's application with its request pool open (``worker_app``):
    requests on every thread at once then open no connection at all, where a pool opened lazily
    forks a new backend while a request waits, at any time under load (the test above)."""
    app = worker_app(bench_settings(tmp_path / "app", issuer, pg.url, threads=8))
    runtime = app.extensions["sts"]
    requests_pool = statement_engine(runtime.engine).pool
    assert requests_pool.checkedin() == 9  # threads + 1, open and idle
    # Most recently used first: one thread at a time keeps using one connection (warm on the
    # server too), the others stay idle for when more threads need one at once.
    first = requests_pool.connect()
    used = first.dbapi_connection
    first.close()
    again = requests_pool.connect()
    assert again.dbapi_connection is used
    again.close()
    try:
        assert connections_opened_by_concurrent_exchanges(app, issuer, tmp_path / "wire", 80) == 0
        assert requests_pool.checkedin() == 9
    finally:
        runtime.engine.dispose()


def test_opening_the_request_pool_needs_no_reachable_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server down at a worker's start is the readiness check's to report: nothing raised here."""
    engine = make_engine("postgresql://postgres@127.0.0.1:1/nothing?connect_timeout=1")
    try:
        with caplog.at_level("WARNING"):
            assert open_request_pool(engine) == 0
        assert "0 of 9 connections opened at start" in caplog.text
    finally:
        engine.dispose()
    sqlite = make_engine(f"sqlite:///{tmp_path / 'sts.sqlite'}")
    assert open_request_pool(sqlite) == 0  # SQLite: files, no pool to open
    sqlite.dispose()


def record(n: int) -> AuditRecord:
    return AuditRecord(
        event_id=str(uuid.uuid4()), time=NOW + n, request_id=f"req-{n}", endpoint="token", outcome="granted"
    )


def test_a_grant_commits_in_one_round_trip_and_a_replay_keeps_nothing(tmp_path: Path, pg: PgSchema) -> None:
    """``write_with_uses`` on PostgreSQL: the entries and the record in one statement, in autocommit
    its own transaction.  A use already taken fails the statement (nothing of the refused grant is
    kept), without closing the connection; the grant is then refused by the slower path that tells
    which use was taken."""
    engine = make_engine(pg.url)
    upgrade(engine)
    sink = SqlAuditSink(engine)
    sink.write(record(0))  # The chain's registration goes with its first record.
    wire = Wire(engine, tmp_path)
    try:
        uses = [SingleUse("subject_token", "a", NOW + 60, None), SingleUse("dpop:jkt", "b", NOW + 60, None)]
        sink.write_with_uses(record(1), uses, NOW)
        # One statement, its own transaction (before: BEGIN, the entries, the record and COMMIT).
        assert (wire.round_trips(), wire.statements()) == (1, 1)
        replayed = record(2)
        with pytest.raises(AlreadyUsed) as refused:
            sink.write_with_uses(replayed, [SingleUse("dpop:jkt", "c", NOW + 60, None), uses[0]], NOW)
        assert refused.value.use == uses[0]
        assert wire.opened == 0
        stored = [r["event_id"] for r in sink.iter_all()]
        assert replayed.event_id not in stored and len(stored) == 2
        # The other use of the refused grant was rolled back with it: it is still free.
        sink.write_with_uses(record(3), [SingleUse("dpop:jkt", "c", NOW + 60, None)], NOW)
    finally:
        wire.close()
        engine.dispose()


def test_a_restarted_server_costs_no_request_though_every_pooled_connection_is_dead(
    tmp_path: Path, issuer: DevIssuer
) -> None:
    """The request pool is not pinged on checkout.  When the server cuts every connection (a
    restart), the first statement to find its connection dead has the pool replace every
    connection as old as it, so its one retry, and the requests after it, get live ones."""
    with private_database() as name:
        app = bench_app(tmp_path / "app", issuer, f"{PG_SERVER}/{name}", threads=8)
        runtime = app.extensions["sts"]
        exchanges = Exchanges(app, issuer)
        try:
            with ThreadPoolExecutor(8) as pool:
                assert set(pool.map(lambda form: exchanges.send(*form), exchanges.forms(64))) == {200}
            assert statement_engine(runtime.engine).pool.checkedin() >= 2  # type: ignore[attr-defined]
            admin = admin_engine()
            try:
                with admin.connect() as conn:
                    cut = conn.execute(
                        text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                        {"name": name},
                    ).all()
            finally:
                admin.dispose()
            assert len(cut) >= 2
            assert [exchanges.send(*form) for form in exchanges.forms(3)] == [200] * 3
        finally:
            runtime.engine.dispose()


def test_a_connection_the_server_closed_is_replaced_on_checkout_without_a_round_trip(
    tmp_path: Path, pg: PgSchema
) -> None:
    """The request pool looks at an idle connection's socket before lending it: one whose backend
    was terminated is replaced there, and no statement is sent to it (and failed) first."""
    engine = make_engine(pg.url)
    raw = RawStatement(engine)
    try:
        first = raw.query("SELECT pg_backend_pid()", ())[0][0]
        # With a timeout, pg_terminate_backend returns once the backend has ended (PostgreSQL 14+).
        assert pg.execute(f"SELECT pg_terminate_backend({int(first)}, 10000)") == [(True,)]
        wire = Wire(engine, tmp_path)
        try:
            second = raw.query("SELECT pg_backend_pid()", ())[0][0]
            assert second != first
            assert wire.opened == 1
            assert wire.round_trips() == 1
        finally:
            wire.close()
    finally:
        engine.dispose()


def test_the_baseline_read_with_the_subject_state_serves_one_load_of_its_thread(
    tmp_path: Path, pg: PgSchema
) -> None:
    """The subject state's read brings the identity's baseline too (one round trip for both), and
    the next load of that baseline on the same thread takes it instead of reading.  Anything else
    reads again: a load on another thread, of another identity, a second load, and a load after
    this thread saved the baseline (it would otherwise hand back the value before the save)."""
    engine = make_engine(pg.url)
    upgrade(engine)
    states, baselines = SqlSubjectStateStore(engine), SqlBaselineStore(engine)
    first, second = Baseline(scopes=("read",), failures=(NOW,)), Baseline(scopes=("write",), failures=(NOW,))
    baselines.save("github|alice", first, 3600)
    baselines.save_failures("github|alice", (NOW,), 3600)  # Kept apart, and read with the rest.
    states.put("github|alice", SubjectState(blocked_until=NOW), 3600)
    wire = Wire(engine, tmp_path)
    try:

        def trips(work: Callable[[], Any]) -> tuple[Any, int]:
            before = wire.round_trips()
            result = work()
            return result, wire.round_trips() - before

        read, count = trips(lambda: states.get(["github|alice", "*|alice"]))
        assert read == [SubjectState(blocked_until=NOW), SubjectState()] and count == 1
        assert trips(lambda: baselines.load("github|alice")) == (first, 0)
        assert trips(lambda: baselines.load("github|alice")) == (first, 1)  # taken once only

        states.get(["github|alice"])
        assert trips(lambda: baselines.load("github|bob")) == (Baseline(), 1)
        assert trips(lambda: baselines.load("github|alice")) == (first, 1)

        states.get(["github|alice"])
        with ThreadPoolExecutor(1) as other:
            assert other.submit(trips, lambda: baselines.load("github|alice")).result() == (first, 1)

        states.get(["github|alice"])
        baselines.save("github|alice", second, 3600)
        assert trips(lambda: baselines.load("github|alice")) == (second, 1)
    finally:
        wire.close()
        engine.dispose()


def test_postgresql_connections_drop_a_partitioned_peer_and_the_url_can_say_otherwise() -> None:
    """libpq waits on unacknowledged data for the kernel's ~15 minutes by default: connections are
    made with ``tcp_user_timeout`` (and keepalives) unless the URL sets them."""

    def parameters(url: str) -> dict[str, str]:
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                return dict(conn.connection.driver_connection.info.get_parameters())
        finally:
            engine.dispose()

    found = parameters("postgresql://postgres@127.0.0.1:5432/test")
    assert found["tcp_user_timeout"] == "10000" and found["keepalives"] == "1"
    assert found["connect_timeout"] == "5"
    own = parameters("postgresql://postgres@127.0.0.1:5432/test?tcp_user_timeout=2500&connect_timeout=3")
    assert own["tcp_user_timeout"] == "2500" and own["connect_timeout"] == "3"
