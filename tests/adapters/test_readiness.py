"""Running as a fleet: honest readiness, small connection pools, a start while the database is down,
and a schema that any number of workers can create at once (issue 9, items 4, 5, 6 and 8).

Every failure is real: a PostgreSQL database switched to read-only (``default_transaction_read_only``
with its sessions cut, as after a fail-over to a standby), a SQLite file the file system refuses to
write (``chattr +i``, which binds root too), a Redis that answers ``PING`` but refuses writes (a
replica of a master that is gone), and a database behind a TCP relay that a test cuts and restores.
Each test uses its own PostgreSQL database (``private_database``) or its own ``redis-server``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import yaml
from flask import Flask
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import OperationalError

from sts.adapters.readiness import DatabaseSchema, Readiness, sql_store_check, wait_for_schema
from sts.adapters.sql.engines import PoolOptions, make_engine
from sts.adapters.sql.schema import metadata
from sts.app import prepare
from sts.dev.issuer import RunningServer
from sts.migrations import upgrade
from sts.settings import Settings
from sts.wiring.stores import database_pool
from tests.adapters.test_stores import assert_withheld, audit_rows, gateway_exchange, ledger_token
from tests.conftest import GATEWAY_SECRET, STS_ISSUER, exchange_form
from tests.core.test_single_use import TcpRelay
from tests.support.postgres import PG_SERVER, admin_engine, private_database
from tests.support.redis_server import RedisProcess, free_port

REPO = Path(__file__).resolve().parents[2]
STS = str(Path(sys.executable).with_name("sts"))
SCHEMA_TABLES = set(metadata.tables) | {"alembic_version"}


def fresh_checks(app: Flask) -> None:
    """Readiness keeps a good result for a second; these tests change the world faster."""
    app.extensions["sts"].readiness.cache_seconds = 0
    app.extensions["sts"].schema.retry_interval = 0


def cut_sessions(name: str) -> None:
    with admin_engine().connect() as conn:
        conn.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
            {"name": name},
        )


@contextlib.contextmanager
def read_only(name: str) -> Iterator[None]:
    """The database answers every read and refuses every write, as a standby does after a fail-over."""
    with admin_engine().connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'))
    cut_sessions(name)  # The setting applies to new sessions: the app's pools reconnect.
    try:
        yield
    finally:
        with admin_engine().connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" RESET default_transaction_read_only'))
        cut_sessions(name)


def basic_gateway() -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"gateway:{GATEWAY_SECRET}".encode()).decode()}


# -- item 4: liveness is not readiness -------------------------------------------------------------


def test_a_read_only_postgresql_database_is_not_ready_while_the_process_stays_live(
    make_app: Callable[..., Flask], upstream: RunningServer
) -> None:
    with private_database() as name:
        app = make_app(database_url=f"{PG_SERVER}/{name}")
        fresh_checks(app)
        client = app.test_client()
        assert client.get("/readyz").status_code == 200
        assert gateway_exchange(client, ledger_token(upstream)).status_code == 200

        with read_only(name):
            # It still answers a query, which is all the former health check asked of it ...
            with app.extensions["sts"].engine.connect() as conn:
                assert conn.execute(text("SELECT 1")).scalar_one() == 1
            # ... but it cannot commit an audit record, so nothing can be issued.
            assert_withheld(gateway_exchange(client, ledger_token(upstream)))
            for path in ("/readyz", "/healthz"):
                response = client.get(path)
                assert response.status_code == 503, path
                assert response.get_json() == {"status": "unavailable", "problems": ["database"]}
            assert client.get("/livez").status_code == 200
            assert client.get("/livez").get_json() == {"status": "ok"}

        assert client.get("/readyz").status_code == 200
        assert gateway_exchange(client, ledger_token(upstream)).status_code == 200
        assert [row["outcome"] for row in audit_rows(f"{PG_SERVER}/{name}")] == ["granted", "granted"]


def test_a_sqlite_file_that_cannot_be_written_is_not_ready(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    fresh_checks(app)
    client = app.test_client()
    assert client.get("/readyz").status_code == 200
    database = Path(str(app.extensions["sts"].engine.url.database))
    # The file and its write-ahead log; the shared-memory index stays writable, as SQLite maps it.
    frozen = [str(database), f"{database}-wal"]
    subprocess.run(["chattr", "+i", *frozen], check=True)
    try:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.get_json()["problems"] == ["database"]
        assert client.get("/livez").status_code == 200
    finally:
        subprocess.run(["chattr", "-i", *frozen], check=True)
    assert client.get("/readyz").status_code == 200


def test_a_ledger_mark_that_cannot_be_opened_is_not_ready(tmp_path: Path, upstream: Any) -> None:
    """Without its ledger mark a SQLite instance no longer notices lost commits, and a single-use
    token could be accepted again after a restored file: it ran so, ready, when the mark could not
    be opened (an outside re-check found a root-owned mark the service could not open).  Now it
    is not ready (``database``), and the log at start says why."""
    import copy

    from sts.app import create_app
    from tests.conftest import DEFAULT_POLICY, settings_for

    policy = copy.deepcopy(DEFAULT_POLICY)
    policy["rules"][0]["single_use"] = True
    (tmp_path / "sts.sqlite.ledger-mark").mkdir()  # no file can be opened there
    app = create_app(settings_for(tmp_path, upstream, policy))
    fresh_checks(app)
    client = app.test_client()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["problems"] == ["database"]
    # Not ready, and refusing a single-use token too: it granted meanwhile, and after a restored
    # older copy of the database the same token was granted again (an outside re-check).
    token = upstream.issuer.github_actions_token(audience=STS_ISSUER)
    form = exchange_form(token, audience="https://deploy.example.com")
    refused = client.post("/token", data=form)
    assert refused.status_code == 503 and refused.get_json()["error"] == "temporarily_unavailable"
    record = app.extensions["sts"].audit.recent(1)[0]
    assert record["outcome"] == "refused" and "ledger mark cannot be opened" in json.dumps(record)
    # The fault passes (the directory goes): the mark is opened again, without a restart.
    (tmp_path / "sts.sqlite.ledger-mark").rmdir()
    mark = app.extensions["sts"].audit.mark
    mark._next_try = 0.0  # the retry interval (a second) passed
    assert client.get("/readyz").status_code == 200
    assert client.post("/token", data=form).status_code == 200
    assert (tmp_path / "sts.sqlite.ledger-mark").stat().st_size == 16
    assert client.post("/token", data=form).get_json()["error"] == "invalid_request"  # spent now


def test_a_rate_limit_file_that_cannot_be_written_is_not_ready(make_app: Callable[..., Flask]) -> None:
    """Every token request is counted first: a rate-limit store that cannot count refuses them all
    (503, fail closed), so readiness says so too, and the database is fine meanwhile."""
    app = make_app()
    fresh_checks(app)
    client = app.test_client()
    assert client.get("/readyz").status_code == 200
    limits = Path(f"{app.extensions['sts'].engine.url.database}.rate-limits")
    frozen = [str(limits), f"{limits}-wal"]
    subprocess.run(["chattr", "+i", *frozen], check=True)
    try:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.get_json()["problems"] == ["rate_limits"]
    finally:
        subprocess.run(["chattr", "-i", *frozen], check=True)
    assert client.get("/readyz").status_code == 200


def test_a_redis_store_that_answers_ping_but_refuses_writes_is_not_ready(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    server = RedisProcess(tmp_path / "redis").start()
    try:
        app = make_app(store="redis", redis_url=f"redis://127.0.0.1:{server.port}/0")
        fresh_checks(app)
        client = app.test_client()
        assert client.get("/readyz").status_code == 200
        admin = redis.Redis(port=server.port)
        # A replica of a master that is gone: PING answers, every write is refused (READONLY).
        admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
        try:
            assert admin.ping()
            response = client.get("/readyz")
            assert response.status_code == 503
            assert response.get_json()["problems"] == ["store"]
            assert client.get("/livez").status_code == 200
        finally:
            admin.execute_command("REPLICAOF", "NO", "ONE")
            admin.close()
        assert client.get("/readyz").status_code == 200
    finally:
        server.stop()


def test_a_good_readiness_result_is_kept_for_a_second(make_app: Callable[..., Flask]) -> None:
    runtime = app_runtime(make_app())
    ticks = iter(range(1_000_000))
    elapsed = [0.0]
    readiness = Readiness(
        schema=runtime.schema,
        audit=runtime.audit,
        store=sql_store_check(runtime.replay, "test"),
        store_in_database=True,
        keyring=runtime.keyring,
        clock=lambda: float(next(ticks)),
        instance="test-instance",
        monotonic=lambda: elapsed[0],
    )

    def heartbeat() -> float:
        with runtime.engine.connect() as conn:
            return float(
                conn.execute(
                    text("SELECT checked_at FROM heartbeats WHERE instance = 'test-instance'")
                ).scalar_one()
            )

    assert readiness.problems() == []
    first = heartbeat()
    elapsed[0] = 0.9
    assert readiness.problems() == []
    assert heartbeat() == first  # Within the second: no new commit.
    elapsed[0] = 1.1
    assert readiness.problems() == []
    assert heartbeat() > first


def app_runtime(app: Flask) -> Any:
    return app.extensions["sts"]


# -- item 5: connection pools, and decisions that could not be audited -----------------------------


def test_default_pools_are_derived_from_the_threads(make_settings: Callable[..., Settings]) -> None:
    # A connection for every thread and one more, kept: none opened or closed under load.
    assert database_pool(make_settings(threads=8)) == PoolOptions(size=9, max_overflow=0, timeout=5.0)
    assert database_pool(make_settings(threads=1)) == PoolOptions(size=2, max_overflow=0, timeout=5.0)
    explicit = make_settings(database_pool_size=3, database_max_overflow=0, database_pool_timeout=2)
    assert database_pool(explicit) == PoolOptions(size=3, max_overflow=0, timeout=2.0)


def test_the_pool_size_is_honoured_after_a_concurrent_burst(
    make_app: Callable[..., Flask], upstream: RunningServer
) -> None:
    with private_database() as name:
        app = make_app(database_url=f"{PG_SERVER}/{name}", database_pool_size=1, database_max_overflow=2)
        tokens = [ledger_token(upstream) for _ in range(48)]

        def connections() -> int:
            with admin_engine().connect() as conn:
                return int(
                    conn.execute(
                        text("SELECT count(*) FROM pg_stat_activity WHERE datname = :name"), {"name": name}
                    ).scalar_one()
                )

        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], connections())
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            with ThreadPoolExecutor(16) as pool:
                responses = list(pool.map(lambda t: gateway_exchange(app.test_client(), t), tokens))
        finally:
            done.set()
            sampler.join()
        assert [r.status_code for r in responses] == [200] * 48
        # Two pools: the request pool of 1 + 2 overflow, and the transaction pool (1 + 2).
        assert 1 <= peak[0] <= 6, peak[0]
        # Overflow connections are closed once returned: each pool keeps its one.
        assert connections() <= 2


def test_a_refusal_whose_audit_write_fails_is_logged_with_its_decision(
    make_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    with private_database() as name:
        # Without rate limits: their counts live in this database too, and a read-only database
        # would refuse every request at the first check (503, fail closed) before this refusal.
        app = make_app(database_url=f"{PG_SERVER}/{name}", rate_limits={"enabled": False})
        client = app.test_client()
        bad_token = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJzZWNyZXQtc3ViamVjdCJ9."
        with read_only(name), caplog.at_level(logging.ERROR, logger="sts"):
            refused = client.post(
                "/token",
                data=exchange_form(bad_token, resource="https://ledger.example.com/api"),
                headers={**basic_gateway(), "X-Request-Id": "refused-while-read-only"},
            )
            introspected = client.post(
                "/introspect",
                data={"token": bad_token},
                headers={"Authorization": "Basic " + base64.b64encode(b"gateway:wrong").decode(),
                         "X-Request-Id": "introspect-while-read-only"},
            )  # fmt: skip
        # The refusals stand, though they could not be audited ...
        assert refused.status_code == 400 and refused.get_json()["error"] == "invalid_request"
        assert introspected.status_code == 401
        # ... and each decision is in the log, one line each, with no token.
        decisions = {r.decision["request_id"]: r for r in caplog.records if hasattr(r, "decision")}
        token = decisions["refused-while-read-only"]
        assert token.decision["outcome"] == "refused"
        assert token.decision["endpoint"] == "token"
        assert token.decision["error"] == "invalid_request"
        assert token.decision["client_id"] == "gateway"
        assert token.decision["reasons"] and all(isinstance(r, str) for r in token.decision["reasons"])
        assert token.decision["audit_failure"]
        introspect = decisions["introspect-while-read-only"]
        assert introspect.decision["endpoint"] == "introspect"
        assert introspect.decision["error"] == "invalid_client"
        for record in (token, introspect):
            line = record.getMessage()
            assert "\n" not in line and line.startswith("decision not audited")
            assert json.loads(line.split(": ", 1)[1]) == json.loads(json.dumps(record.decision, default=str))
        assert bad_token not in caplog.text
        assert audit_rows(f"{PG_SERVER}/{name}") == []


# -- item 6: starting while the database is down ---------------------------------------------------


@pytest.fixture
def database_relay() -> Iterator[tuple[TcpRelay, str]]:
    """A private PostgreSQL database behind a relay that is cut (nothing listens) at first."""
    with private_database() as name:
        relay = TcpRelay(("127.0.0.1", 5432))
        relay.restore()
        relay.cut()
        try:
            yield relay, f"postgresql+psycopg://postgres@127.0.0.1:{relay.port}/{name}"
        finally:
            relay.cut()


def test_waiting_for_the_database_backs_off_with_one_line_per_attempt(
    database_relay: tuple[TcpRelay, str], caplog: pytest.LogCaptureFixture
) -> None:
    relay, url = database_relay
    engine = make_engine(url)
    now = [0.0]
    pauses: list[float] = []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        now[0] += seconds

    try:
        with caplog.at_level(logging.WARNING, logger="sts"):
            ready = wait_for_schema(DatabaseSchema(engine), 5, sleep=sleep, monotonic=lambda: now[0])
    finally:
        engine.dispose()
    assert ready is False
    assert pauses == [0.5, 1.0, 2.0, 1.5]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5
    assert all("\n" not in line and f"127.0.0.1:{relay.port}" in line for line in lines)
    assert "attempt 1, retrying in 0.5 s" in lines[0]
    assert "starting not ready" in lines[-1]
    assert not any(r.exc_info for r in caplog.records)


def test_an_app_started_while_the_database_is_down_becomes_ready_by_itself(
    database_relay: tuple[TcpRelay, str], make_app: Callable[..., Flask], upstream: RunningServer
) -> None:
    relay, url = database_relay
    app = make_app(database_url=url)  # Does not raise.
    fresh_checks(app)
    client = app.test_client()
    assert client.get("/livez").status_code == 200
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503 and not_ready.get_json()["problems"] == ["database"]
    assert_withheld(gateway_exchange(client, ledger_token(upstream)))

    relay.restore()
    assert client.get("/readyz").status_code == 200
    assert gateway_exchange(client, ledger_token(upstream)).status_code == 200
    assert [row["outcome"] for row in audit_rows(url)] == ["granted"]


def test_sts_serve_starts_not_ready_without_a_traceback_and_becomes_ready(
    database_relay: tuple[TcpRelay, str], tmp_path: Path
) -> None:
    relay, url = database_relay
    port = free_port()
    config = yaml.safe_load((REPO / "sts.yaml").read_text())
    config.update(
        port=port,
        issuer=f"http://127.0.0.1:{port}",
        workers=2,
        threads=2,
        database_url=url,
        database_startup_timeout=1,
    )
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    (tmp_path / "sts.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STS_")}
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        serve = subprocess.Popen(
            [STS, "serve"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_for_status(f"{base}/livez", 200, serve), stderr_path.read_text()
        assert requests.get(f"{base}/readyz", timeout=5).status_code == 503
        assert requests.post(f"{base}/token", data={}, timeout=5).status_code == 503
        relay.restore()
        assert wait_for_status(f"{base}/readyz", 200, serve), stderr_path.read_text()
    finally:
        serve.terminate()
        try:
            serve.wait(timeout=15)
        except subprocess.TimeoutExpired:
            serve.kill()
    log = stderr_path.read_text()
    assert "Traceback" not in log, log
    waits = [line for line in log.splitlines() if "not answering" in line]
    assert any("attempt 1, retrying in 0.5 s" in line for line in waits), log
    assert any("starting not ready" in line for line in waits), log


def wait_for_status(url: str, status: int, process: subprocess.Popen[bytes], deadline: float = 30.0) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end and process.poll() is None:
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == status:
                return True
        time.sleep(0.1)
    return False


def test_prepare_returns_when_the_database_does_not_answer(
    database_relay: tuple[TcpRelay, str], make_settings: Callable[..., Settings]
) -> None:
    _, url = database_relay
    pauses: list[float] = []
    settings = make_settings(database_url=url, database_startup_timeout=0)
    assert prepare(settings, sleep=pauses.append) is False
    assert pauses == []


# -- item 8: one schema, however many start at once ------------------------------------------------


def create_schema_concurrently(url: str, count: int = 6) -> list[str]:
    engines = [make_engine(url) for _ in range(count)]
    barrier = threading.Barrier(count)
    errors: list[str] = []

    def create(engine: Engine) -> None:
        barrier.wait()
        try:
            upgrade(engine)
        except Exception as exc:  # The test reports whatever went wrong.
            errors.append(f"{type(exc).__name__}: {exc}"[:300])

    threads = [threading.Thread(target=create, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for engine in engines:
        engine.dispose()
    return errors


def test_workers_starting_together_on_a_fresh_postgresql_database_create_the_schema_once() -> None:
    for _ in range(3):
        with private_database() as name:
            url = f"{PG_SERVER}/{name}"
            assert create_schema_concurrently(url) == []
            engine = make_engine(url)
            try:
                assert set(inspect(engine).get_table_names()) == SCHEMA_TABLES
            finally:
                engine.dispose()


def test_workers_starting_together_on_a_fresh_sqlite_file_create_the_schema_once(tmp_path: Path) -> None:
    for attempt in range(3):
        url = f"sqlite:///{tmp_path / f'fresh-{attempt}.sqlite'}"
        assert create_schema_concurrently(url) == []
        engine = make_engine(url)
        try:
            assert set(inspect(engine).get_table_names()) == SCHEMA_TABLES
        finally:
            engine.dispose()


def test_a_hung_backend_is_not_ready_within_the_deadline(make_app: Callable[..., Flask]) -> None:
    """A check that hangs (a frozen database server, a lock held on a table) makes the probe
    answer not ready, naming it, within the deadline; later probes answer at once from the same
    check, and none starts another until it is over (it held /readyz for as long before)."""
    runtime = app_runtime(make_app())
    release, calls = threading.Event(), []

    def hanging_store(now: float) -> None:
        calls.append(now)
        release.wait(30)

    readiness = Readiness(
        schema=runtime.schema,
        audit=runtime.audit,
        store=hanging_store,
        store_in_database=False,
        keyring=runtime.keyring,
        clock=time.time,
        instance="test-instance",
        deadline=0.3,
    )
    started = time.monotonic()
    assert readiness.problems() == ["store"]
    assert 0.25 < time.monotonic() - started < 5
    started = time.monotonic()
    assert readiness.problems() == ["store"]
    assert time.monotonic() - started < 0.2
    assert len(calls) == 1
    release.set()
    deadline = time.monotonic() + 5
    while readiness.problems() != [] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert readiness.problems() == []


@pytest.mark.parametrize(
    ("change", "probed_first"),
    [("wal-deleted", True), ("wal-deleted", False), ("file-replaced", True), ("file-deleted", True)],
)
def test_a_sqlite_file_deleted_or_replaced_under_the_process_is_not_ready(
    make_app: Callable[..., Flask], upstream: RunningServer, change: str, probed_first: bool
) -> None:
    """The connections write on into unlinked files (lost at a crash, or at the last close): the
    process is not ready, and stays so when another process makes a new ``-wal`` beside them (it
    was ready, and issued tokens into deleted files; then it saw only a ``-wal`` missing, for the
    seconds until another connection made a new one)."""
    app = make_app()
    client = app.test_client()
    token = ledger_token(upstream)
    assert gateway_exchange(client, token).status_code == 200  # the request threads' connections
    if probed_first:
        assert client.get("/readyz").status_code == 200
    path = Path(app_runtime(app).engine.url.database)
    if change == "wal-deleted":
        Path(f"{path}-wal").unlink()
        # A new, empty -wal at the path, as a new connection (a CLI command) makes one.
        Path(f"{path}-wal").touch()
    elif change == "file-replaced":
        shutil.copyfile(path, path.with_suffix(".copy"))
        os.replace(path.with_suffix(".copy"), path)
    else:
        path.unlink()
    for _ in range(2):
        time.sleep(1.1)  # past the second a good result is kept
        answer = client.get("/readyz")
        assert answer.status_code == 503 and answer.get_json()["problems"] == ["database"]
    # Nor is a token granted: its audit record and its use would go into files no one can open.
    refused = gateway_exchange(client, ledger_token(upstream))
    assert refused.status_code == 503 and refused.get_json()["error"] == "temporarily_unavailable"
    if change == "file-deleted":
        # Nor does a connection opened now make a new, empty file in its place (one did, with the
        # process's umask: 0644, and a restart then started on it).
        with pytest.raises(OperationalError):
            app_runtime(app).engine.connect().close()
        assert not path.exists()


def test_a_lock_held_on_the_audit_table_is_not_ready(make_app: Callable[..., Flask]) -> None:
    """PostgreSQL: ``LOCK TABLE audit_events`` held elsewhere leaves the heartbeat committing while
    every grant waits: not ready at once (it said ready while /token waited 10 s and more)."""
    with private_database() as name:
        app = make_app(database_url=f"{PG_SERVER}/{name}")
        client = app.test_client()
        assert client.get("/readyz").status_code == 200
        locker = make_engine(f"{PG_SERVER}/{name}")
        try:
            with locker.connect() as conn, conn.begin():
                conn.exec_driver_sql("LOCK TABLE audit_events IN SHARE MODE")
                time.sleep(1.1)  # past the second a good result is kept
                started = time.monotonic()
                answer = client.get("/readyz")
                assert answer.status_code == 503 and answer.get_json()["problems"] == ["database"]
                assert time.monotonic() - started < 1.5  # NOWAIT: no wait for the lock
            time.sleep(1.1)
            assert client.get("/readyz").status_code == 200
        finally:
            locker.dispose()
            app_runtime(app).engine.dispose()


def test_the_sqlite_files_are_watched_through_a_symbolic_link(tmp_path: Path) -> None:
    """A database path through a symbolic link (``/var/lib`` -> ``/data``): /proc/self/fd names the
    real file, which the check compares with (a path compared as written matched nothing, and the
    ``-wal`` went unwatched)."""
    from sts.adapters.sql.files_in_use import SqliteFile

    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    path = tmp_path / "link" / "sts.sqlite"
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.commit()
        files = SqliteFile(str(path))
        assert files.problem() is None
        Path(f"{path}-wal").unlink()
        Path(f"{path}-wal").touch()
        assert files.problem() == "sts.sqlite-wal in use was deleted or replaced"
    finally:
        conn.close()


def test_a_full_disk_under_the_database_is_not_ready(
    make_app: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An outside audit filled a small file system: every grant failed while ``/readyz`` still said
    ready (its one-row check commit fitted in the reused ``-wal``).  Here the threshold is raised
    above what the disk has free, which is what a full disk looks like to the check."""
    from sts.adapters.sql import files_in_use

    client = make_app().test_client()
    assert client.get("/readyz").status_code == 200
    free = os.statvfs(os.path.dirname(str(app_runtime(client.application).engine.url.database)))
    monkeypatch.setattr(files_in_use, "MIN_FREE_BYTES", free.f_bavail * free.f_frsize + (1 << 30))
    time.sleep(1.1)  # past the second a good result is kept
    answer = client.get("/readyz")
    assert answer.status_code == 503 and answer.get_json()["problems"] == ["database"]
    assert "the disk holding the database is full" in caplog.text
    monkeypatch.setattr(files_in_use, "MIN_FREE_BYTES", 0)
    assert client.get("/readyz").status_code == 200  # space again: ready at once


def test_the_audit_sink_checks_its_files_at_most_once_a_second_and_remembers_a_problem() -> None:
    from sts.adapters.sql.files_in_use import SqliteFile, WatchedFile

    answers = [None, "the database file is gone", None]
    asked: list[float] = []
    clock = [100.0]

    class Files(SqliteFile):
        def __init__(self) -> None:
            pass

        def problem(self) -> str | None:
            asked.append(clock[0])
            return answers[len(asked) - 1]

        def moved(self) -> bool:
            return False

    watched = WatchedFile(Files(), interval=1.0, monotonic=lambda: clock[0])
    assert watched.problem() is None
    clock[0] = 100.5
    assert watched.problem() is None and asked == [100.0]  # within the second: not asked again
    clock[0] = 101.2
    assert watched.problem() == "the database file is gone"
    clock[0] = 105.0
    assert watched.problem() == "the database file is gone" and asked == [100.0, 101.2]  # it stays


@pytest.mark.parametrize("replaced", ["sts.sqlite", "sts.sqlite-wal", "sts.sqlite-shm"])
def test_no_record_is_committed_into_a_file_replaced_since_the_last_check(
    tmp_path: Path, replaced: str
) -> None:
    """The files were checked once a second: an outside fault campaign had ten grants answered in
    the 0.13 s after the database file was deleted, their records in a file no one could open again.
    Before each commit the two files are now looked at (``stat``), and checked at once if moved."""
    import uuid

    from sts.adapters.sql.audit_sink import SqlAuditSink
    from sts.core.audit import AuditRecord
    from sts.core.ports import AuditUnavailable

    engine = make_engine(f"sqlite:///{tmp_path / 'sts.sqlite'}")
    upgrade(engine)
    sink = SqlAuditSink(engine)

    def record() -> AuditRecord:
        return AuditRecord(event_id=str(uuid.uuid4()), time=time.time(), request_id="r", endpoint="token")

    try:
        sink.write(record())
        sink.write(record())  # the -wal in use is known from the check before this commit
        path = tmp_path / replaced
        copy = tmp_path / "copy"
        copy.write_bytes(path.read_bytes())
        os.replace(copy, path)
        started = time.monotonic()
        with pytest.raises(AuditUnavailable, match="replaced"):
            sink.write(record())
        assert time.monotonic() - started < 0.5  # not the next second's check
    finally:
        engine.dispose()


def test_a_database_directory_link_pointed_elsewhere_is_noticed_at_the_next_commit(tmp_path: Path) -> None:
    """The path was resolved once, at start: with the database's directory a symbolic link pointed
    elsewhere, the process went on committing into the old file while every new connection (another
    worker, the CLI) opened the new one (an outside review)."""
    import uuid

    from sts.adapters.sql.audit_sink import SqlAuditSink
    from sts.core.audit import AuditRecord
    from sts.core.ports import AuditUnavailable

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        made = make_engine(f"sqlite:///{tmp_path / name / 'sts.sqlite'}")
        upgrade(made)
        made.dispose()
    (tmp_path / "data").symlink_to(tmp_path / "a")
    engine = make_engine(f"sqlite:///{tmp_path / 'data' / 'sts.sqlite'}")
    sink = SqlAuditSink(engine)
    try:
        sink.write(
            AuditRecord(event_id=str(uuid.uuid4()), time=time.time(), request_id="r", endpoint="token")
        )
        (tmp_path / "next").symlink_to(tmp_path / "b")
        os.replace(tmp_path / "next", tmp_path / "data")
        with pytest.raises(AuditUnavailable, match="replaced"):
            sink.write(
                AuditRecord(event_id=str(uuid.uuid4()), time=time.time(), request_id="r", endpoint="token")
            )
    finally:
        engine.dispose()


def test_a_clock_off_from_redis_is_not_ready(fresh_redis_url: str) -> None:
    """Redis keeps spent uses by its clock and this process judges expiry by its own: a host clock
    more than MAX_CLOCK_SKEW off makes the store not ready (an outside fault campaign had an
    instance 60 s behind, ready, grant a single-use token a second time)."""
    from sts.adapters.readiness import MAX_CLOCK_SKEW, redis_store_check
    from sts.core.ports import StoreUnavailable

    client = redis.Redis.from_url(fresh_redis_url)
    redis_store_check(client, "on-time")(time.time())
    for offset in (MAX_CLOCK_SKEW + 30, -(MAX_CLOCK_SKEW + 30)):
        check = redis_store_check(client, "skewed", wall_clock=lambda o=offset: time.time() + o)
        with pytest.raises(StoreUnavailable, match="clock off"):
            check(time.time())
    client.close()
