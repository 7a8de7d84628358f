"""PostgreSQL: a request's statement with no answer is cancelled at its deadline, and its connection
cut when the server cannot answer the cancellation either (``sts.adapters.sql.deadline``).

Before, a statement waiting on a ``LOCK TABLE`` held elsewhere, or on a server process stopped
while its host answered (``SIGSTOP``, ``docker pause``), waited as long: ``/token`` gave no answer.
The server is the machine's shared one, never stopped: a proxy in front of it freezes instead.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from flask import Flask
from psycopg.errors import QueryCanceled

from sts.adapters.sql.deadline import TRIAL_WAIT, DeadlinePassed, StatementDeadlines
from sts.adapters.sql.engines import PoolOptions, make_engine
from sts.adapters.sql.statements import RawStatement
from sts.dev.issuer import RunningServer
from tests.adapters.test_stores import assert_withheld, gateway_exchange, ledger_token
from tests.conftest import DEFAULT_POLICY
from tests.support.frozen_proxy import FrozenProxy, frozen_proxy
from tests.support.postgres import PG_SERVER, private_database


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with private_database() as name:
        yield name


@pytest.fixture
def proxy() -> Iterator[FrozenProxy]:
    with frozen_proxy(("127.0.0.1", 5432)) as running:
        yield running


def _statements(url: str, deadline: float) -> RawStatement:
    return RawStatement(make_engine(url, PoolOptions(size=2, deadline=deadline)))


def _table(database: str) -> str:
    name = f"t_{time.monotonic_ns()}"
    raw = _statements(f"{PG_SERVER}/{database}", 5)
    raw.run(f"CREATE TABLE {name} (x int)", ())
    raw.engine.dispose()
    return name


def test_a_statement_waiting_on_a_lock_is_cancelled_at_its_deadline(database: str) -> None:
    url = f"{PG_SERVER}/{database}"
    table = _table(database)
    raw = _statements(url, 1)
    locker = make_engine(url)
    try:
        with locker.connect() as conn, conn.begin():
            conn.exec_driver_sql(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            with pytest.raises(DeadlinePassed) as raised:
                raw.run(f"INSERT INTO {table} VALUES (1)", ())  # noqa: S608 - a name of ours
            waited = time.monotonic() - started
            # Cancelled once, not tried again (a second try would wait a second deadline).
            assert 0.9 < waited < 1.8
            assert isinstance(raised.value.__cause__, QueryCanceled)
            # Answering late is answering too late: for the next deadline's time the statements
            # after it fail at once (each waited out a deadline of its own, and under a lock held
            # for a minute every request thread filled and the requests queued behind them ran
            # after their clients had gone, spending their single-use tokens).
            started = time.monotonic()
            with pytest.raises(DeadlinePassed, match="not tried again yet"):
                raw.run(f"INSERT INTO {table} VALUES (2)", ())  # noqa: S608 - a name of ours
            assert time.monotonic() - started < 0.2
        time.sleep(1.0)
        # The live server aborted the statement: nothing was committed, and the pool goes on.
        assert raw.query(f"SELECT count(*) FROM {table}", ()) == [(0,)]  # noqa: S608 - a name of ours
    finally:
        raw.engine.dispose()
        locker.dispose()


def test_a_statement_on_a_frozen_server_is_cut_after_the_grace(database: str, proxy: FrozenProxy) -> None:
    """The cancellation cannot reach a stopped server either: the socket is shut down after the
    grace, and the request's thread gets its answer; statements then fail at once for a deadline's
    time (not each waiting out its own); after that, a new connection serves."""
    url = f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/{database}?connect_timeout=2"
    raw = _statements(url, 1)
    try:
        assert raw.query("SELECT 1", ()) == [(1,)]
        proxy.freeze()
        started = time.monotonic()
        with pytest.raises(DeadlinePassed):
            raw.query("SELECT 2", ())
        waited = time.monotonic() - started
        assert 1.9 < waited < 3.0  # deadline 1 s, grace 1 s, a tick
        # For the next second (the deadline), statements fail at once, without a connection.
        started = time.monotonic()
        with pytest.raises(DeadlinePassed, match="not tried again yet"):
            raw.query("SELECT 3", ())
        assert time.monotonic() - started < 0.2
        time.sleep(1.0)
        # Then one statement tries the server: its new connection times out (connect_timeout=2),
        # the silence is renewed, and the statement after it fails at once.
        started = time.monotonic()
        with pytest.raises(DeadlinePassed):
            raw.query("SELECT 4", ())
        assert 1.9 < time.monotonic() - started < 3.0
        started = time.monotonic()
        with pytest.raises(DeadlinePassed, match="not tried again yet"):
            raw.query("SELECT 5", ())
        assert time.monotonic() - started < 0.2
        proxy.thaw()
        time.sleep(1.0)
        # The next try gets its answer, which ends the silence (the try that timed out held the
        # others off for a minute).
        assert raw.query("SELECT 6", ()) == [(6,)]
        assert raw.query("SELECT 7", ()) == [(7,)]
    finally:
        proxy.thaw()
        raw.engine.dispose()


def test_a_transaction_on_a_frozen_server_ends_at_its_deadline(database: str, proxy: FrozenProxy) -> None:
    raw = _statements(f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/{database}", 1)
    try:
        assert raw.transaction(lambda cur: cur.execute("SELECT 1").fetchall()) == [(1,)]
        proxy.freeze()
        started = time.monotonic()
        with pytest.raises(DeadlinePassed):
            raw.transaction(lambda cur: cur.execute("SELECT 2").fetchall())
        assert time.monotonic() - started < 3.0
    finally:
        proxy.thaw()
        raw.engine.dispose()


def test_an_answer_within_the_deadline_is_untouched_and_zero_waits(database: str) -> None:
    url = f"{PG_SERVER}/{database}"
    table = _table(database)
    quick, patient = _statements(url, 1), _statements(url, 0)
    locker = make_engine(url)
    try:
        for _ in range(20):
            assert quick.query("SELECT 1", ()) == [(1,)]
        conn = locker.connect()
        transaction = conn.begin()
        conn.exec_driver_sql(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        threading.Timer(1.5, lambda: (transaction.commit(), conn.close())).start()
        started = time.monotonic()
        assert patient.run(f"INSERT INTO {table} VALUES (1)", ()) == 1  # noqa: S608 - waited for the lock
        assert time.monotonic() - started > 1.4
    finally:
        quick.engine.dispose()
        patient.engine.dispose()
        locker.dispose()


def test_the_thread_ends_when_idle_and_a_later_watch_starts_another() -> None:
    deadlines = StatementDeadlines(5, tick=0.01, linger=0.05)

    class Connection:
        def cancel_safe(self, timeout: float) -> None:
            raise AssertionError("nothing is due")

    def threads() -> int:
        return sum(t.name == "sts-statement-deadlines" for t in threading.enumerate())

    before = threads()
    with deadlines.watch(Connection()):
        assert threads() == before + 1
    time.sleep(0.3)
    assert threads() == before
    with deadlines.watch(Connection()):
        assert threads() == before + 1


def test_a_grant_on_a_frozen_database_is_refused_503_in_seconds(
    make_app: Callable[..., Flask], upstream: RunningServer, database: str, proxy: FrozenProxy
) -> None:
    """End to end: ``/token`` answered nothing while the database server was stopped."""
    url = f"postgresql://postgres@127.0.0.1:{proxy.port}/{database}"
    app = make_app(database_url=url, database_deadline=1)
    client = app.test_client()
    assert gateway_exchange(client, ledger_token(upstream)).status_code == 200
    proxy.freeze()
    try:
        started = time.monotonic()
        answer = gateway_exchange(client, ledger_token(upstream))
        waited = time.monotonic() - started
        assert_withheld(answer)
        # The grant's statement: deadline and grace; the refusal's audit record then fails at once
        # (it waited 10 s more for a new connection: connect_timeout, twice with sslmode=prefer).
        assert waited < 3.0
        started = time.monotonic()
        assert_withheld(gateway_exchange(client, ledger_token(upstream)))
        assert time.monotonic() - started < 0.5
    finally:
        proxy.thaw()
    time.sleep(1.0)
    assert gateway_exchange(client, ledger_token(upstream)).status_code == 200


def test_concurrent_grants_under_a_lock_are_refused_together_and_their_tokens_stay_usable(
    make_app: Callable[..., Flask], upstream: RunningServer, database: str
) -> None:
    """``LOCK TABLE audit_events`` held elsewhere: the batch of waiting grants is cancelled once,
    not tried again record by record (each waiting out a deadline of its own, while the requests
    behind it waited, and gave up, and their records committed when the lock went: tokens spent
    that were never sent).  Every single-use token refused so stays usable."""
    policy = copy.deepcopy(DEFAULT_POLICY)
    policy["rules"][1]["single_use"] = True
    url = f"{PG_SERVER}/{database}"
    app = make_app(policy=policy, database_url=url, database_deadline=1)
    assert gateway_exchange(app.test_client(), ledger_token(upstream)).status_code == 200
    tokens = [ledger_token(upstream) for _ in range(4)]

    def exchange(token: str) -> tuple[int, float]:
        started = time.monotonic()
        answer = gateway_exchange(app.test_client(), token)
        return answer.status_code, time.monotonic() - started

    locker = make_engine(url)
    try:
        with locker.connect() as conn, conn.begin():
            conn.exec_driver_sql("LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE")
            with ThreadPoolExecutor(len(tokens)) as pool:
                answers = list(pool.map(exchange, tokens))
        assert [status for status, _ in answers] == [503] * len(tokens)
        # The first batch waits out one deadline; then the rest fail at once (record by record
        # it took a deadline per grant more).
        assert max(waited for _, waited in answers) < 2.5
        time.sleep(1.0)
        for token in tokens:
            assert gateway_exchange(app.test_client(), token).status_code == 200
    finally:
        locker.dispose()


def test_statements_arriving_while_one_tries_a_silent_server_wait_for_its_outcome() -> None:
    """After an outage, the first statement tries the server; a burst arriving with it was refused
    at once, though the server had long been back (an outside fault campaign: 3 of 16 requests
    refused 503 while ``/readyz`` said ready).  Now they wait for its outcome, briefly."""
    now = [100.0]
    deadlines = StatementDeadlines(5, clock=lambda: now[0])
    deadlines.heard_nothing()  # silent until 105
    with pytest.raises(DeadlinePassed):
        deadlines.admit()  # within the silence: at once
    outcomes: list[str] = []

    def admit() -> None:
        try:
            deadlines.admit()
            outcomes.append("admitted")
        except DeadlinePassed:
            outcomes.append("refused")

    def meanwhile(report: Callable[[], None]) -> None:
        waiting = threading.Thread(target=admit)
        waiting.start()
        time.sleep(0.05)
        assert waiting.is_alive(), "a statement arriving during the trial waits for its outcome"
        report()
        waiting.join(2)

    now[0] = 106
    deadlines.admit()  # this one tries the server
    meanwhile(deadlines.answered)
    assert outcomes == ["admitted"]
    deadlines.admit()  # no longer silent: nothing to wait for

    deadlines.heard_nothing()
    now[0] = 112
    deadlines.admit()  # the next trial
    meanwhile(deadlines.heard_nothing)  # the server is still silent: the one waiting fails
    assert outcomes == ["admitted", "refused"]

    now[0] = 118
    deadlines.admit()  # a trial that does not report: the others fail after TRIAL_WAIT
    started = time.monotonic()
    with pytest.raises(DeadlinePassed):
        deadlines.admit()
    assert TRIAL_WAIT - 0.05 < time.monotonic() - started < TRIAL_WAIT + 1
