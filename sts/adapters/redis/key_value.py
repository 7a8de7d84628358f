"""Per-identity values in Redis, one key each with an expiry: subject state, baselines, revocations."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence

import redis

from ...core.baseline import Baseline
from ...core.ports import StoreUnavailable
from ...core.subject_state import SubjectState
from .client import commands


class RedisSubjectStateStore:
    """ports.SubjectStateStore on Redis: one JSON value per identity, with expiry."""

    def __init__(self, client: redis.Redis, *, prefix: str = "sts") -> None:
        self.client = client
        self.prefix = prefix
        self.commands = commands(client)

    def _name(self, identity: str) -> bytes:
        return f"{self.prefix}:subject:{identity}".encode("utf-8", "surrogatepass")

    def get(self, identities: Sequence[str]) -> list[SubjectState]:
        try:
            values = self.commands(b"MGET", *[self._name(i) for i in identities])
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
                        pipe.watch(name)  # type: ignore[no-untyped-call]  # redis-py leaves watch() untyped
                        state = change(SubjectState.from_json_dict(_loads(pipe.get(name))))
                        pipe.multi()
                        pipe.set(name, json.dumps(state.to_json_dict()), ex=ttl)
                        pipe.execute()
                        return state
                    except redis.WatchError:
                        continue
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None


def baseline_name(prefix: str, identity: str) -> bytes:
    """The key of an identity's baseline (also written by the single-use ledger's confirmation)."""
    return f"{prefix}:baseline:{identity}".encode("utf-8", "surrogatepass")


class RedisBaselineStore:
    """ports.BaselineStore on Redis."""

    def __init__(self, client: redis.Redis, *, prefix: str = "sts") -> None:
        self.client = client
        self.prefix = prefix
        self.commands = commands(client)

    def _name(self, identity: str) -> bytes:
        return baseline_name(self.prefix, identity)

    def load(self, identity: str) -> Baseline:
        try:
            value = self.commands(b"GET", self._name(identity))
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        return Baseline.from_json(value)

    def save(self, identity: str, baseline: Baseline, ttl: int) -> None:
        try:
            self.commands(b"SET", self._name(identity), baseline.to_json(), b"EX", ttl)
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
        self.commands = commands(client)

    def _name(self, jti: str) -> bytes:
        return f"{self.prefix}:revoked:{jti}".encode("utf-8", "surrogatepass")

    def revoke(self, jti: str, expires_at: float) -> None:
        try:
            self.client.set(self._name(jti), b"1", pxat=math.ceil(expires_at * 1000) + 1000)
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    def revoked(self, jti: str) -> bool:
        try:
            return bool(self.commands(b"EXISTS", self._name(jti)))
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None
