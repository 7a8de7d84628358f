"""What the rate-limit tests run in other processes: kept apart from the test module, so that a
spawned process imports only the store adapters, not Flask and the whole app."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

from sts.adapters.redis.client import connect as connect_redis
from sts.adapters.redis.rate_limits import RedisRateLimits
from sts.adapters.sql.engines import make_engine
from sts.adapters.sql.rate_limits import SqlRateLimits
from sts.core.ports import LimitedKey, RateLimitStore
from sts.core.rate_limit import Check, Limit
from sts.migrations import upgrade

NOW = 1_700_000_000.0


@dataclass
class StoreSpec:
    """How to build a store again in another process."""

    kind: str
    url: str
    prefix: str = "sts"


def build_store(spec: StoreSpec) -> tuple[RateLimitStore, Callable[[], None]]:
    if spec.kind == "redis":
        client = connect_redis(spec.url)
        return RedisRateLimits(client, prefix=spec.prefix), client.close
    engine = make_engine(spec.url)
    upgrade(engine)
    return SqlRateLimits(engine), engine.dispose


def cell(key: str, requests: int, period: float, burst: int | None = None) -> LimitedKey:
    return Check("test", key, Limit(requests, period, burst or requests), key).cell()


def admitted(waits: Sequence[float]) -> bool:
    return max(waits) <= 0


def race(
    spec: StoreSpec, attempts: int, burst: int, barrier: Barrier, results: Queue[tuple[int, str]]
) -> None:
    """Try ``attempts`` times, all at one instant, to take a cell of one shared key."""
    try:
        store, close = build_store(spec)
        key = cell("race", requests=1, period=3600, burst=burst)
        barrier.wait(timeout=60)
        won = sum(admitted(store.acquire([key], NOW)) for _ in range(attempts))
        close()
        results.put((won, ""))
    except Exception as exc:
        results.put((0, repr(exc)))
