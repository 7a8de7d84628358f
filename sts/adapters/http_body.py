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

import time
from typing import Final

import requests
import urllib3.exceptions

__all__ = ["BodyUnreadable", "read_body"]

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
        raise BodyUnreadable(f"reading the body failed: {type(exc).__name__}") from None
    return b"".join(chunks)
