"""A misbehaving HTTP server on loopback, for fault injection: what a JWKS or TokenReview endpoint
could do to the service that calls it.

``FaultServer.behaviour`` picks the answer to every request from then on:

* ``Serve(body, status, headers)``: an ordinary answer;
* ``Trickle(body, interval)``: the headers at once, then the body one byte every ``interval``
  seconds (a "slow loris": each socket read succeeds, the whole takes forever);
* ``TrickleHead(interval)``: the status line, then a header line every ``interval`` seconds,
  never ending the head (each socket read succeeds; no body ever starts);
* ``Hang()``: accept, read the request, answer nothing until the server stops;
* ``Reset()``: close the connection without a word.

Built on raw sockets (``socketserver``) so that it can misbehave below HTTP; every handler gives
up when the server is stopped, so a test never leaves a thread writing.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FaultServer", "Hang", "Reset", "Serve", "Trickle", "TrickleHead"]

_REASONS = {200: "OK", 201: "Created", 302: "Found", 404: "Not Found", 500: "Internal Server Error"}


@dataclass(frozen=True)
class Serve:
    body: bytes
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})


@dataclass(frozen=True)
class Trickle:
    body: bytes
    interval: float = 0.05
    status: int = 200


@dataclass(frozen=True)
class TrickleHead:
    interval: float = 0.05


@dataclass(frozen=True)
class Hang:
    pass


@dataclass(frozen=True)
class Reset:
    pass


Behaviour = Serve | Trickle | TrickleHead | Hang | Reset


def _head(status: int, headers: dict[str, str], length: int) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines += [f"Content-Length: {length}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


class FaultServer:
    """Serves ``behaviour`` at every path of ``url``; counts the requests it was sent."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour: Behaviour = behaviour
        self.requests = 0
        self._stopping = threading.Event()
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                connection: socket.socket = self.request
                connection.settimeout(5)
                with contextlib.suppress(OSError):
                    outer._answer(connection)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02})
        self._thread.daemon = True
        self._thread.start()

    def _answer(self, connection: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request and len(request) < 65536:
            data = connection.recv(4096)
            if not data:
                return
            request += data
        self.requests += 1
        behaviour = self.behaviour
        if isinstance(behaviour, Reset):
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        if isinstance(behaviour, Hang):
            self._stopping.wait(30)
            return
        if isinstance(behaviour, TrickleHead):
            connection.sendall(b"HTTP/1.1 200 OK\r\n")
            while not self._stopping.wait(behaviour.interval):
                connection.sendall(b"X-Pad: a\r\n")
            return
        if isinstance(behaviour, Serve):
            connection.sendall(
                _head(behaviour.status, behaviour.headers, len(behaviour.body)) + behaviour.body
            )
            return
        connection.sendall(_head(behaviour.status, {"Content-Type": "application/json"}, len(behaviour.body)))
        for byte in behaviour.body:
            if self._stopping.wait(behaviour.interval):
                return
            connection.sendall(bytes([byte]))

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def elapsed(since: float) -> float:
    return time.monotonic() - since
