"""The DPoP replay cache a resource server's processes share (RFC 9449 §11.1), on a real Redis.

Each test has a database of this run's own ``redis-server`` (``fresh_redis_url``); the verifiers
stand for two processes of one resource server behind a load balancer, each with its own client.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from joserfc.jwk import ECKey
from sts_client import RedisReplayCache, ReplayCacheUnavailable
from sts_client.dpop import InMemoryReplayCache
from sts_client.errors import InvalidDPoPProof, TemporarilyUnavailable
from sts_client.redis_replay import DEFAULT_PREFIX
from sts_client.verifier import TokenVerifier

from tests.clients.test_clients_verifier import URL, dpop_headers, sign_proof
from tests.support.clients_support import AUDIENCE, FakeAuthorizationServer


@pytest.fixture
def fake() -> Iterator[FakeAuthorizationServer]:
    server = FakeAuthorizationServer()
    yield server
    server.stop()


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def test_a_proof_replayed_to_another_process_is_refused(
    fake: FakeAuthorizationServer, fresh_redis_url: str
) -> None:
    key = ECKey.generate_key("P-256")
    token = fake.mint(jkt=key.thumbprint())
    proof = sign_proof(key, token=token)
    first, second = (
        TokenVerifier(fake.issuer, AUDIENCE, replay_cache=RedisReplayCache(_client(fresh_redis_url)))
        for _ in range(2)
    )
    assert first.verify("POST", URL, dpop_headers(token, proof)).jkt == key.thumbprint()
    with pytest.raises(InvalidDPoPProof) as info:
        second.verify("POST", URL, dpop_headers(token, proof))
    assert info.value.reason == "dpop.replayed"
    # What the shared cache is for: with a cache per process, the other process accepts the replay.
    apart = TokenVerifier(fake.issuer, AUDIENCE, replay_cache=InMemoryReplayCache())
    assert apart.verify("POST", URL, dpop_headers(token, proof)).jkt


def test_one_first_use_of_a_proof_among_concurrent_processes(fresh_redis_url: str) -> None:
    caches = [RedisReplayCache(_client(fresh_redis_url)) for _ in range(16)]
    now = time.time()
    start = threading.Barrier(len(caches))
    answers: list[bool] = []

    def record(cache: RedisReplayCache) -> None:
        start.wait()
        answers.append(cache.first_use("same-proof", now + 60, now))

    threads = [threading.Thread(target=record, args=(cache,)) for cache in caches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == [False] * 15 + [True]
    assert caches[0].first_use("another-proof", now + 60, now)


def test_an_entry_lives_until_the_proof_is_no_longer_accepted(fresh_redis_url: str) -> None:
    """The lifetime is rounded up to the millisecond, never down to whole seconds: an expiry of
    ``int(expires_at - now)`` seconds ends up to a second before the proof stops being accepted."""
    client = _client(fresh_redis_url)
    cache = RedisReplayCache(client, prefix="rs-a:")
    now = time.time()
    assert cache.first_use("k", now + 1.2, now)
    assert 1100 < client.pttl("rs-a:k") <= 1201  # (1.2 s is 1200.0000000000002 ms as a float)
    assert not cache.first_use("k", now + 1.2, now + 0.5)
    time.sleep(1.3)
    assert cache.first_use("k", now + 400, now + 1.3)  # past its window: a new entry
    assert client.pttl(DEFAULT_PREFIX + "k") == -2  # the prefix is the one given


def test_an_unreachable_redis_fails_closed_with_503(fake: FakeAuthorizationServer) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    down = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1, socket_timeout=1)
    cache = RedisReplayCache(down)
    with pytest.raises(ReplayCacheUnavailable):
        cache.first_use("k", time.time() + 60, time.time())
    key = ECKey.generate_key("P-256")
    token = fake.mint(jkt=key.thumbprint())
    verifier = TokenVerifier(fake.issuer, AUDIENCE, replay_cache=cache)
    with pytest.raises(TemporarilyUnavailable) as info:
        verifier.verify("POST", URL, dpop_headers(token, sign_proof(key, token=token)))
    assert info.value.reason == "dpop.replay_cache_unavailable"
    assert info.value.status == 503
    assert ("Retry-After", "5") in info.value.headers()


def test_an_asyncio_client_or_a_pipeline_is_refused_not_taken_for_a_first_use(fresh_redis_url: str) -> None:
    """An asyncio client's ``set`` answers a coroutine and a pipeline's its own object, both true:
    every replay passed and nothing was written (an outside review).  Anything but True or None
    is no answer."""
    import warnings

    import redis.asyncio

    now = time.time()
    for client in (redis.asyncio.Redis.from_url(fresh_redis_url), _client(fresh_redis_url).pipeline()):
        cache = RedisReplayCache(client)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the coroutine is closed, not left unawaited
            with pytest.raises(ReplayCacheUnavailable):
                cache.first_use("k", now + 60, now)
