"""Prometheus metrics: what the service decided and why, how long each step took, what failed.

The decision core never imports this module (nor ``prometheus_client``).  It is
fed from outside the core:

* every decision, through the audit sink and the single-use ledger it is
  committed by (:class:`MeteredAuditSink`, :class:`MeteredLedger`): one count
  per audit record, by endpoint, outcome, OAuth error and policy rule, and the
  risk signals that fired in it;
* request latency per route, from the HTTP layer (:mod:`sts.http.metrics`),
  and per pipeline stage, from the pipeline's stage port
  (:meth:`Metrics.observe_stage`, an ``observer(route, stage, seconds)``);
* store, audit and upstream failures, by wrapping the ports where the
  pipeline meets them (:func:`count_store_errors`, :class:`CountedIssuerKeys`,
  :class:`CountedTokenReviewer`);
* JWKS fetches, from :class:`sts.adapters.jwks_cache.HttpJWKS`'s ``on_fetch`` hook;
* the signing keys' ages, read from the key ring when scraped
  (:class:`ExpositionCollector`).

Labels are bounded: endpoints, routes, stages, outcomes, errors, stores and
signals are fixed by the code; rules, issuers and clients come from the
configuration.  No label ever holds a subject, a client address or a token.

Several worker processes
------------------------

``sts serve`` runs several worker processes, and each counts what it serves.
With ``metrics_listen`` set it puts ``prometheus_client`` in multiprocess mode
(:func:`enable_multiprocess`): every worker writes its values to files in a
directory private to the instance, and the listener, one per instance in the
``sts serve`` process itself, adds them up when scraped (counters and
histograms are summed; the values of a worker that died are kept, so totals
never go back).  Gauges describing a worker's caches count only workers still
alive (files of dead workers are swept at each scrape,
:func:`prometheus_client.multiprocess.mark_process_dead`).  Each instance is
its own scrape target; sum across instances in PromQL.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    make_wsgi_app,
    values,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from ..core.audit import AuditRecord
from ..core.ports import (
    AlreadyUsed,
    AuditSink,
    AuditUnavailable,
    BaselineUpdate,
    IssuerKeys,
    KeysUnavailable,
    SingleUse,
    SingleUseLedger,
    StoreUnavailable,
    TokenReviewer,
    TokenReviewUnavailable,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from joserfc.jwk import Key

    from sts.core.key_rotation import KeyEntry

log = logging.getLogger(__name__)

#: The variable ``prometheus_client`` reads to choose multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

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

JWKS_LAST_SUCCESS = "sts_jwks_last_success_timestamp_seconds"
JWKS_LAST_SUCCESS_AGE = "sts_jwks_last_success_age_seconds"

T = TypeVar("T")


def _label(value: object) -> str:
    return "" if value is None else str(value)[:_LABEL_MAX]


class _Children:
    """The label children of one metric, each looked up once: ``labels()`` validates and takes a
    lock on every call, which doubled the cost of an observation on the request path."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.cache: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self.cache.get(values)
        if child is None:
            child = self.cache[values] = self.metric.labels(*values)
        return child


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

        self._request_seconds = _Children(self.request_seconds)
        self._responses = _Children(self.responses)
        self._stage_seconds = _Children(self.stage_seconds)
        self._decisions = _Children(self.decisions)

    # -- requests and stages --------------------------------------------------------------------

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self._request_seconds(route).observe(seconds)
        self._responses(route, str(status)).inc()

    def observe_stage(self, route: str, stage: str, seconds: float) -> None:
        """A stage observer, ``observer(route, stage, seconds)``, for the pipeline's stage port."""
        self._stage_seconds(route, stage).observe(seconds)

    # -- decisions ------------------------------------------------------------------------------

    def decided(self, record: AuditRecord, *, delivered: bool = True) -> None:
        """Count one decision; ``delivered`` is False when its answer was withheld (not audited)."""
        outcome = record.outcome if delivered or record.outcome in _REFUSALS else "withheld"
        self._decisions(
            _label(record.endpoint), _label(outcome), _label(record.error), _label(record.rule)
        ).inc()
        risk = record.details.get("risk")
        if isinstance(risk, Mapping):
            mode = _label(risk.get("mode"))
            for signal in risk.get("signals") or ():
                if isinstance(signal, Mapping) and signal.get("fired"):
                    self.signals.labels(_label(signal.get("name")), mode).inc()

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


# -- the ports, counted --------------------------------------------------------------------------


class MeteredAuditSink:
    """An :class:`~sts.core.ports.AuditSink` that counts each decision written through it."""

    def __init__(self, inner: AuditSink, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics

    def write(self, record: AuditRecord) -> None:
        try:
            self.inner.write(record)
        except AuditUnavailable:
            self.metrics.audit_failed(record)
            self.metrics.decided(record, delivered=False)
            raise
        self.metrics.decided(record)


class MeteredLedger:
    """A :class:`~sts.core.ports.SingleUseLedger` that counts the decisions it commits and its failures.

    A grant whose commit is refused as a concurrent use (:class:`AlreadyUsed`) is not counted
    here: the pipeline records it again, as a refusal, through the audit sink.
    """

    def __init__(self, inner: SingleUseLedger, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics

    def reserve(self, use: SingleUse, now: float) -> SingleUse:
        try:
            return self.inner.reserve(use, now)
        except StoreUnavailable:
            self.metrics.store_failed("ledger", "reserve")
            raise

    def spend(self, use: SingleUse, now: float) -> SingleUse | None:
        try:
            return self.inner.spend(use, now)
        except StoreUnavailable:
            self.metrics.store_failed("replay", "first_use")
            raise

    def commit(
        self,
        record: AuditRecord,
        uses: Sequence[SingleUse],
        now: float,
        baseline: BaselineUpdate | None = None,
    ) -> None:
        try:
            self.inner.commit(record, uses, now, baseline)
        except AlreadyUsed:
            raise
        except AuditUnavailable:
            self.metrics.audit_failed(record)
            self.metrics.decided(record, delivered=False)
            raise
        except StoreUnavailable:
            # The record is committed, but the use could not be confirmed: the token is withheld.
            self.metrics.store_failed("ledger", "commit")
            self.metrics.decided(record, delivered=False)
            raise
        self.metrics.decided(record)

    def cancel(self, uses: Sequence[SingleUse]) -> None:
        self.inner.cancel(uses)


class _StoreErrorCounter:
    """Passes every attribute through to ``inner``; the named operations count StoreUnavailable."""

    def __init__(self, inner: Any, store: str, operations: Iterable[str], metrics: Metrics) -> None:
        self._inner = inner
        for name in operations:
            setattr(self, name, self._counted(getattr(inner, name), store, name, metrics))

    @staticmethod
    def _counted(
        operation: Callable[..., Any], store: str, name: str, metrics: Metrics
    ) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            try:
                return operation(*args, **kwargs)
            except StoreUnavailable:
                metrics.store_failed(store, name)
                raise

        return counted

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


#: The operations of each store port (sts.core.ports) whose failures are counted.
STORE_OPERATIONS: Mapping[str, tuple[str, ...]] = {
    "replay": ("first_use", "release"),
    "subject_state": ("get", "put", "update"),
    "baseline": ("load", "save"),
    "revocation": ("revoke", "revoked"),
    "rate_limit": ("acquire",),
}


def count_store_errors(inner: T, store: str, metrics: Metrics) -> T:
    """``inner`` (a store port) with its :class:`StoreUnavailable` failures counted as ``store``."""
    counted: T = _StoreErrorCounter(inner, store, STORE_OPERATIONS[store], metrics)  # type: ignore[assignment]
    return counted


class CountedIssuerKeys:
    """An :class:`~sts.core.ports.IssuerKeys` whose :class:`KeysUnavailable` failures are counted."""

    def __init__(self, inner: IssuerKeys, metrics: Metrics, kind: str, source: str) -> None:
        self.inner = inner
        self.metrics = metrics
        self.kind = kind
        self.source = source

    def key_for(self, kid: str | None, alg: str) -> Key:
        try:
            return self.inner.key_for(kid, alg)
        except KeysUnavailable:
            self.metrics.upstream_failed(self.kind, self.source)
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class CountedTokenReviewer:
    """A :class:`~sts.core.ports.TokenReviewer` whose failures to reach the cluster are counted."""

    def __init__(self, inner: TokenReviewer, metrics: Metrics, source: str) -> None:
        self.inner = inner
        self.metrics = metrics
        self.source = source

    def review(self, token: str, audiences: tuple[str, ...]) -> str | None:
        try:
            return self.inner.review(token, audiences)
        except TokenReviewUnavailable:
            self.metrics.upstream_failed("token_review", self.source)
            raise


# -- multiprocess mode ---------------------------------------------------------------------------


def multiprocess_enabled() -> bool:
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def enable_multiprocess(directory: Path | None = None) -> tuple[Path, bool]:
    """Put this process (and the workers it starts) in multiprocess mode; return ``(directory, owned)``.

    ``directory`` (else ``$PROMETHEUS_MULTIPROC_DIR``) is created if missing and emptied of
    the files of a previous run (``*.db``); without either a private directory is made
    (``0700``), ``owned``: the caller removes it at exit (:func:`remove_directory`).
    Call before any metric is created.
    """
    given = directory or (Path(os.environ[MULTIPROC_ENV]) if os.environ.get(MULTIPROC_ENV) else None)
    if given is None:
        path, owned = Path(tempfile.mkdtemp(prefix="sts-metrics-")), True
    else:
        path, owned = given, False
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
    os.environ[MULTIPROC_ENV] = str(path)
    # prometheus_client chose its value class when first imported: choose again, now.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    return path, owned


def remove_directory(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_dead_processes(directory: Path) -> list[int]:
    """Forget the live gauges of worker processes that have exited (crashed or replaced).

    Their counters and histograms stay: what a worker counted before it died still happened.
    """
    dead = set()
    for name in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        match = _LIVE_GAUGE_FILE.fullmatch(os.path.basename(name))
        if match and not _alive(int(match.group(1))):
            dead.add(int(match.group(1)))
    for pid in dead:
        mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
    return sorted(dead)


# -- exposition ----------------------------------------------------------------------------------


class ExpositionCollector(Collector):
    """What ``/metrics`` shows: the workers' metrics, plus values computed at scrape time.

    * ``directory`` (multiprocess mode): every worker's files, summed; else ``source``, a
      registry of this process.
    * ``sts_jwks_last_success_age_seconds``: seconds since each key source's last successful
      fetch (from ``sts_jwks_last_success_timestamp_seconds``).
    * ``key_entries``: the signing key ring (:meth:`sts.adapters.keyring.KeyRing.entries`),
      read now: ``sts_signing_key_age_seconds`` by state (``active``: since it started
      signing; ``next``: since it was published) and ``sts_signing_keys`` by state.
    """

    def __init__(
        self,
        *,
        directory: Path | None = None,
        source: Collector | None = None,
        key_entries: Callable[[], Sequence[KeyEntry]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (directory is None) == (source is None):
            raise ValueError("give exactly one of directory and source")
        self.directory = directory
        self.source = source
        self.key_entries = key_entries
        self.clock = clock
        # Concurrent scrapes: one sweeps and reads the directory at a time.
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        if self.directory is not None:
            with self._lock:
                sweep_dead_processes(self.directory)
                files = MultiProcessCollector(None, path=str(self.directory))  # type: ignore[no-untyped-call]
                families: Iterable[Metric] = list(files.collect())  # type: ignore[no-untyped-call]
        else:
            assert self.source is not None
            families = self.source.collect()
        for family in families:
            yield family
            if family.name == JWKS_LAST_SUCCESS:
                yield _ages(family, now)
        if self.key_entries is not None:
            yield from _signing_key_families(self.key_entries(), now)


def _ages(timestamps: Metric, now: float) -> Metric:
    age = GaugeMetricFamily(
        JWKS_LAST_SUCCESS_AGE,
        "Seconds since the last successful JWK Set fetch, by key source.",
        labels=("issuer",),
    )
    for sample in timestamps.samples:
        if sample.name == JWKS_LAST_SUCCESS:
            age.add_metric((sample.labels.get("issuer", ""),), max(0.0, now - sample.value))
    return age


def _signing_key_families(entries: Sequence[KeyEntry], now: float) -> Iterator[Metric]:
    ages = GaugeMetricFamily(
        "sts_signing_key_age_seconds",
        "Age of the signing keys: active, since it started signing; next, since it was published.",
        labels=("state",),
    )
    counts = GaugeMetricFamily(
        "sts_signing_keys", "Keys in the signing key ring, by state.", labels=("state",)
    )
    by_state = {"active": 0, "next": 0, "retired": 0}
    for entry in entries:
        by_state[entry.state] = by_state.get(entry.state, 0) + 1
        if entry.state == "active":
            ages.add_metric(("active",), max(0.0, now - (entry.activated_at or entry.created_at)))
        elif entry.state == "next":
            ages.add_metric(("next",), max(0.0, now - entry.created_at))
    for state, count in by_state.items():
        counts.add_metric((state,), count)
    yield ages
    yield counts


def exposition_registry(collector: ExpositionCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


METRICS_PATH = "/metrics"


def metrics_wsgi_app(registry: CollectorRegistry) -> WSGIApplication:
    """``GET /metrics`` (the Prometheus text format, or OpenMetrics when asked); 404 elsewhere."""
    exposition = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"Not found: metrics are at /metrics\n"]
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Content-Type", "text/plain"), ("Allow", "GET, HEAD")])
            return [b"Method not allowed\n"]
        answer: Iterable[bytes] = exposition(environ, start_response)
        return answer

    return app


class _QuietHandler(WSGIRequestHandler):
    """No line on stderr per scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        return None


class MetricsServer:
    """The instance's ``/metrics`` listener: a small threaded HTTP server, in a daemon thread."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

        class Server(ThreadingWSGIServer):
            address_family = family

        self._server: WSGIServer = make_server(
            host, port, metrics_wsgi_app(registry), server_class=Server, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="sts-metrics", kwargs={"poll_interval": 0.5}, daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def prometheus_text(collector: Collector) -> bytes:
    """One scrape of ``collector``, in the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)
