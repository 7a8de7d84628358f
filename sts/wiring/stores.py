"""The shared state: the replay cache, subject states, baselines, revoked tokens and the
single-use ledger, in Redis (``store: redis``) or in the database (``store: embedded``);
the rate limits beside them; and the shape of the database pools."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import redis
from sqlalchemy import Engine

from ..adapters.metered_ports import count_store_errors
from ..adapters.metrics import Metrics
from ..adapters.readiness import StoreCheck, redis_store_check, sql_store_check
from ..adapters.redis.client import connect as connect_redis
from ..adapters.redis.durable import DurableRevokedTokens, DurableSubjectStates
from ..adapters.redis.epoch import LedgerEpoch
from ..adapters.redis.key_value import RedisBaselineStore, RedisRevokedTokens, RedisSubjectStateStore
from ..adapters.redis.ledger import RedisReplayCache, RedisSingleUseLedger
from ..adapters.redis.persistence import check_at_start, watch_evictions
from ..adapters.redis.rate_limits import RedisRateLimits
from ..adapters.sql.audit_sink import SqlAuditSink
from ..adapters.sql.engines import PoolOptions
from ..adapters.sql.key_value import SqlBaselineStore, SqlLedgerEpochMemory, SqlRevokedTokens
from ..adapters.sql.rate_limits import SqlRateLimits, own_rate_limit_file, rate_limit_engine
from ..adapters.sql.replay import SqlReplayCache
from ..adapters.sql.single_use import SqlSingleUseLedger
from ..adapters.sql.subject_state import SqlSubjectStateStore
from ..core.ports import (
    BaselineStore,
    LimitedKey,
    RateLimitStore,
    ReplayCache,
    RevokedTokens,
    SingleUseLedger,
    SubjectStateStore,
)
from ..core.rate_limit import NO_LIMITS, Limit, RateLimiter, RateLimitPolicy
from ..http.review import MAX_SESSION_LIFETIME
from ..settings import Settings


@dataclass(frozen=True)
class Stores:
    """The stores the pipeline shares with every other instance, behind their ports."""

    replay: ReplayCache
    subject_states: SubjectStateStore
    baselines: BaselineStore
    revoked: RevokedTokens
    #: The Redis client (``store: redis``); None when the state is kept in the database.
    redis_client: redis.Redis | None = None
    epoch: LedgerEpoch | None = None

    def counted(self, metrics: Metrics) -> Stores:
        """The same stores, with their failures counted (``sts_store_errors_total{store=...}``)."""
        return replace(
            self,
            replay=count_store_errors(self.replay, "replay", metrics),
            subject_states=count_store_errors(self.subject_states, "subject_state", metrics),
            baselines=count_store_errors(self.baselines, "baseline", metrics),
            revoked=count_store_errors(self.revoked, "revocation", metrics),
        )


def open_stores(settings: Settings, engine: Engine, clock: Callable[[], float]) -> Stores:
    """The configured store; Redis is connected to and checked now."""
    if settings.store != "redis":
        return Stores(
            replay=SqlReplayCache(engine),
            subject_states=SqlSubjectStateStore(engine, clock=clock),
            baselines=SqlBaselineStore(engine, clock=clock),
            revoked=SqlRevokedTokens(engine, clock=clock),
        )
    redis_client = connect_redis(settings.redis_url)
    # The durable database remembers the ledger's epoch, so that even a process started after
    # Redis lost its records knows they were lost.
    epoch = LedgerEpoch(redis_client, memory=SqlLedgerEpochMemory(engine, clock=clock))
    check_at_start(redis_client, epoch, clock())
    watch_evictions(epoch, clock)
    baselines = RedisBaselineStore(redis_client)
    # Blocks, re-attestation demands and revocations are kept in the database too: a Redis that
    # loses its records must not forget them (sts/adapters/redis/durable.py).
    subject_states = DurableSubjectStates(
        # The subject's state, its baseline and the ledger's epoch in one round trip.
        RedisSubjectStateStore(redis_client, baselines=baselines),
        SqlSubjectStateStore(engine, clock=clock),
        epoch,
        clock=clock,
    )
    revoked = DurableRevokedTokens(
        RedisRevokedTokens(redis_client),
        SqlRevokedTokens(engine, clock=clock),
        epoch,
        # What is revoked there is read from the database for as long as it can matter after a
        # Redis loss: a token's lifetime, and with the review page a sign-out's (the sessions share
        # the store; only a token's lifetime brought a signed-out session back: a re-check).
        max_lifetime=max(settings.max_lifetime, MAX_SESSION_LIFETIME if settings.review.enabled else 0)
        + settings.leeway,
        clock=clock,
    )
    return Stores(
        replay=RedisReplayCache(redis_client, epoch=epoch),
        subject_states=subject_states,
        baselines=baselines,
        revoked=revoked,
        redis_client=redis_client,
        epoch=epoch,
    )


def single_use_ledger(stores: Stores, audit: SqlAuditSink) -> SingleUseLedger:
    """The ledger of single uses (subject tokens, DPoP proofs), in the same store; each use, and
    the grant's baseline update, is committed with its decision's audit record."""
    if stores.redis_client is not None:
        return RedisSingleUseLedger(
            stores.redis_client, audit, epoch=stores.epoch, baselines=stores.baselines, baselines_here=True
        )
    return SqlSingleUseLedger(audit)


def store_check(stores: Stores, instance: str) -> StoreCheck:
    """Readiness's probe of the store.  Given the uncounted stores: readiness reports its own
    failures (``/readyz``); they are not counted."""
    if stores.redis_client is not None:
        return redis_store_check(stores.redis_client, instance)
    return sql_store_check(stores.replay, instance)


def rate_limit_store(
    engine: Engine, redis_client: redis.Redis | None, *, server_clock: bool = True
) -> RateLimitStore:
    """Where rate-limit counts are kept: with the rest of the shared state (Redis, else the database).
    ``server_clock``: Redis counts by its own clock, one for the fleet (off when tests move time)."""
    if redis_client is not None:
        return RedisRateLimits(redis_client, server_clock=server_clock)
    return SqlRateLimits(rate_limit_engine(engine))


def rate_limit_check(
    settings: Settings, engine: Engine, redis_client: redis.Redis | None
) -> StoreCheck | None:
    """Readiness's probe of the rate-limit store, when limits are on: one count on a key of its own
    (admitted whatever came before: a day of tolerance), so a store that cannot count shows."""
    configured = settings.rate_limits
    if not configured.enabled or not any(configured.limits.values()):
        return None
    store = rate_limit_store(engine, redis_client)
    key = [LimitedKey("readyz", 0.001, 86400.0)]

    def check(now: float) -> None:
        store.acquire(key, now)

    return check


def rate_limits_home(engine: Engine, redis_client: redis.Redis | None) -> str:
    """Where the rate limits are kept, for readiness: ``store`` (Redis), ``own`` (a SQLite file of
    their own, see ``rate_limit_engine``) or ``database`` (PostgreSQL's table)."""
    if redis_client is not None:
        return "store"
    return "own" if own_rate_limit_file(engine) is not None else "database"


def build_rate_limiter(
    settings: Settings,
    engine: Engine,
    redis_client: redis.Redis | None,
    metrics: Metrics | None = None,
    *,
    server_clock: bool = True,
) -> RateLimiter:
    """The configured limits, kept where the rest of the shared state is (Redis, else the database);
    with ``metrics``, the store's failures are counted (``sts_store_errors_total{store="rate_limit"}``)."""
    configured = settings.rate_limits
    endpoints = {
        endpoint: {scope: Limit(s.requests, s.period, s.burst) for scope, s in scopes.items()}
        for endpoint, scopes in configured.limits.items()
        if scopes
    }
    if not configured.enabled:
        return NO_LIMITS
    # With every service-wide limit removed, the store is kept all the same: a policy rule's own
    # ``rate_limit`` counts there (it cost nothing else: no scope is checked).
    store = rate_limit_store(engine, redis_client, server_clock=server_clock)
    if metrics is not None:
        store = count_store_errors(store, "rate_limit", metrics)
    return RateLimiter(RateLimitPolicy(endpoints, configured.ipv4_prefix, configured.ipv6_prefix), store)


def database_pool(settings: Settings) -> PoolOptions:
    """The shape of a process's PostgreSQL request pool (see :class:`PoolOptions`).

    By default it keeps a connection for every thread, and one more (size = threads + 1,
    no overflow): a thread holds one connection at a time, so under load none is opened or
    closed (an overflow connection is closed when returned, and PostgreSQL forks a backend
    for each one opened).  With 8 threads: 9 connections, and at most 3 more in the
    engine's own pool for the rare transactions.
    """
    size = settings.database_pool_size
    if size is None:
        size = settings.threads + 1
    overflow = settings.database_max_overflow
    if overflow is None:
        overflow = 0
    return PoolOptions(
        size=size,
        max_overflow=overflow,
        timeout=float(settings.database_pool_timeout),
        deadline=float(settings.database_deadline),
    )
