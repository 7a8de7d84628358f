"""Reading an HTTP response body from a server we do not control: bounded in size and in time.

Every fetch this service makes on the request path (an issuer's or a
transmitter's JWKS, a client's ``jwks_uri``, Kubernetes TokenReview) must end
quickly whatever the other side does.  ``requests`` bounds the connection and
each *socket read* with ``timeout``, but not the body as a whole: reading a
chunk of *n* bytes loops over socket reads until it has them, so a server that
sends one byte a second (a "slow loris") keeps a 16 KiB read going for hours,
and with it the lock that other requests for the same keys wait on.

:func:`read_body` reads with ``urllib3``'s ``read1``, which returns whatever a
single socket read brought, so the overall deadline is checked after every
read: a body not complete within ``timeout`` seconds (plus at most one socket
timeout) is refused, and so is one longer than ``max_bytes``, declared or not
(counted after any ``Content-Encoding`` is undone, so a compressed body cannot
grow past the limit).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

import requests
import urllib3.exceptions

from .request_threads import waiting

__all__ = ["BodyUnreadable", "Outbound", "read_body"]

T = TypeVar("T")

_READ_SIZE: Final = 16 * 1024
_DIGITS: Final = frozenset("0123456789")


class BodyUnreadable(Exception):
    """The body was too large, too slow, or the connection failed while reading it."""


def read_body(response: requests.Response, *, max_bytes: int, timeout: float) -> bytes:
    """The whole body of a ``stream=True`` response, or raise :class:`BodyUnreadable`.

    ``timeout`` bounds the time from this call until the last byte (each
    socket read is bounded by the request's own timeout); ``max_bytes`` bounds
    the size, checked against ``Content-Length`` before reading and against
    what arrives while reading.
    """
    declared = response.headers.get("Content-Length")
    if declared and set(declared) <= _DIGITS and int(declared) > max_bytes:
        raise BodyUnreadable(f"body of {declared} bytes exceeds the {max_bytes}-byte limit")
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    size = 0
    # Some bodies never let one ``read1`` return, though every socket read brings something: a
    # gzip body of empty deflate blocks (urllib3 reads on while nothing decodes), a chunked body's
    # trailer lines (``http.client`` reads them without limit).  The helper thread of
    # :class:`Outbound` then hung for good and kept its slot: once ``limit`` had, that server's
    # keys were refused until a restart (an outside audit found it in the client library).  A
    # timer shuts the socket down at the deadline, which ends any read.
    watchdog = threading.Timer(timeout, _shut_down, (response,))
    watchdog.daemon = True
    watchdog.start()
    try:
        while True:
            chunk = response.raw.read1(_READ_SIZE, decode_content=True)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise BodyUnreadable(f"body exceeds the {max_bytes}-byte limit")
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise BodyUnreadable(f"body not received within {timeout:.1f}s")
    except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
        if time.monotonic() > deadline:
            raise BodyUnreadable(f"body not received within {timeout:.1f}s") from None
        raise BodyUnreadable(f"reading the body failed: {type(exc).__name__}") from None
    finally:
        watchdog.cancel()
    if time.monotonic() > deadline:  # the end may be the shut-down's, not the body's
        raise BodyUnreadable(f"body not received within {timeout:.1f}s")
    return b"".join(chunks)


def _shut_down(response: requests.Response) -> None:
    """Shut down the socket a streamed response reads from: a read blocked in another thread then
    returns (closing the socket would not wake it).  Found through urllib3's connection, else
    through ``http.client``'s file; when neither is there, nothing is done."""
    raw = response.raw
    sock = getattr(getattr(raw, "_connection", None), "sock", None)
    if sock is None:
        file = getattr(getattr(raw, "_fp", None), "fp", None)
        sock = getattr(getattr(file, "raw", None), "_sock", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class Outbound:
    """Runs each outbound HTTP exchange on a helper thread and waits for it at most a deadline.

    :func:`read_body` bounds the body, but not what comes before it: ``requests`` bounds each
    socket read, so a server that sends its status line and headers a byte (or a header line)
    a second, or ``100 Continue`` after ``100 Continue``, held the request thread for as long as
    it liked (an outside audit held ``/token`` for 90 s, and with 8 such requests the whole
    worker).  Here the caller stops waiting at ``seconds`` and raises :class:`BodyUnreadable`;
    the helper (a daemon thread: it never holds up the process's exit) ends when the server
    lets it, each of its reads still bounded by the request's own timeout.  At most ``limit``
    helpers run at once: while that many hang, further calls fail at once instead of adding
    threads.
    """

    def __init__(self, limit: int) -> None:
        self._slots = threading.BoundedSemaphore(limit)

    def run(self, call: Callable[[], T], seconds: float) -> T:
        if not self._slots.acquire(blocking=False):
            raise BodyUnreadable("earlier requests to this server have not ended")
        done = threading.Event()
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["result"] = call()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                outcome["error"] = exc
            finally:
                self._slots.release()
                done.set()

        threading.Thread(target=work, name="sts-outbound", daemon=True).start()
        with waiting():  # outside the process: another request runs meanwhile
            ended = done.wait(seconds)
        if not ended:
            raise BodyUnreadable(f"no complete answer within {seconds:.1f}s")
        if "error" in outcome:
            raise outcome["error"]
        result: T = outcome["result"]
        return result
