"""The request body's deadline allows for a worker that was not running: a body that arrived
while the worker was stopped (SIGSTOP) or starved, or within a second after, is read, not refused
``408`` (an outside fault test froze a worker for 40 s, and requests whose whole body had been sent
before it were answered ``408``)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from sts.serving import Limits, WSGIOverRSGI

from ..support.rsgi_fakes import FakeHeaders, FakeProto, FakeScope


class _BodyProto(FakeProto):
    """Its body arrives ``after`` seconds (from another thread, as granian's runtime delivers it)."""

    def __init__(self, after: float | None) -> None:
        super().__init__()
        self.after = after

    def __call__(self) -> asyncio.Future[bytes]:
        loop = asyncio.get_running_loop()
        body: asyncio.Future[bytes] = loop.create_future()
        if self.after is not None:
            threading.Timer(self.after, loop.call_soon_threadsafe, (body.set_result, b"a=1")).start()
        return body


def _read(after: float | None, *, frozen: float | None, busy: float | None = None) -> Any:
    served = WSGIOverRSGI(lambda environ, start: [], Limits(body_read_timeout=0.2))
    scope = FakeScope("/token")
    scope.method = "POST"
    scope.headers = FakeHeaders({"host": "sts", "content-length": "3"})

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        if frozen is not None:
            loop.call_later(0.05, time.sleep, frozen)  # the worker runs nothing meanwhile
        if busy is not None:
            # The worker runs, but in stretches of 1.8 s (other requests' work on the loop).
            for start in range(int(busy / 1.81)):
                loop.call_later(0.05 + start * 1.81, time.sleep, 1.8)
        started = loop.time()
        try:
            return await served._read_body(scope, _BodyProto(after))
        except Exception as exc:
            return type(exc).__name__, getattr(exc, "status", None), loop.time() - started

    return asyncio.run(main())


def test_a_body_that_arrived_while_the_worker_was_stopped_is_read() -> None:
    assert _read(0.3, frozen=1.0) == b"a=1"


def test_a_body_that_arrives_just_after_the_worker_resumed_is_read() -> None:
    """Stopped from 0.05 to 1.05 s past a deadline at 0.2 s, its body arriving at 1.3 s: in the grace."""
    assert _read(1.3, frozen=1.0) == b"a=1"


def test_a_body_that_arrives_in_time_is_read() -> None:
    assert _read(0.05, frozen=None) == b"a=1"


@pytest.mark.parametrize("frozen", [None, 1.0])
def test_a_body_that_never_comes_is_refused_408(frozen: float | None) -> None:
    """On time when the worker ran throughout; after a freeze, once the grace has passed too."""
    name, status, took = _read(None, frozen=frozen)
    assert (name, status) == ("_RequestError", 408)
    # Frozen from 0.05 to 1.05 s: the timer due at 0.2 s fires 0.85 s late, so GRACE (1 s) follows.
    assert 0.2 <= took < 0.9 if frozen is None else 2.0 <= took < 3.5, took


def test_a_busy_worker_gives_a_client_the_grace_once() -> None:
    """Every timer fires late on a worker busy in long stretches: the grace is given once, so a
    body that never comes is refused within its deadline, the grace and a stretch (a review held
    the deadline open for as long as the worker stayed busy, 20 s and more)."""
    name, status, took = _read(None, frozen=None, busy=9.0)
    assert (name, status) == ("_RequestError", 408)
    # Due at 0.2 s, fired at 1.85 s, its grace due at 2.85 s fired at 3.66 s: refused then.
    assert took < 5.0, took
