"""Redis adapters of the replay ledger, for a fleet of instances: replay cache and single-use ledger.

``SET key 1 NX PXAT <expiry>`` is atomic on the server, so of any number of
concurrent first uses, across any number of instances, exactly one wins.
Keys are prefixed by purpose (``sts:replay:<purpose>:``) so replay caches
for different purposes never collide.  Any Redis error becomes
:class:`~sts.core.ports.StoreUnavailable`, and the caller fails closed.
Every record is written under the ledger's epoch (:mod:`sts.adapters.redis.epoch`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import replace

import redis

from ...core.audit import AuditRecord
from ...core.ports import (
    CLOCK_MARGIN,
    AlreadyUsed,
    AuditOutcomeUnknown,
    AuditSink,
    BaselineStore,
    BaselineUpdate,
    ReplayWindowLost,
    SingleUse,
    StoreUnavailable,
    UsesNotClaimed,
)
from ..request_threads import waiting
from .baseline_writes import WRITE_BASELINE, baseline_write
from .client import LuaScript, commands
from .epoch import LedgerEpoch

log = logging.getLogger(__name__)

#: How long a single-use reservation holds unless confirmed: longer than the audit commit may take
#: (``SqlAuditSink`` gives up after 10 s), short enough that a crashed request frees the token soon.
RESERVATION_HOLD = 30.0
#: How long a request waits for a concurrent one holding the same token to commit or give up.
RESERVATION_WAIT = 2.0

# Every script: KEYS[1] is the epoch, ARGV[1] the epoch the caller knows.  If Redis holds another
# (or none), nothing is written and -1 (first element) says so.
# _USE: KEYS[2] the entry, written with ARGV[2] until ARGV[3] unless it exists; 0 when it is used,
# 2 when a reservation holds it.
_USE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PXAT', ARGV[3]) then return 1 end
local held = redis.call('GET', KEYS[2])
if held and string.sub(held, 1, 2) == 'r:' then return 2 end
return 0
"""
# _CLAIM: all of KEYS[2..] or none; use i (KEYS[i + 1]) is written with ARGV[2i] until ARGV[2i + 1].
# {0}: all written; {1, i}: use i is used; {2, i}: another request's reservation holds it.  A use
# that already holds this request's own reservation counts as free (a retried claim).
_CLAIM = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-1} end
local held_by = 0
for i = 2, #KEYS do
  local held = redis.call('GET', KEYS[i])
  if held then
    if string.sub(held, 1, 2) ~= 'r:' then return {1, i - 1} end
    if held ~= ARGV[2 * i - 2] then held_by = i - 1 end
  end
end
if held_by > 0 then return {2, held_by, redis.call('PTTL', KEYS[held_by + 1])} end
for i = 2, #KEYS do redis.call('SET', KEYS[i], ARGV[2 * i - 2], 'PXAT', ARGV[2 * i - 1]) end
return {0}
"""
# _CONFIRM: the ARGV[2] reservations KEYS[2..] become uses: reservation i (KEYS[i + 1]) is ARGV[2i + 1],
# used until ARGV[2i + 2] (also when it lapsed and nobody took it); then, if more keys follow, the
# grant's baseline update is written with them (``write_baseline`` of .baseline_writes: its drift
# state only if the grant changed it, its counters advanced from the stored ones).  All or nothing:
# {0, i} when another request took reservation i.
_CONFIRM = (
    WRITE_BASELINE
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-1} end
local n = tonumber(ARGV[2])
for i = 1, n do
  local held = redis.call('GET', KEYS[i + 1])
  if held and held ~= ARGV[2 * i + 1] then return {0, i} end
end
for i = 1, n do redis.call('SET', KEYS[i + 1], '1', 'PXAT', ARGV[2 * i + 2]) end
if #KEYS > n + 1 then write_baseline(n + 2, 2 * n + 3) end
return {1}
"""
)
_CANCEL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _kept_until(expires_at: float, now: float) -> int:
    """When Redis may drop a spent use (``PXAT``): its expiry and
    :data:`~sts.core.ports.CLOCK_MARGIN` (readiness refuses a clock off by more than a fifth of it,
    :data:`sts.adapters.readiness.MAX_CLOCK_SKEW`)."""
    return _pxat(expires_at + CLOCK_MARGIN, now)


def _pxat(expires_at: float, now: float) -> int:
    """``expires_at`` in Redis's milliseconds; if already past, a second from now (Redis refuses
    a past PXAT)."""
    return math.ceil((expires_at if expires_at > now else now + 1) * 1000)


class _RedisLedgerBase:
    def __init__(self, client: redis.Redis, *, prefix: str, epoch: LedgerEpoch | None) -> None:
        self.client = client
        self.prefix = prefix
        self.epoch = epoch if epoch is not None else LedgerEpoch(client, prefix=prefix)
        self.commands = commands(client)
        self._use = LuaScript(self.commands, _USE)

    def _name(self, purpose: str, key: str) -> bytes:
        # Redis keys are bytes; "surrogatepass" keeps a jti with lone surrogates (valid JSON) distinct
        # instead of failing to encode.
        return f"{self.prefix}:replay:{purpose}:{key}".encode("utf-8", "surrogatepass")

    def _check(self, valid_from: Sequence[float | None]) -> None:
        for start in valid_from:
            self.epoch.check(start)

    def _under_epoch(
        self,
        script: LuaScript,
        names: Sequence[bytes],
        args: Sequence[bytes | int | str],
        now: float,
        valid_from: Sequence[float | None] = (),
    ) -> list[int]:
        """Run ``script`` on ``names`` under the current epoch (one round trip); re-sync and retry
        when it changed.  A credential (given by when it could first have been accepted,
        ``valid_from``) the lost records may have seen is refused (:class:`ReplayWindowLost`), also
        when the loss is found only after the write."""
        try:
            for _ in range(3):
                expected = self.epoch.expected(now)
                self._check(valid_from)
                answer = script(keys=[self.epoch.key, *names], args=[expected, *args])
                result = [int(x) for x in answer] if isinstance(answer, list) else [int(answer)]
                if result[0] == -1 or self.epoch.stale():
                    # The epoch changed, or this ran on a new connection (a restarted server?).
                    self.epoch.sync(now)
                    self._check(valid_from)
                    if result[0] == -1:
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
        name = self._name(purpose, key)
        kept = _kept_until(expires_at, now)
        [result] = self._under_epoch(self._use, [name], [b"1", kept], now, [valid_from])
        return result == 1

    def release(self, purpose: str, key: str) -> None:
        try:
            self.client.delete(self._name(purpose, key))
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None


class RedisSingleUseLedger(_RedisLedgerBase):
    """ports.SingleUseLedger with the uses in Redis and the audit trail elsewhere (SQL).

    Each write waits for Redis's append-only file to reach the disk (``appendfsync always``), so
    an exchange writes twice, whatever it uses up:

    * :meth:`reserve` (the subject token) and :meth:`spend` (a DPoP proof's ``jti``) write nothing:
      they check the ledger's epoch (a credential the lost records may have seen is refused
      there) and hand the use on to :meth:`commit`;
    * :meth:`commit` claims every use in one script, all or none: the proof's ``jti`` as used, the
      subject token as ``r:<holder>`` held for :data:`RESERVATION_HOLD`.  One found used raises
      :class:`AlreadyUsed` naming it before anything is committed; one held by a request still in
      flight is waited for (:data:`RESERVATION_WAIT`): its outcome decides (else, as when Redis
      cannot be reached, :class:`UsesNotClaimed`: nothing committed, the pipeline records a 503).
      Then the audit record is committed (if that fails, the reservation is dropped; if the
      request dies, it lapses), then one script confirms the reservations as uses until the
      tokens expire and saves the baseline update (best effort) with them.

    Of concurrent requests with one subject token or one proof, across instances, exactly one
    claims it; the others are refused as replays, their records not written.  A proof verified
    but claimed by nobody (its request refused) is spent by the pipeline all the same
    (``ProofUses.spend_now``, through the replay cache).
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
        baselines: BaselineStore | None = None,
        baselines_here: bool = False,
    ) -> None:
        """``baselines_here``: ``baselines`` is a :class:`RedisBaselineStore` on this client and
        prefix, so the confirmation script saves the update (no round trip of its own)."""
        super().__init__(client, prefix=prefix, epoch=epoch)
        self.audit = audit
        self.baselines = baselines
        self.baselines_here = baselines_here
        self.hold = hold
        self.wait = wait
        self._claim = LuaScript(self.commands, _CLAIM)
        self._confirm = LuaScript(self.commands, _CONFIRM)
        self._cancel = LuaScript(self.commands, _CANCEL)

    def _checked(self, use: SingleUse, now: float) -> None:
        try:
            self.epoch.expected(now)  # No round trip unless the connection may be to a new server.
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        self.epoch.check(use.valid_from)

    def reserve(self, use: SingleUse, now: float) -> SingleUse:
        """The reservation :meth:`commit` claims (nothing is written yet)."""
        self._checked(use, now)
        return replace(use, holder=f"r:{secrets.token_hex(12)}")

    def used(self, use: SingleUse, now: float) -> bool:
        """A confirmed use of ``use`` (a reservation, ``r:<holder>``, is not one: its commit decides)."""
        self._checked(use, now)
        try:
            held = self.commands(b"GET", self._name(use.purpose, use.key))
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        return isinstance(held, bytes) and not held.startswith(b"r:")

    def spend(self, use: SingleUse, now: float) -> SingleUse | None:
        """The use :meth:`commit` claims (nothing is written yet)."""
        self._checked(use, now)
        return replace(use, holder="")

    def commit(
        self,
        record: AuditRecord,
        uses: Sequence[SingleUse],
        now: float,
        baseline: BaselineUpdate | None = None,
    ) -> None:
        if uses:
            self._claim_all(uses, now)
        try:
            self.audit.write(record)
        except AuditOutcomeUnknown:
            # The record may yet be committed: its uses stay used (confirmed), so that the trail
            # never shows the token granted twice.  The token is withheld; it fails closed.
            with contextlib.suppress(StoreUnavailable, ReplayWindowLost, redis.RedisError):
                self._confirm_uses([u for u in uses if u.holder], now, None)
            raise
        except BaseException:
            self.cancel(uses)
            raise
        reserved = [u for u in uses if u.holder]
        if reserved:
            # The claim proved this request first in its epoch; should the epoch have ended
            # meanwhile, the new one refuses the token for its whole validity, so recording the
            # use there is still right.
            baseline = self._confirm_uses(reserved, now, baseline)
        if baseline is not None and self.baselines is not None:
            try:
                self.baselines.save(
                    baseline.identity,
                    baseline.baseline,
                    baseline.ttl,
                    drift=baseline.drift_changed,
                    grant=True,
                )
            except StoreUnavailable:
                log.warning("baseline update skipped: store unavailable")

    def _confirm_uses(
        self, reserved: Sequence[SingleUse], now: float, baseline: BaselineUpdate | None
    ) -> BaselineUpdate | None:
        """Confirm the reservations as uses, with ``baseline`` when it is kept here (then None is
        returned: saved; else ``baseline``, for the caller to save)."""
        if not reserved:
            return baseline
        names = [self._name(u.purpose, u.key) for u in reserved]
        args: list[bytes | int | str] = [len(reserved)]
        for u in reserved:
            args += [u.holder.encode(), _kept_until(u.expires_at, now)]
        if baseline is not None and self.baselines_here:
            more_names, more_args = baseline_write(self.prefix, baseline, grant=True)
            names += more_names
            args += more_args
            baseline = None
        if self._under_epoch(self._confirm, names, args, now)[0] != 1:
            raise StoreUnavailable("single-use reservation lost before it was confirmed")
        return baseline

    def _claim_all(self, uses: Sequence[SingleUse], now: float) -> None:
        """Claim every use at once (see the class); raises AlreadyUsed or UsesNotClaimed."""
        names = [self._name(u.purpose, u.key) for u in uses]
        args: list[bytes | int | str] = []
        for u in uses:
            # A reservation lapses after the hold; a proof's jti is used (and kept) at once.
            args += (
                [u.holder.encode(), _pxat(now + self.hold, now)]
                if u.holder
                else [b"1", _kept_until(u.expires_at, now)]
            )
        deadline = time.monotonic() + self.wait
        delay = 0.002
        while True:
            try:
                result = self._under_epoch(self._claim, names, args, now, [u.valid_from for u in uses])
            except ReplayWindowLost as exc:
                # Redis lost its records since this request checked: the use they may have seen
                # is named, for the refusal the loss calls for.
                lost = next((u for u in uses if u.valid_from is None or u.valid_from < exc.lost_at), None)
                if lost is None:
                    raise UsesNotClaimed(f"the replay store's epoch changed: {exc}") from None
                raise ReplayWindowLost(exc.lost_at, lost) from None
            except StoreUnavailable as exc:
                raise UsesNotClaimed(str(exc)) from None
            if result[0] == 0:
                return
            if result[0] == 1:
                raise AlreadyUsed(uses[result[1] - 1])
            # Held by a request still in flight: its outcome decides.
            if time.monotonic() + delay > deadline:
                # Retry once the hold lapses (a crashed holder's does): an outside re-check was
                # told 5 s, four times over, while the token stayed held for 30 (RFC 9110 §10.2.3).
                held_for = result[2] / 1000 if len(result) > 2 and result[2] > 0 else None
                raise UsesNotClaimed("single-use token held by a concurrent request", retry_after=held_for)
            with waiting():
                time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def cancel(self, uses: Sequence[SingleUse]) -> None:
        for use in uses:
            if not use.holder:
                continue  # A proof's jti stays used.
            try:
                self._cancel(keys=[self._name(use.purpose, use.key)], args=[use.holder.encode()])
            except redis.RedisError as exc:
                log.warning("could not drop a single-use reservation (it lapses on its own): %s", exc)
