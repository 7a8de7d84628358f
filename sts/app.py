"""The app factory: wire the adapters into the pipeline, once, at start.

``create_app(settings)`` parses keys, compiles policies, opens the database
pool and the store client, and registers the blueprints.  Nothing of this is
repeated per request.  What each part is built from lives in :mod:`sts.wiring`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from flask import Flask

from .adapters.coalesced_refusals import CoalescingAuditSink
from .adapters.decision_log import LoggedSqlAuditSink
from .adapters.keyring import KeyRing
from .adapters.metered_ports import MeteredAuditSink, MeteredLedger
from .adapters.metrics import Metrics
from .adapters.policy_files import PolicySources
from .adapters.readiness import DatabaseSchema, Readiness, instance_name, wait_for_schema
from .adapters.sql.engines import make_engine
from .adapters.sql.files_in_use import sqlite_file
from .adapters.tracing import build_tracing
from .settings import Settings
from .wiring.metadata import build_metadata
from .wiring.runtime import Runtime
from .wiring.services import build_exchange, build_signal_receiver, build_token_status
from .wiring.stores import (
    build_rate_limiter,
    database_pool,
    open_stores,
    rate_limit_check,
    rate_limits_home,
    single_use_ledger,
    store_check,
)
from .wiring.trust import build_clients, build_policy
from .wiring.web import build_flask_app

log = logging.getLogger(__name__)


def prepare(
    settings: Settings,
    *,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> bool:
    """One-time set-up before workers start: keys created, database schema current (migrated when
    ``database_migrate_on_start``).

    A database that does not answer yet is waited for, with backoff and one log line per
    attempt, for up to ``database_startup_timeout`` seconds; after that the service starts
    anyway, not ready (``/readyz`` answers 503, ``/token`` 503 ``temporarily_unavailable``),
    and becomes ready by itself once the database answers.  Returns whether the schema is
    current.
    """
    KeyRing.open(settings.keys_dir, passphrase=settings.key_passphrase, create_alg=settings.signing_alg)
    engine = make_engine(settings.database_url, database_pool(settings))
    try:
        schema = DatabaseSchema(engine, migrate=settings.database_migrate_on_start)
        return wait_for_schema(schema, settings.database_startup_timeout, sleep=sleep, monotonic=monotonic)
    finally:
        engine.dispose()


def create_app(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    span_exporter: Any = None,
    policy_sources: PolicySources | None = None,
) -> Flask:
    """Build the WSGI application for ``settings`` (tests pass their own settings and clock).

    Nothing here needs the database to answer: if it does not, the app starts not ready
    and migrates the schema when it does (see :class:`DatabaseSchema`).  ``span_exporter``
    (tests): an OpenTelemetry span exporter used instead of the configured one.
    ``policy_sources``: the policy files' texts as read once (``sts serve`` gives every worker
    those its main process read), instead of the files themselves.
    """
    logging.getLogger("sts").setLevel(settings.log_level)
    engine = make_engine(settings.database_url, database_pool(settings))
    schema = DatabaseSchema(engine, migrate=settings.database_migrate_on_start)
    schema.attempt()
    keyring = KeyRing.open(
        settings.keys_dir, passphrase=settings.key_passphrase, create_alg=settings.signing_alg, now=clock()
    )
    stores = open_stores(settings, engine, clock)
    policy = build_policy(settings, policy_sources)
    # Every decision whose record is committed is also summarised on the decision log (sts.decision).
    # No grant committed later than database_deadline after its request began (0: no deadline).
    audit = LoggedSqlAuditSink(engine, commit_deadline=float(settings.database_deadline) or None, clock=clock)
    # Metrics (sts.adapters.metrics): every decision is counted as it is committed, and the
    # failures of the stores, the audit trail and upstream services where the pipeline meets them.
    metrics = Metrics(clock=clock)
    # A flood's refusals of one rate-limit key are audited as two records per period, not one each
    # (sts.adapters.coalesced_refusals); each is still counted by the metrics in front of it.
    coalesced = CoalescingAuditSink(audit, settings.rate_limits.coalesce_refusals, clock)
    decisions = MeteredAuditSink(coalesced, metrics)
    counted = stores.counted(metrics)
    # Given the counted stores: a baseline the Redis ledger saves after a grant counts its failures.
    ledger = MeteredLedger(single_use_ledger(counted, audit), metrics)
    # On the real clock, Redis counts by its own (one clock for the fleet); a test's clock is its own.
    real_clock = clock is time.time
    limits = build_rate_limiter(settings, engine, stores.redis_client, metrics, server_clock=real_clock)
    # The pipeline's stages: trace spans (when tracing is on) and the per-stage latency histogram.
    tracing = build_tracing(settings.tracing, span_exporter=span_exporter)
    tracing.add_stages_observer(metrics.observe_stages)
    clients = build_clients(settings, clock, metrics)
    exchange = build_exchange(
        settings,
        keyring=keyring,
        clients=clients,
        policy=policy,
        stores=counted,
        ledger=ledger,
        audit=decisions,
        limits=limits,
        tracing=tracing,
        metrics=metrics,
        clock=clock,
    )
    token_status = build_token_status(
        settings,
        keyring=keyring,
        clients=clients,
        stores=counted,
        audit=decisions,
        limits=limits,
        clock=clock,
    )
    instance = instance_name()
    runtime = Runtime(
        settings=settings,
        engine=engine,
        keyring=keyring,
        replay=counted.replay,
        exchange=exchange,
        policy=policy,
        audit=audit,
        metadata=build_metadata(settings, policy),
        clock=clock,
        subject_states=counted.subject_states,
        baselines=counted.baselines,
        token_status=token_status,
        redis_client=stores.redis_client,
        limits=limits,
        tracing=tracing,
        schema=schema,
        readiness=Readiness(
            schema=schema,
            audit=audit,
            # The uncounted stores: readiness reports its own failures (/readyz); they are not counted.
            store=store_check(stores, instance),
            store_in_database=stores.redis_client is None,
            keyring=keyring,
            clock=clock,
            instance=instance,
            rate_limits=rate_limit_check(settings, engine, stores.redis_client),
            rate_limits_in=rate_limits_home(engine, stores.redis_client),
            sqlite_file=sqlite_file(engine),
        ),
        metrics=metrics,
    )
    if settings.transmitters:
        runtime.signals = build_signal_receiver(
            settings, exchange=exchange, stores=counted, limits=limits, metrics=metrics, clock=clock
        )
    app = build_flask_app(runtime, token_status=token_status, metrics=metrics)
    log.info(
        "sts %s: issuer %s, %d issuer(s), %d client(s), %d rule(s), store %s",
        "ready" if schema.ready else "started, not ready until the database answers",
        settings.issuer,
        len(settings.issuers),
        len(clients),
        len(policy.rules),
        settings.store,
    )
    return app


def wsgi_app_from_environment() -> Flask:
    """Entry point for other WSGI servers (``sts serve`` uses granian)."""
    from .adapters.log_format import configure_logging
    from .settings.load import load_settings

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)
