"""Redis adapter for the store ports, for a fleet of instances.

``SET key 1 NX PXAT <expiry>`` is atomic on the server, so of any number of
concurrent first uses, across any number of instances, exactly one wins.
Keys are prefixed by purpose (``sts:replay:<purpose>:``) so replay caches
for different purposes never collide.  Any Redis error becomes
:class:`~sts.core.ports.StoreUnavailable`, and the caller fails closed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence

import redis

from ..core.baseline import Baseline
from ..core.ports import StoreUnavailable
from ..core.subject_state import SubjectState


def connect(url: str, *, timeout: float = 0.5) -> redis.Redis:
    """One client (and connection pool) per process, created at start."""
    return redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30
    )


class RedisReplayCache:
    def __init__(self, client: redis.Redis, *, prefix: str = "sts") -> None:
        self.client = client
        self.prefix = prefix

    def first_use(self, purpose: str, key: str, expires_at: float, now: float) -> bool:
        if expires_at <= now:
            # Already expired: nothing to remember, and Redis refuses a past PXAT.
            expires_at = now + 1
        name = self._name(purpose, key)
        try:
            created = self.client.set(name, b"1", nx=True, pxat=math.ceil(expires_at * 1000))
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        return bool(created)

    def _name(self, purpose: str, key: str) -> bytes:
        # Redis keys are bytes; "surrogatepass" keeps a jti with lone surrogates (valid JSON) distinct
        # instead of failing to encode.
        return f"{self.prefix}:replay:{purpose}:{key}".encode("utf-8", "surrogatepass")

    def release(self, purpose: str, key: str) -> None:
        try:
            self.client.delete(self._name(purpose, key))
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    def ping(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None


class RedisSubjectStateStore:
    """ports.SubjectStateStore on Redis: one JSON value per identity, with expiry."""

    def __init__(self, client: redis.Redis, *, prefix: str = "sts") -> None:
        self.client = client
        self.prefix = prefix

    def _name(self, identity: str) -> bytes:
        return f"{self.prefix}:subject:{identity}".encode("utf-8", "surrogatepass")

    def get(self, identities: Sequence[str]) -> list[SubjectState]:
        try:
            values = self.client.mget([self._name(i) for i in identities])
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        return [SubjectState.from_json_dict(_loads(v)) for v in values]

    def put(self, identity: str, state: SubjectState, ttl: int) -> None:
        try:
            self.client.set(self._name(identity), json.dumps(state.to_json_dict()), ex=ttl)
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    def update(self, identity: str, change: Callable[[SubjectState], SubjectState], ttl: int) -> SubjectState:
        """Optimistic: WATCH the key, compute, MULTI/EXEC; retried when another writer got there first."""
        name = self._name(identity)
        try:
            with self.client.pipeline() as pipe:
                while True:
                    try:
                        pipe.watch(name)
                        state = change(SubjectState.from_json_dict(_loads(pipe.get(name))))
                        pipe.multi()
                        pipe.set(name, json.dumps(state.to_json_dict()), ex=ttl)
                        pipe.execute()
                        return state
                    except redis.WatchError:
                        continue
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None


class RedisBaselineStore:
    """ports.BaselineStore on Redis."""

    def __init__(self, client: redis.Redis, *, prefix: str = "sts") -> None:
        self.client = client
        self.prefix = prefix

    def _name(self, identity: str) -> bytes:
        return f"{self.prefix}:baseline:{identity}".encode("utf-8", "surrogatepass")

    def load(self, identity: str) -> Baseline:
        try:
            value = self.client.get(self._name(identity))
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        return Baseline.from_json(value)  # type: ignore[arg-type]

    def save(self, identity: str, baseline: Baseline, ttl: int) -> None:
        try:
            self.client.set(self._name(identity), baseline.to_json(), ex=ttl)
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None


def _loads(value: object) -> object:
    if not isinstance(value, bytes | str) or not value:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return None


class RedisRevokedTokens:
    """ports.RevokedTokens on Redis: one key per revoked jti, expiring with the token."""

    def __init__(self, client: redis.Redis, *, prefix: str = "sts") -> None:
        self.client = client
        self.prefix = prefix

    def _name(self, jti: str) -> bytes:
        return f"{self.prefix}:revoked:{jti}".encode("utf-8", "surrogatepass")

    def revoke(self, jti: str, expires_at: float) -> None:
        try:
            self.client.set(self._name(jti), b"1", pxat=math.ceil(expires_at * 1000) + 1000)
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    def revoked(self, jti: str) -> bool:
        try:
            return bool(self.client.exists(self._name(jti)))
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None
