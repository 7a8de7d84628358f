"""Redis adapters of the replay ledger, for a fleet of instances: replay cache and single-use ledger.

``SET key 1 NX PXAT <expiry>`` is atomic on the server, so of any number of
concurrent first uses, across any number of instances, exactly one wins.
Keys are prefixed by purpose (``sts:replay:<purpose>:``) so replay caches
for different purposes never collide.  Any Redis error becomes
:class:`~sts.core.ports.StoreUnavailable`, and the caller fails closed.
Every record is written under the ledger's epoch (:mod:`sts.adapters.redis.epoch`).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import redis

from ...core.audit import AuditRecord
from ...core.ports import AlreadyUsed, AuditSink, SingleUse, StoreUnavailable
from .epoch import LedgerEpoch

log = logging.getLogger(__name__)

#: How long a single-use reservation holds unless confirmed: longer than the audit commit may take
#: (``SqlAuditSink`` gives up after 10 s), short enough that a crashed request frees the token soon.
RESERVATION_HOLD = 30.0
#: How long a request waits for a concurrent one holding the same token to commit or give up.
RESERVATION_WAIT = 2.0

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
