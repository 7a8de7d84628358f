"""Subject states and revocations with ``store: redis``: a durable copy in the database.

Redis keeps them in memory, and a Redis that loses its records (an empty restart, an old
snapshot, a flush, another server behind ``redis_url``) would forget every block, revocation
and re-attestation demand: revoked tokens would introspect as active again, and a blocked
workload could exchange at once.  The replay ledger refuses what the lost records may have
seen (:mod:`.epoch`); these are not credentials to refuse but facts to keep.  So:

* **Writes** go to the database first, which decides (its own atomic update), then to Redis
  (the whole new value).  They are rare: security events, ``/revoke``, ``sts revoke``.
* **Reads** go to Redis, in the same round trip as a look at the ledger's epoch: if Redis
  holds another epoch than this process knows (a flush, a restart), the epoch is synced
  first (:meth:`LedgerEpoch.sync`), which marks the loss.
* **After a loss**, until everything written before it has expired (subject states after
  :data:`~sts.core.subject_state.STATE_TTL`, revocations after the longest token lifetime),
  a state is read from the database, and a token not found revoked in Redis is looked up
  there too.  Everything written since the loss is in Redis as well, so afterwards Redis
  alone answers again.

The database is the audit database (PostgreSQL in a fleet, shared by every instance).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ...core.ports import RevokedTokens, SubjectStateStore
from ...core.subject_state import STATE_TTL, SubjectState
from .epoch import LedgerEpoch
from .key_value import RedisRevokedTokens, RedisSubjectStateStore


def _newer(durable: SubjectState, fast: SubjectState) -> SubjectState:
    """The later of two copies of one state (by ``updated_at``; the durable one when equal): Redis
    may hold a state written before the durable copy was kept (an upgrade)."""
    if fast.updated_at is not None and (durable.updated_at is None or fast.updated_at > durable.updated_at):
        return fast
    return durable


class DurableSubjectStates:
    """ports.SubjectStateStore: Redis for reads, the database as the durable copy (see the module)."""

    def __init__(
        self,
        fast: RedisSubjectStateStore,
        durable: SubjectStateStore,
        epoch: LedgerEpoch,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.fast = fast
        self.durable = durable
        self.epoch = epoch
        self._clock = clock

    def get(self, identities: Sequence[str]) -> list[SubjectState]:
        now = self._clock()
        states = self.fast.get(identities, epoch=self.epoch, now=now)
        lost_at = self.epoch.lost_at
        if lost_at is not None and now < lost_at + STATE_TTL:
            return self.durable.get(identities)
        return states

    def put(self, identity: str, state: SubjectState, ttl: int) -> None:
        self.durable.put(identity, state, ttl)
        self.fast.put(identity, state, ttl)

    def update(self, identity: str, change: Callable[[SubjectState], SubjectState], ttl: int) -> SubjectState:
        [fast] = self.fast.get([identity])
        state = self.durable.update(identity, lambda durable: change(_newer(durable, fast)), ttl)
        self.fast.put(identity, state, ttl)
        return state


class DurableRevokedTokens:
    """ports.RevokedTokens: Redis for reads, the database as the durable copy (see the module)."""

    def __init__(
        self,
        fast: RedisRevokedTokens,
        durable: RevokedTokens,
        epoch: LedgerEpoch,
        *,
        max_lifetime: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.fast = fast
        self.durable = durable
        self.epoch = epoch
        self.max_lifetime = max_lifetime
        self._clock = clock

    def revoke(self, jti: str, expires_at: float) -> None:
        self.durable.revoke(jti, expires_at)
        self.fast.revoke(jti, expires_at)

    def revoked(self, jti: str) -> bool:
        now = self._clock()
        if self.fast.revoked(jti, epoch=self.epoch, now=now):
            return True
        lost_at = self.epoch.lost_at
        # A token revoked before the loss lives at most the longest lifetime after it.
        return lost_at is not None and now < lost_at + self.max_lifetime and self.durable.revoked(jti)
