"""The app factory: wire the adapters into the pipeline, once, at start.

``create_app(settings)`` parses keys, compiles policies, opens the database
pool and the store client, and registers the blueprints.  Nothing of this is
repeated per request.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from flask import Flask
from sqlalchemy import Engine

from .adapters import redis_store, sql
from .adapters.decision_log import LoggedSqlAuditSink
from .adapters.jwks import FileJWKS, HttpJWKS, StaticJWKS
from .adapters.keyring import SUPPORTED_ALGORITHMS as SIGNING_ALGORITHMS
from .adapters.keyring import KeyRing, OwnTokenKeys
from .adapters.metered_ports import (
    CountedIssuerKeys,
    CountedTokenReviewer,
    MeteredAuditSink,
    MeteredLedger,
    count_store_errors,
)
from .adapters.metrics import Metrics
from .adapters.policy_files import load_policies, policy_files
from .adapters.readiness import (
    DatabaseSchema,
    Readiness,
    instance_name,
    redis_store_check,
    sql_store_check,
    wait_for_schema,
)
from .adapters.redis_rate_limits import RedisRateLimits
from .adapters.sql_rate_limits import SqlRateLimits, rate_limit_engine
from .adapters.token_review import HttpTokenReviewer
from .adapters.tracing import Tracing, build_tracing
from .core.assurance import LEVELS
from .core.attest import IssuerDirectory, IssuerPolicy, TrustedIssuer
from .core.client_secrets import check_hash_format
from .core.clients import AssertionAudience, RegisteredClient
from .core.delegation import SELF_ISSUER
from .core.dpop import DPoPConfig, allowed_algorithms
from .core.exchange import ExchangeConfig, TokenExchange
from .core.introspection import OwnTokenVerifier
from .core.policy import PolicySet
from .core.ports import (
    BaselineStore,
    IssuerKeys,
    RateLimitStore,
    ReplayCache,
    RevokedTokens,
    SingleUseLedger,
    SubjectStateStore,
    TokenReviewer,
)
from .core.profiles import ProfileOptions, get_profile
from .core.rate_limit import NO_LIMITS, Limit, RateLimiter, RateLimitPolicy
from .core.shared_signals import SignalReceiver, Transmitter, TransmitterPolicy
from .core.token_status import TokenStatus
from .errors import ConfigurationError
from .http import metrics as metrics_http
from .http import responses
from .http import tracing as tracing_http
from .http.body_limit import BodyLimit
from .http.oauth import discovery_blueprint, health_blueprint, token_blueprint
from .http.ssf import events_blueprint
from .http.token_status import token_status_blueprint
from .protocol.token_exchange import GRANT_TYPE_TOKEN_EXCHANGE, TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT
from .settings import ClientSettings, IssuerSettings, Settings, TransmitterSettings

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Everything a request needs, built once per process."""

    settings: Settings
    engine: Engine
    keyring: KeyRing
    replay: ReplayCache
    exchange: TokenExchange
    policy: PolicySet
    audit: sql.SqlAuditSink
    metadata: dict[str, Any]
    clock: Callable[[], float]
    subject_states: SubjectStateStore | None = None
    baselines: BaselineStore | None = None
    token_status: TokenStatus | None = None
    redis_client: redis.Redis | None = None
    schema: DatabaseSchema | None = None
    readiness: Readiness | None = None
    #: The Shared Signals receiver (``/ssf/events``), when transmitters are configured.
    signals: SignalReceiver | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    metrics: Metrics | None = None
    limits: RateLimiter = NO_LIMITS
    tracing: Tracing = field(default_factory=Tracing)

    def health(self) -> list[str]:
        """Readiness (``/readyz``): what stops this process from issuing a token now; empty when
        nothing does.  See :class:`sts.adapters.readiness.Readiness`."""
        assert self.readiness is not None
        return self.readiness.problems()

    def database_ready(self) -> bool:
        """The schema is current (migrated now if the database has come back since start)."""
        return self.schema is None or self.schema.ensure()


def issuer_keys(
    iss: IssuerSettings, clock: Callable[[], float], metrics: Metrics | None = None
) -> IssuerKeys:
    if iss.jwks_file is not None:
        return FileJWKS(iss.jwks_file, algorithms=iss.algorithms)
    assert iss.jwks_uri is not None
    keys = HttpJWKS(
        iss.jwks_uri,
        algorithms=iss.algorithms,
        max_stale=iss.jwks_max_stale,
        clock=clock,
        on_fetch=metrics.jwks_fetch_recorder(iss.name) if metrics else None,
    )
    return CountedIssuerKeys(keys, metrics, "issuer_keys", iss.name) if metrics else keys


def build_issuers(
    settings: Settings,
    clock: Callable[[], float],
    keyring: KeyRing | None = None,
    metrics: Metrics | None = None,
) -> IssuerDirectory:
    """The trusted issuers; with ``keyring``, this service itself too (``self``) for re-exchange."""
    trusted = []
    for iss in settings.issuers:
        profile = get_profile(iss.profile)
        options = ProfileOptions(claim_mappings=dict(iss.claim_mappings), trust_domain=iss.trust_domain)
        profile.check_options(iss.name, options)
        policy = IssuerPolicy(
            name=iss.name,
            issuer=iss.issuer,
            audiences=frozenset(iss.audiences),
            algorithms=frozenset(iss.algorithms),
            token_types=frozenset(iss.token_types),
            typ=frozenset(t.lower().removeprefix("application/") if t else None for t in iss.typ),
            max_token_age=iss.max_token_age,
            max_token_lifetime=iss.max_token_lifetime,
            require_jti=iss.require_jti,
            profile=iss.profile,
            profile_options=options,
            trusted_delegation=iss.trusted_delegation,
        )
        trusted.append(TrustedIssuer(policy, issuer_keys(iss, clock, metrics)))
    if keyring is not None:
        own = IssuerPolicy(
            name=SELF_ISSUER,
            issuer=settings.issuer,
            audiences=frozenset(),
            algorithms=frozenset(SIGNING_ALGORITHMS),
            token_types=frozenset({TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT}),
            # Only our RFC 9068 access tokens, never anything else we might sign.
            typ=frozenset({"at+jwt"}),
            # Every token we issue has a jti; revocation (RFC 7009) is looked up by it.
            require_jti=True,
            check_audience=False,
        )
        trusted.append(TrustedIssuer(own, OwnTokenKeys(keyring, clock)))
    return IssuerDirectory(trusted)


def build_token_reviewers(settings: Settings, metrics: Metrics | None = None) -> dict[str, TokenReviewer]:
    reviewers: dict[str, TokenReviewer] = {
        iss.name: HttpTokenReviewer(
            iss.token_review_url, token_file=iss.token_review_token_file, ca_file=iss.token_review_ca_file
        )
        for iss in settings.issuers
        if iss.token_review_url
    }
    if metrics is not None:
        reviewers = {name: CountedTokenReviewer(r, metrics, name) for name, r in reviewers.items()}
    return reviewers


def transmitter_keys(
    t: TransmitterSettings, clock: Callable[[], float], metrics: Metrics | None = None
) -> IssuerKeys:
    if t.jwks_file is not None:
        return FileJWKS(t.jwks_file, algorithms=t.algorithms)
    assert t.jwks_uri is not None
    source = f"transmitter:{t.name}"
    keys = HttpJWKS(
        t.jwks_uri,
        algorithms=t.algorithms,
        max_stale=t.jwks_max_stale,
        clock=clock,
        on_fetch=metrics.jwks_fetch_recorder(source) if metrics else None,
    )
    return CountedIssuerKeys(keys, metrics, "transmitter_keys", source) if metrics else keys


def build_transmitters(
    settings: Settings, clock: Callable[[], float], metrics: Metrics | None = None
) -> list[Transmitter]:
    """The Shared Signals transmitters, each with its key source (RFC 8935 §2)."""
    return [
        Transmitter(
            TransmitterPolicy(
                name=t.name,
                issuer=t.issuer,
                audience=t.audience or settings.issuer,
                algorithms=frozenset(t.algorithms),
                block_duration=t.block_duration,
                max_age=t.max_age,
                subject_issuers=frozenset(t.subject_issuers) if t.subject_issuers is not None else None,
            ),
            transmitter_keys(t, clock, metrics),
        )
        for t in settings.transmitters
    ]


def _client(
    c: ClientSettings, clock: Callable[[], float], metrics: Metrics | None = None
) -> RegisteredClient:
    keys: IssuerKeys | None = None
    if c.auth_method == "private_key_jwt":
        if c.jwks is not None:
            keys = StaticJWKS(dict(c.jwks), algorithms=c.algorithms, source=f"client {c.client_id}")
        elif c.jwks_file is not None:
            keys = FileJWKS(c.jwks_file, algorithms=c.algorithms)
        else:
            assert c.jwks_uri is not None
            source = f"client:{c.client_id}"
            keys = HttpJWKS(
                c.jwks_uri,
                algorithms=c.algorithms,
                clock=clock,
                on_fetch=metrics.jwks_fetch_recorder(source) if metrics else None,
            )
            if metrics is not None:
                keys = CountedIssuerKeys(keys, metrics, "client_keys", source)
    elif not check_hash_format(c.secret_hash or ""):
        raise ConfigurationError(
            f"setting clients.{c.client_id}.secret_hash: not a recognised hash "
            "(make one with `sts clients secret`)"
        )
    return RegisteredClient(c.client_id, c.auth_method, c.secret_hash, keys, frozenset(c.algorithms))


def build_policy(settings: Settings) -> PolicySet:
    return load_policies(
        policy_files(settings.policies_dir),
        issuers=frozenset(i.name for i in settings.issuers) | {SELF_ISSUER},
        clients=frozenset(c.client_id for c in settings.clients),
        max_lifetime=settings.max_lifetime,
        default_lifetime=settings.default_lifetime,
    )


def introspection_endpoint(settings: Settings) -> str:
    return settings.issuer.rstrip("/") + "/introspect"


def revocation_endpoint(settings: Settings) -> str:
    return settings.issuer.rstrip("/") + "/revoke"


def build_metadata(settings: Settings, policy: PolicySet) -> dict[str, Any]:
    """RFC 8414 §2 metadata; ``issuer`` is exactly the configured issuer.

    §3.2: a member with zero elements is left out, never sent as ``[]``: so no
    ``code_challenge_methods_supported`` (no PKCE: there is no authorization
    endpoint).  ``response_types_supported`` is REQUIRED by §2 all the same;
    it holds ``none`` (the registered response type under which the
    authorization endpoint issues nothing), which is what a server without an
    authorization endpoint supports, and what clients that validate metadata
    (Authlib) accept.
    """
    methods = ["client_secret_basic", "client_secret_post", "private_key_jwt"]
    # What registered private_key_jwt clients may actually use (RFC 8414 §2).
    assertion_algs = sorted(
        {a for c in settings.clients if c.auth_method == "private_key_jwt" for a in c.algorithms}
        or {"ES256", "ES384", "RS256", "PS256", "EdDSA"}
    )
    if policy.allows_anonymous:
        methods.append("none")
    metadata: dict[str, Any] = {
        "issuer": settings.issuer,
        "token_endpoint": settings.token_endpoint,
        "jwks_uri": settings.jwks_uri,
        "grant_types_supported": [GRANT_TYPE_TOKEN_EXCHANGE],
        "response_types_supported": ["none"],
        "token_endpoint_auth_methods_supported": methods,
        "token_endpoint_auth_signing_alg_values_supported": assertion_algs,
        "dpop_signing_alg_values_supported": sorted(allowed_algorithms(settings.dpop_algorithms)),
        # RFC 9470 §6 / OpenID Connect Discovery: the assurance levels, lowest first (sts.core.assurance).
        "acr_values_supported": list(LEVELS),
        "introspection_endpoint": introspection_endpoint(settings),
        "introspection_endpoint_auth_methods_supported": methods[:3],
        "introspection_endpoint_auth_signing_alg_values_supported": assertion_algs,
        "revocation_endpoint": revocation_endpoint(settings),
        "revocation_endpoint_auth_methods_supported": methods[:3],
        "revocation_endpoint_auth_signing_alg_values_supported": assertion_algs,
        "service_documentation": "https://github.com/workload-sts/workload-sts#readme",
    }
    # RFC 8414 §3.2: "Claims with zero elements MUST be omitted from the response."
    return {name: value for name, value in metadata.items() if value != []}


def build_rate_limiter(
    settings: Settings, engine: Engine, redis_client: redis.Redis | None, metrics: Metrics | None = None
) -> RateLimiter:
    """The configured limits, kept where the rest of the shared state is (Redis, else the database);
    with ``metrics``, the store's failures are counted (``sts_store_errors_total{store="rate_limit"}``)."""
    configured = settings.rate_limits
    endpoints = {
        endpoint: {scope: Limit(s.requests, s.period, s.burst) for scope, s in scopes.items()}
        for endpoint, scopes in configured.limits.items()
        if scopes
    }
    if not configured.enabled or not endpoints:
        return NO_LIMITS
    store: RateLimitStore = (
        RedisRateLimits(redis_client)
        if redis_client is not None
        else SqlRateLimits(rate_limit_engine(engine))
    )
    if metrics is not None:
        store = count_store_errors(store, "rate_limit", metrics)
    return RateLimiter(RateLimitPolicy(endpoints, configured.ipv4_prefix, configured.ipv6_prefix), store)


def dpop_nonce_secret(keys_dir: Path) -> bytes:
    """The secret behind stateless DPoP nonces (RFC 9449 §8), shared by every instance that shares
    the key directory; created on first use, mode 0600."""
    path = keys_dir / "dpop-nonce.secret"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(32))
    data = path.read_bytes()
    if len(data) < 32:
        raise ConfigurationError(f"{path}: DPoP nonce secret is truncated; delete it to create a new one")
    return data


def build_review(
    settings: Settings, engine: Engine, baselines: BaselineStore | None, clock: Callable[[], float]
) -> Any:
    """The review page's blueprint (``review.enabled``), given what it reads.  Nothing here
    needs the database: its tables come with the schema's migrations."""
    from .adapters import audit_query
    from .http import review

    for user in settings.review.users:
        if not check_hash_format(user.password_hash):
            raise ConfigurationError(
                f"setting review.users.{user.username}.password_hash: not a recognised hash "
                "(make one with `sts clients secret --stdin`)"
            )
    config = review.ReviewConfig(
        users={u.username: u.password_hash for u in settings.review.users},
        session_secret=secret_file(settings.keys_dir / "review-session.secret"),
        session_lifetime=settings.review.session_lifetime,
        secure_cookie=settings.issuer.startswith("https://"),
        new_edge_days=settings.review.new_edge_days,
    )
    query = audit_query.AuditQuery(engine, clock=clock)
    return review.blueprint(config, query=query, baselines=baselines, clock=clock)


def secret_file(path: Path) -> bytes:
    """32 random bytes kept in ``path`` (mode 0600), created on first use; shared by every
    instance that shares the directory."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(32))
    data = path.read_bytes()
    if len(data) < 32:
        raise ConfigurationError(f"{path}: secret is truncated; delete it to create a new one")
    return data


def database_pool(settings: Settings) -> sql.PoolOptions:
    """The shape of each of a process's two PostgreSQL pools (see :class:`sql.PoolOptions`).

    By default each pool can give every thread a connection at once (size + overflow =
    threads + 1), and keeps few open while idle (size = threads // 4, at least 1): with
    8 threads, 2 idle and at most 9 per pool.
    """
    size = settings.database_pool_size
    if size is None:
        size = max(1, settings.threads // 4)
    overflow = settings.database_max_overflow
    if overflow is None:
        overflow = max(0, settings.threads + 1 - size)
    return sql.PoolOptions(size=size, max_overflow=overflow, timeout=float(settings.database_pool_timeout))


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
    engine = sql.make_engine(settings.database_url, database_pool(settings))
    try:
        schema = DatabaseSchema(engine, migrate=settings.database_migrate_on_start)
        return wait_for_schema(schema, settings.database_startup_timeout, sleep=sleep, monotonic=monotonic)
    finally:
        engine.dispose()


def create_app(
    settings: Settings, *, clock: Callable[[], float] = time.time, span_exporter: Any = None
) -> Flask:
    """Build the WSGI application for ``settings`` (tests pass their own settings and clock).

    Nothing here needs the database to answer: if it does not, the app starts not ready
    and migrates the schema when it does (see :class:`DatabaseSchema`).  ``span_exporter``
    (tests): an OpenTelemetry span exporter used instead of the configured one.
    """
    logging.getLogger("sts").setLevel(settings.log_level)
    engine = sql.make_engine(settings.database_url, database_pool(settings))
    schema = DatabaseSchema(engine, migrate=settings.database_migrate_on_start)
    schema.attempt()
    keyring = KeyRing.open(
        settings.keys_dir, passphrase=settings.key_passphrase, create_alg=settings.signing_alg, now=clock()
    )
    redis_client: redis.Redis | None = None
    epoch: redis_store.LedgerEpoch | None = None
    replay: ReplayCache
    subject_states: SubjectStateStore
    baselines: BaselineStore
    if settings.store == "redis":
        redis_client = redis_store.connect(settings.redis_url)
        # The durable database remembers the ledger's epoch, so that even a process started after
        # Redis lost its records knows they were lost.
        epoch = redis_store.LedgerEpoch(redis_client, memory=sql.SqlLedgerEpochMemory(engine, clock=clock))
        redis_store.check_at_start(redis_client, epoch, clock())
        replay = redis_store.RedisReplayCache(redis_client, epoch=epoch)
        subject_states = redis_store.RedisSubjectStateStore(redis_client)
        baselines = redis_store.RedisBaselineStore(redis_client)
        revoked: RevokedTokens = redis_store.RedisRevokedTokens(redis_client)
    else:
        replay = sql.SqlReplayCache(engine)
        subject_states = sql.SqlSubjectStateStore(engine, clock=clock)
        baselines = sql.SqlBaselineStore(engine, clock=clock)
        revoked = sql.SqlRevokedTokens(engine, clock=clock)
    policy = build_policy(settings)
    # Every decision whose record is committed is also summarised on the decision log (sts.decision).
    audit = LoggedSqlAuditSink(engine)
    ledger: SingleUseLedger = (
        redis_store.RedisSingleUseLedger(redis_client, audit, epoch=epoch)
        if redis_client is not None
        else sql.SqlSingleUseLedger(audit)
    )
    # Metrics (sts.adapters.metrics): every decision is counted as it is committed, and the
    # failures of the stores, the audit trail and upstream services where the pipeline meets them.
    metrics = Metrics(clock=clock)
    decisions = MeteredAuditSink(audit, metrics)
    ledger = MeteredLedger(ledger, metrics)
    probed_replay = replay  # readiness reports its own failures (/readyz); they are not counted
    replay = count_store_errors(replay, "replay", metrics)
    subject_states = count_store_errors(subject_states, "subject_state", metrics)
    baselines = count_store_errors(baselines, "baseline", metrics)
    revoked = count_store_errors(revoked, "revocation", metrics)
    limits = build_rate_limiter(settings, engine, redis_client, metrics)
    # The pipeline's stages: trace spans (when tracing is on) and the per-stage latency histogram.
    tracing = build_tracing(settings.tracing, span_exporter=span_exporter)
    tracing.add_observer(metrics.observe_stage)
    clients = {c.client_id: _client(c, clock, metrics) for c in settings.clients}

    def current_signer() -> Any:
        keyring.reload_if_changed(clock())
        return keyring.signer()

    exchange = TokenExchange(
        ExchangeConfig(
            issuer=settings.issuer,
            token_endpoint=settings.token_endpoint,
            leeway=settings.leeway,
            max_assertion_lifetime=settings.max_client_assertion_lifetime,
            dpop=DPoPConfig(
                algorithms=allowed_algorithms(settings.dpop_algorithms),
                max_age=settings.dpop_max_age,
                leeway=settings.leeway,
                nonce_secret=dpop_nonce_secret(settings.keys_dir) if settings.dpop_nonce else None,
            ),
        ),
        clients=clients,
        issuers=build_issuers(settings, clock, keyring, metrics),
        policy=policy,
        replay=replay,
        ledger=ledger,
        signer=current_signer,
        audit=decisions,
        clock=clock,
        token_reviewers=build_token_reviewers(settings, metrics),
        subject_states=subject_states,
        baselines=baselines,
        revoked_tokens=revoked,
        limits=limits,
        stages=tracing,
    )
    own_keys = OwnTokenKeys(keyring, clock)
    token_status = TokenStatus(
        verifier=OwnTokenVerifier(
            issuer=settings.issuer,
            algorithms=frozenset(SIGNING_ALGORITHMS),
            keys=own_keys.key_for,
            leeway=settings.leeway,
        ),
        clients=clients,
        client_audiences={c.client_id: c.audiences for c in settings.clients},
        issuer_names=frozenset(i.name for i in settings.issuers),
        replay=replay,
        states=subject_states,
        revoked=revoked,
        audit=decisions,
        assertion_audience=AssertionAudience(settings.issuer, settings.token_endpoint),
        clock=clock,
        leeway=settings.leeway,
        max_assertion_lifetime=settings.max_client_assertion_lifetime,
        endpoint_urls={
            "introspect": introspection_endpoint(settings),
            "revoke": revocation_endpoint(settings),
        },
        limits=limits,
    )
    instance = instance_name()
    store_check = (
        redis_store_check(redis_client, instance)
        if redis_client is not None
        else sql_store_check(probed_replay, instance)
    )
    runtime = Runtime(
        settings=settings,
        engine=engine,
        keyring=keyring,
        replay=replay,
        exchange=exchange,
        policy=policy,
        audit=audit,
        metadata=build_metadata(settings, policy),
        clock=clock,
        subject_states=subject_states,
        baselines=baselines,
        token_status=token_status,
        redis_client=redis_client,
        limits=limits,
        tracing=tracing,
        schema=schema,
        readiness=Readiness(
            schema=schema,
            audit=audit,
            store=store_check,
            store_in_database=redis_client is None,
            keyring=keyring,
            clock=clock,
            instance=instance,
        ),
        metrics=metrics,
    )

    if settings.transmitters:
        runtime.signals = SignalReceiver(
            build_transmitters(settings, clock, metrics),
            issuers=exchange.issuers,
            replay=replay,
            states=subject_states,
            # The exchange's sink: the audit trail, with each decision counted.
            audit=exchange.audit,
            clock=clock,
            leeway=settings.leeway,
            limits=limits,
        )

    def published_jwks() -> dict[str, Any]:
        keyring.reload_if_changed(clock())
        return keyring.public_jwks()

    app = Flask("sts")
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        MAX_FORM_MEMORY_SIZE=settings.max_body_bytes,
        MAX_FORM_PARTS=200,
        JSON_SORT_KEYS=False,
    )
    app.extensions["sts"] = runtime
    app.wsgi_app = BodyLimit(app.wsgi_app, settings.max_body_bytes)  # type: ignore[method-assign]
    responses.install(
        app, trusted_proxies=tuple(ipaddress.ip_network(p, strict=False) for p in settings.trusted_proxies)
    )
    tracing_http.install(app, tracing)
    metrics_http.install(app, metrics.observe_request)
    # An issuer with a path: the endpoints its metadata names live under that path too
    # (and stay at the root, for a proxy that strips the prefix).
    path = urlsplit(settings.issuer).path.rstrip("/")
    mtls_header = settings.mtls_client_cert_header
    app.register_blueprint(
        token_blueprint(
            exchange,
            clock=clock,
            nonce_secret=exchange.config.dpop.nonce_secret if exchange.config.dpop else None,
            database_ready=runtime.database_ready,
            mtls_header=mtls_header,
            issuer_path=path,
        )
    )
    app.register_blueprint(discovery_blueprint(runtime.metadata, published_jwks, issuer_path=path))
    app.register_blueprint(health_blueprint(runtime.health))
    token_status_bp = token_status_blueprint(token_status, mtls_header=mtls_header)
    app.register_blueprint(token_status_bp)
    if path:
        app.register_blueprint(token_status_bp, url_prefix=path, name="token_status_under_issuer_path")
    if runtime.signals is not None:
        app.register_blueprint(events_blueprint(runtime.signals))
    if settings.review.enabled:
        app.register_blueprint(build_review(settings, engine, baselines, clock))
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
    from .settings import load_settings

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)
