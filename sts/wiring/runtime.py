"""The runtime: everything a request needs, built once per process by ``create_app`` and kept
in ``app.extensions["sts"]`` (for the commands and tests; the blueprints are given their services)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from sqlalchemy import Engine

from ..adapters.keyring import KeyRing
from ..adapters.metrics import Metrics
from ..adapters.readiness import DatabaseSchema, Readiness
from ..adapters.sql.audit_sink import SqlAuditSink
from ..adapters.tracing import Tracing
from ..core.exchange import TokenExchange
from ..core.policy.index import PolicySet
from ..core.ports import BaselineStore, ReplayCache, SubjectStateStore
from ..core.rate_limit import NO_LIMITS, RateLimiter
from ..core.signals.receiver import SignalReceiver
from ..core.token_status import TokenStatus
from ..settings import Settings


@dataclass
class Runtime:
    """Everything a request needs, built once per process."""

    settings: Settings
    engine: Engine
    keyring: KeyRing
    replay: ReplayCache
    exchange: TokenExchange
    policy: PolicySet
    audit: SqlAuditSink
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
