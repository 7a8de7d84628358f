"""Per-identity values in Redis, one key each with an expiry: subject state, baselines, revocations."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Sequence

import redis

from ...core.baseline import Baseline, appended_failure, failures_to_json, with_failures
from ...core.baseline_counts import read_counts_text, with_counts
from ...core.drift import drift_to_json, same_drift, with_drift
from ...core.ports import BaselineUpdate, StoreUnavailable
from ...core.subject_state import SubjectState
from .baseline_writes import WRITE_BASELINE, baseline_name, baseline_write, counts_name, drift_name
from .client import LuaScript, commands
from .epoch import LedgerEpoch


class RedisSubjectStateStore:
    """ports.SubjectStateStore on Redis: one JSON value per identity, with expiry.

    Given ``baselines`` (a :class:`RedisBaselineStore` on this client), :meth:`get` reads the first
    identity's baseline (and the parts kept apart from it, :func:`failures_name` and
    :func:`drift_name`) in the same ``MGET`` and hands it
    to that store, which answers the
    exchange's :meth:`RedisBaselineStore.load` that follows with it: the risk stage reads both,
    one after the other, and saves a round trip.
    """

    def __init__(
        self, client: redis.Redis, *, prefix: str = "sts", baselines: RedisBaselineStore | None = None
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.commands = commands(client)
        self.baselines = baselines

    def _name(self, identity: str) -> bytes:
        return f"{self.prefix}:subject:{identity}".encode("utf-8", "surrogatepass")

    def get(
        self, identities: Sequence[str], *, epoch: LedgerEpoch | None = None, now: float = 0.0
    ) -> list[SubjectState]:
        """The states; given the ledger's ``epoch``, it is read in the same ``MGET`` and synced
        when Redis holds another (:func:`look_at_epoch`)."""
        names = [self._name(i) for i in identities]
        baselines = self.baselines if identities else None
        if baselines is not None:
            names += baselines.names(identities[0])
        if epoch is not None:
            names.append(epoch.key)
        try:
            values = self.commands(b"MGET", *names)
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        if epoch is not None:
            look_at_epoch(epoch, values.pop(), now)
        if baselines is not None:
            counts, drift, failures = values.pop(), values.pop(), values.pop()
            baselines.read_ahead(identities[0], values.pop(), failures, drift, counts)
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


def failures_name(prefix: str, identity: str) -> bytes:
    """The key of an identity's recent refusals, kept apart from its baseline, which the single-use
    ledger's confirmation writes back whole: only :meth:`RedisBaselineStore.add_failure` (a refusal)
    and :meth:`RedisBaselineStore.save_failures` (a reset) write it."""
    return f"{prefix}:failures:{identity}".encode("utf-8", "surrogatepass")


#: A baseline's write (:func:`~.baseline_writes.baseline_write`).
_SAVE = WRITE_BASELINE + "write_baseline(1, 1)\nreturn 1\n"

#: How long a baseline read ahead (:meth:`RedisBaselineStore.read_ahead`) answers a load: the
#: risk stage loads it microseconds after; a thread held up longer reads it again.
READ_AHEAD_FOR = 0.01


class _ReadAhead(threading.local):
    """The calling thread's baseline read ahead: the identity, its value, refusals, drift state and
    counters,
    and when it was read (``time.monotonic()``, and the thread's count of commands sent,
    :meth:`Commands.sent`)."""

    identity: str | None = None
    value: bytes | None = None
    failures: bytes | None = None
    drift: bytes | None = None
    counts: bytes | None = None
    at: float = 0.0
    sent: int = -1


class RedisBaselineStore:
    """ports.BaselineStore on Redis.

    A baseline read ahead by :meth:`RedisSubjectStateStore.get` answers the next :meth:`load` of the
    same identity on the same thread, once, if it is the thread's next read of Redis (no command
    sent since, which could have changed it) and comes within :data:`READ_AHEAD_FOR`: as fresh as
    a ``GET`` sent then, in a request that ran that much slower.

    The identity's recent refusals are a key of their own (:func:`failures_name`, with the same
    expiry), read with the baseline and written only by :meth:`add_failure` and
    :meth:`save_failures`: a grant's
    confirmation writes back the baseline it read, and never undoes a refusal recorded since.  So
    is its drift state (:func:`drift_name`), which a grant writes only when it changed it, and a
    refusal's probation step with :meth:`update_drift`; and so are its counters
    (:func:`~.baseline_writes.counts_name`), which a grant's write advances from the stored ones.
    A key that is not there: the part is the baseline's own (every write of the baseline carries
    it too).
    """

    def __init__(self, client: redis.Redis, *, prefix: str = "sts") -> None:
        self.client = client
        self.prefix = prefix
        self.commands = commands(client)
        self._ahead = _ReadAhead()
        self._save = LuaScript(self.commands, _SAVE)

    def _name(self, identity: str) -> bytes:
        return baseline_name(self.prefix, identity)

    def names(self, identity: str) -> tuple[bytes, bytes, bytes, bytes]:
        """The keys of the identity's baseline, its refusals, its drift state and its counters,
        read together."""
        return (
            baseline_name(self.prefix, identity),
            failures_name(self.prefix, identity),
            drift_name(self.prefix, identity),
            counts_name(self.prefix, identity),
        )

    def read_ahead(
        self,
        identity: str,
        value: bytes | None,
        failures: bytes | None = None,
        drift: bytes | None = None,
        counts: bytes | None = None,
    ) -> None:
        ahead = self._ahead
        ahead.identity, ahead.value, ahead.failures, ahead.drift = identity, value, failures, drift
        ahead.counts, ahead.at, ahead.sent = counts, time.monotonic(), self.commands.sent()

    def load(self, identity: str) -> Baseline:
        ahead = self._ahead
        if ahead.identity is not None:
            fresh = (
                ahead.identity == identity
                and ahead.sent == self.commands.sent()
                and time.monotonic() - ahead.at < READ_AHEAD_FOR
            )
            value, failures, drift, counts = ahead.value, ahead.failures, ahead.drift, ahead.counts
            ahead.identity = ahead.value = ahead.failures = ahead.drift = ahead.counts = None
            if fresh:
                return _merged(value, failures, drift, counts)
        try:
            value, failures, drift, counts = self.commands(b"MGET", *self.names(identity))
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        return _merged(value, failures, drift, counts)

    def save(
        self, identity: str, baseline: Baseline, ttl: int, *, drift: bool = True, grant: bool = False
    ) -> None:
        """One script (:func:`~.baseline_writes.baseline_write`), on this thread's connection as
        every other command."""
        names, args = baseline_write(
            self.prefix, BaselineUpdate(identity, baseline, ttl, drift_changed=drift), grant=grant
        )
        try:
            self._save(keys=names, args=args)
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    def save_failures(self, identity: str, failures: tuple[float, ...], ttl: int) -> None:
        try:
            self.commands(
                b"SET", failures_name(self.prefix, identity), failures_to_json(failures), b"EX", ttl
            )
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    def add_failure(self, identity: str, at: float, ttl: int) -> None:
        """Append ``at`` to the identity's refusals, atomically (``WATCH``, ``MULTI``, tried again
        when another refusal got there first): refusals at the same instant undid each other."""
        name = failures_name(self.prefix, identity)
        try:
            with self.client.pipeline() as pipe:
                while True:
                    try:
                        pipe.watch(name)  # type: ignore[no-untyped-call]  # redis-py leaves watch() untyped
                        stored = pipe.get(name)
                        baseline = pipe.get(baseline_name(self.prefix, identity))
                        # The refusals live no longer than the baseline they belong to (a refusal
                        # does not extend it, as on SQL: an outside review found them kept 30 days
                        # for a baseline about to expire).
                        left = pipe.pttl(baseline_name(self.prefix, identity))
                        if baseline is None or left == -2:  # -2: expired since the GET
                            pipe.reset()
                            return  # no live baseline: an identity never granted here (see the port)
                        if stored is None:  # none kept apart yet: the baseline's own, if any
                            earlier = Baseline.from_json(baseline).failures
                        else:
                            earlier = with_failures(Baseline(), stored).failures
                        pipe.multi()
                        kept = failures_to_json(appended_failure(earlier, at))
                        pipe.set(name, kept, px=min(left, ttl * 1000) if left > 0 else ttl * 1000)
                        pipe.execute()
                        return
                    except redis.WatchError:
                        continue
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    def update_drift(self, identity: str, change: Callable[[Baseline], Baseline], ttl: int) -> None:
        """Replace the drift state with that of ``change`` of the stored baseline, atomically
        (``WATCH`` of the drift key, ``MULTI``, tried again when another request changed it first):
        a refused exchange's probation step was saved with the whole baseline it had read, and a
        grant or another refusal in between undid it, or was undone (an outside audit)."""
        self._ahead.identity = None  # Written by this thread: what it read ahead is not the latest.
        names = self.names(identity)
        try:
            with self.client.pipeline() as pipe:
                while True:
                    try:
                        pipe.watch(names[2])  # type: ignore[no-untyped-call]  # redis-py leaves watch() untyped
                        stored = _merged(*pipe.mget(names))
                        changed = change(stored)
                        if same_drift(changed, stored):
                            pipe.reset()
                            return
                        pipe.multi()
                        pipe.set(names[2], drift_to_json(changed), ex=ttl)
                        pipe.execute()
                        return
                    except redis.WatchError:
                        continue
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None


#: A value as Redis gives it back (none: the key is not there).
_Stored = bytes | str | None


def _merged(baseline: _Stored, failures: _Stored, drift: _Stored, counts: _Stored = None) -> Baseline:
    """The baseline stored as ``baseline`` with the parts kept apart from it (none: its own)."""
    merged = with_counts(Baseline.from_json(baseline), read_counts_text(counts))
    return with_drift(with_failures(merged, failures), drift)


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

    def revoked(self, jti: str, *, epoch: LedgerEpoch | None = None, now: float = 0.0) -> bool:
        """Given the ledger's ``epoch``, it is read in the same round trip (:func:`look_at_epoch`)."""
        try:
            if epoch is None:
                return bool(self.commands(b"EXISTS", self._name(jti)))
            revoked, seen = self.commands(b"MGET", self._name(jti), epoch.key)
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        look_at_epoch(epoch, seen, now)
        return revoked is not None


def look_at_epoch(epoch: LedgerEpoch, seen: bytes | None, now: float) -> None:
    """Sync the ledger's ``epoch`` when Redis holds another than this process knows (``seen``):
    it lost its records since (a flush, a restart), and the sync marks the loss.  Raises
    StoreUnavailable."""
    if seen != epoch.expected(now):
        epoch.sync(now)
