"""Rate-limit refusals of one key written as two audit records per period, not one per request.

Every refusal is audited, and a refusal for a rate limit is no exception: but it is also what a
flood is made of.  Written one by one, an outside audit's flood of junk tokens from one address
(1,500 requests a second, 1,300 of them over the network's limit) added 2.25 KB of audit trail
per request, 286 GB a day, and each ``429`` cost as much CPU as a full refusal (the write).

:class:`CoalescingAuditSink` sits in front of the audit sink.  For each rate-limit key (the
endpoint, the scope and what was limited: a network, client, identity or rule) it opens a
*window* of ``period`` seconds at the key's first refusal, which is written in full as before.
The refusals that follow within the window are counted, not written: the newest is kept, and
once the window has passed it is written standing for all of them, with
``details.rate_limit.coalesced``: ``count`` (the refusals it stands for, itself included),
``first`` and ``last`` (their times) and ``window`` (the period).  A key's flood is then two
records per period in each process, whatever its rate, and every refusal is counted in one.

Held records are written when their window has passed: by the key's next refusal, with its own
record; by a background thread (woken when the earliest is due, or by a record written once one
is), which takes the passed windows into an *outbox* and writes them one at a time; and when the
process (a server's worker: :mod:`.worker_exit`) stops.  The stop writes what is left in the
outbox, waits for the records being written, and logs as not audited what its budget leaves, those
included (granian ends a worker with ``os._exit``, which kills the flusher where it stands: an
outside review lost six held records so, without a log line).  A request never waits for another
key's held record.
A process killed before then loses what it held (at most ``period`` seconds of one key's
refusals; their first was written).  Each refusal is still counted by the metrics
(``sts_decisions_total``, in front of this sink), and answered ``429`` as before.  Anything
other than a rate-limit refusal passes straight through.  ``period`` 0 writes every refusal; the
configuration allows at most 60 s, well within how far a record's ``time`` may lag the order it
was written in (:data:`~.audit_tables.SLACK`, which the trail's readers allow for).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.audit import AuditRecord, log_unaudited
from ..core.ports import AuditSink, AuditUnavailable
from .worker_exit import at_worker_exit

log = logging.getLogger(__name__)

#: Seconds a failed write must have taken for the rest of a flush to be logged, not tried.
STALLED_WRITE = 1.0
#: Seconds a stopping process spends writing held records before it logs the rest (granian kills
#: a worker that has not stopped after 10 s).
EXIT_BUDGET = 5.0
#: Keys with a window open at once, per process, passed windows waiting in the outbox included;
#: past this a key's refusals are written one by one (fail towards recording): at most this many
#: held records in memory.
MAX_WINDOWS = 10_000


@dataclass
class _Window:
    opened: float
    held: AuditRecord | None = None
    count: int = 0
    first: float = 0.0


def _key(record: AuditRecord) -> tuple[str, str, str] | None:
    """The rate-limit key a refusal was for (the limiter's own, which names the whole identity or
    client: ``limited`` is cut short, and two identities alike in their first 300 characters were
    merged; an outside review), or None for any other record."""
    if record.outcome != "refused" or not record.reasons or not record.reasons[-1].startswith("rate_limit."):
        return None
    limit: Any = record.details.get("rate_limit")
    if not isinstance(limit, dict):
        return None
    return record.endpoint, record.reasons[-1], str(limit.get("key", limit.get("limited")))


class CoalescingAuditSink:
    """An :class:`~sts.core.ports.AuditSink` that coalesces each rate-limit key's refusals (above)."""

    def __init__(self, inner: AuditSink, period: float, clock: Callable[[], float]) -> None:
        self.inner = inner
        self.period = period
        self.clock = clock
        self._windows: dict[tuple[str, str, str], _Window] = {}
        #: Held records whose window has passed, to be written (by the flusher or at the stop).
        self._outbox: deque[_Window] = deque()
        #: Held records taken from the outbox and being written now.
        self._writing: list[_Window] = []
        #: A write from the outbox failed slowly: the rest of it is logged, not tried, by every
        #: thread writing it (the flusher, a stop), until it has been emptied.
        self._stalled = False
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        #: Notified whenever a write from the outbox ends.
        self._written = threading.Condition(self._lock)
        #: The background flusher; None when none runs (set and cleared with the lock held).
        self._flusher: threading.Thread | None = None
        #: The earliest time a window ends (a racy look from :meth:`write` is enough).
        self._due = float("inf")
        if period > 0:
            # At exit: granian's workers end with os._exit, which runs no atexit handler (an outside
            # review lost every held record on a plain stop), so a worker's stop runs it too.
            flush = _flush_at_exit(weakref.ref(self))
            atexit.register(flush)
            at_worker_exit(flush)

    def _open(self, window: _Window, now: float) -> bool:
        """Whether ``now`` falls in ``window`` (not when the clock went back before its opening:
        a clock set back an hour held a key's refusals for that hour; an outside review)."""
        return 0 <= now - window.opened < self.period

    def write(self, record: AuditRecord) -> None:
        now = record.time
        if now >= self._due:
            # Windows have passed: the flusher writes them, never the request (a request that
            # flushed a dozen held records behind a slow database waited 12 s; an outside review).
            with self._lock:
                if self._start_flusher():
                    self._due = float("inf")  # else the next record tries again (an outside review)
        key = _key(record) if self.period > 0 else None
        if key is None:
            self.inner.write(record)
            return
        stale: _Window | None = None
        with self._lock:
            window = self._windows.get(key)
            if window is not None and self._open(window, now):
                if window.held is None:
                    window.first = now
                window.held, window.count = record, window.count + 1
                self._start_flusher()
                return
            if window is not None and window.held is not None:
                # Its window has passed, and no flush has taken it yet: this request writes it with
                # its own record, as a stop would wait for (``_writing``).  Handed to the flusher
                # instead, a flood over thousands of keys left one thread writing every held record,
                # and tens of thousands were logged at the stop, unwritten (an outside review).
                stale = window
                self._writing.append(stale)
            if window is not None or len(self._windows) + len(self._outbox) < MAX_WINDOWS:
                self._windows[key] = _Window(opened=now)
                self._due = min(self._due, now + self.period)
        if stale is not None:
            try:
                self._write_held(stale)
            finally:
                with self._lock:
                    self._writing.remove(stale)
                    self._written.notify_all()
        self.inner.write(record)

    def flush(self, now: float | None = None, *, budget: float | None = None) -> None:
        """Write the held records whose window has passed (all of them when ``now`` is None), each
        written or logged as not audited.  Once a write has failed slowly (a database down or
        locked: each try waits out its deadline), or ``budget`` seconds have gone, the others are
        logged rather than tried: a stopping worker is killed after 10 s (an outside review lost
        eight held records so, without a log line).  A record refused at once (for its content)
        stops none of the others (a later review).  All of them (``now`` None, as at a stop): the
        records the flusher is writing are waited for too (within ``budget``; logged if unfinished)."""
        with self._lock:
            due = [
                (key, window)
                for key, window in self._windows.items()
                if now is None or not self._open(window, now)
            ]
            for key, window in due:
                del self._windows[key]
                if window.held is not None:
                    self._outbox.append(window)
            self._due = min((w.opened + self.period for w in self._windows.values()), default=float("inf"))
        ends = None if budget is None else time.monotonic() + budget
        self._drain(ends)
        if now is None:  # all of them: also those the flusher is writing
            self._await_writes(ends)

    def _drain(self, ends: float | None) -> None:
        """Write the outbox's records one at a time, until it is empty (see :meth:`flush`)."""
        try:
            while True:
                with self._lock:
                    if not self._outbox:
                        self._stalled = False
                        return
                    window = self._outbox.popleft()
                    self._writing.append(window)
                    stalled = self._stalled
                try:
                    stalled = stalled or (ends is not None and time.monotonic() > ends)
                    started = time.monotonic()
                    if (
                        not self._write_held(window, log_only=stalled)
                        and time.monotonic() - started > STALLED_WRITE
                    ):
                        self._stalled = True
                except BaseException:
                    self._write_held(window, log_only=True)  # the interrupted write's own record
                    raise
                finally:
                    with self._lock:
                        self._writing.remove(window)
                        self._written.notify_all()
        except BaseException:
            # An interrupt (KeyboardInterrupt, SystemExit) during a write: what is left is logged.
            with self._lock:
                left, self._outbox = list(self._outbox), deque()
                self._stalled = False  # emptied: the next records are tried again
            for window in left:
                self._write_held(window, log_only=True)
            raise

    def _await_writes(self, ends: float | None) -> None:
        """Wait (until ``ends``, if any: a stop) for the records the flusher is writing; log those it
        has not finished by then (the process ends next, and the flusher with it)."""
        with self._lock:
            while self._writing:
                left = None if ends is None else ends - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._written.wait(left)
            unfinished = list(self._writing)
        for window in unfinished:
            assert window.held is not None
            log_unaudited(
                log,
                window.held,
                f"its write had not ended when the process stopped (it stood for {window.count} "
                "rate-limit refusals; it may be in the trail)",
            )

    def _write_held(self, window: _Window, *, log_only: bool = False) -> bool:
        record = window.held
        assert record is not None
        limit = record.details.get("rate_limit")
        if isinstance(limit, dict):
            coalesced = {"count": window.count, "first": window.first, "last": record.time}
            coalesced["window"] = self.period
            record.details["rate_limit"] = {**limit, "coalesced": coalesced}
        stood = f"it stood for {window.count} rate-limit refusals"
        if log_only:
            reason = "the flush gave up: the audit trail failed slowly, or time ran out"
            log_unaudited(log, record, f"{reason} ({stood})")
            return False
        try:
            self.inner.write(record)
        except AuditUnavailable as exc:
            log_unaudited(log, record, f"{exc} ({stood})")
            return False
        except Exception as exc:  # a held record never fails the request that flushes it
            log.exception("coalesced rate-limit refusals not written (request %s)", record.request_id)
            log_unaudited(log, record, f"{type(exc).__name__} ({stood})")
            return False
        return True

    def _start_flusher(self) -> bool:
        """(With the lock held.) Wake the background flusher, starting one first if none runs: the
        flusher decides to end with the lock held and says so, so no hold is left without one (a
        hold that came as it was ending found it alive and only woke it; an outside review).  Whether
        one runs: a thread that cannot be started now is tried again by the next record."""
        if self._flusher is None:
            flusher = threading.Thread(
                target=_run_flusher, args=(weakref.ref(self),), name="sts-coalesced-refusals", daemon=True
            )
            try:
                flusher.start()
            except RuntimeError as exc:  # no thread to be had now: the next record tries again
                log.warning("coalesced rate-limit refusals: no flusher started (%s)", exc)
                return False
            self._flusher = flusher
        self._wake.notify()
        return True

    def _next(self) -> float | None:
        """(The flusher, with the lock held.) Seconds until the earliest held record is due (0: now,
        or a window to clear); None when none is held, and then the flusher ends."""
        now = self.clock()
        if self._outbox or any(not self._open(w, now) for w in self._windows.values()):
            return 0.0
        held = [w for w in self._windows.values() if w.held is not None]
        if not held:
            self._flusher = None
            return None
        return min(w.opened + self.period for w in held) - now


def _run_flusher(ref: weakref.ReferenceType[CoalescingAuditSink]) -> None:
    """Write held records as their windows pass; ends once none is held (a hold starts another)."""
    while (sink := ref()) is not None:
        with sink._lock:
            wait = sink._next()
            if wait is None:
                return
            if wait > 0:
                sink._wake.wait(timeout=min(wait + 0.01, sink.period))
                continue
        try:
            sink.flush(sink.clock())
        except BaseException:
            # Ended by an error (the flush has logged its records): the next hold starts another.
            with sink._lock:
                sink._flusher = None
            raise
        del sink


def _flush_at_exit(ref: weakref.ReferenceType[CoalescingAuditSink]) -> Callable[[], None]:
    def flush() -> None:
        sink = ref()
        if sink is not None:
            try:
                sink.flush(budget=EXIT_BUDGET)
            except Exception:  # at exit, nothing may stop the process
                log.exception("coalesced rate-limit refusals not written at exit")

    return flush
