"""Redis's persistence settings, checked at start: what in them can lose replay records."""

from __future__ import annotations

import logging

import redis

from ...core.ports import StoreUnavailable
from .epoch import LedgerEpoch

log = logging.getLogger(__name__)


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
