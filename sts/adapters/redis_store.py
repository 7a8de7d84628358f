"""Redis adapter for the store ports, for a fleet of instances.

``SET key 1 NX PXAT <expiry>`` is atomic on the server, so of any number of
concurrent first uses, across any number of instances, exactly one wins.
Keys are prefixed by purpose (``sts:replay:<purpose>:``) so replay caches
for different purposes never collide.  Any Redis error becomes
:class:`~sts.core.ports.StoreUnavailable`, and the caller fails closed.

Redis keeps the replay records in memory.  A Redis that restarts without
them (no persistence, or an old RDB snapshot) would accept every credential
it had already seen, so every record is written together with a check of the
ledger's *epoch* (:class:`LedgerEpoch`): an empty restart, or one that did not
replay an append-only file, starts a new epoch marked as following a loss,
and credentials that could have been used before it are refused until they
expire (:class:`~sts.core.ports.ReplayWindowLost`).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import redis

from ..core.audit import AuditRecord
from ..core.baseline import Baseline
from ..core.ports import (
    AlreadyUsed,
    AuditSink,
    ReplayWindowLost,
    SingleUse,
    StoreUnavailable,
)
from ..core.subject_state import SubjectState

log = logging.getLogger(__name__)

#: How long a single-use reservation holds unless confirmed: longer than the audit commit may take
#: (``SqlAuditSink`` gives up after 10 s), short enough that a crashed request frees the token soon.
RESERVATION_HOLD = 30.0
#: How long a request waits for a concurrent one holding the same token to commit or give up.
RESERVATION_WAIT = 2.0


class ConnectionCounter:
    """Counts the connections a client opens: each new one may be to a restarted server."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, connection: Any) -> None:
        # Used as redis-py's ``redis_connect_func``: do the usual handshake, then count.
        connection.on_connect()
        with self._lock:
            self.count += 1


def connect(url: str, *, timeout: float = 0.5) -> redis.Redis:
    """One client (and connection pool) per process, created at start."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
        redis_connect_func=ConnectionCounter(),
    )


def _connection_counter(client: redis.Redis) -> ConnectionCounter:
    kwargs = client.connection_pool.connection_kwargs
    counter = kwargs.get("redis_connect_func")
    if not isinstance(counter, ConnectionCounter):
        # A client not made by connect(): connections the pool makes from now on are counted
        # (those it has already made are not; connect() avoids that).
        counter = ConnectionCounter()
        kwargs["redis_connect_func"] = counter
    return counter


class EpochMemory(Protocol):
    """Durable memory of the last epoch seen (:class:`sts.adapters.sql.SqlLedgerEpochMemory`)."""

    def load(self, name: str) -> str | None: ...

    def save(self, name: str, epoch_id: str) -> None: ...


@dataclass(frozen=True)
class Epoch:
    """One life of the ledger in Redis: created when Redis was found without one."""

    id: str
    #: When it began (this service's clock, whole seconds rounded up).
    created_at: int
    #: The Redis server run it was last confirmed under (``INFO server`` ``run_id``).
    run_id: str | None
    #: True when it replaced an epoch whose records were lost.
    after_loss: bool

    def dump(self) -> bytes:
        value = {
            "id": self.id,
            "created_at": self.created_at,
            "run_id": self.run_id,
            "after_loss": self.after_loss,
        }
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def load(cls, raw: object) -> Epoch | None:
        if not isinstance(raw, bytes | str):
            return None
        try:
            value = json.loads(raw)
            return cls(
                str(value["id"]),
                int(value["created_at"]),
                None if value["run_id"] is None else str(value["run_id"]),
                bool(value["after_loss"]),
            )
        except (ValueError, TypeError, KeyError):
            return None


# KEYS[1] is the epoch, KEYS[2] the entry.  ARGV[1] is the epoch the caller knows: if Redis holds
# another (or none), nothing is written and -1 says so.
_USE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PXAT', ARGV[3]) then return 1 end
local held = redis.call('GET', KEYS[2])
if held and string.sub(held, 1, 2) == 'r:' then return 2 end
return 0
"""
# Confirm a reservation (ARGV[2]) as a use until ARGV[3]; also when it lapsed and nobody took it.
_CONFIRM = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local held = redis.call('GET', KEYS[2])
if held == ARGV[2] or not held then
  redis.call('SET', KEYS[2], '1', 'PXAT', ARGV[3])
  return 1
end
return 0
"""
_CANCEL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_REPLACE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2]) return 1 end
return 0
"""


class LedgerEpoch:
    """Knows whether the replay records in Redis are all there, for one process.

    Redis holds ``<prefix>:ledger-epoch``; every write of a record checks, in the
    same script, that it still holds the epoch this process knows.  This process
    re-reads it (:meth:`sync`) when that check fails and whenever its client
    opened a new connection (the server may have restarted):

    * no epoch in Redis: it restarted empty (or is new). A new epoch begins, marked
      as following a loss if this process, or the durable ``memory``, knew an
      earlier one;
    * Redis runs under another ``run_id`` than the epoch was confirmed under: it
      restarted with its data.  Kept if the append-only file is on (it replays every
      write); otherwise the data came from an RDB snapshot, which misses the
      latest records: a new epoch, after a loss;
    * another epoch than the one this process knew: one of the above, seen first
      by another process.

    After a loss, :meth:`check` refuses credentials that could have been accepted
    before the new epoch began, until they expire.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "sts",
        memory: EpochMemory | None = None,
    ) -> None:
        self.client = client
        self.key = f"{prefix}:ledger-epoch".encode()
        self.memory = memory
        self._memory_name = f"redis:{prefix}"
        self._connections = _connection_counter(client)
        self._replace = client.register_script(_REPLACE)
        self._lock = threading.Lock()
        self._known: Epoch | None = None
        self._raw: bytes | None = None
        self._synced = -1
        #: Credentials that could have been accepted before this time are refused (None: no loss).
        self.lost_at: float | None = None
        self._warned_info = False

    def expected(self, now: float) -> bytes:
        """The epoch to write records under (synced first when the connection may be new)."""
        if self._raw is None or self.stale():
            self.sync(now)
        assert self._raw is not None
        return self._raw

    def stale(self) -> bool:
        return self._connections.count != self._synced

    def check(self, valid_from: float | None) -> None:
        """Raise :class:`ReplayWindowLost` for a credential the lost records may have seen."""
        lost_at = self.lost_at
        if lost_at is not None and (valid_from is None or valid_from < lost_at):
            raise ReplayWindowLost(lost_at)

    def sync(self, now: float) -> None:
        """Read the epoch from Redis (starting or replacing it as above).  Raises StoreUnavailable."""
        with self._lock:
            try:
                self._sync(now)
            except redis.RedisError as exc:
                raise StoreUnavailable(type(exc).__name__) from None

    def _sync(self, now: float) -> None:
        synced = self._connections.count
        run_id, aof = self._server()
        previous = self._known.id if self._known is not None else self._remembered()
        for _ in range(8):
            raw: bytes | None = self.client.get(self.key)  # type: ignore[assignment]
            epoch = Epoch.load(raw)
            # What the scripts compare with: exactly the bytes Redis holds.
            current = raw
            if epoch is None:
                # Empty (or unreadable): a new epoch; after a loss if an earlier one was known.
                epoch = Epoch(secrets.token_hex(8), math.ceil(now), run_id, previous is not None)
                current = epoch.dump()
                if raw is None:
                    if not self.client.set(self.key, current, nx=True):
                        continue
                elif not self._replace(keys=[self.key], args=[raw, current]):
                    continue
                if epoch.after_loss:
                    log.error(
                        "the replay store (Redis) lost its records: credentials issued before now "
                        "are refused until they expire; see docs/configuration.md"
                    )
            else:
                changed = epoch
                if run_id is not None and epoch.run_id != run_id:
                    if aof:
                        # Restarted and replayed its append-only file: every record is back.
                        changed = replace(epoch, run_id=run_id)
                    else:
                        # Restarted from a snapshot (or nothing): the latest records are missing.
                        changed = Epoch(secrets.token_hex(8), math.ceil(now), run_id, True)
                        log.error(
                            "the replay store (Redis) restarted without an append-only file: records "
                            "written after its last snapshot are lost; credentials issued before now "
                            "are refused until they expire"
                        )
                if previous is not None and changed.id != previous and not changed.after_loss:
                    # Another process began this epoch without knowing the one before: we do.
                    changed = replace(changed, after_loss=True)
                if changed != epoch:
                    assert raw is not None
                    current = changed.dump()
                    if not self._replace(keys=[self.key], args=[raw, current]):
                        continue
                    epoch = changed
            break
        else:
            raise StoreUnavailable("the ledger epoch keeps changing")
        if epoch.after_loss:
            self.lost_at = max(self.lost_at or epoch.created_at, epoch.created_at)
        if self.memory is not None and epoch.id != previous:
            self._remember(epoch.id)
        self._known, self._raw, self._synced = epoch, current, synced

    def _server(self) -> tuple[str | None, bool]:
        """``run_id`` and whether the append-only file is on; (None, False) when INFO is refused."""
        try:
            server = self.client.info("server")
            persistence = self.client.info("persistence")
        except redis.ResponseError:
            if not self._warned_info:
                self._warned_info = True
                log.warning("Redis refuses INFO: a restart that reloads an old snapshot cannot be detected")
            return None, False
        run_id = server.get("run_id")
        return (str(run_id) if run_id else None), bool(persistence.get("aof_enabled"))

    def _remembered(self) -> str | None:
        if self.memory is None:
            return None
        return self.memory.load(self._memory_name)

    def _remember(self, epoch_id: str) -> None:
        assert self.memory is not None
        try:
            self.memory.save(self._memory_name, epoch_id)
        except StoreUnavailable:
            log.warning("could not remember the replay store's epoch in the database")


class _RedisLedgerBase:
    def __init__(self, client: redis.Redis, *, prefix: str, epoch: LedgerEpoch | None) -> None:
        self.client = client
        self.prefix = prefix
        self.epoch = epoch if epoch is not None else LedgerEpoch(client, prefix=prefix)
        self._use = client.register_script(_USE)

    def _name(self, purpose: str, key: str) -> bytes:
        # Redis keys are bytes; "surrogatepass" keeps a jti with lone surrogates (valid JSON) distinct
        # instead of failing to encode.
        return f"{self.prefix}:replay:{purpose}:{key}".encode("utf-8", "surrogatepass")

    def _under_epoch(
        self,
        script: Callable[..., Any],
        name: bytes,
        value: bytes,
        expires_at: float,
        now: float,
        valid_from: float | None,
        *,
        check: bool = True,
    ) -> int:
        """Run ``script`` on ``name`` under the current epoch; re-sync and retry when it changed.

        With ``check``, a credential the lost records may have seen is refused
        (:class:`ReplayWindowLost`), also when the loss is found only after the write.
        """
        # Already expired: nothing to remember, and Redis refuses a past PXAT.
        pxat = math.ceil((expires_at if expires_at > now else now + 1) * 1000)
        try:
            for _ in range(3):
                expected = self.epoch.expected(now)
                if check:
                    self.epoch.check(valid_from)
                result = int(script(keys=[self.epoch.key, name], args=[expected, value, pxat]))
                if result == -1 or self.epoch.stale():
                    # The epoch changed, or this ran on a new connection (a restarted server?).
                    self.epoch.sync(now)
                    if check:
                        self.epoch.check(valid_from)
                    if result == -1:
                        continue
                return result
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        raise StoreUnavailable("the ledger epoch keeps changing")

    def ping(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None


class RedisReplayCache(_RedisLedgerBase):
    """ports.ReplayCache on Redis (DPoP proofs, client assertions, SETs)."""

    def __init__(self, client: redis.Redis, *, prefix: str = "sts", epoch: LedgerEpoch | None = None) -> None:
        super().__init__(client, prefix=prefix, epoch=epoch)

    def first_use(
        self, purpose: str, key: str, expires_at: float, now: float, *, valid_from: float | None = None
    ) -> bool:
        return self._under_epoch(self._use, self._name(purpose, key), b"1", expires_at, now, valid_from) == 1

    def release(self, purpose: str, key: str) -> None:
        try:
            self.client.delete(self._name(purpose, key))
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None


class RedisSingleUseLedger(_RedisLedgerBase):
    """ports.SingleUseLedger with the uses in Redis and the audit trail elsewhere (SQL).

    ``reserve`` writes ``r:<holder>`` with a short expiry (:data:`RESERVATION_HOLD`);
    ``commit`` commits the audit record, then confirms the reservation as a use until
    the token expires.  If the audit commit fails, the reservation is dropped; if the
    request dies, it lapses.  A request that finds another's reservation waits
    (briefly) for it to be confirmed (a replay) or dropped (then it takes over).
    """

    def __init__(
        self,
        client: redis.Redis,
        audit: AuditSink,
        *,
        prefix: str = "sts",
        epoch: LedgerEpoch | None = None,
        hold: float = RESERVATION_HOLD,
        wait: float = RESERVATION_WAIT,
    ) -> None:
        super().__init__(client, prefix=prefix, epoch=epoch)
        self.audit = audit
        self.hold = hold
        self.wait = wait
        self._confirm = client.register_script(_CONFIRM)
        self._cancel = client.register_script(_CANCEL)

    def reserve(self, use: SingleUse, now: float) -> SingleUse:
        holder = f"r:{secrets.token_hex(12)}"
        name = self._name(use.purpose, use.key)
        deadline = time.monotonic() + self.wait
        delay = 0.002
        while True:
            result = self._under_epoch(self._use, name, holder.encode(), now + self.hold, now, use.valid_from)
            if result == 1:
                return replace(use, holder=holder)
            if result == 0:
                raise AlreadyUsed
            # Held by a request still in flight: its outcome decides.
            if time.monotonic() + delay > deadline:
                raise StoreUnavailable("single-use token held by a concurrent request")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def commit(self, record: AuditRecord, uses: Sequence[SingleUse], now: float) -> None:
        try:
            self.audit.write(record)
        except BaseException:
            self.cancel(uses)
            raise
        for use in uses:
            # The reservation proved this request first in its epoch; should the epoch have ended
            # meanwhile, the new one refuses the token for its whole validity, so recording the
            # use there is still right.
            name = self._name(use.purpose, use.key)
            confirmed = self._under_epoch(
                self._confirm, name, use.holder.encode(), use.expires_at, now, None, check=False
            )
            if confirmed != 1:
                raise StoreUnavailable("single-use reservation lost before it was confirmed")

    def cancel(self, uses: Sequence[SingleUse]) -> None:
        for use in uses:
            try:
                self._cancel(keys=[self._name(use.purpose, use.key)], args=[use.holder.encode()])
            except redis.RedisError as exc:
                log.warning("could not drop a single-use reservation (it lapses on its own): %s", exc)


def check_at_start(client: redis.Redis, epoch: LedgerEpoch, now: float) -> None:
    """Warn about settings that can lose replay records, and learn the ledger's epoch.

    Redis may be down at start: then both happen later (the epoch at the first use).
    """
    try:
        for warning in persistence_warnings(client):
            log.warning("%s (see docs/configuration.md, Redis)", warning)
        epoch.sync(now)
    except StoreUnavailable as exc:
        log.warning("Redis cannot be reached at start (%s); its persistence was not checked", exc)


def persistence_warnings(client: redis.Redis) -> list[str]:
    """What in Redis's configuration can lose replay records (empty when nothing).

    Reads ``CONFIG GET`` (often disabled on managed Redis) and falls back on
    ``INFO persistence``.  Raises :class:`StoreUnavailable` when Redis cannot be reached.
    """
    try:
        try:
            config: dict[str, str] = {}
            for name in ("appendonly", "appendfsync", "maxmemory-policy"):
                config.update({str(k): str(v) for k, v in client.config_get(name).items()})
        except redis.ResponseError:
            config = {}
        if not config:
            try:
                aof = client.info("persistence").get("aof_enabled")
            except redis.ResponseError:
                return [
                    "cannot read Redis's persistence settings (CONFIG and INFO refused): make sure "
                    "it runs with appendonly yes, appendfsync always, maxmemory-policy noeviction"
                ]
            config = {"appendonly": "yes" if aof else "no"}
    except redis.RedisError as exc:
        raise StoreUnavailable(type(exc).__name__) from None
    warnings = []
    if config.get("appendonly") != "yes":
        warnings.append(
            "Redis runs without an append-only file (appendonly no): a restart loses the single-use "
            "records, and credentials issued before it are refused until they expire"
        )
    elif config.get("appendfsync", "always") != "always":
        warnings.append(
            f"Redis syncs its append-only file with appendfsync {config['appendfsync']}: a crash of the "
            "machine can lose the last records unnoticed (appendfsync always keeps every one)"
        )
    policy = config.get("maxmemory-policy", "noeviction")
    if policy != "noeviction":
        warnings.append(
            f"Redis may evict replay records when memory runs out (maxmemory-policy {policy}); use noeviction"
        )
    return warnings


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
        return Baseline.from_json(value)

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
