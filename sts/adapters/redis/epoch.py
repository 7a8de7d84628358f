"""The replay ledger's epoch in Redis: whether the records in Redis are all there.

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
from dataclasses import dataclass, replace
from typing import Protocol

import redis

from ...core.ports import ReplayWindowLost, StoreUnavailable
from .client import connection_counter

log = logging.getLogger(__name__)


class EpochMemory(Protocol):
    """Durable memory of the last epoch seen (:class:`sts.adapters.sql.key_value.SqlLedgerEpochMemory`)."""

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
    #: The keys Redis had evicted (``INFO stats`` ``evicted_keys``, under ``run_id``) when this
    #: epoch was last confirmed; None: not known (an older version's epoch, or ``INFO`` refused).
    evicted: int | None = None
    #: Whether Redis could evict then (a ``maxmemory`` and a policy other than ``noeviction``): a
    #: restart of such a Redis is a loss, whatever policy it comes back with.
    evicting: bool = False

    def dump(self) -> bytes:
        value = {
            "id": self.id,
            "created_at": self.created_at,
            "run_id": self.run_id,
            "after_loss": self.after_loss,
            "evicted": self.evicted,
            "evicting": self.evicting,
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
                None if value.get("evicted") is None else int(value["evicted"]),
                bool(value.get("evicting", False)),
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


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
      by another process;
    * an epoch that began *before* the one this process (or the durable ``memory``)
      knew: another Redis, or another database of it, than the one written to since
      (``redis_url`` pointed away and back), or a restored backup.  The records
      written under the newer epoch are not in it: a new epoch begins, after a loss;
    * Redis evicted keys since the epoch was confirmed (``INFO stats`` ``evicted_keys``
      above the count the epoch records, under the same ``run_id``): any ``maxmemory-policy``
      but ``noeviction`` drops keys with an expiry first or at random, replay records among
      them.  A new epoch begins, after a loss.  Besides the syncs above,
      :func:`~.persistence.watch_evictions` looks at the count every half second and syncs when
      it moved (and every 2 s): a credential whose record was evicted could be used again until
      then (before, never noticed at all: the start only warned of the policy).

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
        self._connections = connection_counter(client)
        self._replace = client.register_script(_REPLACE)
        self._lock = threading.Lock()
        #: Set to end :func:`~.persistence.watch_evictions`'s thread (a process about to fork).
        self.unwatched = threading.Event()
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
        known = self._known
        previous, previous_at = (known.id, known.created_at) if known is not None else self._remembered()
        for _ in range(8):
            raw: bytes | None = self.client.get(self.key)  # type: ignore[assignment]
            # Read after the epoch (each try): a count read before it, reused, could be older than
            # the one another process wrote into it meanwhile, and taken for a reset (a review).
            run_id, aof, evicted, evicting = self._server()
            epoch = Epoch.load(raw)
            # What the scripts compare with: exactly the bytes Redis holds.
            current = raw
            if epoch is None:
                # Empty (or unreadable): a new epoch; after a loss if an earlier one was known.
                epoch = Epoch(
                    secrets.token_hex(8), math.ceil(now), run_id, previous is not None, evicted, evicting
                )
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
            elif previous_at is not None and epoch.id != previous and epoch.created_at < previous_at:
                # Older than an epoch already in force: what was written under that one is not here.
                assert raw is not None
                epoch = Epoch(secrets.token_hex(8), math.ceil(now), run_id, True, evicted, evicting)
                current = epoch.dump()
                if not self._replace(keys=[self.key], args=[raw, current]):
                    continue
                log.error(
                    "the replay store (Redis) holds an older epoch than the one last in force (another "
                    "Redis or database, or a restored backup): its records are incomplete; credentials "
                    "issued before now are refused until they expire"
                )
            else:
                changed = epoch
                if run_id is not None and epoch.run_id != run_id:
                    if aof and not evicting and not epoch.evicting:
                        # Restarted and replayed its append-only file: every record is back.  (Not
                        # under an evicting policy: keys evicted before the restart, after the last
                        # look, are gone from the file too, and the count began again; a review.)
                        changed = replace(epoch, run_id=run_id, evicted=evicted, evicting=evicting)
                    else:
                        # Restarted from a snapshot (or nothing): the latest records are missing.
                        changed = Epoch(secrets.token_hex(8), math.ceil(now), run_id, True, evicted, evicting)
                        log.error(
                            "the replay store (Redis) restarted %s: records written after its last "
                            "snapshot, or evicted, are lost; credentials issued before now are refused "
                            "until they expire",
                            "(it could evict keys)" if aof else "without an append-only file",
                        )
                elif (
                    evicted is not None
                    and epoch.evicted is not None
                    and evicted != epoch.evicted
                    and (evicted > epoch.evicted or evicted > 0)
                ):
                    # Keys evicted since the epoch was confirmed: replay records may be among them.
                    # (Fewer than it recorded: counted anew, ``CONFIG RESETSTAT``, and some since.)
                    changed = Epoch(secrets.token_hex(8), math.ceil(now), run_id, True, evicted, evicting)
                    log.error(
                        "the replay store (Redis) evicted keys (maxmemory-policy; %d counted, %d when last "
                        "seen): replay records may be among them; credentials issued before now are "
                        "refused until they expire",
                        evicted,
                        epoch.evicted,
                    )
                elif (evicted != changed.evicted and evicted is not None) or evicting != changed.evicting:
                    # Not known yet (an older version's epoch), counted anew with none since, or the
                    # policy changed (``CONFIG SET``).
                    changed = replace(
                        changed,
                        evicted=evicted if evicted is not None else changed.evicted,
                        evicting=evicting,
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
            self._remember(epoch)
        self._known, self._raw, self._synced = epoch, current, synced

    def _server(self) -> tuple[str | None, bool, int | None, bool]:
        """``run_id``, whether the append-only file is on, the keys evicted since the start, and
        whether Redis may evict (a ``maxmemory`` and a policy other than ``noeviction``):
        ``INFO``'s default sections, in one round trip; (None, False, None, False) when INFO is
        refused."""
        try:
            info = self.client.info()
        except redis.ResponseError:
            if not self._warned_info:
                self._warned_info = True
                log.warning(
                    "Redis refuses INFO: a restart that reloads an old snapshot, or evicted replay "
                    "records, cannot be detected"
                )
            return None, False, None, False
        run_id = info.get("run_id")
        evicted = info.get("evicted_keys")
        evicting = bool(info.get("maxmemory")) and info.get("maxmemory_policy", "noeviction") != "noeviction"
        return (
            str(run_id) if run_id else None,
            bool(info.get("aof_enabled")),
            int(evicted) if isinstance(evicted, int) else None,
            evicting,
        )

    def evicted_now(self) -> int | None:
        """Redis's count of evicted keys (``INFO stats``, a short answer); None when refused."""
        try:
            evicted = self.client.info("stats").get("evicted_keys")
        except redis.ResponseError:
            return None
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        return int(evicted) if isinstance(evicted, int) else None

    def _remembered(self) -> tuple[str | None, int | None]:
        """The epoch last seen, as remembered in the database: its id and when it began (None when
        remembered by an older version, which kept the id alone)."""
        if self.memory is None:
            return None, None
        value = self.memory.load(self._memory_name)
        if value is None:
            return None, None
        epoch_id, _, began = value.partition("@")
        return epoch_id, int(began) if began.isdigit() else None

    def _remember(self, epoch: Epoch) -> None:
        assert self.memory is not None
        try:
            self.memory.save(self._memory_name, f"{epoch.id}@{epoch.created_at}")
        except StoreUnavailable:
            log.warning("could not remember the replay store's epoch in the database")
