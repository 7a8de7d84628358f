"""The request path's Redis commands (:mod:`sts.adapters.redis.client`) and the baseline read with
the subject's state (:mod:`sts.adapters.redis.key_value`), against this run's private redis-server.

``Commands`` sends each command on the calling thread's own connection of the client's pool; what
the pool did at each checkout (a connection the server closed is made anew, and counted, so the
ledger's epoch is read again) still happens.  A baseline read ahead answers only the load that
follows it at once, on the same thread, with no command sent between.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis

from sts.adapters.redis import client as client_module
from sts.adapters.redis import key_value
from sts.adapters.redis.client import Commands, LuaScript, commands, connection_counter
from sts.adapters.redis.client import connect as connect_redis
from sts.adapters.redis.key_value import RedisBaselineStore, RedisSubjectStateStore
from sts.core.baseline import Baseline

IDENTITY = "upstream|repo:acme/app:ref:refs/heads/main"


@pytest.fixture
def client(fresh_redis_url: str) -> Iterator[redis.Redis]:
    made = connect_redis(fresh_redis_url)
    yield made
    made.close()


def test_one_commands_per_client_and_one_connection_per_thread(client: redis.Redis) -> None:
    sent = commands(client)
    assert commands(client) is sent
    assert sent(b"SET", b"k", "v", b"PX", 60_000) == b"OK"
    assert sent(b"MGET", b"k", b"missing") == [b"v", None]
    mine = sent.connection()
    other: list[object] = []
    thread = threading.Thread(target=lambda: other.append(sent.connection()))
    thread.start()
    thread.join()
    assert other and other[0] is not mine
    assert sent.connection() is mine


def test_a_thread_that_ends_gives_its_connection_back_to_the_pool(client: redis.Redis) -> None:
    sent = commands(client)
    taken: list[object] = []

    def work() -> None:
        sent(b"PING")
        taken.append(sent.connection())

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    gc.collect()
    pool = client.connection_pool
    assert taken[0] in pool._available_connections
    assert taken[0] not in pool._in_use_connections


def test_the_connection_check_is_a_wait_too(client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool's check before a command (a health check's PING, a new connection) is a round trip:
    it runs inside ``waiting()``, so the request thread's turn goes meanwhile (on a paused Redis it
    held the turn for the socket timeout)."""
    inside: list[bool] = []
    waits = [False]

    @contextlib.contextmanager
    def waiting() -> Iterator[None]:
        waits[0] = True
        try:
            yield
        finally:
            waits[0] = False

    monkeypatch.setattr(client_module, "waiting", waiting)
    sent = Commands(client)
    check = sent.pool.ensure_connection

    def recorded(connection: object) -> None:
        inside.append(waits[0])
        check(connection)  # type: ignore[arg-type]

    monkeypatch.setattr(sent.pool, "ensure_connection", recorded)
    assert sent(b"PING") == b"PONG"  # the thread's first command: its connection is taken too
    assert sent(b"PING") == b"PONG"
    assert inside and all(inside), inside


def test_an_error_reply_raises_as_with_the_client(client: redis.Redis) -> None:
    sent = Commands(client)
    sent(b"SET", b"text", b"x")
    with pytest.raises(redis.ResponseError):
        sent(b"INCR", b"text")
    assert sent(b"GET", b"text") == b"x"  # The connection is still in step.


def test_a_script_is_loaded_when_redis_does_not_know_it(client: redis.Redis) -> None:
    script = LuaScript(commands(client), "return {tonumber(ARGV[1]) + 1, KEYS[1]}")
    assert script(keys=[b"key"], args=[41]) == [42, b"key"]
    client.script_flush()  # What a restart does to the script cache.
    assert script(keys=[b"key"], args=[1]) == [2, b"key"]


def test_a_connection_the_server_closed_is_made_anew_and_counted(client: redis.Redis) -> None:
    sent = commands(client)
    counter = connection_counter(client)
    own = sent(b"CLIENT", b"ID")
    assert client.client_kill_filter(_id=str(own)) == 1  # (From another connection of the pool.)
    before = counter.count
    assert sent(b"GET", b"nothing") is None
    assert counter.count == before + 1
    assert sent(b"CLIENT", b"ID") != own


# -- the baseline read with the subject's state --------------------------------------------------


@pytest.fixture
def stores(client: redis.Redis) -> tuple[RedisSubjectStateStore, RedisBaselineStore, redis.Redis]:
    baselines = RedisBaselineStore(client)
    return RedisSubjectStateStore(client, baselines=baselines), baselines, client


def saved(client: redis.Redis, count: int) -> Baseline:
    baseline = Baseline(count=count)
    client.set(f"sts:baseline:{IDENTITY}", baseline.to_json())
    return baseline


def test_the_load_after_the_state_is_answered_from_the_same_read(
    stores: tuple[RedisSubjectStateStore, RedisBaselineStore, redis.Redis],
) -> None:
    states, baselines, client = stores
    first = saved(client, 3)
    client.set(f"sts:failures:{IDENTITY}", "[1700000000.0]")  # Its refusals, kept apart: read too.
    states.get([IDENTITY, "*|repo:acme/app:ref:refs/heads/main"])
    before = baselines.commands.sent()
    assert baselines.load(IDENTITY) == replace(first, failures=(1700000000.0,))
    client.delete(f"sts:failures:{IDENTITY}")
    assert baselines.commands.sent() == before  # No GET: answered from the MGET.
    # Only once: the next load reads Redis.
    second = saved(client, 4)
    assert baselines.load(IDENTITY) == second


def test_a_command_sent_between_makes_the_load_read_again(
    stores: tuple[RedisSubjectStateStore, RedisBaselineStore, redis.Redis],
) -> None:
    states, baselines, client = stores
    saved(client, 3)
    states.get([IDENTITY])
    # This thread writes the baseline (as the ledger's confirmation does) before it loads it.
    newer = Baseline(count=5)
    baselines.save(IDENTITY, newer, 60)
    assert baselines.load(IDENTITY) == newer


def test_another_identity_another_thread_or_a_late_load_reads_again(
    stores: tuple[RedisSubjectStateStore, RedisBaselineStore, redis.Redis], monkeypatch: pytest.MonkeyPatch
) -> None:
    states, baselines, client = stores
    saved(client, 3)
    states.get([IDENTITY])
    newer = saved(client, 6)  # Written by another instance meanwhile.
    assert baselines.load("upstream|someone-else") == Baseline()
    assert baselines.load(IDENTITY) == newer  # The other load dropped what was read ahead.

    states.get([IDENTITY])
    newest = saved(client, 7)
    loaded: list[Baseline] = []
    thread = threading.Thread(target=lambda: loaded.append(baselines.load(IDENTITY)))
    thread.start()
    thread.join()
    assert loaded == [newest]

    monkeypatch.setattr(key_value, "READ_AHEAD_FOR", -1.0)  # Every read ahead is too old.
    states.get([IDENTITY])
    latest = saved(client, 8)
    assert baselines.load(IDENTITY) == latest
