"""A request that waited for a request thread longer than ``request_queue_timeout`` is refused
``503`` before the application runs it: not run after its client may have gone (with every
thread held by a slow backend, requests queued for a minute and were then granted, spending
single-use tokens on answers nobody read)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from sts.adapters.request_threads import QueuedTooLong, RequestThreads
from sts.serving import Limits, WSGIOverRSGI

from ..support.rsgi_fakes import FakeProto as _Proto
from ..support.rsgi_fakes import FakeScope as _Scope

RAN: list[str] = []


def _app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    RAN.append(environ["PATH_INFO"])
    if environ["PATH_INFO"] == "/slow":
        time.sleep(0.8)  # holds the only request thread (a backend answering slowly)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def _serve_two(queue_timeout: float, hangs_up_after: float | None = None) -> tuple[_Proto, _Proto]:
    served = WSGIOverRSGI(_app, Limits(threads=1, active_threads=1, queue_timeout=queue_timeout))
    slow, queued = _Proto(), _Proto(hangs_up_after)

    async def body() -> None:
        loop = asyncio.get_running_loop()
        served.__rsgi_init__(loop)
        try:
            first = asyncio.ensure_future(served.__rsgi__(_Scope("/slow"), slow))
            await asyncio.sleep(0.05)
            await served.__rsgi__(_Scope("/fast"), queued)  # waits for the only thread
            await first
        finally:
            served.__rsgi_del__(loop)

    asyncio.run(body())
    return slow, queued


def test_a_request_queued_past_the_timeout_is_refused_before_the_application() -> None:
    slow, queued = _serve_two(queue_timeout=0.3)
    assert slow.answer is not None and slow.answer[0] == 200
    assert queued.answer is not None
    status, headers, body = queued.answer
    assert status == 503
    assert json.loads(body)["error"] == "temporarily_unavailable"
    assert headers["Retry-After"] == "1" and headers["Cache-Control"] == "no-store"
    assert headers["X-Request-Id"]


def test_a_request_queued_within_the_timeout_is_served() -> None:
    _, queued = _serve_two(queue_timeout=5)
    assert queued.answer is not None and queued.answer[0] == 200


def test_the_threads_do_not_run_a_call_that_waited_too_long() -> None:
    ran: list[str] = []

    async def body() -> None:
        threads = RequestThreads(asyncio.get_running_loop(), 1, 1, queue_timeout=0.2)
        try:
            first = threads.run(lambda: (time.sleep(0.5), ran.append("first")))
            second = threads.run(lambda: ran.append("second"))
            await first
            with pytest.raises(QueuedTooLong):
                await second
        finally:
            threads.shutdown()

    asyncio.run(body())
    assert ran == ["first"]


def test_refusals_are_counted_and_warned_about_at_most_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> RequestThreads:
        threads = RequestThreads(asyncio.get_running_loop(), 1, 1, queue_timeout=0.1)
        try:
            first = threads.run(time.sleep, 0.4)
            late = [threads.run(lambda: None) for _ in range(3)]
            await first
            for call in late:
                with pytest.raises(QueuedTooLong):
                    await call
        finally:
            threads.shutdown()
        return threads

    with caplog.at_level(logging.WARNING, logger="sts.adapters.request_threads"):
        threads = asyncio.run(body())
    assert threads.refused_total == 3
    assert [r.getMessage() for r in caplog.records] == [
        "request threads: 1 request(s) refused 503 after waiting more than 0.1 s for a thread (1 in all): "
        "every thread was busy that long (a slow backend, an overload)"
    ]


def test_the_refusal_comes_at_the_timeout_while_every_thread_is_still_busy() -> None:
    """Answered when the timeout passes, not once a thread is free (an outside audit waited 8 s for
    a 503 due after 1)."""

    async def body() -> float:
        threads = RequestThreads(asyncio.get_running_loop(), 1, 1, queue_timeout=0.2)
        try:
            first = threads.run(time.sleep, 1.0)
            started = time.monotonic()
            with pytest.raises(QueuedTooLong):
                await threads.run(lambda: None)
            refused_after = time.monotonic() - started
            assert not first.done()  # the only thread is still busy
            await first
            return refused_after
        finally:
            threads.shutdown()

    assert 0.2 <= asyncio.run(body()) < 0.6


def test_a_queued_request_whose_client_hung_up_is_not_run(caplog: pytest.LogCaptureFixture) -> None:
    """Its client gone while it waited for a thread, it is withdrawn unrun: no single-use token spent
    on an answer nobody reads (an outside audit had such a request granted); logged 499."""
    RAN.clear()
    with caplog.at_level(logging.INFO, logger="sts.access"):
        slow, _ = _serve_two(queue_timeout=5, hangs_up_after=0.4)
    assert slow.answer is not None and slow.answer[0] == 200
    assert RAN == ["/slow"]  # /fast never reached the application
    lines = [r.getMessage() for r in caplog.records if r.name == "sts.access"]
    assert any('"GET -" 499' in line for line in lines), lines


def test_a_client_that_stays_is_served_after_its_wait() -> None:
    RAN.clear()
    _, queued = _serve_two(queue_timeout=5, hangs_up_after=None)
    assert queued.answer is not None and queued.answer[0] == 200 and RAN == ["/slow", "/fast"]


def test_answers_given_before_the_application_are_in_the_access_log(caplog: pytest.LogCaptureFixture) -> None:
    """Like every request's, with the X-Request-Id the answer carries (an outside audit found the
    408, 411, 413, 400 and queue-timeout 503 answers in no log line)."""
    RAN.clear()
    with caplog.at_level(logging.INFO, logger="sts.access"):
        _, queued = _serve_two(queue_timeout=0.3)
    assert queued.answer is not None and queued.answer[0] == 503
    request_id = queued.answer[1]["X-Request-Id"]
    lines = [r.getMessage() for r in caplog.records if r.name == "sts.access"]
    assert any('"GET -" 503' in line and f"request_id={request_id}" in line for line in lines), lines
