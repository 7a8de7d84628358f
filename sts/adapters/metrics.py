"""Prometheus metrics: what the service decided and why, how long each step took, what failed.

The decision core never imports this module (nor ``prometheus_client``).  It is
fed from outside the core:

* every decision, through the audit sink and the single-use ledger it is
  committed by (:mod:`sts.adapters.metered_ports`): one count per audit
  record, by endpoint, outcome, OAuth error and policy rule, and the risk
  signals that fired in it (:meth:`Metrics.decided`);
* request latency per route, from the HTTP layer (:mod:`sts.http.metrics`),
  and per pipeline stage, from the pipeline's stage port
  (:meth:`Metrics.observe_stages`: a request's stages, as the request ends);
* store, audit and upstream failures, by wrapping the ports where the
  pipeline meets them (:mod:`sts.adapters.metered_ports`);
* JWKS fetches, from :class:`sts.adapters.jwks_cache.HttpJWKS`'s ``on_fetch`` hook;
* the signing keys' ages, read from the key ring when scraped
  (:class:`sts.adapters.metrics_exposition.ExpositionCollector`).

Labels are bounded: endpoints, routes, stages, outcomes, errors, stores and
signals are fixed by the code; rules, issuers and clients come from the
configuration.  No label ever holds a subject, a client address or a token.

The per-request observations (about twenty per token exchange: the request,
its stages, its decision) are added up as plain numbers, a request's stages in
one batch, and reach ``prometheus_client``'s values when the registry is
collected, or as each batch is added in multiprocess mode
(:mod:`sts.adapters.metrics_tally`); each labelled child is looked up once
(:class:`_Series`).  Several worker processes, and what a scrape shows:
:mod:`sts.adapters.metrics_exposition`.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..core.audit import AuditRecord
from .metrics_exposition import JWKS_LAST_SUCCESS, multiprocess_enabled
from .metrics_tally import Tally

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

#: The bucket bounds as ``prometheus_client`` keeps them (its last bucket is ``+Inf``).
_REQUEST_BOUNDS = (*REQUEST_BUCKETS, math.inf)
_STAGE_BOUNDS = (*STAGE_BUCKETS, math.inf)


def _label(value: object) -> str:
    return "" if value is None else str(value)[:_LABEL_MAX]


def _histogram_values(child: Any) -> list[Any]:
    """A histogram child's values, in its slots' order: the sum, then each bucket (not cumulative).

    An observation adds to the sum and to the first bucket whose upper bound is at least the
    amount (NaN: to no bucket), as ``Histogram.observe`` does; the count is the buckets' total.
    """
    return [child._sum, *child._buckets]


def _counter_values(child: Any) -> list[Any]:
    return [child._value]


class _Series:
    """The slots (:class:`~sts.adapters.metrics_tally.Tally`) of one metric's labelled children,
    each child looked up once: ``labels()`` validates and takes a lock on every call.

    ``first_slot`` maps what the caller has at hand (the record's fields, a status code) to the
    child's first slot; the label values are made from it only the first time it is seen.
    """

    def __init__(self, metric: Any, tally: Tally, values_of: Callable[[Any], list[Any]]) -> None:
        self.metric = metric
        self.tally = tally
        self.values_of = values_of
        self.first_slot: dict[Hashable, int] = {}
        #: One child, one set of slots, whichever keys lead to it.
        self._by_labels: dict[tuple[str, ...], int] = {}
        self._lock = threading.Lock()

    def new(self, key: Hashable, labels: tuple[str, ...]) -> int:
        """The first slot of the child with ``labels``, found for ``key`` (once per key)."""
        with self._lock:
            slot = self._by_labels.get(labels)
            if slot is None:
                slot = self.tally.slots(self.values_of(self.metric.labels(*labels)))
                self._by_labels[labels] = slot
            self.first_slot[key] = slot
            return slot


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
        self.tally = Tally()
        if reg is not None:
            reg.register(self.tally)  # first: collecting the registry sets the values it keeps
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

        # The request path's metrics, counted in the tally (registered before them, it sets their
        # values when the registry is collected; in multiprocess mode it writes them through).
        tally = self.tally
        self._request_seconds = _Series(self.request_seconds, tally, _histogram_values)
        self._responses = _Series(self.responses, tally, _counter_values)
        self._stage_seconds = _Series(self.stage_seconds, tally, _histogram_values)
        #: Route -> stage -> the first slot of that child of ``stage_seconds``.
        self._stage_slots: dict[str, dict[str, int]] = {}
        self._decisions = _Series(self.decisions, tally, _counter_values)
        self._signals = _Series(self.signals, tally, _counter_values)

    # -- requests and stages --------------------------------------------------------------------

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        latency = self._request_seconds.first_slot.get(route)
        if latency is None:
            latency = self._request_seconds.new(route, (route,))
        key = (route, status)
        response = self._responses.first_slot.get(key)
        if response is None:
            response = self._responses.new(key, (route, str(status)))
        if seconds == seconds:  # not NaN: NaN goes in no bucket
            bucket = latency + 1 + bisect_left(_REQUEST_BOUNDS, seconds)
            self.tally.add((latency, seconds, bucket, 1.0, response, 1.0))
        else:
            self.tally.add((latency, seconds, response, 1.0))

    def observe_stages(self, route: str, timings: Iterable[tuple[str, float]]) -> None:
        """A request's stages, ``(stage, seconds)`` in order, counted together (one lock): the
        observer of the pipeline's stage port (:meth:`sts.adapters.tracing.Tracing.add_stages_observer`)."""
        slots = self._stage_slots.get(route)
        if slots is None:
            slots = self._stage_slots.setdefault(route, {})
        batch: list[Any] = []
        for stage, seconds in timings:
            first = slots.get(stage)
            if first is None:
                first = slots[stage] = self._stage_seconds.new((route, stage), (route, stage))
            if seconds == seconds:
                batch += (first, seconds, first + 1 + bisect_left(_STAGE_BOUNDS, seconds), 1.0)
            else:
                batch += (first, seconds)
        self.tally.add(batch)

    def observe_stage(self, route: str, stage: str, seconds: float) -> None:
        """One stage, ``observer(route, stage, seconds)``."""
        self.observe_stages(route, ((stage, seconds),))

    # -- decisions ------------------------------------------------------------------------------

    def decided(self, record: AuditRecord, *, delivered: bool = True) -> None:
        """Count one decision; ``delivered`` is False when its answer was withheld (not audited)."""
        outcome = record.outcome if delivered or record.outcome in _REFUSALS else "withheld"
        key = (record.endpoint, outcome, record.error, record.rule)
        decision = self._decisions.first_slot.get(key)
        if decision is None:
            decision = self._decisions.new(key, tuple(_label(value) for value in key))
        batch: list[Any] = [decision, 1.0]
        risk = record.details.get("risk")
        if isinstance(risk, (dict, Mapping)):
            mode = risk.get("mode")
            for signal in risk.get("signals") or ():
                # A plain dict is told apart first: the ABC check costs more than the rest.
                if isinstance(signal, (dict, Mapping)) and signal.get("fired"):
                    fired = (signal.get("name"), mode)
                    slot = self._signals.first_slot.get(fired)
                    if slot is None:
                        slot = self._signals.new(fired, (_label(fired[0]), _label(mode)))
                    batch += (slot, 1.0)
        self.tally.add(batch)

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
