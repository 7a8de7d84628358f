"""Serving the metrics: prometheus_client's multiprocess mode, what a scrape shows, the listener.

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

What is counted is defined in :mod:`sts.adapters.metrics`.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import ipaddress
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app, values
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from sts.core.key_rotation import KeyEntry

#: The variable ``prometheus_client`` reads to choose multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

JWKS_LAST_SUCCESS = "sts_jwks_last_success_timestamp_seconds"
JWKS_LAST_SUCCESS_AGE = "sts_jwks_last_success_age_seconds"


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
        return answer(environ, _named(start_response))

    def answer(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"Not found: metrics are at /metrics\n"]
        method = environ.get("REQUEST_METHOD")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Content-Type", "text/plain"), ("Allow", "GET, HEAD")])
            return [b"Method not allowed\n"]
        if method == "HEAD":
            # RFC 9110 §9.3.2: GET's status and headers, with the Content-Length GET sends, and no
            # body (prometheus_client answers HEAD 405, and wsgiref would send a body).
            answered: list[Any] = []
            body = b"".join(
                exposition({**environ, "REQUEST_METHOD": "GET"}, lambda *answer: answered.extend(answer))
            )
            status, headers = answered[0], list(answered[1])
            if not any(name.lower() == "content-length" for name, _ in headers):
                headers.append(("Content-Length", str(len(body))))
            start_response(status, headers)
            return []
        answered_body: Iterable[bytes] = exposition(environ, start_response)
        return answered_body

    return app


def _named(start_response: StartResponse) -> StartResponse:
    """``start_response`` with a ``Server`` header naming no software version (wsgiref's own names
    its version and Python's: ``WSGIServer/0.2 CPython/3.11.7``, an outside audit)."""

    def named(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        return start_response(status, [*headers, ("Server", SERVER_NAME)], exc_info)

    return named


#: The ``Server`` header of every answer: no software version.
SERVER_NAME = "sts"
#: Connections the listener serves at once (one thread each); more are closed at once.
MAX_METRICS_CONNECTIONS = 64
#: Of those, connections one client may hold at once, counted per IPv4 address and per IPv6 /64
#: (one host's addresses): one client sending its requests a byte at a time held every slot, and
#: no scrape was answered for as long as it liked (an outside audit; a re-check then used four
#: addresses).  A scraper uses one; keeping the whole listener busy now takes sixteen networks.
MAX_METRICS_CONNECTIONS_PER_ADDRESS = 4
#: Seconds the listener waits for each read of a request before it drops the connection.
METRICS_READ_TIMEOUT = 5.0
#: Seconds a connection may last, whatever it sends: a scrape takes milliseconds, and a scraper
#: that keeps its connection open connects again for its next scrape.
METRICS_CONNECTION_DEADLINE = 10.0


def _client_network(host: str) -> str:
    """What one client's connections are counted under: its IPv4 address (an IPv4-mapped one's too),
    or its IPv6 /64."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class _QuietHandler(WSGIRequestHandler):
    """No line on stderr per scrape; a read that waits :data:`METRICS_READ_TIMEOUT` drops the
    connection (socketserver's ``StreamRequestHandler.timeout``), and so does the end of
    :data:`METRICS_CONNECTION_DEADLINE`, however the client sends (a byte every few seconds)."""

    timeout = METRICS_READ_TIMEOUT

    def setup(self) -> None:
        super().setup()
        self._deadline = threading.Timer(METRICS_CONNECTION_DEADLINE, self._expire)
        self._deadline.daemon = True
        self._deadline.start()

    def _expire(self) -> None:
        with contextlib.suppress(OSError):  # a read blocked in the handler's thread returns
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self._deadline.cancel()
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def version_string(self) -> str:  # the Server header of http.server's own errors (a bad request line)
        return SERVER_NAME


class MetricsServer:
    """The instance's ``/metrics`` listener: a small threaded HTTP server, in a daemon thread.

    It runs in the ``sts serve`` process that supervises the workers, so it is bounded: at most
    :data:`MAX_METRICS_CONNECTIONS` connections at once (one thread each; one more is closed at
    once), :data:`MAX_METRICS_CONNECTIONS_PER_ADDRESS` of them from one address (an IPv6 /64), each dropped
    after a read waits :data:`METRICS_READ_TIMEOUT` and after :data:`METRICS_CONNECTION_DEADLINE`
    in all.  Before, idle or
    half-sent connections each held a thread and a descriptor of that process for ever."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        slots = threading.BoundedSemaphore(MAX_METRICS_CONNECTIONS)
        by_address: collections.Counter[str] = collections.Counter()
        counting = threading.Lock()

        def admit(address: str) -> bool:
            with counting:
                if by_address[address] >= MAX_METRICS_CONNECTIONS_PER_ADDRESS:
                    return False
                if not slots.acquire(blocking=False):
                    return False
                by_address[address] += 1
                return True

        def leave(address: str) -> None:
            with counting:
                by_address[address] -= 1
                if by_address[address] <= 0:
                    del by_address[address]
            slots.release()

        class Server(ThreadingWSGIServer):
            address_family = family
            request_queue_size = 64  # socketserver's 5 drops the handshakes of a burst of scrapers

            def handle_error(self, request: Any, client_address: Any) -> None:
                if not isinstance(sys.exc_info()[1], OSError):  # a slow or vanished client is no error
                    super().handle_error(request, client_address)

            def process_request(self, request: Any, client_address: Any) -> None:
                client = _client_network(client_address[0])
                if not admit(client):
                    self.shutdown_request(request)
                    return
                try:
                    super().process_request(request, client_address)
                except BaseException:
                    leave(client)
                    raise

            def process_request_thread(self, request: Any, client_address: Any) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    leave(_client_network(client_address[0]))

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
        # ``shutdown`` waits for ``serve_forever`` to stop: a listener never started (``sts serve``
        # failing before it starts it, on a bad policy, say) would wait for ever (an outside audit
        # had such a start hang silently instead of printing its error).
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        if self._thread.ident is not None:
            self._thread.join(timeout=5)


def prometheus_text(collector: Collector) -> bytes:
    """One scrape of ``collector``, in the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)
