"""Prometheus metrics: what the service decided and why, how long each step took, what failed.

The decision core never imports this module (nor ``prometheus_client``).  It is
fed from outside the core:

* every decision, through the audit sink and the single-use ledger it is
  committed by (:mod:`sts.adapters.metered_ports`): one count per audit
  record, by endpoint, outcome, OAuth error and policy rule, and the risk
  signals that fired in it (:meth:`Metrics.decided`);
* request latency per route, from the HTTP layer (:mod:`sts.http.metrics`),
  and per pipeline stage, from the pipeline's stage port
  (:meth:`Metrics.observe_stage`, an ``observer(route, stage, seconds)``);
* store, audit and upstream failures, by wrapping the ports where the
  pipeline meets them (:mod:`sts.adapters.metered_ports`);
* JWKS fetches, from :class:`sts.adapters.jwks_cache.HttpJWKS`'s ``on_fetch`` hook;
* the signing keys' ages, read from the key ring when scraped
  (:class:`sts.adapters.metrics_exposition.ExpositionCollector`).

Labels are bounded: endpoints, routes, stages, outcomes, errors, stores and
signals are fixed by the code; rules, issuers and clients come from the
configuration.  No label ever holds a subject, a client address or a token.

The per-request observations (about a dozen per token exchange) go straight to
the values of each labelled child, looked up once (:class:`_Children`): what
``prometheus_client``'s ``labels()``, ``observe()`` and ``inc()`` check on
every call holds by construction here.  Several worker processes, and what a
scrape shows: :mod:`sts.adapters.metrics_exposition`.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..core.audit import AuditRecord
from .metrics_exposition import JWKS_LAST_SUCCESS, multiprocess_enabled

#: Whole requests: from a millisecond (a cached JWKS answer) to the 10 s deadlines.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Pipeline stages: most take well under a millisecond; an upstream fetch or a commit can take seconds.
STAGE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

#: Outcomes whose answer stands when their audit record cannot be committed (the others are withheld).
_REFUSALS = frozenset({"refused", "error"})
_LABEL_MAX = 128

#: Records one observation (a histogram) or increment (a counter) on one labelled child.
Record = Callable[[float], None]


def _label(value: object) -> str:
    return "" if value is None else str(value)[:_LABEL_MAX]


def _histogram_observer(child: Any) -> Record:
    """``child.observe`` for the request path: the sum, then the first bucket whose upper bound is
    at least the amount, found by bisection (``observe`` walks the bounds one by one, and checks on
    each call that the child is observable, which a child of ``labels()`` always is).

    Reads ``prometheus_client``'s ``_sum``, ``_buckets`` and ``_upper_bounds``: the test of this
    module compares the result with ``observe`` on every bucket edge, so a change there shows.
    """
    total, buckets, bounds = child._sum, child._buckets, tuple(child._upper_bounds)

    def observe(amount: float) -> None:
        total.inc(amount)
        if not math.isnan(amount):  # ``observe`` counts NaN in no bucket
            buckets[bisect_left(bounds, amount)].inc(1)

    return observe


def _counter_increment(child: Any) -> Record:
    """``child.inc`` for the request path: the value's own ``inc`` (the amounts here are never
    negative, and no exemplars are kept)."""
    increment: Record = child._value.inc
    return increment


class _Children:
    """The labelled children of one metric, each looked up once: ``labels()`` validates and takes a
    lock on every call, which doubled the cost of an observation on the request path.  Each child
    is kept as the function that records on it (:func:`_histogram_observer`,
    :func:`_counter_increment`)."""

    def __init__(self, metric: Any, recorder: Callable[[Any], Record]) -> None:
        self.metric = metric
        self.recorder = recorder
        self.cache: dict[tuple[str, ...], Record] = {}

    def __call__(self, *values: str) -> Record:
        record = self.cache.get(values)
        if record is None:
            record = self.cache[values] = self.recorder(self.metric.labels(*values))
        return record


class Metrics:
    """This process's metrics.

    In multiprocess mode the values go to the instance's metrics directory and
    ``registry`` is None (the listener reads the directory); otherwise they are
    registered in ``registry`` (a fresh one by default: never the global
    registry, so several apps in one process each count their own).
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, clock: Callable[[], float] = time.time):
        self.clock = clock
        reg = None if multiprocess_enabled() else (registry if registry is not None else CollectorRegistry())
        self.registry = reg
        self.decisions = Counter(
            "sts_decisions",
            "Decisions (one per audit record) by endpoint, outcome, OAuth error and policy rule.",
            ("endpoint", "outcome", "error", "rule"),
            registry=reg,
        )
        self.signals = Counter(
            "sts_risk_signals_fired",
            "Risk signals that fired in a token exchange, by signal and the rule's risk mode.",
            ("signal", "mode"),
            registry=reg,
        )
        self.request_seconds = Histogram(
            "sts_http_request_duration_seconds",
            "Time to answer a request, by route rule.",
            ("route",),
            buckets=REQUEST_BUCKETS,
            registry=reg,
        )
        self.responses = Counter(
            "sts_http_responses",
            "Responses by route rule and HTTP status.",
            ("route", "status"),
            registry=reg,
        )
        self.stage_seconds = Histogram(
            "sts_pipeline_stage_duration_seconds",
            "Time spent in each stage of a request's decision pipeline, by route rule and stage.",
            ("route", "stage"),
            buckets=STAGE_BUCKETS,
            registry=reg,
        )
        self.audit_errors = Counter(
            "sts_audit_errors",
            "Audit records that could not be committed, by endpoint and the outcome they recorded.",
            ("endpoint", "outcome"),
            registry=reg,
        )
        self.store_errors = Counter(
            "sts_store_errors",
            "Failed calls to the shared store, by store and operation.",
            ("store", "operation"),
            registry=reg,
        )
        self.upstream_errors = Counter(
            "sts_upstream_errors",
            "Requests that needed an upstream service that could not answer, by kind and configured name.",
            ("kind", "source"),
            registry=reg,
        )
        self.jwks_fetches = Counter(
            "sts_jwks_fetches",
            "JWK Set fetches, by key source (issuer name; client:ID, transmitter:NAME) and result.",
            ("issuer", "result"),
            registry=reg,
        )
        self.jwks_keys = Gauge(
            "sts_jwks_keys",
            "Usable keys in the JWKS cache, by key source (the largest among live workers).",
            ("issuer",),
            registry=reg,
            multiprocess_mode="livemax",
        )
        self.jwks_last_success = Gauge(
            JWKS_LAST_SUCCESS,
            "Unix time of the last successful JWK Set fetch, by key source.",
            ("issuer",),
            registry=reg,
            multiprocess_mode="max",
        )

        self._request_seconds = _Children(self.request_seconds, _histogram_observer)
        self._responses = _Children(self.responses, _counter_increment)
        self._stage_seconds = _Children(self.stage_seconds, _histogram_observer)
        self._decisions = _Children(self.decisions, _counter_increment)
        self._signals = _Children(self.signals, _counter_increment)

    # -- requests and stages --------------------------------------------------------------------

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self._request_seconds(route)(seconds)
        self._responses(route, str(status))(1)

    def observe_stage(self, route: str, stage: str, seconds: float) -> None:
        """A stage observer, ``observer(route, stage, seconds)``, for the pipeline's stage port."""
        self._stage_seconds(route, stage)(seconds)

    # -- decisions ------------------------------------------------------------------------------

    def decided(self, record: AuditRecord, *, delivered: bool = True) -> None:
        """Count one decision; ``delivered`` is False when its answer was withheld (not audited)."""
        outcome = record.outcome if delivered or record.outcome in _REFUSALS else "withheld"
        self._decisions(_label(record.endpoint), _label(outcome), _label(record.error), _label(record.rule))(
            1
        )
        risk = record.details.get("risk")
        if isinstance(risk, (dict, Mapping)):
            mode = _label(risk.get("mode"))
            for signal in risk.get("signals") or ():
                # A plain dict is told apart first: the ABC check costs more than the rest.
                if isinstance(signal, (dict, Mapping)) and signal.get("fired"):
                    self._signals(_label(signal.get("name")), mode)(1)

    def audit_failed(self, record: AuditRecord) -> None:
        self.audit_errors.labels(_label(record.endpoint), _label(record.outcome)).inc()

    def store_failed(self, store: str, operation: str) -> None:
        self.store_errors.labels(store, operation).inc()

    def upstream_failed(self, kind: str, source: str) -> None:
        self.upstream_errors.labels(kind, _label(source)).inc()

    # -- JWKS -----------------------------------------------------------------------------------

    def jwks_fetch_recorder(self, source: str) -> Callable[[bool, int], None]:
        """The ``on_fetch(ok, usable_keys)`` hook of :class:`~sts.adapters.jwks_cache.HttpJWKS` per source."""
        name = _label(source)

        def fetched(ok: bool, usable_keys: int) -> None:
            self.jwks_fetches.labels(name, "success" if ok else "failure").inc()
            self.jwks_keys.labels(name).set(usable_keys)
            if ok:
                self.jwks_last_success.labels(name).set(self.clock())

        return fetched
