"""Request threads and their turns (sts.adapters.request_threads): at most ``active`` threads run
the application at once, a thread gives its turn up while it waits (``waiting()``), and nothing
waits for a turn longer than ``patience``."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from sts.adapters.request_threads import RequestThreads, waiting

T = TypeVar("T")


class Running:
    """Counts the calls running at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.threads: list[str] = []

    def __enter__(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.threads.append(threading.current_thread().name)

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.now -= 1


def scenario(body: Callable[[RequestThreads], Awaitable[T]], count: int, **options: Any) -> T:
    async def main() -> T:
        threads = RequestThreads(asyncio.get_running_loop(), count, **options)
        try:
            return await body(threads)
        finally:
            threads.shutdown()

    return asyncio.run(main())


def test_one_turn_runs_one_call_at_a_time_on_one_warm_thread() -> None:
    running = Running()

    def work(n: int) -> int:
        with running:
            time.sleep(0.002)  # not marked as a wait: the turn is kept
        return n

    async def body(threads: RequestThreads) -> list[int]:
        return list(await asyncio.gather(*(threads.run(work, n) for n in range(20))))

    assert scenario(body, 4, active=1, patience=10) == list(range(20))
    assert running.most == 1
    # Queued calls are taken by the thread that finished the previous one: no thread is woken.
    assert len(set(running.threads)) == 1


def test_a_thread_that_waits_lets_another_call_run() -> None:
    running = Running()

    def work() -> float:
        with running:
            pass
        with waiting():
            time.sleep(0.2)
        with running:
            pass
        return time.monotonic()

    async def body(threads: RequestThreads) -> float:
        started = time.monotonic()
        await asyncio.gather(*(threads.run(work) for _ in range(4)))
        return time.monotonic() - started

    elapsed = scenario(body, 4, active=1, patience=10)
    assert elapsed < 0.6  # the four waits overlapped (one after another: 0.8 s)
    assert running.most == 1  # and the Python around them never ran side by side


def test_without_active_every_thread_runs_at_once() -> None:
    barrier = threading.Barrier(3, timeout=5)

    async def body(threads: RequestThreads) -> list[int]:
        return list(await asyncio.gather(*(threads.run(barrier.wait) for _ in range(3))))

    assert sorted(scenario(body, 3)) == [0, 1, 2]


def test_a_call_stuck_on_an_unmarked_wait_holds_back_the_others_only_for_patience(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body(threads: RequestThreads) -> tuple[float, int, int]:
        stuck = threads.run(time.sleep, 1.0)
        await asyncio.sleep(0.01)
        started = time.monotonic()
        lent = await threads.run(lambda: threads.lent)  # runs on a lent turn
        waited = time.monotonic() - started
        await stuck
        await threads.run(lambda: None)
        return waited, lent, threads.lent

    with caplog.at_level(logging.WARNING, logger="sts.adapters.request_threads"):
        waited, lent_while_stuck, lent_after = scenario(body, 2, active=1, patience=0.05)
    assert 0.04 <= waited < 0.5
    assert lent_while_stuck == 1
    assert lent_after == 0  # paid back when the turns were given up
    # The operator hears of it (at most once a minute).
    assert [r.getMessage() for r in caplog.records] == [
        "request threads: 1 turn(s) lent in all, 1 lent now: a request kept its turn 50 ms while "
        "others waited (a wait not marked with waiting(), or a slow request)"
    ]


def test_a_thread_back_from_waiting_takes_a_lent_turn_after_patience() -> None:
    order: list[str] = []

    def waits() -> float:
        with waiting():
            time.sleep(0.05)
        order.append("back")
        return time.monotonic()

    def hogs() -> float:
        time.sleep(1.0)  # holds the turn, unmarked
        order.append("hog")
        return time.monotonic()

    async def body(threads: RequestThreads) -> tuple[float, float]:
        first = threads.run(waits)
        await asyncio.sleep(0.01)
        second = threads.run(hogs)
        return await first, await second

    back, hog = scenario(body, 2, active=1, patience=0.1)
    assert order == ["back", "hog"] and back < hog


def test_a_thread_back_from_waiting_goes_before_queued_calls() -> None:
    order: list[str] = []
    resumed = threading.Event()

    def waits() -> None:
        with waiting():
            time.sleep(0.1)
        order.append("resumed")
        resumed.set()

    def runs(n: int) -> None:
        time.sleep(0.03)
        order.append(f"call {n}")

    async def body(threads: RequestThreads) -> None:
        futures = [threads.run(waits), *(threads.run(runs, n) for n in range(6))]
        await asyncio.gather(*futures)

    scenario(body, 3, active=1, patience=10)
    # It came back during call 2 or 3 and ran as soon as that call gave up its turn.
    assert order.index("resumed") < order.index("call 5")
    assert order[: order.index("resumed")] == [f"call {n}" for n in range(order.index("resumed"))]


def test_waiting_outside_a_request_thread_and_nested_does_nothing_more() -> None:
    with waiting(), waiting():  # not a request thread: nothing to give up
        pass

    def nested() -> int:
        with waiting():
            with waiting():
                time.sleep(0.01)
            time.sleep(0.01)
        return 1

    async def body(threads: RequestThreads) -> tuple[list[int], int]:
        results = list(await asyncio.gather(*(threads.run(nested) for _ in range(3))))
        return results, threads.lent

    results, lent = scenario(body, 3, active=1, patience=10)
    assert results == [1, 1, 1] and lent == 0


def test_exceptions_reach_the_caller_and_the_turn_is_given_back() -> None:
    def fails() -> None:
        with waiting():
            pass
        raise ValueError("from the thread")

    async def body(threads: RequestThreads) -> int:
        for _ in range(3):
            with pytest.raises(ValueError, match="from the thread"):
                await threads.run(fails)
        return int(await threads.run(lambda: 7))

    assert scenario(body, 2, active=1, patience=10) == 7


def test_shutdown_finishes_queued_calls_and_stops_every_thread() -> None:
    done: list[int] = []

    def work(n: int) -> None:
        time.sleep(0.01)
        done.append(n)

    async def body(threads: RequestThreads) -> RequestThreads:
        for n in range(5):
            threads.run(work, n)
        threads.shutdown()
        assert sorted(done) == list(range(5))
        with pytest.raises(RuntimeError):
            threads.run(work, 9)
        return threads

    threads = scenario(body, 3, active=1, patience=10)
    assert not any(thread.is_alive() for thread in threads._threads)


def test_a_thread_waiting_for_another_threads_group_commit_gives_up_its_turn() -> None:
    """The audit sink's group commit: while one thread commits (a round trip, given up), the
    others queue behind it.  Were their wait not given up too, the committer would find no turn
    when its round trip ends, and every commit would cost ``patience``."""
    from sts.adapters.sql.group_commit import GroupCommit, PendingRow

    lent: list[int] = []
    threads_box: list[RequestThreads] = []

    def commit(batch: list[PendingRow]) -> None:
        with waiting():
            time.sleep(0.05)
        lent.append(threads_box[0].lent)
        for item in batch:
            item.done = True

    group = GroupCommit(commit, max_batch=16, timeout=5)

    def write(n: int) -> int:
        group.join(PendingRow({"n": n}))
        return n

    async def body(threads: RequestThreads) -> float:
        threads_box.append(threads)
        started = time.monotonic()
        assert sorted(await asyncio.gather(*(threads.run(write, n) for n in range(6)))) == list(range(6))
        return time.monotonic() - started

    elapsed = scenario(body, 6, active=1, patience=2.0)
    assert elapsed < 1.0  # two or three batches of 0.05 s, never a wait for patience (2 s)
    assert lent and set(lent) == {0}


@pytest.mark.parametrize("active", [1, 2])
def test_turns_add_up_after_a_storm_of_calls_waits_and_stalls(active: int) -> None:
    """Seeded random calls: some wait (given up), some nest waits, some stall holding their turn,
    some fail.  Every call is answered, and afterwards every turn is back and none is lent."""
    import random

    rng = random.Random(1234 + active)
    plans = [[rng.choice("pwsx") for _ in range(rng.randint(1, 4))] for _ in range(300)]
    running = Running()

    def call(plan: list[str]) -> int:
        for step in plan:
            if step == "w":
                with waiting():
                    time.sleep(rng.random() * 0.002)
                    if rng.random() < 0.3:
                        with waiting():
                            time.sleep(0.0005)
            elif step == "s":
                time.sleep(rng.random() * 0.003)  # unmarked: the turn is kept
            elif step == "x":
                raise ValueError("planned")
            else:
                with running:
                    sum(range(200))
        return len(plan)

    async def body(threads: RequestThreads) -> list[object]:
        futures = [threads.run(call, plan) for plan in plans]
        results = list(await asyncio.gather(*futures, return_exceptions=True))
        deadline = time.monotonic() + 5
        while len(threads._idle) < 8 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert threads._free == active and threads._lent == 0
        assert not threads._calls and not threads._returning and len(threads._idle) == 8
        return results

    results = scenario(body, 8, active=active, patience=0.02)
    for plan, result in zip(plans, results, strict=True):
        if "x" in plan:
            assert isinstance(result, ValueError)
        else:
            assert result == len(plan)
