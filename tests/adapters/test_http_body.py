"""Bodies from servers we do not control are bounded in time, whatever the server sends."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from sts.adapters.http_body import BodyUnreadable, Outbound, read_body

Answer = Callable[[socket.socket, threading.Event], None]


def _gzip_of_nothing(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nConnection: close\r\n\r\n")
    conn.sendall(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")  # a gzip member's header
    while not stop.wait(0.1):
        conn.sendall(b"\x00\x00\x00\xff\xff")  # an empty stored deflate block: decodes to nothing


def _endless_trailer(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n")
    while not stop.wait(0.1):
        conn.sendall(b"X-Trailer: y\r\n")


def _trickle(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n")
    while not stop.wait(0.1):
        conn.sendall(b" ")


@pytest.fixture
def hostile() -> Iterator[Callable[[Answer], str]]:
    """Starts servers that read a request and then run an answer until the test ends."""
    stop = threading.Event()
    listeners: list[socket.socket] = []

    def start(answer: Answer) -> str:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listeners.append(listener)

        def serve() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return

                def one(conn: socket.socket = conn) -> None:
                    with conn, contextlib.suppress(OSError):
                        conn.recv(65536)
                        answer(conn, stop)

                threading.Thread(target=one, daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}/keys"

    yield start
    stop.set()
    for listener in listeners:
        listener.close()


def _fetch(url: str, timeout: float) -> bytes:
    with requests.Session() as session:
        session.trust_env = False
        with session.get(url, timeout=timeout, stream=True) as response:
            return read_body(response, max_bytes=65536, timeout=timeout)


@pytest.mark.parametrize("answer", [_gzip_of_nothing, _endless_trailer, _trickle])
def test_a_body_that_never_ends_is_refused_at_the_deadline(
    hostile: Callable[[Answer], str], answer: Answer
) -> None:
    """Each socket read brings something, so no read times out; with gzip of empty blocks or an
    endless chunked trailer no ``read1`` returned either, and the reading thread hung for good
    (an outside audit found it in the client library, which reads the same way)."""
    url = hostile(answer)
    outcome: list[BaseException | bytes] = []

    def run() -> None:
        try:
            outcome.append(_fetch(url, 0.5))
        except BaseException as exc:
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    assert outcome, "still reading after 10 s"
    assert time.monotonic() - started < 2.5
    assert isinstance(outcome[0], BodyUnreadable), outcome
    assert "within" in str(outcome[0])


def test_a_hung_server_does_not_keep_the_outbound_slots(hostile: Callable[[Answer], str]) -> None:
    """:class:`Outbound` refuses at once while ``limit`` helpers hang: they must end at their
    deadline, or the server's keys stayed refused until a restart."""
    url = hostile(_gzip_of_nothing)
    outbound = Outbound(limit=1)
    for _ in range(3):
        with pytest.raises(BodyUnreadable) as refused:
            outbound.run(lambda: _fetch(url, 0.3), 5.0)
        assert "earlier requests" not in str(refused.value)


def test_a_whole_body_is_read(hostile: Callable[[Answer], str]) -> None:
    def whole(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\nConnection: close\r\n\r\n{"keys":[]}')

    assert _fetch(hostile(whole), 2.0) == b'{"keys":[]}'
