"""A request waiting for a request thread is not run once its client has hung up.

Under overload a request may wait in a worker's queue for seconds (up to
``request_queue_timeout``).  A client that gives up meanwhile would otherwise have its request
run all the same: its single-use token spent, and a grant recorded, for an answer nobody reads
(an outside audit had a request queued past its client's departure granted).  granian tells
when a client hangs up (RSGI ``HTTPProtocol.client_disconnect()``, an awaitable); watching costs
a task per request, so only a request still waiting after :data:`WATCH_AFTER` is watched.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from .request_threads import RequestThreads

T = TypeVar("T")

#: Seconds a request waits for a thread before its client is watched.
WATCH_AFTER = 0.25


async def watched(threads: RequestThreads, call: asyncio.Future[T], proto: Any) -> T:
    """The result of ``call`` (from :meth:`RequestThreads.run`); should the client of ``proto``
    hang up while it is still queued, it is withdrawn unrun and this raises
    :class:`~.request_threads.ClientGone` (a call already running is left to finish)."""
    watching: list[asyncio.Future[Any]] = []

    def watch() -> None:
        if call.done():
            return
        # In a task of its own: granian's awaitable, handed to ensure_future as it is, came back
        # unwrapped, and the garbage collector cannot see through it: each withdrawn request, its
        # body and frames, stayed in memory for good (an outside review measured 12 KB each).
        gone = asyncio.ensure_future(_hang_up(proto))
        gone.add_done_callback(lambda done: None if done.cancelled() else threads.withdraw(call))
        watching.append(gone)

    timer = asyncio.get_running_loop().call_later(WATCH_AFTER, watch)
    try:
        return await call
    finally:
        timer.cancel()
        for gone in watching:
            gone.cancel()
        watching.clear()


async def _hang_up(proto: Any) -> None:
    """Until the client of ``proto`` hangs up; a protocol that cannot tell never ends (no watch)."""
    try:
        await proto.client_disconnect()
    except Exception:  # noqa: BLE001 - then the request runs, as it always did
        await asyncio.Event().wait()
