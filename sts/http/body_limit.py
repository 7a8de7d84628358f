"""The request-body cap for bodies sent without ``Content-Length`` (chunked transfer coding).

Werkzeug enforces ``MAX_CONTENT_LENGTH`` on a declared ``Content-Length``
(413 before anything is read).  A chunked body (RFC 9112 §7.1) declares no
length: the server decodes it and sets ``wsgi.input_terminated``, and
Werkzeug then reads at most ``MAX_CONTENT_LENGTH`` bytes of it and stops,
without an error.  A form cut there would be parsed as if it were whole,
losing every parameter after the cut (an ``actor_token``, a ``scope``, a
``resource``).

This middleware reads such a body itself, up to one byte more than the cap,
and hands the application a body of known length: the body, when it fits;
else the bytes read, whose declared length then exceeds the cap, so the
endpoint refuses the request as too large (``request.body_too_large``), exactly
as it does for a declared ``Content-Length`` over the cap.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

_CHUNK = 64 * 1024


class BodyLimit:
    """WSGI middleware: a body the server terminates but whose length is not declared (chunked) is
    read here, at most ``limit + 1`` bytes, and passed on with its length."""

    def __init__(self, app: WSGIApplication, limit: int) -> None:
        self.app = app
        self.limit = limit

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("wsgi.input_terminated") and (
            not environ.get("CONTENT_LENGTH") or "HTTP_TRANSFER_ENCODING" in environ
        ):
            try:
                body = self._read(environ["wsgi.input"])
            except Exception:  # noqa: BLE001 - any failure to read the body means there is no body.
                # A malformed chunk (gunicorn raises its own ParseException, not an OSError) or the
                # client went away mid-body: the failure is replayed to the application, which
                # answers it in JSON as it answers a broken body of declared length (Werkzeug's
                # ClientDisconnected: ``request.malformed_body``).  A partial body is never passed
                # on as a whole one.
                environ["wsgi.input"] = _BrokenBody()
                environ["CONTENT_LENGTH"] = "1"
            else:
                environ["wsgi.input"] = io.BytesIO(body)
                environ["CONTENT_LENGTH"] = str(len(body))
            # The body is no longer chunked for the application: Werkzeug ignores Content-Length
            # while Transfer-Encoding says chunked (RFC 9112 §6.3).
            environ.pop("HTTP_TRANSFER_ENCODING", None)
        return self.app(environ, start_response)

    def _read(self, stream: io.BufferedIOBase) -> bytes:
        """Up to ``limit + 1`` bytes: enough to tell a body that fits from one that does not."""
        wanted = self.limit + 1
        parts: list[bytes] = []
        while wanted > 0:
            part = stream.read(min(wanted, _CHUNK))
            if not part:
                break
            parts.append(part)
            wanted -= len(part)
        return b"".join(parts)


class _BrokenBody(io.RawIOBase):
    """A request body that could not be read: every read fails, as the server's read did."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        raise OSError("the request body could not be read")
