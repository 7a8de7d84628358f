"""The threads that run the WSGI application, and the turns they take to run Python.

A worker runs the application on ``count`` threads, but lets only ``active`` of them (one, by
default) run at once: each holds a *turn* while it runs a request, and gives it up while it
waits on something outside the process (:func:`waiting`: a round trip to Redis or PostgreSQL,
a JWKS fetch, another thread's group commit), so that another request runs meanwhile.

Why: every thread of a process shares one interpreter lock.  With several threads runnable at
once, each short release of that lock (every SQLite call, every socket call) hands it to another
thread, and the releasing thread then sleeps until it can take the lock back: two context
switches and cold caches for a few microseconds of waiting.  Measured on a 2-core machine, 2
workers, 8 connections (``benchmarks/bench.py``): the SQLite exchange made about 20 context
switches per request with 8 threads running freely, and served 1.3 times as many requests with
one thread per worker; but one thread per worker leaves the CPU idle while a request waits on
Redis or PostgreSQL.  Turns keep the one and avoid the other.

A thread that finishes a request while requests are queued takes the next one itself, keeping
its turn (no thread is woken); an idle thread is woken only when a turn is free.  A thread coming
back from :func:`waiting` takes the first free turn, before queued requests (it has started its
request).

Nothing waits for a turn forever: a call queued, or a thread back from waiting, that finds no
turn free for ``patience`` seconds runs anyway, on a turn lent for the occasion (the thread
holding a turn may be stuck on a wait nobody marked, or on a lock held by a waiting thread).
So at worst requests run as they did without turns, ``patience`` later.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: Seconds a queued call, or a thread back from waiting, waits for a turn before taking a lent one.
PATIENCE = 0.05
#: Seconds between two warnings that turns were lent.
LENT_LOG_INTERVAL = 60.0

log = logging.getLogger(__name__)

_Call = tuple["asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...], float]
_Finished = tuple["asyncio.Future[Any]", Any, BaseException | None]

_local = threading.local()


class _Waiting:
    """``with waiting():`` the calling request thread gives up its turn for the block's duration."""

    __slots__ = ("_worker",)

    def __enter__(self) -> None:
        worker: _Worker | None = getattr(_local, "worker", None)
        self._worker = worker
        if worker is not None:
            worker.pool._leave(worker)

    def __exit__(self, *exc: object) -> None:
        worker = self._worker
        if worker is not None:
            self._worker = None
            worker.pool._enter(worker)


def waiting() -> _Waiting:
    """A context for a wait on something outside the process: the calling thread runs no Python
    meanwhile, so it lets another request run.  Outside a request thread, it does nothing.
    Nested uses give the turn up once (the inner one does nothing)."""
    return (
        _Waiting() if getattr(_local, "worker", None) is not None and _local.worker.has_turn else _NOT_WAITING
    )


def queue_wait() -> float:
    """Seconds the calling request thread's current request waited in the queue before it ran
    (0.0 outside a request thread): its age at its start, which deadlines counted from its
    arrival add (a grant's commit deadline, see :mod:`sts.adapters.sql.group_commit`)."""
    waited: float = getattr(_local, "waited", 0.0)
    return waited


def yield_turn() -> bool:
    """If the calling request thread holds a turn and a queued request or a thread back from a
    wait wants one, give the turn to it and take one back after it: the caller resumes once that
    request has run up to its own wait (or its end).  Returns whether the turn was given up
    (False outside a request thread, or with nobody waiting: then it costs a lookup)."""
    worker: _Worker | None = getattr(_local, "worker", None)
    if worker is None or not worker.has_turn:
        return False
    pool = worker.pool
    if not (pool._calls and pool._idle) and not pool._returning:  # a racy look; _leave decides
        return False
    pool._leave(worker)
    pool._enter(worker)
    return True


class _NotWaiting:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NOT_WAITING: Any = _NotWaiting()


class _Worker:
    """One request thread: how it is woken (a lock it sleeps on), and what it was handed."""

    __slots__ = ("call", "has_turn", "pool", "wake")

    def __init__(self, pool: RequestThreads) -> None:
        self.pool = pool
        self.wake = threading.Lock()
        self.wake.acquire()  # held: the thread sleeps by acquiring it, is woken by its release
        self.call: _Call | None = None
        self.has_turn = False


class QueuedTooLong(Exception):
    """A call waited in the queue longer than :attr:`RequestThreads.queue_timeout`: it was not run.
    Every thread was busy that long (a backend answering slowly, an overload): the request is
    refused, rather than run after its client may have gone (a single-use token spent on an
    answer nobody reads)."""


class ClientGone(Exception):
    """A call withdrawn while it waited in the queue (:meth:`RequestThreads.withdraw`): its client
    hung up, so it was not run."""


class RequestThreads:
    """The request threads of a worker, each call awaited from the event loop.

    What ``loop.run_in_executor`` does for a thread pool, with less work per call (the executor
    wraps a ``concurrent.futures`` future in an asyncio one: measured here, about twice the CPU
    per request), and with turns (see the module docstring).  A thread puts each result (or
    exception) on a queue of finished calls and wakes the loop only if no wake-up is pending:
    one callback settles every call finished by the time it runs.  A call already running cannot
    be cancelled, as with the executor: its result is then dropped.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        count: int,
        active: int | None = None,
        patience: float = PATIENCE,
        queue_timeout: float | None = None,
    ) -> None:
        self.loop = loop
        self.patience = patience
        #: Seconds a call may wait in the queue: one that waited longer is not run (it raises
        #: :class:`QueuedTooLong`), as its client may have gone, or will soon (None: no limit).
        self.queue_timeout = queue_timeout
        self._lock = threading.Lock()
        self._calls: collections.deque[_Call] = collections.deque()
        #: Threads with nothing to do, the most recently idle last (woken first: its caches are warm).
        self._idle: list[_Worker] = []
        #: Threads back from waiting, each wanting a turn, in the order they came back.
        self._returning: collections.deque[_Worker] = collections.deque()
        self._free = count if active is None else max(1, min(active, count))
        #: Turns lent beyond ``active`` and not yet given back (they are not returned to ``_free``).
        self._lent = 0
        #: Turns lent since the start.
        self.lent_total = 0
        self._reported_at = -LENT_LOG_INTERVAL
        #: Calls refused for waiting longer than ``queue_timeout``, since the start and since the
        #: last warning (see :meth:`_report_refused`), and when that warning was.
        self.refused_total = 0
        self._refused_unreported = 0
        self._refused_reported_at = -LENT_LOG_INTERVAL
        self._watching = False
        self._stopping = False
        #: Calls finished and not yet settled in the loop (``deque`` appends and pops are atomic).
        self._finished: collections.deque[_Finished] = collections.deque()
        #: Whether a callback to settle ``_finished`` is scheduled and has not started yet.
        self._wake_pending = False
        #: Calls queued or running, and when one last finished (or the first of them came).
        self._in_flight = 0
        self._progress_at = time.monotonic()
        self._workers = [_Worker(self) for _ in range(count)]
        self._idle.extend(reversed(self._workers))  # sts-request_0 first
        self._threads = [
            threading.Thread(target=self._serve, args=(worker,), name=f"sts-request_{n}", daemon=True)
            for n, worker in enumerate(self._workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def lent(self) -> int:
        """Turns lent beyond ``active`` right now (a stuck thread, or a wait nobody marked)."""
        return self._lent

    def run(self, function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``function(*args)`` on one of the threads; await the returned future for its result.

        Called from the event loop's thread."""
        future: asyncio.Future[T] = self.loop.create_future()
        call: _Call = (future, function, args, time.monotonic())
        with self._lock:
            if self._stopping:
                raise RuntimeError("the request threads are stopping")
            if not self._in_flight:
                self._progress_at = call[3]
            self._in_flight += 1
            if self._free > 0 and self._idle:
                self._free -= 1
                self._hand(self._idle.pop(), call)
                return future
            self._calls.append(call)
            watch = not self._watching
            self._watching = True
        if watch:
            self.loop.call_later(self.patience, self._watch)
        return future

    def withdraw(self, future: asyncio.Future[Any]) -> None:
        """Take the call of ``future`` out of the queue, unrun (it raises :class:`ClientGone`); a
        call already running is left to finish.  Called from the event loop's thread."""
        with self._lock:
            call = next((c for c in self._calls if c[0] is future), None)
            if call is None:
                return
            self._calls.remove(call)
            self._in_flight -= 1
        _settle(future, None, ClientGone("the client closed the connection"))

    def stalled_for(self) -> float:
        """Seconds the threads have held calls (queued or running) without finishing any; 0 when
        none is held.  A worker whose every thread is stuck shows here (what ``/livez`` reports)."""
        with self._lock:
            return time.monotonic() - self._progress_at if self._in_flight else 0.0

    def shutdown(self) -> None:
        """Finish the calls queued so far, then stop every thread."""
        with self._lock:
            if self._stopping:
                return  # stopped already, or stopping in another thread
            self._stopping = True
        while True:
            with self._lock:
                if not self._calls and len(self._idle) == len(self._workers):
                    idle, self._idle = self._idle, []
                    break
            time.sleep(0.005)
        for worker in idle:
            self._hand(worker, None, turn=False)  # woken without a turn: the thread ends
        for thread in self._threads:
            thread.join()

    # -- the threads -------------------------------------------------------------------------------

    def _hand(self, worker: _Worker, call: _Call | None, *, turn: bool = True) -> None:
        """Wake a sleeping ``worker`` with a turn, and a call to run if it is idle; lock held."""
        worker.call = call
        worker.has_turn = turn
        worker.wake.release()

    def _serve(self, worker: _Worker) -> None:
        _local.worker = worker
        while True:
            worker.wake.acquire()  # sleeps until handed a turn, or told to stop
            if not worker.has_turn:
                return
            call, worker.call = worker.call, None
            if call is None:  # (not handed so today; taken from the queue all the same)
                with self._lock:
                    call = self._next_or_idle(worker)
            while call is not None:
                self._run(call)
                del call
                with self._lock:
                    call = self._next_or_idle(worker)

    def _run(self, call: _Call) -> None:
        future, function, args, queued = call
        try:
            limit = self.queue_timeout
            _local.waited = waited = time.monotonic() - queued
            if limit is not None and waited > limit:
                self._report_refused(limit)
                raise QueuedTooLong(f"queued for more than {limit:g} s")
            result, error = function(*args), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine, as the executor does
            result, error = None, exc
        with self._lock:  # counted before the loop hears of it (stalled_for, seen from the loop)
            self._in_flight -= 1
            self._progress_at = time.monotonic()
        self._finished.append((future, result, error))
        del future, result, error  # Nothing of this request outlives it in the thread.
        self._wake_loop()

    def _next_or_idle(self, worker: _Worker) -> _Call | None:
        """The worker holds a turn and is free: its next call, or None once it is idle; lock held."""
        if self._returning:
            self._hand(self._returning.popleft(), None)
        elif self._calls:
            return self._calls.popleft()
        else:
            self._release_turn()
        worker.has_turn = False
        self._idle.append(worker)
        return None

    def _release_turn(self) -> None:
        """A turn nobody waits for goes back (a lent one is paid back first); lock held."""
        if self._lent > 0:
            self._lent -= 1
        else:
            self._free += 1

    def _leave(self, worker: _Worker) -> None:
        """``waiting()`` starts: the worker's turn goes to whoever wants one."""
        with self._lock:
            worker.has_turn = False
            if self._returning:
                self._hand(self._returning.popleft(), None)
            elif self._calls and self._idle:
                self._hand(self._idle.pop(), self._calls.popleft())
            else:
                self._release_turn()

    def _enter(self, worker: _Worker) -> None:
        """``waiting()`` ends: take a turn, waiting for one at most ``patience`` seconds."""
        with self._lock:
            if self._free > 0:
                self._free -= 1
                worker.has_turn = True
                return
            self._returning.append(worker)
        if worker.wake.acquire(timeout=self.patience):
            return  # handed a turn
        with self._lock:
            lent = worker in self._returning
            if lent:  # nobody handed one: run on a lent turn
                self._returning.remove(worker)
                self._lent += 1
                self.lent_total += 1
                worker.has_turn = True
        if lent:
            self._report_lent()
            return
        worker.wake.acquire()  # a turn was handed just as the wait ended: it is ours

    def _watch(self) -> None:
        """In the loop, every ``patience`` while calls are queued: refuse the calls that waited
        longer than ``queue_timeout`` (:class:`QueuedTooLong`, answered now, not once a thread is
        free: an outside audit waited 8 s for a 503 due after 1), and lend a turn to the oldest
        call that has waited ``patience`` for one, if a thread is idle to run it."""
        now = time.monotonic()
        limit = self.queue_timeout
        expired: list[_Call] = []
        with self._lock:
            while limit is not None and self._calls and now - self._calls[0][3] > limit:
                expired.append(self._calls.popleft())  # oldest first: the queue is in arrival order
                self._in_flight -= 1
            lent = self.lent_total
            while self._calls and self._idle and now - self._calls[0][3] >= self.patience:
                self._lent += 1
                self.lent_total += 1
                self._hand(self._idle.pop(), self._calls.popleft())
            lent = self.lent_total - lent
            self._watching = bool(self._calls)
        for call in expired:
            self._report_refused(limit or 0.0)
            _settle(call[0], None, QueuedTooLong(f"queued for more than {limit:g} s"))
        if lent:
            self._report_lent()
        if self._watching:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                self.loop.call_later(self.patience, self._watch)

    def _report_lent(self) -> None:
        """A warning now and then (at most every ``LENT_LOG_INTERVAL`` s) when turns were lent: a
        request held its turn ``patience`` while others waited, on a wait nobody marked."""
        now = time.monotonic()
        if now - self._reported_at < LENT_LOG_INTERVAL:
            return
        self._reported_at = now
        log.warning(
            "request threads: %d turn(s) lent in all, %d lent now: a request kept its turn %.0f ms "
            "while others waited (a wait not marked with waiting(), or a slow request)",
            self.lent_total,
            self._lent,
            self.patience * 1000,
        )

    def _report_refused(self, limit: float) -> None:
        """Count a call refused for waiting too long; warn at most every ``LENT_LOG_INTERVAL`` s
        (one line per refusal would flood the log in the overload that causes them)."""
        with self._lock:
            self.refused_total += 1
            self._refused_unreported += 1
            now = time.monotonic()
            if now - self._refused_reported_at < LENT_LOG_INTERVAL:
                return
            self._refused_reported_at, count, self._refused_unreported = now, self._refused_unreported, 0
        log.warning(
            "request threads: %d request(s) refused 503 after waiting more than %g s for a thread "
            "(%d in all): every thread was busy that long (a slow backend, an overload)",
            count,
            limit,
            self.refused_total,
        )

    # -- answers back to the loop ------------------------------------------------------------------

    def _wake_loop(self) -> None:
        """Schedule ``_settle_finished`` unless it is scheduled and has not started: it clears the
        flag before it takes the first call, so a call appended meanwhile is never left behind."""
        if self._wake_pending:
            return
        self._wake_pending = True
        # RuntimeError: the loop has closed, and nobody awaits the answers any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._settle_finished)

    def _settle_finished(self) -> None:
        self._wake_pending = False
        while self._finished:
            _settle(*self._finished.popleft())


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled while the call ran
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
