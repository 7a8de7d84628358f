"""What one worker of ``sts serve`` allows a client (:mod:`sts.serving`)."""

from __future__ import annotations

from dataclasses import dataclass

#: The largest request head (request line and headers) accepted; hyper answers 431 above it.
MAX_HEAD_BYTES = 16384


@dataclass(frozen=True)
class Limits:
    """What one worker allows a client."""

    threads: int = 8
    #: Threads that run Python at once (turns, see :mod:`sts.adapters.request_threads`).
    active_threads: int = 1
    header_read_timeout: float = 10.0
    body_read_timeout: float = 10.0
    max_body_bytes: int = 16384
    max_connections: int = 1024
    #: Seconds a request may wait for a request thread: longer, and it is refused ``503``.
    queue_timeout: float = 10.0
    #: Seconds the request threads may hold requests without finishing any before ``/livez``
    #: answers ``503`` (see :mod:`sts.adapters.probe_lane`).
    liveness_stall: float = 60.0
