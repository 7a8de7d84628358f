"""Serving: the WSGI application behind granian, so that slow or idle clients cost no Python thread.

granian (Rust, hyper) owns the sockets.  In each worker process:

* hyper accepts connections and reads request lines and headers in Rust.  A connection whose
  request head (request line and headers) has not fully arrived within ``header_read_timeout``
  seconds is closed; the same deadline ends an idle keep-alive connection.  A head larger than
  ``MAX_HEAD_BYTES`` is refused by hyper (``431``), as are malformed request lines and framing
  headers (``400``): those answers come from the HTTP server, with an empty body, before any
  Python code sees the request.
* At most ``ceil(max_connections / workers)`` connections are open per worker (granian's
  *backpressure*); further connections wait in the kernel's listen queue until one closes.
* The request body is read here, in the worker's event loop (granian's RSGI interface), within
  ``body_read_timeout`` seconds and ``max_body_bytes`` bytes: a slow body holds a coroutine,
  never a thread.  (granian's own WSGI interface would hand the request to a Python thread as
  soon as its headers arrive, and that thread would wait for the body.)
* Only a complete request reaches the Flask application, on one of ``threads`` Python threads
  of the worker.

The event loop is uvloop's.  Every request wakes it from other threads (granian's runtime hands
it the request, then the body; a request thread hands back the answer): the standard library's
loop writes a byte to its self-pipe for each wake-up and reads it back, where libuv coalesces the
wake-ups that arrive before the loop runs (``uv_async_send``, libuv's "uv_async_t" docs).

Each worker listens on its own socket with ``SO_REUSEPORT``: the kernel spreads new connections
over the workers by a hash of the address pair, so a client's connections do not all land on
whichever worker accepted first.  A keep-alive connection stays with its worker; with few
clients a worker that holds more than its share closes one now and then
(:mod:`.adapters.connection_balance`).

Refusals answered here (a body too slow ``408``, chunked ``411``, too large ``413``; a header
value granian cannot pass on ``400``; a failure of this adapter ``500``) are JSON like the
application's, with ``X-Request-Id``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import importlib
import io
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from granian._granian import RSGIProtocolClosed, RSGIProtocolError

from .adapters.client_watch import watched
from .adapters.connection_balance import INTERVAL as BALANCE_INTERVAL
from .adapters.connection_balance import ConnectionBalance, SharedCounts
from .adapters.connection_balance import create_file as create_counts_file
from .adapters.log_format import GRANIAN_LOG_CONFIG
from .adapters.probe_lane import LIVENESS_PATH, PROBE_PATHS, stalled_answer
from .adapters.request_head import host_is_valid
from .adapters.request_threads import ClientGone, QueuedTooLong, RequestThreads, queue_wait
from .adapters.worker_exit import run_worker_exit_hooks
from .adapters.worker_process import die_with_parent, load_or_wait
from .http.responses import answer_before_app
from .serving_limits import MAX_HEAD_BYTES, Limits, within

log = logging.getLogger(__name__)

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
T = TypeVar("T")

__all__ = ["MAX_HEAD_BYTES", "Limits", "WSGIOverRSGI", "per_worker_connections", "serve"]


class _RequestError(Exception):
    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status, self.description = status, description


class WSGIOverRSGI:
    """An RSGI application that reads the whole body asynchronously, then calls a WSGI app in a thread pool.

    A request body must come with ``Content-Length`` (a chunked one is answered ``411``), of at
    most ``max_body_bytes`` (else ``413``, unread), received in full within ``body_read_timeout``
    (else ``408``).  A body cut short by the client is dropped with its connection, unanswered.

    The environ follows PEP 3333: ``PATH_INFO`` is the percent-decoded path as latin-1, and headers
    whose name holds an underscore are dropped, since ``X_Client_Cert`` would otherwise become the
    same variable as the ``X-Client-Cert`` a proxy sets.  Repeated headers are joined with ``,``.
    """

    def __init__(
        self,
        app: WSGIApp,
        limits: Limits,
        request_id: Callable[[str], str] | None = None,
        counts_file: str | None = None,
    ) -> None:
        self.app, self.limits, self.request_id = app, limits, request_id or _request_id
        self._threads: RequestThreads | None = None
        #: The health probes' own thread (:mod:`.adapters.probe_lane`).
        self._probes: RequestThreads | None = None
        #: The workers' shared connection counts (several workers), see :mod:`.adapters.connection_balance`.
        self.counts_file = counts_file
        self._balance: ConnectionBalance | None = None

    # -- RSGI hooks (granian calls these in the worker) --------------------------------------------

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._threads = self._request_threads(loop)
        self._probes = RequestThreads(loop, 1, queue_timeout=self.limits.queue_timeout)
        if self.counts_file is not None:
            self._balance = ConnectionBalance(SharedCounts(self.counts_file))
            loop.call_later(BALANCE_INTERVAL, self._rebalance, loop)

    def _request_threads(self, loop: asyncio.AbstractEventLoop) -> RequestThreads:
        limits = self.limits
        return RequestThreads(loop, limits.threads, limits.active_threads, queue_timeout=limits.queue_timeout)

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        for threads in (self._threads, self._probes):
            if threads is not None:
                threads.shutdown()
        # What must be done before the worker exits, which granian does with os._exit (no atexit).
        run_worker_exit_hooks()
        if self._balance is not None:
            self._balance.counts.close()
            self._balance = None

    def _rebalance(self, loop: asyncio.AbstractEventLoop) -> None:
        balance = self._balance
        if balance is None:
            return
        try:
            balance.tick()
        except Exception:  # a shared count is an optimisation, never the worker's end
            log.exception("connection balance: could not share this worker's count")
        loop.call_later(BALANCE_INTERVAL, self._rebalance, loop)

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        if scope.proto != "http":
            return
        arrived = time.perf_counter()
        try:
            body = await self._read_body(scope, proto)
        except _RequestError as exc:
            self._error(scope, proto, exc.status, exc.description, close=True, started=arrived)
            return
        except (ConnectionError, RSGIProtocolClosed, RSGIProtocolError):
            # The client ended its side before the body it announced (a half-close) or hung up:
            # answered all the same, since after a half-close it may still read (granian sends a
            # bare 500 for a request left unanswered); to a closed connection nothing is sent.
            log.debug("request body not received: the client closed the connection")
            with contextlib.suppress(RSGIProtocolClosed, RSGIProtocolError, ConnectionError, RuntimeError):
                ended = "The request body ended before its Content-Length."
                self._error(scope, proto, 400, ended, close=True, started=arrived)
            return
        try:
            if self._threads is None:  # called without __rsgi_init__ (not by granian)
                self._threads = self._request_threads(asyncio.get_running_loop())
            threads = self._threads
            if scope.path in PROBE_PATHS and self._probes is not None:
                stalled = threads.stalled_for()
                if scope.path == LIVENESS_PATH and stalled > self.limits.liveness_stall:
                    log.error("liveness: the request threads have finished nothing for %.0f s", stalled)
                    status, headers, payload = stalled_answer()
                    request_id = self.request_id(", ".join(scope.headers.get_all("x-request-id")))
                    proto.response_bytes(status, [*headers, ("X-Request-Id", request_id)], payload)
                    return
                threads = self._probes
            status, headers, payload = await watched(threads, threads.run(self._call, scope, body), proto)
        except QueuedTooLong:
            # Every request thread was busy that long: refused before the application, not run
            # after the client may have gone (it is not audited: no decision was made).
            busy = "The server is busy; retry later."
            self._error(scope, proto, 503, busy, error="temporarily_unavailable", started=arrived)
            return
        except ClientGone:
            # Hung up while its request waited for a thread: not run; logged as nginx logs it (499).
            with contextlib.suppress(RSGIProtocolClosed, RSGIProtocolError, ConnectionError, RuntimeError):
                self._error(scope, proto, 499, "The client closed the connection.", started=arrived)
            return
        except Exception:
            log.exception("the request could not be handed to the application")
            self._error(scope, proto, 500, "The server could not complete the request.", error="server_error")
            return
        if self._balance is not None and self._balance.after_request(scope.client, scope.http_version):
            headers = [*headers, ("connection", "close")]  # to even out the workers' connections
        proto.response_bytes(status, headers, payload)

    # -- the body, read in the event loop ----------------------------------------------------------

    async def _read_body(self, scope: Any, proto: Any) -> bytes:
        headers = scope.headers
        names = headers.keys()
        if len(names) != len({name for name, _ in headers.items()}):
            # granian leaves out a header whose value is not visible ASCII; refuse rather than
            # act on a request without it (an Authorization, a DPoP proof, a client certificate).
            raise _RequestError(400, "A header value is not valid.")
        if not host_is_valid(headers.get_all("host"), scope.http_version):
            raise _RequestError(400, "The request needs one valid Host header.")
        if len(headers.get_all("content-type")) > 1:
            # RFC 9110 §8.3: one media type per message; of two, an intermediary and this service
            # could each act on a different one.
            raise _RequestError(400, "The request may have only one Content-Type header.")
        if "transfer-encoding" in names:
            # RFC 9110 §15.5.12: a chunked body has no length to check before it is read, and a
            # truncated one cannot be told from a complete one here.  (With both framings hyper
            # has already dropped Content-Length, RFC 9112 §6.3.)
            raise _RequestError(411, "The request body needs a Content-Length.")
        length_header = headers.get("content-length")
        if length_header is None:
            return b""  # RFC 9112 §6.3: no Content-Length and no Transfer-Encoding, no body
        # hyper has checked the framing (RFC 9112 §6.3): one valid decimal length.
        length = int(length_header)
        if length > self.limits.max_body_bytes:
            raise _RequestError(413, "The request body is too large.")
        if length == 0:
            return b""
        try:
            # Raises if the client goes away first: a truncated body never reaches the app.
            body = bytes(await within(proto(), self.limits.body_read_timeout))
        except TimeoutError:
            raise _RequestError(408, "The request body was not received in time.") from None
        if len(body) != length:
            raise ConnectionError("request body shorter than its Content-Length")
        return body

    # -- the WSGI call, in a thread ----------------------------------------------------------------

    def _environ(self, scope: Any, body: bytes) -> dict[str, Any]:
        server_host, _, server_port = scope.server.rpartition(":")
        client_host, _, client_port = scope.client.rpartition(":")
        environ: dict[str, Any] = {
            "REQUEST_METHOD": scope.method,
            "SCRIPT_NAME": "",
            # PEP 3333: native strings hold the bytes as latin-1.
            "PATH_INFO": scope.path.encode("utf-8").decode("latin-1"),
            "QUERY_STRING": scope.query_string,
            "SERVER_NAME": server_host.strip("[]"),
            "SERVER_PORT": server_port,
            "SERVER_PROTOCOL": "HTTP/" + scope.http_version,
            "REMOTE_ADDR": client_host.strip("[]"),
            "REMOTE_PORT": client_port,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": scope.scheme,
            "wsgi.input": io.BytesIO(body),
            "wsgi.input_terminated": True,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "sts.queued_seconds": queue_wait(),  # (sts.http.responses.QUEUED, for the access log)
        }
        for name, value in scope.headers.items():
            if "_" in name:
                continue
            if name in ("content-type", "content-length"):
                environ[name.upper().replace("-", "_")] = value
                continue
            key = "HTTP_" + name.upper().replace("-", "_")
            environ[key] = f"{environ[key]},{value}" if key in environ else value
        return environ

    def _call(self, scope: Any, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        environ = self._environ(scope, body)
        started: list[Any] = []
        chunks: list[bytes] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if exc_info is not None and started:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [status, headers]
            return chunks.append

        result = self.app(environ, start_response)
        try:
            chunks.extend(chunk for chunk in result if chunk)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status, headers = started
        return int(status.split(" ", 1)[0]), list(headers), b"".join(chunks)

    def _error(
        self,
        scope: Any,
        proto: Any,
        status: int,
        description: str,
        *,
        error: str = "invalid_request",
        close: bool = False,
        started: float | None = None,
    ) -> None:
        headers, body = answer_before_app(
            status,
            description,
            error=error,
            # Its values joined, as the application reads them: a repeated one is no acceptable id
            # (answers given here echoed the first; an outside audit).
            request_id=self.request_id(", ".join(scope.headers.get_all("x-request-id"))),
            close=close,
            client=scope.client.rpartition(":")[0].strip("[]") or "-",
            method=scope.method,
            started=started,
        )
        proto.response_bytes(status, headers, body)


def _request_id(incoming: str) -> str:
    return str(uuid.uuid4())


def per_worker_connections(max_connections: int, workers: int) -> int:
    return max(1, math.ceil(max_connections / workers))


def serve(
    load_app: Callable[[], WSGIApp],
    *,
    host: str,
    port: int,
    workers: int,
    limits: Limits,
    log_level: str = "INFO",
    request_id: Callable[[str], str] | None = None,
) -> None:
    """Serve the WSGI app that ``load_app`` builds (once in each worker) until SIGTERM or SIGINT.

    On SIGTERM the workers stop accepting, finish the requests in flight, and
    are killed if they have not within 10 seconds.  A worker that dies is
    replaced.
    """
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.http import HTTP1Settings
    from granian.log import LogLevels
    from granian.server import Server

    server = Server(
        "sts",  # a label: the application comes from the loader below
        address=host,
        port=port,
        interface=Interfaces.RSGI,
        # Named, not granian's "auto", which takes whichever loop package happens to be installed.
        loop=Loops.uvloop,
        workers=workers,
        http=HTTPModes.http1,
        websockets=False,
        backpressure=per_worker_connections(limits.max_connections, workers),
        http1_settings=HTTP1Settings(
            header_read_timeout=int(limits.header_read_timeout * 1000),
            keep_alive=True,
            max_buffer_size=MAX_HEAD_BYTES,
        ),
        log_level=LogLevels(log_level.lower()),
        log_dictconfig=GRANIAN_LOG_CONFIG,
        log_access=False,  # the application logs its requests, without raw paths or query strings
        respawn_failed_workers=True,
        workers_kill_timeout=10,
    )
    # Several workers share their counts of active connections (one file per server).
    counts_file = None
    if workers > 1:
        try:
            counts_file = create_counts_file()
        except OSError as exc:
            log.warning("connections are not balanced over the workers: %s", exc)
    try:
        loader = _Loader(load_app, limits, request_id, counts_file, parent=os.getpid())
        server.serve(target_loader=loader, wrap_loader=False)
    finally:
        if counts_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(counts_file)


@dataclass(frozen=True)
class _Loader:
    """Builds the RSGI application in a worker (a picklable value, for any process start method)."""

    load_app: Callable[[], WSGIApp]
    limits: Limits
    request_id: Callable[[str], str] | None
    counts_file: str | None = None
    #: The server's main process (the workers' parent), as it was when it started them.
    parent: int | None = None

    def __call__(self) -> Any:  # granian types its loaders as returning callables
        die_with_parent(self.parent)
        app = WSGIOverRSGI(load_or_wait(self.load_app), self.limits, self.request_id, self.counts_file)
        # What start-up built (keys, compiled policies, modules) lives as long as the worker: out
        # of the collector's sight, so that a full collection no longer walks it on a request
        # thread (``gc.freeze``, https://docs.python.org/3/library/gc.html#gc.freeze).
        gc.collect()
        gc.freeze()
        return app


def _import_app(target: str) -> WSGIApp:
    module_name, _, attribute = target.partition(":")
    app: WSGIApp = getattr(importlib.import_module(module_name), attribute)
    return app


def main(argv: list[str] | None = None) -> None:
    """``python -m sts.serving MODULE:APP``: serve any WSGI app exactly as ``sts serve`` does.

    For measurements that must compare like with like (the benchmark's floor).
    """
    parser = argparse.ArgumentParser(prog="python -m sts.serving", description=main.__doc__)
    parser.add_argument("app", help="MODULE:ATTRIBUTE of a WSGI application")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--active-threads", type=int, default=1)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    serve(
        functools.partial(_import_app, args.app),
        host=args.host,
        port=args.port,
        workers=args.workers,
        limits=Limits(threads=args.threads, active_threads=args.active_threads),
        log_level=args.log_level,
    )


if __name__ == "__main__":
    main()
