"""Health probes run on a thread of their own: ``/readyz`` answers on time while every request
thread is busy (it queued behind them, 3 to 4 s into a database freeze), and ``/livez`` reports
request threads that have finished nothing for too long."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from sts.adapters.request_threads import RequestThreads
from sts.serving import Limits, WSGIOverRSGI

from ..support.rsgi_fakes import FakeProto, FakeScope

SLOW = 1.0


def _app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/slow":
        time.sleep(SLOW)  # holds the only request thread (a backend answering slowly)
    start_response("200 OK", [("Content-Type", "application/json")])
    return [b'{"status":"ok"}']


Answer = tuple[FakeProto, float, bool]


def _while_slow(limits: Limits, probes: list[tuple[float, str]]) -> tuple[FakeProto, list[Answer]]:
    """Serve ``/slow`` on the only request thread, and each probe ``(at, path)`` ``at`` seconds
    later; each probe's answer, the seconds it took, and whether ``/slow`` was answered first."""
    served = WSGIOverRSGI(_app, limits)
    slow = FakeProto()
    answers: list[Answer] = []

    async def probe(at: float, path: str) -> None:
        await asyncio.sleep(at)
        proto, started = FakeProto(), time.monotonic()
        await served.__rsgi__(FakeScope(path), proto)
        answers.append((proto, time.monotonic() - started, slow.answer is not None))

    async def body() -> None:
        loop = asyncio.get_running_loop()
        served.__rsgi_init__(loop)
        try:
            first = asyncio.ensure_future(served.__rsgi__(FakeScope("/slow"), slow))
            await asyncio.gather(*(probe(at, path) for at, path in probes))
            await first
        finally:
            served.__rsgi_del__(loop)

    asyncio.run(body())
    return slow, answers


def test_readiness_answers_while_every_request_thread_is_busy() -> None:
    slow, answers = _while_slow(Limits(threads=1), [(0.1, "/readyz"), (0.15, "/healthz"), (0.2, "/livez")])
    assert slow.answer is not None and slow.answer[0] == 200
    for proto, took, slow_first in answers:
        assert proto.answer is not None and proto.answer[0] == 200
        assert took < SLOW / 2, took
        assert not slow_first  # nothing waited for the request thread


def test_other_paths_still_wait_for_a_request_thread() -> None:
    _, [(proto, took, slow_first)] = _while_slow(Limits(threads=1), [(0.1, "/token")])
    assert proto.answer is not None and proto.answer[0] == 200
    assert took > SLOW / 2 and slow_first


def test_liveness_reports_request_threads_that_finish_nothing() -> None:
    slow, answers = _while_slow(
        Limits(threads=1, liveness_stall=0.3), [(0.1, "/livez"), (0.6, "/livez"), (SLOW + 0.3, "/livez")]
    )
    assert slow.answer is not None and slow.answer[0] == 200
    (early, _, _), (stalled, _, _), (after, _, _) = answers
    assert early.answer is not None and early.answer[0] == 200  # held 0.1 s: not yet a stall
    assert stalled.answer is not None
    status, headers, body = stalled.answer
    assert status == 503
    assert json.loads(body) == {"status": "stalled", "problems": ["request_threads"]}
    assert headers["Cache-Control"] == "no-store" and headers["X-Request-Id"]
    assert after.answer is not None and after.answer[0] == 200  # the slow request finished


def test_a_stall_is_counted_only_while_calls_are_held() -> None:
    async def body() -> None:
        threads = RequestThreads(asyncio.get_running_loop(), 2, 1)
        try:
            assert threads.stalled_for() == 0.0
            running = threads.run(time.sleep, 0.8)
            await asyncio.sleep(0.2)
            assert 0.15 < threads.stalled_for() < 0.8
            await running
            assert threads.stalled_for() == 0.0
            # A call finishing while another runs is progress: the count starts again from it.
            long = threads.run(time.sleep, 0.5)
            await asyncio.sleep(0.2)
            await threads.run(lambda: None)
            assert threads.stalled_for() < 0.1
            await long
        finally:
            threads.shutdown()

    asyncio.run(body())
