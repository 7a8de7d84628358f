"""A TCP proxy to a real server that can be frozen: a server process stopped while its host answers.

Frozen, it still accepts connections (the kernel of a stopped server completes the handshake)
and takes what is sent, but passes nothing on either way until it is thawed, as ``SIGSTOP`` or
``docker pause`` leaves a server.  The shared PostgreSQL server itself is never stopped.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


class FrozenProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._running = threading.Event()
        self._running.set()
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self._running.clear()

    def thaw(self) -> None:
        self._running.set()

    def close(self) -> None:
        self._closed = True
        self._running.set()
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            self._sockets += [client, server]
            threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                self._running.wait()  # frozen: what came in is held, as a stopped process holds it
                if not data or self._closed:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def frozen_proxy(upstream: tuple[str, int]) -> Iterator[FrozenProxy]:
    proxy = FrozenProxy(upstream)
    try:
        yield proxy
    finally:
        proxy.close()
