"""The store adapters against the real servers on this machine.

* The replay-cache contract (``ports.ReplayCache``), run against every
  implementation: ``SqlReplayCache`` on a SQLite file, ``SqlReplayCache`` on
  PostgreSQL and ``RedisReplayCache``; threads race in one process, and
  processes race on one SQLite file.
* Failing closed: an unreachable or silent Redis is ``StoreUnavailable``
  within a bound, and over HTTP a 503 ``temporarily_unavailable`` with no token.
* PostgreSQL end to end: grants and refusals land in PostgreSQL, and an audit
  database that cannot take the record withholds the token until it can.

Isolation from other test runs on the same servers: the session gets its
own PostgreSQL database (``sts_test_<random>``, dropped at the end) and each
test its own schema in it (``search_path`` in the URL); each Redis test its
own key prefix, whose keys are deleted afterwards.  Time is a parameter
wherever the store allows it; the one sleep (a quarter of a second) is for
Redis, whose expiry runs on the server's own clock.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import math
import multiprocessing
import secrets
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from joserfc import jwt
from joserfc.jwk import KeySet
from sqlalchemy import func, select, text
from werkzeug.test import TestResponse

from sts.adapters.redis.client import connect as connect_redis
from sts.adapters.redis.key_value import RedisSubjectStateStore
from sts.adapters.redis.ledger import RedisReplayCache
from sts.adapters.sql.audit_sink import SqlAuditSink
from sts.adapters.sql.engines import make_engine
from sts.adapters.sql.replay import SqlReplayCache
from sts.adapters.sql.schema import audit_events, replay_entries
from sts.adapters.sql.subject_state import SqlSubjectStateStore
from sts.app import create_app
from sts.core.audit import AuditRecord, token_hash
from sts.core.ports import CLOCK_MARGIN, ReplayCache, StoreUnavailable
from sts.dev.issuer import RunningServer
from sts.migrations import upgrade
from tests.conftest import GATEWAY_SECRET, SIGNER_KEY, STS_ISSUER, exchange_form
from tests.support.clock import Clock
from tests.support.postgres import PG_SERVER, PgSchema, admin_engine, private_database
from tests.support.redis_server import url_of

NOW = 1_700_000_000.0
#: Nothing listens on port 1: connections are refused at once.
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"
LEDGER = "https://ledger.example.com/api"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


# ---------------------------------------------------------------------------
# PostgreSQL: a private database per session, a fresh schema per test
# ---------------------------------------------------------------------------


def audit_rows(url: str) -> list[dict[str, Any]]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(select(audit_events))]
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------
# Redis: a key prefix per test
# ---------------------------------------------------------------------------


@pytest.fixture
def redis_client(fresh_redis_url: str) -> Iterator[redis.Redis]:
    client = connect_redis(fresh_redis_url)
    yield client
    client.close()


@pytest.fixture
def redis_prefix(redis_client: redis.Redis) -> Iterator[str]:
    prefix = f"sts-test-{secrets.token_hex(8)}"
    yield prefix
    for key in redis_client.scan_iter(match=f"{prefix}:*"):
        redis_client.delete(key)


# ---------------------------------------------------------------------------
# The replay-cache contract, over all three implementations
# ---------------------------------------------------------------------------


class WallClock:
    """Redis expires entries on the server's own clock, so its tests use real time (and a move
    of the clock is a sleep) where the other stores take the shared standing ``Clock``."""

    def __call__(self) -> float:
        return time.time()

    def advance(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass
class ReplayStore:
    name: str
    cache: ReplayCache
    clock: Clock | WallClock


def _sql_store(name: str, url: str) -> Iterator[ReplayStore]:
    engine = make_engine(url)
    upgrade(engine)
    yield ReplayStore(name, SqlReplayCache(engine), Clock(NOW))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ReplayStore]:
    if request.param == "sqlite":
        yield from _sql_store("sqlite", f"sqlite:///{tmp_path / 'replay.sqlite'}")
    elif request.param == "postgresql":
        schema: PgSchema = request.getfixturevalue("pg")
        yield from _sql_store("postgresql", schema.url)
    else:
        client: redis.Redis = request.getfixturevalue("redis_client")
        prefix: str = request.getfixturevalue("redis_prefix")
        yield ReplayStore("redis", RedisReplayCache(client, prefix=prefix), WallClock())


def test_first_use_is_accepted_and_a_replay_is_not(store: ReplayStore) -> None:
    now = store.clock()
    assert store.cache.first_use("client_assertion", "jti-1", now + 60, now) is True
    assert store.cache.first_use("client_assertion", "jti-1", now + 60, now) is False
    assert store.cache.first_use("client_assertion", "jti-1", now + 3600, now + 1) is False
    assert store.cache.first_use("client_assertion", "jti-2", now + 60, now) is True


def test_an_expired_entry_can_be_used_again(store: ReplayStore) -> None:
    """In the database, by the clock of whoever asks; Redis keeps a spent use ``CLOCK_MARGIN`` past
    its expiry by its own clock, for an instance whose clock is behind
    (:func:`test_redis_entry_lives_until_expires_at`)."""
    start = store.clock()
    assert store.cache.first_use("dpop", "jti", start + 0.2, start) is True
    assert store.cache.first_use("dpop", "jti", start + 0.2, start) is False
    store.clock.advance(0.25)
    later = store.clock()
    if store.name == "redis":
        assert store.cache.first_use("dpop", "jti", later + 60, later) is False
        return
    assert store.cache.first_use("dpop", "jti", later + 60, later) is True
    # The new use is remembered for its own lifetime.
    assert store.cache.first_use("dpop", "jti", later + 60, later) is False


def test_purposes_and_keys_do_not_collide(store: ReplayStore) -> None:
    now = store.clock()
    assert store.cache.first_use("client_assertion", "abc", now + 60, now) is True
    assert store.cache.first_use("dpop", "abc", now + 60, now) is True
    assert store.cache.first_use("single_use_token", "abc", now + 60, now) is True
    assert store.cache.first_use("client_assertion", "abcd", now + 60, now) is True
    assert store.cache.first_use("client_assertion", "ab", now + 60, now) is True
    assert store.cache.first_use("dpop", "abc", now + 60, now) is False


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param("x" * 300 + "-1", "x" * 300 + "-2", id="long-keys-sharing-a-prefix"),
        pytest.param("jti\x00one", "jti\x00two", id="nul"),
        pytest.param("jti-\ud800", "jti-\udfff", id="lone-surrogates"),
        pytest.param("jti-é", "jti-è", id="non-ascii"),
    ],
)
def test_any_string_is_a_key_of_its_own(store: ReplayStore, first: str, second: str) -> None:
    # A jti is whatever string the token's JSON holds; distinct keys must stay distinct.
    now = store.clock()
    assert store.cache.first_use("dpop", first, now + 60, now) is True
    assert store.cache.first_use("dpop", second, now + 60, now) is True
    assert store.cache.first_use("dpop", first, now + 60, now) is False
    assert store.cache.first_use("dpop", second, now + 60, now) is False


def test_concurrent_first_uses_of_one_key_have_exactly_one_winner(store: ReplayStore) -> None:
    threads, keys = 32, [f"race-{i}" for i in range(8)]
    now = store.clock()
    barrier = threading.Barrier(threads)

    def race() -> list[bool]:
        barrier.wait(timeout=10)
        return [store.cache.first_use("client_assertion", key, now + 60, now) for key in keys]

    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(race) for _ in range(threads)]
        outcomes = [future.result(timeout=30) for future in futures]

    winners_per_key = [sum(outcome[i] for outcome in outcomes) for i in range(len(keys))]
    assert winners_per_key == [1] * len(keys)


def _race_for_keys(
    url: str, keys: list[str], barrier: Barrier, results: Queue[tuple[list[str], str]]
) -> None:
    try:
        engine = make_engine(url)
        cache = SqlReplayCache(engine)
        barrier.wait(timeout=60)
        won = [key for key in keys if cache.first_use("client_assertion", key, NOW + 60, NOW)]
        engine.dispose()
        results.put((won, ""))
    except Exception as exc:
        results.put(([], repr(exc)))


def test_sqlite_replay_cache_is_correct_across_processes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    engine = make_engine(url)
    upgrade(engine)
    keys = [f"jti-{i}" for i in range(150)]
    context = multiprocessing.get_context("spawn")
    workers = 4
    barrier = context.Barrier(workers)
    results: Queue[tuple[list[str], str]] = context.Queue()
    processes = [
        context.Process(target=_race_for_keys, args=(url, keys, barrier, results)) for _ in range(workers)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=60) for _ in range(workers)]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    assert [error for _, error in outcomes] == [""] * workers
    wins = Counter(key for won, _ in outcomes for key in won)
    assert wins == Counter(keys), "each key must be won by exactly one process"
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(replay_entries)).scalar_one() == len(keys)
    engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sql_purge_removes_only_expired_entries(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'purge.sqlite'}" if backend == "sqlite" else request.getfixturevalue("pg").url
    )
    engine = make_engine(url)
    upgrade(engine)
    cache = SqlReplayCache(engine, purge_probability=1.0)
    assert cache.first_use("p", "short-lived", NOW + 10, NOW) is True
    assert cache.first_use("p", "long-lived", NOW + 100, NOW) is True
    # Purged once CLOCK_MARGIN past their expiry (an instance whose clock is behind still needs them).
    assert cache.first_use("p", "trigger", NOW + 400, NOW + 50 + CLOCK_MARGIN) is True
    with engine.connect() as conn:
        kept = sorted(conn.execute(select(replay_entries.c.key)).scalars())
    assert kept == ["p:long-lived", "p:trigger"]
    assert cache.first_use("p", "long-lived", NOW + 200, NOW + 60) is False
    engine.dispose()


def test_redis_entry_lives_until_expires_at(redis_client: redis.Redis, redis_prefix: str) -> None:
    cache = RedisReplayCache(redis_client, prefix=redis_prefix)
    now = time.time()
    expires_at = now + 42.5
    assert cache.first_use("client_assertion", "jti", expires_at, now) is True
    [key] = list(redis_client.scan_iter(match=f"{redis_prefix}:replay:*"))
    assert key == f"{redis_prefix}:replay:client_assertion:jti".encode()
    # Beside the entries, the epoch they were written under (see test_replay_durability.py).
    assert redis_client.exists(f"{redis_prefix}:ledger-epoch")
    # Kept CLOCK_MARGIN longer: an instance whose clock is behind still takes the token then (an
    # outside fault campaign: a 60 s skew granted a single-use token twice).
    assert redis_client.pexpiretime(key) == math.ceil((expires_at + CLOCK_MARGIN) * 1000)


def test_redis_prefixes_keep_deployments_apart(redis_client: redis.Redis, redis_prefix: str) -> None:
    now = time.time()
    one = RedisReplayCache(redis_client, prefix=f"{redis_prefix}:one")
    two = RedisReplayCache(redis_client, prefix=f"{redis_prefix}:two")
    assert one.first_use("client_assertion", "jti", now + 60, now) is True
    assert two.first_use("client_assertion", "jti", now + 60, now) is True
    assert one.first_use("client_assertion", "jti", now + 60, now) is False


# ---------------------------------------------------------------------------
# Failing closed when Redis is gone
# ---------------------------------------------------------------------------


def test_unreachable_redis_is_store_unavailable_promptly() -> None:
    client = connect_redis(DEAD_REDIS_URL)
    cache = RedisReplayCache(client, prefix="unused")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        cache.first_use("client_assertion", "jti", time.time() + 60, time.time())
    with pytest.raises(StoreUnavailable):
        cache.ping()
    assert time.monotonic() - started < 2


def test_a_redis_that_never_answers_is_store_unavailable_within_the_timeout() -> None:
    # The kernel completes the TCP handshake on a listening socket nobody serves.
    with socket.create_server(("127.0.0.1", 0), backlog=8) as silent:
        port = silent.getsockname()[1]
        client = connect_redis(f"redis://127.0.0.1:{port}/0")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            RedisReplayCache(client, prefix="unused").first_use(
                "client_assertion", "jti", time.time() + 60, time.time()
            )
        assert time.monotonic() - started < 2
        client.close()


# ---------------------------------------------------------------------------
# Over HTTP
# ---------------------------------------------------------------------------


def client_assertion(jti: str | None = None, lifetime: int = 60) -> tuple[str, str, int]:
    """RFC 7523 §3 assertion of the ``signer`` client: (assertion, jti, exp)."""
    jti = jti or str(uuid.uuid4())
    now = int(time.time())
    claims = {
        "iss": "signer",
        "sub": "signer",
        "aud": STS_ISSUER,
        "iat": now,
        "exp": now + lifetime,
        "jti": jti,
    }
    header = {"alg": "ES256", "kid": SIGNER_KEY.kid}
    return jwt.encode(header, claims, SIGNER_KEY, algorithms=["ES256"]), jti, now + lifetime


def signer_exchange(client: FlaskClient, subject_token: str, assertion: str) -> TestResponse:
    form = exchange_form(
        subject_token,
        resource=LEDGER,
        client_assertion_type=CLIENT_ASSERTION_TYPE,
        client_assertion=assertion,
    )
    return client.post("/token", data=form)


def gateway_exchange(client: FlaskClient, subject_token: str, resource: str = LEDGER) -> TestResponse:
    basic = base64.b64encode(f"gateway:{GATEWAY_SECRET}".encode()).decode()
    return client.post(
        "/token",
        data=exchange_form(subject_token, resource=resource),
        headers={"Authorization": f"Basic {basic}"},
    )


def ledger_token(upstream: RunningServer) -> str:
    return upstream.issuer.kubernetes_token(audience=[STS_ISSUER])


def issued_claims(client: FlaskClient, response: TestResponse) -> dict[str, Any]:
    """The access token's claims, verified with the service's own published keys."""
    keys = KeySet.import_key_set(client.get("/.well-known/jwks.json").get_json())
    return dict(jwt.decode(response.get_json()["access_token"], keys).claims)


def assert_withheld(response: TestResponse) -> None:
    assert response.status_code == 503
    body = response.get_json()
    assert body["error"] == "temporarily_unavailable"
    assert "access_token" not in body
    assert int(response.headers["Retry-After"]) > 0
    assert response.headers["Cache-Control"] == "no-store"


def test_dead_redis_answers_503_to_an_assertion_exchange(
    make_app: Callable[..., Flask], upstream: RunningServer
) -> None:
    app = make_app(store="redis", redis_url=DEAD_REDIS_URL)
    client = app.test_client()
    assertion, _, _ = client_assertion()

    started = time.monotonic()
    response = signer_exchange(client, ledger_token(upstream), assertion)
    assert time.monotonic() - started < 2

    assert_withheld(response)
    [record] = app.extensions["sts"].audit.recent()
    assert record["outcome"] == "refused"
    assert record["error"] == "temporarily_unavailable"
    assert "store.unavailable" in record["reasons"]
    assert record["issued_jti"] is None
    health = client.get("/healthz")
    assert health.status_code == 503
    assert health.get_json()["problems"] == ["store"]


def test_live_redis_accepts_an_assertion_once(
    make_app: Callable[..., Flask], upstream: RunningServer, redis_client: redis.Redis
) -> None:
    app = make_app(store="redis", redis_url=url_of(redis_client))
    client = app.test_client()
    assertion, jti, exp = client_assertion(lifetime=30)
    # The app's replay key for this assertion; it is deleted below rather than left to expire.
    key = "sts:replay:client_assertion:" + hashlib.sha256(f"signer\x00{jti}".encode()).hexdigest()
    try:
        granted = signer_exchange(client, ledger_token(upstream), assertion)
        assert granted.status_code == 200, granted.get_json()
        assert issued_claims(client, granted)["client_id"] == "signer"
        # Remembered at least as long as the assertion is accepted (exp plus the leeway).
        leeway = app.extensions["sts"].settings.leeway
        assert redis_client.pexpiretime(key) >= (exp + leeway) * 1000

        replayed = signer_exchange(client, ledger_token(upstream), assertion)
        assert replayed.status_code == 401
        assert replayed.get_json()["error"] == "invalid_client"
        assert "access_token" not in replayed.get_json()
    finally:
        redis_client.delete(key)


def test_postgresql_records_grants_and_refusals(
    make_app: Callable[..., Flask], upstream: RunningServer, pg: PgSchema
) -> None:
    app = make_app(database_url=pg.url)
    client = app.test_client()
    granted_token, refused_token = ledger_token(upstream), ledger_token(upstream)
    before = dt.datetime.now(dt.UTC)

    granted = gateway_exchange(client, granted_token)
    assert granted.status_code == 200, granted.get_json()
    refused = gateway_exchange(client, refused_token, resource="https://elsewhere.example.com/")
    assert refused.status_code == 400
    assert refused.get_json()["error"] == "invalid_target"

    rows = {row["outcome"]: row for row in audit_rows(pg.url)}
    assert set(rows) == {"granted", "refused"}
    grant, refusal = rows["granted"], rows["refused"]
    assert grant["issued_jti"] == issued_claims(client, granted)["jti"]
    assert grant["client_id"] == "gateway"
    assert grant["rule"] == "ledger-with-client"
    assert grant["subject"] == "system:serviceaccount:payments:api"
    assert grant["subject_token_sha256"] == token_hash(granted_token)
    assert grant["time"].utcoffset() == dt.timedelta(0)
    assert before - dt.timedelta(seconds=1) <= grant["time"] <= dt.datetime.now(dt.UTC)
    assert refusal["error"] == "invalid_target"
    assert refusal["issued_jti"] is None
    assert refusal["subject_token_sha256"] == token_hash(refused_token)
    assert refusal["time"].tzinfo is not None

    # The tokens and secrets themselves are nowhere in the trail, only their hashes.
    trail = json.dumps(audit_rows(pg.url), default=str)
    for secret in (granted_token, refused_token, granted.get_json()["access_token"], GATEWAY_SECRET):
        assert secret not in trail
    for token in (granted_token, refused_token):
        # Not even the signature part alone.
        assert token.rsplit(".", 1)[1] not in trail


def test_assertion_is_not_recorded_in_the_audit_trail(
    make_app: Callable[..., Flask], upstream: RunningServer, pg: PgSchema
) -> None:
    app = make_app(database_url=pg.url)
    client = app.test_client()
    assertion, _, _ = client_assertion()
    assert signer_exchange(client, ledger_token(upstream), assertion).status_code == 200
    assert signer_exchange(client, ledger_token(upstream), assertion).status_code == 401

    rows = audit_rows(pg.url)
    assert [row["outcome"] for row in sorted(rows, key=lambda r: r["id"])] == ["granted", "refused"]
    trail = json.dumps(rows, default=str)
    assert assertion not in trail
    assert assertion.rsplit(".", 1)[1] not in trail


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_recent_lists_newest_first_with_filters(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'audit.sqlite'}" if backend == "sqlite" else request.getfixturevalue("pg").url
    )
    engine = make_engine(url)
    upgrade(engine)
    sink = SqlAuditSink(engine)
    records = []
    for i, (outcome, client_id) in enumerate([("granted", "a"), ("refused", "b"), ("refused", "a")]):
        record = AuditRecord(
            event_id=str(uuid.uuid4()),
            time=NOW + i,
            request_id=f"req-{i}",
            endpoint="token",
            outcome=outcome,
            client_id=client_id,
            reasons=[f"reason.{i}"],
            requested_scope=["ledger:read"] if i == 0 else None,
            details={"n": i, "nested": {"ok": True}},
        )
        sink.write(record)
        records.append(record.as_dict())

    assert sink.recent() == records[::-1]
    assert sink.recent(limit=2) == records[:0:-1]
    assert sink.recent(outcome="refused") == [records[2], records[1]]
    assert sink.recent(outcome="refused", client_id="a") == [records[2]]
    assert sink.recent(client_id="nobody") == []
    assert list(sink.iter_all()) == records
    engine.dispose()


def test_audit_table_gone_withholds_the_token_until_restored(
    make_app: Callable[..., Flask], upstream: RunningServer, pg: PgSchema
) -> None:
    app = make_app(database_url=pg.url)
    client = app.test_client()
    assert gateway_exchange(client, ledger_token(upstream)).status_code == 200

    pg.execute(f'ALTER TABLE "{pg.schema}".audit_events RENAME TO audit_events_away')
    try:
        assert_withheld(gateway_exchange(client, ledger_token(upstream)))
    finally:
        pg.execute(f'ALTER TABLE "{pg.schema}".audit_events_away RENAME TO audit_events')

    restored = gateway_exchange(client, ledger_token(upstream))
    assert restored.status_code == 200
    granted = [row for row in audit_rows(pg.url) if row["outcome"] == "granted"]
    assert len(granted) == 2
    assert issued_claims(client, restored)["jti"] in {row["issued_jti"] for row in granted}


def test_database_refusing_connections_withholds_the_token_until_it_accepts_them(
    make_app: Callable[..., Flask], upstream: RunningServer
) -> None:
    with private_database() as name:
        app = make_app(database_url=f"{PG_SERVER}/{name}")
        client = app.test_client()
        assert gateway_exchange(client, ledger_token(upstream)).status_code == 200

        admin = admin_engine()

        def cut_connections() -> None:
            with admin.connect() as conn:
                terminated = conn.execute(
                    text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                    {"name": name},
                ).all()
            assert terminated, "the app holds a pooled connection to its database"

        try:
            # A restarted server (pooled connections cut) costs no failed request.
            cut_connections()
            assert gateway_exchange(client, ledger_token(upstream)).status_code == 200

            with admin.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            cut_connections()
            assert_withheld(gateway_exchange(client, ledger_token(upstream)))
            assert client.get("/healthz").get_json()["problems"] == ["database"]
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
            admin.dispose()

        assert gateway_exchange(client, ledger_token(upstream)).status_code == 200
        assert client.get("/healthz").status_code == 200
        assert [row["outcome"] for row in audit_rows(f"{PG_SERVER}/{name}")] == ["granted"] * 3


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


def test_plain_postgresql_url_uses_the_psycopg_driver(
    make_app: Callable[..., Flask], upstream: RunningServer, pg: PgSchema
) -> None:
    plain = pg.url.replace("postgresql+psycopg://", "postgresql://", 1)
    engine = make_engine(plain)
    try:
        assert engine.url.drivername == "postgresql+psycopg"
        with engine.connect() as conn:
            # The URL's query (here the search_path) survives the rewrite.
            assert conn.execute(text("SELECT current_schema()")).scalar_one() == pg.schema
    finally:
        engine.dispose()

    app = make_app(database_url=plain)
    assert app.extensions["sts"].settings.database_url == plain
    assert app.extensions["sts"].engine.dialect.driver == "psycopg"
    assert gateway_exchange(app.test_client(), ledger_token(upstream)).status_code == 200
    assert [row["outcome"] for row in audit_rows(pg.url)] == ["granted"]


def test_audit_text_with_nul_and_lone_surrogate_is_stored_on_postgresql(pg: PgSchema) -> None:
    """PostgreSQL text refuses NUL and lone surrogates; such a claim must not lose the record."""
    from sts.core.audit import AuditRecord

    engine = make_engine(pg.url)
    try:
        upgrade(engine)
        record = AuditRecord(
            event_id="nul-1",
            time=1_800_000_000.0,
            request_id="req\x00id",
            endpoint="token",
            subject="evil\x00sub\ud800",
            subject_token_jti="j\x00ti",
        )
        SqlAuditSink(engine).write(record)
        rows = audit_rows(pg.url)
        assert len(rows) == 1
        assert rows[0]["subject"].startswith("evil") and "\x00" not in rows[0]["subject"]
        assert "\x00" not in rows[0]["request_id"]
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "redis"])
def test_subject_state_updates_are_atomic(
    backend: str, tmp_path: Path, pg: PgSchema, redis_client: redis.Redis, redis_prefix: str
) -> None:
    from sts.core.subject_state import SubjectState as State

    if backend == "redis":
        store: Any = RedisSubjectStateStore(redis_client, prefix=redis_prefix)
    else:
        engine = make_engine(pg.url if backend == "postgresql" else f"sqlite:///{tmp_path / 's.sqlite'}")
        upgrade(engine)
        store = SqlSubjectStateStore(engine)
    # Events are kept bounded (16), so count through a field every update increments.
    store.put("k|s", State(), 3600)

    def bump(s: State) -> State:
        return s.with_event("x", (s.updated_at or 0) + 1)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda _: store.update("k|s", bump, 3600), range(40)))
    assert store.get(["k|s"])[0].updated_at == 40


def test_cached_subject_state_follows_writes_from_another_instance(
    make_settings: Callable[..., Any], upstream: Any
) -> None:
    """SQLite state reads are cached per process and revalidated by a shared change counter: a block
    written through another instance applies to the very next exchange here."""
    from sts.core.subject_state import SubjectState as State
    from tests.conftest import STS_ISSUER, exchange_form

    settings = make_settings()
    here, there = create_app(settings), create_app(settings)
    web = here.test_client()

    def exchange() -> int:
        subject = upstream.issuer.github_actions_token(audience=STS_ISSUER)
        return int(
            web.post("/token", data=exchange_form(subject, audience="https://deploy.example.com")).status_code
        )

    assert exchange() == 200  # caches "no state" for the identity
    assert exchange() == 200
    key = "upstream|repo:acme/app:ref:refs/heads/main"
    there.extensions["sts"].subject_states.put(key, State(blocked_until=time.time() + 600), 3600)
    assert exchange() == 400
    there.extensions["sts"].subject_states.put(key, State(), 3600)
    assert exchange() == 200
    counter = Path(settings.database_url.removeprefix("sqlite:///") + ".state-generation")
    assert oct(counter.stat().st_mode & 0o777) == "0o600"


def test_subject_states_without_a_writable_counter_file_are_read_uncached(
    make_settings: Callable[..., Any], upstream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory the counter file cannot be made in (``chattr +i``, a read-only mount) was a
    traceback at start; the service starts, and states are read from the database each time."""
    import sts.adapters.sql.subject_state as module
    from sts.core.subject_state import SubjectState as State
    from tests.conftest import STS_ISSUER, exchange_form

    def refused(counter: object, path: Path) -> None:
        raise PermissionError(13, "Operation not permitted", str(path))

    monkeypatch.setattr(module.ChangeCounter, "__init__", refused)
    app = create_app(make_settings())
    web = app.test_client()
    key = "upstream|repo:acme/app:ref:refs/heads/main"

    def exchange() -> int:
        subject = upstream.issuer.github_actions_token(audience=STS_ISSUER)
        return int(
            web.post("/token", data=exchange_form(subject, audience="https://deploy.example.com")).status_code
        )

    assert exchange() == 200
    app.extensions["sts"].subject_states.put(key, State(blocked_until=time.time() + 600), 3600)
    assert exchange() == 400
