"""A DPoP ``jti`` replay cache (RFC 9449 §11.1) that the processes of a resource server share.

:class:`~sts_client.dpop.InMemoryReplayCache` remembers the proofs one process has seen: behind a
load balancer, a proof replayed to another process of the same resource server is not found there.
:class:`RedisReplayCache` keeps them in Redis, one key per proof with its own expiry, set with
``SET key 1 NX PX ttl`` (https://redis.io/docs/latest/commands/set/): atomic, so of two processes
recording the same proof at once exactly one is told it is the first.

The client is a synchronous redis-py client (``redis.Redis``, ``redis.cluster.RedisCluster``, a
``Sentinel`` master; not ``redis.asyncio``, whose answers are refused); this module imports nothing
from it, so the library needs no Redis client unless this cache is used (``pip install
workload-sts-client[redis]``).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Final, Protocol

from .dpop import ReplayCacheUnavailable

__all__ = ["DEFAULT_PREFIX", "RedisReplayCache"]

#: What every key of this cache starts with; the rest is :func:`~sts_client.dpop.proof_replay_key`
#: (a SHA-256 of the proof key's thumbprint and the ``jti``, so Redis holds no client data).
DEFAULT_PREFIX: Final = "sts-client:dpop-jti:"


class _SetsKeys(Protocol):
    def set(self, name: str, value: bytes, *, nx: bool, px: int) -> Any: ...


class RedisReplayCache:
    """A :class:`~sts_client.dpop.ReplayCache` in Redis, shared by every process that uses it.

    Each entry lives until at least ``expires_at`` by the verifier's clock: its lifetime is counted
    from ``now`` and rounded up to the millisecond, so no proof outlives its entry (a lifetime cut
    down to whole seconds would let a proof be replayed in its last second).  The clocks of the
    resource server's processes matter only as much as they do for the proofs' ``iat``.

    Fails closed: any error of the client (Redis down, a timeout, a read-only replica, memory full
    under ``noeviction``) raises :class:`~sts_client.dpop.ReplayCacheUnavailable`, which the
    verifier answers with ``503``.  Give the client a short ``socket_timeout``.  Run this Redis with
    ``maxmemory-policy noeviction`` (or without ``maxmemory``): an entry evicted early is a proof
    that can be replayed.
    """

    def __init__(self, client: _SetsKeys, *, prefix: str = DEFAULT_PREFIX) -> None:
        self._client = client
        self._prefix = prefix

    def first_use(self, key: str, expires_at: float, now: float) -> bool:
        lifetime_ms = max(1, math.ceil((expires_at - now) * 1000))
        try:
            stored = self._client.set(self._prefix + key, b"1", nx=True, px=lifetime_ms)
        except Exception as exc:  # noqa: BLE001 - whatever the client raises, the answer is unknown
            raise ReplayCacheUnavailable(f"replay cache unavailable: {type(exc).__name__}") from None
        # redis-py answers True (set) or None (there already).  Anything else is no answer: an
        # asyncio client's coroutine or a pipeline's queued command counted as True, and every
        # replay passed without a key being written (an outside review).
        if stored is True:
            return True
        if stored is None or stored is False:
            return False
        close = getattr(stored, "close", None)
        if inspect.iscoroutine(stored) and callable(close):
            close()  # never awaited: closed, so no warning is left behind
        raise ReplayCacheUnavailable(
            f"replay cache: the client answered {type(stored).__name__}, not True or None"
        )
