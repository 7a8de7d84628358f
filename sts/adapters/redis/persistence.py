"""Redis's persistence settings, checked at start: what in them can lose replay records."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable

import redis

from ...core.ports import StoreUnavailable
from .epoch import LedgerEpoch

log = logging.getLogger(__name__)


#: Seconds between two tries to read the settings of a Redis that could not be reached at start.
RETRY_SECONDS = 5.0
#: Tries before giving up (an hour): a Redis that never answers refuses every token anyway.
RETRIES = 720
#: Seconds between two looks at the keys Redis evicted (:func:`watch_evictions`), in each worker:
#: a credential whose replay record was evicted may be accepted again until then (an outside
#: test: 25 of 35 replays within the 1.5 s a look every 2 s took; volatile-lru evicts the idle
#: records first).
EVICTION_CHECK = 0.5


def check_at_start(client: redis.Redis, epoch: LedgerEpoch, now: float) -> None:
    """Warn about settings that can lose replay records, and learn the ledger's epoch.

    Redis may be down at start: then both happen later, the epoch at the first use, and the
    settings once Redis answers (a thread tries every :data:`RETRY_SECONDS`, :data:`RETRIES`
    times, and says so if it gives up).  They were never read then, and a Redis started after the
    service, as compose and Kubernetes often start them, went unchecked (an outside fault
    campaign).  Settings changed while the service runs (``CONFIG SET``) are not read again.
    """
    try:
        _warn(persistence_warnings(client))
    except StoreUnavailable as exc:
        log.warning("Redis cannot be reached at start (%s); its persistence is checked once it answers", exc)
        threading.Thread(
            target=_check_later, args=(weakref.ref(client),), name="sts-redis-settings", daemon=True
        ).start()
        return
    try:
        epoch.sync(now)
    except StoreUnavailable as exc:  # (it reads the database too) learnt at the first use instead
        log.warning("the ledger epoch could not be read at start (%s); it is read at the first use", exc)


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        log.warning("%s (see docs/configuration.md, Redis)", warning)


def _check_later(client_ref: weakref.ref[redis.Redis]) -> None:
    """Read the settings once Redis answers; ends then, or once the client is gone (held weakly:
    an application dropped, in tests, takes its thread with it)."""
    for _ in range(RETRIES):
        time.sleep(RETRY_SECONDS)
        client = client_ref()
        if client is None:
            return
        try:
            warnings = persistence_warnings(client)
        except StoreUnavailable:
            continue
        finally:
            del client
        _warn(warnings)
        log.info("Redis answers: its persistence settings were read")
        return
    log.warning(
        "Redis did not answer for %.0f s after the start: its persistence settings were not read "
        "(see docs/configuration.md, Redis)",
        RETRIES * RETRY_SECONDS,
    )


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
            # CONFIG refused (renamed away on many managed services): INFO says what it can, the
            # append-only file and the eviction policy (before, the policy was taken for noeviction:
            # an outside audit evicted single-use records unwarned); never appendfsync.
            try:
                aof = client.info("persistence").get("aof_enabled")
                policy = client.info("memory").get("maxmemory_policy")
            except redis.ResponseError:
                return [
                    "cannot read Redis's persistence settings (CONFIG and INFO refused): make sure "
                    "it runs with appendonly yes, appendfsync always, maxmemory-policy noeviction"
                ]
            config = {"appendonly": "yes" if aof else "no", "appendfsync": "(unknown)"}
            if policy is not None:
                config["maxmemory-policy"] = str(policy)
    except redis.RedisError as exc:
        raise StoreUnavailable(type(exc).__name__) from None
    warnings = []
    if config.get("appendonly") != "yes":
        warnings.append(
            "Redis runs without an append-only file (appendonly no): a restart loses the single-use "
            "records, and credentials issued before it are refused until they expire"
        )
    elif config.get("appendfsync") == "(unknown)":
        warnings.append(
            "cannot read Redis's appendfsync (CONFIG refused): make sure it is always, or a crash of "
            "the machine can lose the last records unnoticed"
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


def watch_evictions(epoch: LedgerEpoch, clock: Callable[[], float]) -> threading.Thread:
    """Look at Redis's count of evicted keys every :data:`EVICTION_CHECK` seconds (``INFO stats``),
    and sync ``epoch`` when it moved (keys evicted since the epoch was confirmed begin a new one,
    after a loss: :class:`~.epoch.LedgerEpoch`) and every :data:`FULL_LOOK` looks, in a daemon
    thread, until the epoch is gone (held weakly: an application dropped, in tests, takes its
    thread with it) or unwatched (the check application ``sts serve`` builds before it forks).
    A Redis that cannot be reached is tried again at the next look; a request finds it so on its
    own."""
    thread = threading.Thread(
        target=_watch, args=(weakref.ref(epoch), clock), name="sts-redis-evictions", daemon=True
    )
    thread.start()
    return thread


#: Every this many looks the epoch is re-read whether or not the count moved: a policy changed
#: while Redis runs (``CONFIG SET``) is recorded in it within 2 s (a review: a restart of a Redis
#: made to evict that way, the policy gone with the restart, went unnoticed).
FULL_LOOK = 4


def _watch(epoch_ref: weakref.ref[LedgerEpoch], clock: Callable[[], float]) -> None:
    seen: int | None = None
    looks = 0
    while True:
        time.sleep(EVICTION_CHECK)
        epoch = epoch_ref()
        if epoch is None or epoch.unwatched.is_set():
            return
        looks += 1
        try:
            evicted = epoch.evicted_now()
            if evicted != seen or looks % FULL_LOOK == 0:
                epoch.sync(clock())
                seen = evicted
        except StoreUnavailable:
            seen = None  # looked at again in full once Redis answers
        except Exception:  # never let a surprise end the watch silently
            log.exception("the look at Redis's evicted keys failed")
        finally:
            del epoch
