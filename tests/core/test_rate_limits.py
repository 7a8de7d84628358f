"""Rate limits (issue 13): the algorithm, the shared stores, and the endpoints that apply them.

* GCRA itself and the source-network keys (pure functions).
* The store contract (``ports.RateLimitStore``) on SQLite, PostgreSQL and Redis:
  a burst is admitted and no more, a refusal changes nothing (all or nothing),
  time restores capacity, and processes racing on one store admit exactly the
  burst between them.
* Over HTTP: ``429`` with ``Retry-After`` and an audited refusal
  (``rate_limit.<scope>``) for the global, per-network, per-client,
  per-identity and per-rule limits of ``/token``, and for ``/introspect``,
  ``/revoke`` and ``/ssf/events``; a store that is down fails closed (503).
* Two instances sharing a store (Redis, one SQLite file, one PostgreSQL
  database) enforce one combined count.

Time is an injected clock everywhere; no test sleeps.
"""

from __future__ import annotations

import base64
import contextlib
import json
import multiprocessing
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from sts.adapters.redis.client import connect as connect_redis
from sts.adapters.redis.rate_limits import RedisRateLimits
from sts.adapters.sql.engines import make_engine
from sts.adapters.sql.rate_limits import SqlRateLimits
from sts.adapters.sql.schema import rate_limits
from sts.app import create_app
from sts.core.audit import AuditRecord
from sts.core.ports import RateLimitStore, StoreUnavailable
from sts.core.rate_limit import (
    NO_LIMITS,
    Check,
    Limit,
    RateLimiter,
    RateLimitPolicy,
    gcra_admit,
    gcra_start,
    gcra_wait,
    network_of,
)
from sts.dev.issuer import DevIssuer, RunningServer
from sts.errors import ConfigurationError, RateLimited, TemporarilyUnavailable
from sts.migrations import upgrade
from sts.settings import DEFAULT_RATE_LIMITS, LimitSettings
from tests.conftest import DEFAULT_POLICY, GATEWAY_SECRET, STS_ISSUER, exchange_form, settings_for
from tests.core.rate_limit_support import NOW, StoreSpec, admitted, build_store, cell, race
from tests.support.clock import Clock
from tests.support.redis_server import RedisProcess

DEPLOY = "https://deploy.example.com"
LEDGER = "https://ledger.example.com/api"
SET_MEDIA_TYPE = "application/secevent+jwt"
SESSION_REVOKED = "https://schemas.openid.net/secevent/caep/event-type/session-revoked"


# -- the algorithm ----------------------------------------------------------------------------------


def test_gcra_admits_the_burst_then_one_request_per_interval() -> None:
    limit = Limit(requests=10, period=60, burst=3)  # one every 6 s, three at once
    key = Check("t", "k", limit, "k").cell()
    tat: float | None = None
    admitted = []
    for _ in range(5):
        new = gcra_admit(tat, NOW, key.interval, key.tolerance)
        admitted.append(new is not None)
        tat = new if new is not None else tat
    assert admitted == [True, True, True, False, False]
    assert gcra_admit(tat, NOW + 5.9, key.interval, key.tolerance) is None
    tat = gcra_admit(tat, NOW + 6, key.interval, key.tolerance)
    assert tat is not None
    assert gcra_admit(tat, NOW + 6, key.interval, key.tolerance) is None
    # After a long rest the whole burst is back, never more.
    rested = [gcra_admit(tat, NOW + 3600, key.interval, key.tolerance) is not None]
    assert rested == [True]


def test_gcra_reads_a_tat_beyond_the_limits_tolerance_as_its_burst_spent() -> None:
    """A TAT an earlier, stricter limit left far ahead: the current limit's wait at most, and its
    sustained rate from there (an outside audit: 109 s to wait under 200/s burst 2000)."""
    key = Check("t", "k", Limit(requests=200, period=1, burst=2000), "k").cell()
    stale = NOW + 120  # 1/60s burst 2, spent
    assert 0 < gcra_wait(stale, NOW, key.interval, key.tolerance) <= key.interval + 1e-6
    assert gcra_admit(stale, NOW, key.interval, key.tolerance) is None
    # What a store writes back on that refusal: the burst spent at NOW; one interval on, admitted.
    capped = gcra_start(stale, NOW, key.tolerance)
    assert capped == NOW + key.tolerance
    assert gcra_admit(capped, NOW + key.interval, key.interval, key.tolerance) == pytest.approx(
        capped + key.interval
    )


@pytest.mark.parametrize(
    ("address", "v4", "v6", "network"),
    [
        ("192.0.2.77", 24, 56, "192.0.2.0/24"),
        ("192.0.2.77", 32, 56, "192.0.2.77/32"),
        ("192.0.2.77", 16, 56, "192.0.0.0/16"),
        ("2001:db8:1234:5678::1", 24, 56, "2001:db8:1234:5600::/56"),
        ("2001:db8:1234:5678::1", 24, 64, "2001:db8:1234:5678::/64"),
        ("::ffff:192.0.2.77", 24, 56, "192.0.2.0/24"),  # IPv4-mapped: counted as IPv4
        ("127.0.0.1", 24, 56, "127.0.0.0/24"),
        (None, 24, 56, "unknown"),
        ("/run/sts.sock", 24, 56, "unknown"),
        ("", 24, 56, "unknown"),
    ],
)
def test_source_network_keys(address: str | None, v4: int, v6: int, network: str) -> None:
    assert network_of(address, v4, v6) == network


@pytest.mark.parametrize(("requests", "period", "burst"), [(0, 1, 1), (1, 0, 1), (1, 1, 0), (1, -5, 1)])
def test_a_limit_must_admit_something(requests: int, period: float, burst: int) -> None:
    with pytest.raises(ValueError):
        Limit(requests, period, burst)


def test_configured_limits_need_a_store() -> None:
    with pytest.raises(ValueError):
        RateLimiter(RateLimitPolicy({"token": {"network": Limit(1, 1, 1)}}), None)
    record = AuditRecord("e", NOW, "r", "token")
    NO_LIMITS.on_arrival("token", "192.0.2.1", NOW, record)  # no limits: nothing checked, nothing stored
    assert record.details == {}


# -- the store contract, on every backend -----------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSpec:
    if request.param == "sqlite":
        return StoreSpec("sqlite", f"sqlite:///{tmp_path / 'limits.sqlite'}")
    if request.param == "postgresql":
        return StoreSpec("postgresql", request.getfixturevalue("pg").url)
    return StoreSpec("redis", request.getfixturevalue("fresh_redis_url"), prefix=f"t{secrets.token_hex(4)}")


@pytest.fixture
def store(spec: StoreSpec) -> Iterator[RateLimitStore]:
    built, close = build_store(spec)
    yield built
    close()


def test_a_burst_is_admitted_and_the_next_request_is_told_how_long_to_wait(store: RateLimitStore) -> None:
    key = cell("net:192.0.2.0/24", requests=10, period=60, burst=3)
    assert [admitted(store.acquire([key], NOW)) for _ in range(4)] == [True, True, True, False]
    waits = store.acquire([key], NOW + 1)
    assert waits[0] == pytest.approx(5.0, abs=0.01)  # the fourth cell is due 6 s after the first


def test_time_restores_capacity_at_the_sustained_rate(store: RateLimitStore) -> None:
    key = cell("identity:a", requests=2, period=10, burst=2)  # one every 5 s
    assert admitted(store.acquire([key], NOW)) and admitted(store.acquire([key], NOW))
    assert not admitted(store.acquire([key], NOW + 4.9))
    assert admitted(store.acquire([key], NOW + 5))
    assert not admitted(store.acquire([key], NOW + 5))
    assert admitted(store.acquire([key], NOW + 100)) and admitted(store.acquire([key], NOW + 100))
    assert not admitted(store.acquire([key], NOW + 100))


def test_a_refusal_charges_none_of_the_keys(store: RateLimitStore) -> None:
    """All or nothing: a request refused for its network does not spend the global budget."""
    network = cell("net:198.51.100.0/24", requests=2, period=60)
    everyone = cell("global", requests=3, period=60)
    assert admitted(store.acquire([everyone, network], NOW))
    assert admitted(store.acquire([everyone, network], NOW))
    for _ in range(5):  # the network is spent: refused, and the global limit is not charged
        waits = store.acquire([everyone, network], NOW)
        assert waits[0] <= 0 < waits[1]
    other = cell("net:203.0.113.0/24", requests=2, period=60)
    assert admitted(store.acquire([everyone, other], NOW)), "global was charged by refused requests"
    assert not admitted(store.acquire([everyone, other], NOW))


def test_a_relaxed_limit_is_not_held_to_the_stricter_limits_state(store: RateLimitStore) -> None:
    """The limit raised (a restart with another configuration): the key's state of the old one
    counts as the new limit's burst spent, no more.  An outside audit had a /24 refused 429 with
    ``Retry-After: 109`` under 200/s burst 2000, until the old limit's state (1/60s burst 2) ran
    out; with a period of 3600, for up to an hour."""
    strict = cell("net:192.0.2.0/24", requests=1, period=60, burst=2)
    assert [admitted(store.acquire([strict], NOW)) for _ in range(3)] == [True, True, False]
    relaxed = cell("net:192.0.2.0/24", requests=200, period=1, burst=2000)
    later = NOW + 1
    [wait] = store.acquire([relaxed], later)
    assert 0 < wait <= relaxed.interval + 1e-6  # Retry-After: 1, not 109
    # One interval of the new limit on, admitted, and then at the new limit's rate (half an
    # interval more each time, so that rounding at 1.7e9 s decides nothing).
    step = relaxed.interval
    assert admitted(store.acquire([relaxed], later + 1.5 * step))
    assert not admitted(store.acquire([relaxed], later + 1.5 * step))
    assert admitted(store.acquire([relaxed], later + 2.5 * step))
    # Stricter again: the refusals are the new limit's own, as long as it says.
    stricter = cell("net:192.0.2.0/24", requests=1, period=3600, burst=1)
    [wait] = store.acquire([stricter], later + 3 * step)
    assert 0 < wait <= stricter.interval + 1e-6


def test_a_clock_set_back_does_not_hold_keys_for_as_long_as_it_was_ahead(store: RateLimitStore) -> None:
    """The clock an hour ahead, then set right (or an instance an hour ahead, on a shared store): the
    state it wrote counts as the limit's burst spent, no more.  An outside fault campaign had every
    client of a network refused for as long as the clock had been ahead, told ``Retry-After: 1``."""
    key = cell("net:192.0.2.0/24", requests=2, period=20, burst=2)  # one every 10 s, 2 at once
    ahead = NOW + 3600
    assert [admitted(store.acquire([key], ahead)) for _ in range(3)] == [True, True, False]
    [wait] = store.acquire([key], NOW)
    assert 0 < wait <= key.interval + 1e-6
    assert admitted(store.acquire([key], NOW + key.interval))
    assert not admitted(store.acquire([key], NOW + key.interval))


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_tat_a_little_ahead_is_counted_as_it_is_and_the_wait_says_how_long(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A TAT written under the same limit up to ``CLOCK_SKEW`` beyond what the limit allows is
    counted as it is: another instance's clock (PostgreSQL), or a request that started later than
    this one (each counts by the time it started: SQLite too).  Lowering it handed allowance back
    (a review: 1,377 admitted under 100/s in 3 s).  The wait says how long it really is."""
    url = f"sqlite:///{tmp_path / 'limits.sqlite'}" if kind == "sqlite" else request.getfixturevalue("pg").url
    store, close = build_store(StoreSpec(kind, url))
    try:
        key = cell("net:198.51.100.0/24", requests=2, period=20, burst=2)  # interval 10 s, tolerance 20 s
        assert [admitted(store.acquire([key], NOW + 30)) for _ in range(2)] == [True, True]  # TAT: NOW + 50
        [wait] = store.acquire([key], NOW)
        assert wait == pytest.approx(40, abs=0.01)  # NOW + 50 + 10 - 20: due then, and said so
        assert not admitted(store.acquire([key], NOW + 39))
        assert admitted(store.acquire([key], NOW + 40))
    finally:
        close()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_requests_counted_at_their_start_times_out_of_order_get_no_more_than_the_limit(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Each request counts by the time it started, and requests reach the store out of that order
    (a later check after a slow verification, a wait for the write lock): one counted 2 ms early
    must not lower what a later one wrote (a review: 4.5 times the limit)."""
    url = f"sqlite:///{tmp_path / 'limits.sqlite'}" if kind == "sqlite" else request.getfixturevalue("pg").url
    store, close = build_store(StoreSpec(kind, url))
    try:
        key = cell("global", requests=200, period=1, burst=200)  # one every 5 ms, 200 at once
        won = 0
        for n in range(2000):  # two seconds of a flood, two requests a millisecond
            won += admitted(store.acquire([key], NOW + n * 0.001))
            won += admitted(store.acquire([key], NOW + n * 0.001 - 0.002))  # started 2 ms earlier
        assert 200 + 2 * 200 - 2 <= won <= 200 + 2 * 200 + 2
    finally:
        close()


def test_keys_are_independent(store: RateLimitStore) -> None:
    one, two = cell("client:one", 1, 60), cell("client:two", 1, 60)
    assert admitted(store.acquire([one], NOW))
    assert not admitted(store.acquire([one], NOW))
    assert admitted(store.acquire([two], NOW))


def test_processes_racing_on_one_store_admit_exactly_the_burst(spec: StoreSpec) -> None:
    """Three processes, 15 attempts each, at one instant: 25 admitted between them, not one more."""
    _store, close = build_store(spec)  # the schema exists before the race
    close()
    context = multiprocessing.get_context("spawn")
    workers = 3
    barrier = context.Barrier(workers)
    results: Queue[tuple[int, str]] = context.Queue()
    processes = [context.Process(target=race, args=(spec, 15, 25, barrier, results)) for _ in range(workers)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in range(workers)]
    for process in processes:
        process.join(timeout=60)
    assert [error for _, error in outcomes] == [""] * workers
    assert sum(won for won, _ in outcomes) == 25


def test_on_redis_instances_with_skewed_clocks_count_by_one_clock(fresh_redis_url: str) -> None:
    """An instance whose clock runs a minute ahead must not lock the others out: with the server's
    clock (as ``sts serve`` runs) every instance counts by Redis's ``TIME``; by each caller's clock
    the ahead one writes arrival times the others read as a minute away (an outside fault campaign:
    one skewed instance had every instance answer 429)."""
    import time as real_time

    key = [cell("skew", requests=2, period=20, burst=2)]
    for server_clock, admitted_after in ((True, True), (False, False)):
        prefix = f"t{secrets.token_hex(4)}"
        ahead = RedisRateLimits(connect_redis(fresh_redis_url), prefix=prefix, server_clock=server_clock)
        on_time = RedisRateLimits(connect_redis(fresh_redis_url), prefix=prefix, server_clock=server_clock)
        assert admitted(ahead.acquire(key, real_time.time() + 60))
        real_time.sleep(0.2)
        assert admitted(on_time.acquire(key, real_time.time())) is admitted_after


def test_sql_store_purges_only_spent_keys(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'purge.sqlite'}")
    upgrade(engine)
    store = SqlRateLimits(engine, purge_probability=1.0)
    assert admitted(store.acquire([cell("short", 1, 10)], NOW))
    assert admitted(store.acquire([cell("long", 1, 1000)], NOW))
    assert admitted(store.acquire([cell("trigger", 1, 10)], NOW + 50))  # purges what ended before NOW + 50
    with engine.connect() as conn:
        keys = {row[0] for row in conn.execute(rate_limits.select())}
    assert keys == {"long", "trigger"}
    engine.dispose()


def test_on_sqlite_the_counts_live_in_a_private_file_beside_the_database(
    build: Callable[..., Flask], upstream: RunningServer, tmp_path: Path
) -> None:
    app = build(**limits(token={"network": {"requests": 1, "period": 60}}))
    client = app.test_client()
    assert deploy(client, upstream).status_code == 200
    assert deploy(client, upstream).status_code == 429
    side = tmp_path / "sts.sqlite.rate-limits"
    assert side.is_file() and side.stat().st_mode & 0o777 == 0o600
    with app.extensions["sts"].engine.connect() as conn:  # the main file's table stays empty
        assert list(conn.execute(rate_limits.select())) == []


def test_unreachable_stores_are_store_unavailable(tmp_path: Path) -> None:
    dead = RedisRateLimits(connect_redis("redis://127.0.0.1:1/0"))
    with pytest.raises(StoreUnavailable):
        dead.acquire([cell("k", 1, 1)], NOW)
    engine = make_engine(f"sqlite:///{tmp_path / 'no-schema.sqlite'}")  # no table: every write fails
    with pytest.raises(StoreUnavailable):
        SqlRateLimits(engine).acquire([cell("k", 1, 1)], NOW)
    engine.dispose()


def test_the_limiter_fails_closed_when_its_store_is_down() -> None:
    limiter = RateLimiter(
        RateLimitPolicy({"token": {"network": Limit(1, 1, 1)}}),
        RedisRateLimits(connect_redis("redis://127.0.0.1:1/0")),
    )
    with pytest.raises(TemporarilyUnavailable) as caught:
        limiter.on_arrival("token", "192.0.2.1", NOW, AuditRecord("e", NOW, "r", "token"))
    assert caught.value.status == 503 and not isinstance(caught.value, RateLimited)
    assert caught.value.reason == "store.unavailable"


# -- the limiter's memory: refusals remembered ----------------------------------------------------


class CountingStore:
    """A real store, with the number of round trips made to it."""

    def __init__(self, inner: RateLimitStore) -> None:
        self.inner = inner
        self.calls = 0

    def acquire(self, keys: Any, now: float) -> Any:
        self.calls += 1
        return self.inner.acquire(keys, now)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[RateLimitStore]:
    store, close = build_store(StoreSpec("sqlite", f"sqlite:///{tmp_path / 'memory.sqlite'}"))
    yield store
    close()


def arrivals(limiter: RateLimiter, count: int, now: float, address: str = "192.0.2.1") -> int:
    admitted = 0
    for _ in range(count):
        try:
            limiter.on_arrival("token", address, now, AuditRecord("e", now, "r", "token"))
            admitted += 1
        except RateLimited:
            pass
    return admitted


def test_six_processes_sharing_a_burst_use_all_of_it(sqlite_store: RateLimitStore) -> None:
    """100/s with a burst of 2000; six limiters (worker processes) taking turns at 150/s together
    for ten simulated seconds: 500 over the sustained rate, well within the burst, so every
    request is admitted.  (Reserving cells per process in batches failed exactly this: each
    process let most of its batches expire unused, and the burst ran out in seconds.)"""
    policy = RateLimitPolicy({"token": {"network": Limit(100, 1, 2000)}})
    workers = [RateLimiter(policy, sqlite_store) for _ in range(6)]
    admitted = sum(arrivals(workers[i % 6], 1, NOW + i / 150) for i in range(1500))
    assert admitted == 1500


def test_a_small_limit_is_exact_and_a_refusal_is_remembered_until_its_time(
    sqlite_store: RateLimitStore,
) -> None:
    policy = RateLimitPolicy({"token": {"network": Limit(6, 60, 3)}})
    counted = CountingStore(sqlite_store)
    limiter = RateLimiter(policy, counted)
    assert arrivals(limiter, 3, NOW) == 3 and counted.calls == 3
    record = AuditRecord("e", NOW, "r", "token")
    with pytest.raises(RateLimited) as first:
        limiter.on_arrival("token", "192.0.2.1", NOW, record)
    assert first.value.retry_after == 10 and counted.calls == 4
    # Refused again from memory, with the time left, while the store is not asked.
    with pytest.raises(RateLimited) as again:
        limiter.on_arrival("token", "192.0.2.9", NOW + 4, AuditRecord("e", NOW, "r", "token"))
    assert again.value.retry_after == 6 and counted.calls == 4
    assert arrivals(limiter, 100, NOW + 5) == 0 and counted.calls == 4
    assert arrivals(limiter, 1, NOW + 10) == 1 and counted.calls == 5
    assert arrivals(limiter, 1, NOW + 5, "198.51.100.1") == 1  # another network: its own count


def test_a_refusal_remembered_before_the_clock_was_set_back_is_forgotten(
    sqlite_store: RateLimitStore,
) -> None:
    """A running worker whose clock is set back an hour: what it remembers refusing (until a time by
    the old clock) would refuse the key from memory for that hour; it asks the store again."""
    policy = RateLimitPolicy({"token": {"network": Limit(6, 60, 3)}})
    counted = CountingStore(sqlite_store)
    limiter = RateLimiter(policy, counted)
    ahead = NOW + 3600
    assert arrivals(limiter, 4, ahead) == 3 and counted.calls == 4  # the fourth refused, remembered
    assert arrivals(limiter, 1, ahead + 1) == 0 and counted.calls == 4  # from memory
    # Set back: the store is asked (and lowers what the clock ahead wrote: one interval to wait).
    with pytest.raises(RateLimited) as refused:
        limiter.on_arrival("token", "192.0.2.1", NOW, AuditRecord("e", NOW, "r", "token"))
    assert refused.value.retry_after == 10 and counted.calls == 5
    assert arrivals(limiter, 1, NOW + 10) == 1


def limits(**endpoints: dict[str, Any]) -> dict[str, Any]:
    return {"rate_limits": endpoints}


@pytest.fixture
def build(tmp_path: Path, upstream: RunningServer, clock: Clock) -> Callable[..., Flask]:
    def make(policy: dict[str, Any] | None = None, **overrides: Any) -> Flask:
        return create_app(settings_for(tmp_path, upstream, policy, **overrides), clock=clock)

    return make


def github_token(upstream: RunningServer, **claims: Any) -> str:
    return upstream.issuer.github_actions_token(audience=STS_ISSUER, **claims)


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def deploy(client: FlaskClient, upstream: RunningServer, address: str = "192.0.2.10") -> TestResponse:
    return client.post(
        "/token",
        data=exchange_form(github_token(upstream), audience=DEPLOY),
        environ_base={"REMOTE_ADDR": address},
    )


def ledger(client: FlaskClient, upstream: RunningServer, address: str = "192.0.2.10") -> TestResponse:
    token = upstream.issuer.kubernetes_token(audience=STS_ISSUER)
    return client.post(
        "/token",
        data=exchange_form(token, resource=LEDGER),
        headers=basic("gateway", GATEWAY_SECRET),
        environ_base={"REMOTE_ADDR": address},
    )


def last_record(app: Flask, endpoint: str = "token") -> dict[str, Any]:
    record: dict[str, Any] = app.extensions["sts"].audit.recent(1, endpoint=endpoint)[0]
    return record


def assert_limited(response: TestResponse, app: Flask, scope: str, endpoint: str = "token") -> dict[str, Any]:
    """429, Retry-After, the OAuth error body, no-store, and a refusal on the record."""
    assert response.status_code == 429, response.get_data(as_text=True)
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["Cache-Control"] == "no-store"
    body = response.get_json()
    if endpoint == "ssf":
        assert body["err"] == "temporarily_unavailable"
    else:
        assert body == {
            "error": "temporarily_unavailable",
            "error_description": "Too many requests; retry after the number of seconds in Retry-After.",
        }
    record = last_record(app, endpoint)
    assert record["outcome"] == "refused"
    assert record["error"] == "temporarily_unavailable"
    assert record["reasons"][-1] == f"rate_limit.{scope}"
    assert record["details"]["rate_limit"]["scope"] == scope
    assert record["details"]["rate_limit"]["retry_after"] == int(response.headers["Retry-After"])
    return record


def test_per_network_limit_refuses_with_429_retry_after_and_an_audit_record(
    build: Callable[..., Flask], upstream: RunningServer, clock: Clock
) -> None:
    app = build(**limits(token={"network": {"requests": 2, "period": 60}}))
    client = app.test_client()
    assert [deploy(client, upstream).status_code for _ in range(2)] == [200, 200]
    response = deploy(client, upstream, "192.0.2.99")  # same /24
    record = assert_limited(response, app, "network")
    assert record["details"]["rate_limit"]["limited"] == "192.0.2.0/24"
    assert response.headers["Retry-After"] == "30"  # the next cell is due in 30 s
    assert record["subject_token_sha256"] is not None  # refused before parsing, the hash is kept
    assert deploy(client, upstream, "198.51.100.7").status_code == 200  # another network
    clock.advance(30)
    assert deploy(client, upstream).status_code == 200
    assert deploy(client, upstream).status_code == 429


def test_ipv6_sources_are_counted_per_56_unless_configured(
    build: Callable[..., Flask], upstream: RunningServer
) -> None:
    app = build(**limits(token={"network": {"requests": 1, "period": 60}}))
    client = app.test_client()
    assert deploy(client, upstream, "2001:db8:0:100::1").status_code == 200
    assert deploy(client, upstream, "2001:db8:0:1ff::2").status_code == 429  # same /56
    assert deploy(client, upstream, "2001:db8:0:200::1").status_code == 200  # the next /56
    narrow = build(
        **{"rate_limits": {"ipv6_prefix": 64, "token": {"network": {"requests": 1, "period": 60}}}}
    )
    client = narrow.test_client()
    assert deploy(client, upstream, "2001:db8:0:300::1").status_code == 200
    assert deploy(client, upstream, "2001:db8:0:301::1").status_code == 200


def test_global_limit(build: Callable[..., Flask], upstream: RunningServer) -> None:
    app = build(**limits(token={"global": {"requests": 3, "period": 60}}))
    client = app.test_client()
    addresses = ["192.0.2.1", "198.51.100.1", "203.0.113.1"]
    assert [deploy(client, upstream, a).status_code for a in addresses] == [200, 200, 200]
    assert_limited(deploy(client, upstream, "10.9.8.7"), app, "global")


def test_per_client_limit_counts_authenticated_clients_only(
    build: Callable[..., Flask], upstream: RunningServer
) -> None:
    app = build(**limits(token={"client": {"requests": 2, "period": 60}}))
    client = app.test_client()
    assert ledger(client, upstream).status_code == 200
    # A wrong secret is refused before the count: nobody spends the gateway's budget by naming it.
    wrong = client.post(
        "/token",
        data=exchange_form(upstream.issuer.kubernetes_token(audience=STS_ISSUER), resource=LEDGER),
        headers=basic("gateway", "not-the-secret"),
    )
    assert wrong.status_code == 401
    assert ledger(client, upstream).status_code == 200
    record = assert_limited(ledger(client, upstream), app, "client")
    assert record["client_id"] == "gateway" and record["details"]["rate_limit"]["limited"] == "gateway"
    # The anonymous deploy rule has no client to count.
    assert deploy(client, upstream).status_code == 200


def test_per_identity_limit(build: Callable[..., Flask], upstream: RunningServer) -> None:
    app = build(**limits(token={"identity": {"requests": 2, "period": 60}}))
    client = app.test_client()
    assert [deploy(client, upstream, f"192.0.2.{n}").status_code for n in (1, 2)] == [200, 200]
    record = assert_limited(deploy(client, upstream, "198.51.100.3"), app, "identity")  # from anywhere
    assert record["issuer"] == "upstream" and record["subject"] == "repo:acme/app:ref:refs/heads/main"
    assert record["details"]["rate_limit"]["limited"] == "upstream|repo:acme/app:ref:refs/heads/main"
    assert ledger(client, upstream).status_code == 200  # another identity


def test_a_rules_own_limit_applies_per_identity_after_the_rule_is_chosen(
    build: Callable[..., Flask], upstream: RunningServer, clock: Clock
) -> None:
    rules = [dict(rule) for rule in DEFAULT_POLICY["rules"]]
    del rules[0]["subject"]
    rules[0]["subject_pattern"] = "repo:acme/app:ref:refs/heads/.*"
    rules[0]["rate_limit"] = {"requests": 6, "period": 60, "burst": 2}
    app = build({**DEFAULT_POLICY, "rules": rules})
    client = app.test_client()
    assert [deploy(client, upstream).status_code for _ in range(2)] == [200, 200]
    record = assert_limited(deploy(client, upstream), app, "rule")
    assert record["rule"] == "deploy"  # chosen first, then limited
    assert record["details"]["rate_limit"]["limit"] == "6/60s burst 2"
    assert record["details"]["rate_limit"]["retry_after"] == 10
    # Another identity matching the same rule has a count of its own; other rules have none.
    other = exchange_form(github_token(upstream, ref="refs/heads/release"), audience=DEPLOY)
    assert client.post("/token", data=other).status_code == 200
    assert [ledger(client, upstream).status_code for _ in range(3)] == [200, 200, 200]
    clock.advance(10)
    assert deploy(client, upstream).status_code == 200
    assert deploy(client, upstream).status_code == 429


def test_a_rules_limit_is_spent_only_by_requests_that_passed_every_check(
    build: Callable[..., Flask], upstream: RunningServer, clock: Clock
) -> None:
    """A request the rule refuses after choosing it (an attestation too old, here; a bound token
    without its key, risk, assurance) spends none of the workload's quota: whoever holds such a
    copy of the identity's token drained it (an outside red team)."""
    rules = [dict(rule) for rule in DEFAULT_POLICY["rules"]]
    rules[0]["rate_limit"] = {"requests": 2, "period": 60, "burst": 2}
    rules[0]["max_attestation_age"] = 60
    app = build({**DEFAULT_POLICY, "rules": rules})
    client = app.test_client()
    old = exchange_form(github_token(upstream, now=clock.now - 120), audience=DEPLOY)
    assert [client.post("/token", data=old).status_code for _ in range(3)] == [400, 400, 400]
    assert app.extensions["sts"].audit.recent(1)[0]["reasons"][-1] == "policy.attestation_too_old"
    assert [deploy(client, upstream).status_code for _ in range(2)] == [200, 200]
    assert_limited(deploy(client, upstream), app, "rule")


@pytest.mark.parametrize("store", ["embedded", "redis", "postgresql"])
def test_a_single_use_token_presented_again_spends_none_of_a_rules_limit(
    build: Callable[..., Flask], upstream: RunningServer, request: pytest.FixtureRequest, store: str
) -> None:
    """A spent single-use token presented again is refused before the rule's quota is counted (one
    read of the replay store, only for a rule with both): an outside red team held a workload off
    for twenty minutes with three replays of a token it had already used."""
    rules = [dict(rule) for rule in DEFAULT_POLICY["rules"]]
    rules[0]["rate_limit"] = {"requests": 3, "period": 3600, "burst": 3}
    rules[0]["single_use"] = True
    stores: dict[str, Any] = {
        "embedded": {},
        "redis": {"store": "redis", "redis_url": request.getfixturevalue("fresh_redis_url")}
        if store == "redis"
        else {},
        "postgresql": {"database_url": request.getfixturevalue("pg").url} if store == "postgresql" else {},
    }
    app = build({**DEFAULT_POLICY, "rules": rules}, **stores[store])
    client = app.test_client()
    spent = exchange_form(github_token(upstream), audience=DEPLOY)
    assert client.post("/token", data=spent).status_code == 200
    for _ in range(3):
        again = client.post("/token", data=spent)
        assert again.status_code == 400, again.get_json()
        refused = app.extensions["sts"].audit.recent(1)[0]
        assert refused["reasons"][-1] == "subject_token.replayed"
        assert refused["details"]["detail"] == "found used before the rule's quota"
    assert [deploy(client, upstream).status_code for _ in range(2)] == [200, 200]
    assert_limited(deploy(client, upstream), app, "rule")


@pytest.mark.parametrize(
    ("rate_limits", "answers"),
    [
        # ``enabled: false``: no limit at all, a rule's own included (a review: such a rule, there
        # being no store, answered 500).
        ({"enabled": False}, [200, 200, 200]),
        # Every service-wide limit removed: the rule's own still holds (it was silently dropped).
        ({"token": {"network": None, "identity": None}, "introspect": {"network": None, "client": None},
          "revoke": {"network": None, "client": None}, "ssf": {"network": None, "client": None}},
         [200, 200, 429]),
    ],
)  # fmt: skip
def test_a_rules_limit_with_the_services_limits_off(
    build: Callable[..., Flask], upstream: RunningServer, rate_limits: dict[str, Any], answers: list[int]
) -> None:
    rules = [dict(rule) for rule in DEFAULT_POLICY["rules"]]
    rules[0]["rate_limit"] = {"requests": 2, "period": 3600, "burst": 2}
    app = build({**DEFAULT_POLICY, "rules": rules}, rate_limits=rate_limits)
    client = app.test_client()
    assert [deploy(client, upstream).status_code for _ in range(3)] == answers


def test_limits_can_be_switched_off(build: Callable[..., Flask], upstream: RunningServer) -> None:
    app = build(**{"rate_limits": {"enabled": False, "token": {"network": {"requests": 1, "period": 60}}}})
    assert app.extensions["sts"].limits is NO_LIMITS
    client = app.test_client()
    assert [deploy(client, upstream).status_code for _ in range(3)] == [200, 200, 200]


def test_defaults_are_flood_guards_and_null_turns_one_off(tmp_path: Path, upstream: RunningServer) -> None:
    settings = settings_for(tmp_path, upstream)
    assert settings.rate_limits.enabled
    assert settings.rate_limits.limits == DEFAULT_RATE_LIMITS
    assert settings.rate_limits.limits["token"]["network"] == LimitSettings(200, 1, 2000)
    changed = settings_for(
        tmp_path,
        upstream,
        rate_limits={"token": {"network": None, "client": {"requests": 5, "period": 2}}},
    )
    assert "network" not in changed.rate_limits.limits["token"]
    assert changed.rate_limits.limits["token"]["client"] == LimitSettings(5, 2.0, 5)
    assert changed.rate_limits.limits["token"]["identity"] == DEFAULT_RATE_LIMITS["token"]["identity"]
    assert changed.rate_limits.limits["introspect"] == DEFAULT_RATE_LIMITS["introspect"]


@pytest.mark.parametrize(
    "bad",
    [
        {"token": {"network": {"requests": 0, "period": 1}}},
        {"token": {"network": {"requests": 1}}},
        {"token": {"network": {"requests": 1, "period": 0}}},
        {"token": {"rule": {"requests": 1, "period": 1}}},
        {"introspect": {"identity": {"requests": 1, "period": 1}}},
        {"ipv4_prefix": 33},
        {"bogus": {}},
    ],
)
def test_bad_rate_limit_settings_stop_the_start(
    tmp_path: Path, upstream: RunningServer, bad: dict[str, Any]
) -> None:
    with pytest.raises(ConfigurationError, match="rate_limits"):
        settings_for(tmp_path, upstream, rate_limits=bad)


def test_a_bad_rule_limit_stops_the_start(build: Callable[..., Flask]) -> None:
    policy = {**DEFAULT_POLICY, "rules": [dict(rule) for rule in DEFAULT_POLICY["rules"]]}
    policy["rules"][0]["rate_limit"] = {"requests": 0, "period": 60}
    with pytest.raises(ConfigurationError, match="rate_limit"):
        build(policy)


def test_introspection_and_revocation_limits(build: Callable[..., Flask], upstream: RunningServer) -> None:
    app = build(
        **limits(
            introspect={"client": {"requests": 2, "period": 60}},
            revoke={"network": {"requests": 1, "period": 60}},
        )
    )
    client = app.test_client()
    token = deploy(client, upstream).get_json()["access_token"]
    gateway = basic("gateway", GATEWAY_SECRET)
    for _ in range(2):
        assert client.post("/introspect", data={"token": token}, headers=gateway).status_code == 200
    assert_limited(
        client.post("/introspect", data={"token": token}, headers=gateway), app, "client", "introspect"
    )
    assert client.post("/revoke", data={"token": "x"}, headers=gateway).status_code == 200
    # Over the network limit before the credentials are even looked at (a wrong secret too).
    response = client.post("/revoke", data={"token": "x"}, headers=basic("gateway", "wrong"))
    assert_limited(response, app, "network", "revoke")


@pytest.fixture(scope="module")
def transmitter() -> Iterator[RunningServer]:
    with DevIssuer.serve_ephemeral(alg="ES256", mint_endpoints=False) as server:
        yield server


def signed_set(transmitter: RunningServer, upstream: RunningServer) -> str:
    claims = {
        "iss": transmitter.issuer.issuer_url,
        "aud": STS_ISSUER,
        "iat": int(time.time()),
        "jti": uuid.uuid4().hex,
        "sub_id": {"format": "iss_sub", "iss": upstream.issuer.issuer_url, "sub": "repo:acme/app:ref:x"},
        "events": {SESSION_REVOKED: {"event_timestamp": int(time.time()) - 10}},
    }
    return transmitter.issuer.mint(claims, header={"typ": "secevent+jwt"})


def test_shared_signals_limits(
    build: Callable[..., Flask], upstream: RunningServer, transmitter: RunningServer
) -> None:
    entry = {
        "name": "idp",
        "issuer": transmitter.issuer.issuer_url,
        "jwks_uri": transmitter.jwks_uri,
        "algorithms": ["ES256"],
    }
    app = build(
        transmitters=[entry],
        **limits(ssf={"network": {"requests": 3, "period": 60}, "client": {"requests": 1, "period": 60}}),
    )
    client = app.test_client()

    def push(body: str, address: str = "192.0.2.5") -> TestResponse:
        return client.post(
            "/ssf/events", data=body, content_type=SET_MEDIA_TYPE, environ_base={"REMOTE_ADDR": address}
        )

    assert push(signed_set(transmitter, upstream)).status_code == 202
    record = assert_limited(push(signed_set(transmitter, upstream)), app, "client", "ssf")
    assert record["issuer"] == "idp"
    assert push("not-a-set").status_code == 400
    assert_limited(push("not-a-set"), app, "network", "ssf")


def test_a_store_that_is_down_fails_closed(tmp_path: Path, upstream: RunningServer, clock: Clock) -> None:
    server = RedisProcess(tmp_path / "redis").start()
    try:
        settings = settings_for(
            tmp_path,
            upstream,
            store="redis",
            redis_url=f"redis://127.0.0.1:{server.port}/0",
            **limits(token={"network": {"requests": 5, "period": 60}}),
        )
        app = create_app(settings, clock=clock)
        client = app.test_client()
        assert deploy(client, upstream).status_code == 200
        server.kill()
        response = deploy(client, upstream)
        assert response.status_code == 503 and response.get_json()["error"] == "temporarily_unavailable"
        record = last_record(app)
        assert record["reasons"][-1] == "store.unavailable"
        assert "rate limits" in record["details"]["detail"]
    finally:
        server.stop()


# -- several instances, one count -----------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def two_instances(
    request: pytest.FixtureRequest, tmp_path: Path, upstream: RunningServer, clock: Clock
) -> Iterator[tuple[Flask, Flask]]:
    """Two app instances (separate pools, clients, processes' worth of state) sharing one store."""
    shared = limits(
        token={"network": {"requests": 3, "period": 60}, "identity": {"requests": 5, "period": 300}}
    )
    per_instance: list[dict[str, Any]] = [{}, {}]
    if request.param == "sqlite":
        shared["database_url"] = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    elif request.param == "postgresql":
        shared["database_url"] = request.getfixturevalue("pg").url
    else:
        shared.update(store="redis", redis_url=request.getfixturevalue("fresh_redis_url"))
        # Only Redis is shared: each instance keeps its own audit database.
        per_instance = [{"database_url": f"sqlite:///{tmp_path / f'audit-{n}.sqlite'}"} for n in (1, 2)]
    apps = [
        create_app(settings_for(tmp_path, upstream, **{**shared, **extra}), clock=clock)
        for extra in per_instance
    ]
    yield apps[0], apps[1]
    for app in apps:
        app.extensions["sts"].engine.dispose()


def test_the_limit_holds_across_two_instances(
    two_instances: tuple[Flask, Flask], upstream: RunningServer, clock: Clock
) -> None:
    one, two = (app.test_client() for app in two_instances)
    # Network 3 per minute, counted by both together: 2 at one, 1 at the other, then neither.
    assert deploy(one, upstream).status_code == 200
    assert deploy(two, upstream).status_code == 200
    assert deploy(one, upstream).status_code == 200
    assert_limited(deploy(two, upstream), two_instances[1], "network")
    assert_limited(deploy(one, upstream), two_instances[0], "network")
    # Identity 5 per minute across networks and instances: 2 more (from elsewhere), then refused.
    assert deploy(two, upstream, "198.51.100.1").status_code == 200
    assert deploy(one, upstream, "198.51.100.2").status_code == 200
    assert_limited(deploy(two, upstream, "203.0.113.1"), two_instances[1], "identity")
    clock.advance(20)  # one network cell back, shared
    assert deploy(two, upstream).status_code == 429  # the identity still waits
    clock.advance(40)
    assert deploy(one, upstream).status_code == 200


# -- a real multi-worker server ---------------------------------------------------------------------


def test_the_limit_holds_across_the_worker_processes_of_a_running_server(tmp_path: Path) -> None:
    """``sts serve`` with two worker processes, one SQLite database: 5 per network, whichever
    worker answers.  Requests go out on separate connections, eight at a time, so both
    workers serve some; the JSON access log says which process answered each."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    (tmp_path / "policies").mkdir()
    config = {
        "issuer": base,
        "port": port,
        "workers": 2,
        "threads": 1,
        "log_format": "json",
        "rate_limits": {"token": {"network": {"requests": 5, "period": 3600}}},
    }
    (tmp_path / "sts.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STS_")}
    sts = str(Path(sys.executable).with_name("sts"))
    with (tmp_path / "serve.log").open("wb") as log:
        server = subprocess.Popen([sts, "serve"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            # Until both workers answer (each request on a new connection, spread over the workers'
            # sockets by the kernel): a worker still starting would leave the other every request.
            deadline = time.monotonic() + 30
            while len(_access_pids(tmp_path / "serve.log", "/healthz")) < 2:
                with contextlib.suppress(requests.RequestException):
                    requests.get(f"{base}/healthz", timeout=0.5)
                assert time.monotonic() < deadline, "sts serve did not come up with two workers"
                time.sleep(0.05)

            def post(_: int) -> int:
                return requests.post(f"{base}/token", data={"grant_type": "x"}, timeout=10).status_code

            with ThreadPoolExecutor(max_workers=8) as pool:
                statuses = sorted(pool.map(post, range(40)))
        finally:
            server.terminate()
            server.wait(timeout=20)
    assert statuses == [400] * 5 + [429] * 35
    lines = [
        json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines() if line.startswith("{")
    ]
    token_lines = [
        line for line in lines if line["logger"] == "sts.access" and line["http_route"] == "/token"
    ]
    assert len(token_lines) == 40
    assert len({line["pid"] for line in token_lines}) == 2, "one worker served every request"


def _access_pids(log: Path, route: str) -> set[int]:
    """The processes that have answered ``route``, from the JSON access log."""
    pids = set()
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("logger") == "sts.access" and entry.get("http_route") == route:
                    pids.add(entry["pid"])
    return pids
