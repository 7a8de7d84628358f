"""What one worker of ``sts serve`` allows a client (:mod:`sts.serving`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

#: Seconds past its deadline a client's timer may fire before it is taken for a worker that was not
#: running meanwhile (stopped, starved): then the client gets :data:`GRACE` seconds more, once.
LATE = 0.5
GRACE = 1.0

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


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """``await awaitable``, raising :class:`TimeoutError` after ``seconds``, with one allowance: a
    deadline that passed while the worker was not running (stopped with SIGSTOP, starved of CPU)
    is no fault of the client's, whose request may have arrived meanwhile, so a timer that fires
    more than :data:`LATE` late gives it :data:`GRACE` seconds more, once (a
    worker kept busy in long stretches fires every timer late: a review held a body's deadline
    open for as long as that lasted).  An outside fault test froze a worker for 40 s: requests
    whose whole body had been sent before were answered ``408``, their bodies delivered just
    after the timer fired."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(None) as timeout:

        def expire(due: float, graced: bool) -> None:
            now = loop.time()
            if now - due > LATE and not graced:
                handle[0] = loop.call_at(now + GRACE, expire, now + GRACE, True)
            else:
                timeout.reschedule(now)

        due = loop.time() + seconds
        handle = [loop.call_at(due, expire, due, False)]
        try:
            return await awaitable
        finally:
            handle[0].cancel()
