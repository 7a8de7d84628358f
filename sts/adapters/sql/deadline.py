"""PostgreSQL: a deadline on each statement a request runs, kept by one thread per process.

libpq waits for an answer as long as the connection stands.  A server process that hangs while
its host still answers (stopped by ``SIGSTOP`` or ``docker pause``, frozen by its cgroup) sends
nothing and breaks nothing: the kernel acknowledges what is sent, so neither ``tcp_user_timeout``
nor the keepalives end the wait, and a statement waiting on a lock another session holds (a
``LOCK TABLE``) waits as long.  The request would hold its thread and its pooled connection for
as long, and its client would get no answer.

:class:`StatementDeadlines` watches each statement (or transaction) of the request pool
(:class:`~sts.adapters.sql.statements.RawStatement`).  One with no answer ``seconds`` after it
began is cancelled first (psycopg's ``Connection.cancel_safe``, libpq's cancellation protocol:
a live server aborts the statement and rolls it back, and the answer comes at once).  If it is
still running ``grace`` seconds later (the server cannot answer even that), its socket is shut
down, so that libpq sees the connection end.  Either way the request's thread raises
:class:`DeadlinePassed`, which is not tried again, and the request is refused
``503 temporarily_unavailable``; the connection is not pooled again.  Once a statement has
passed its deadline (or a new connection timed out), the pool's statements fail at once
(:meth:`StatementDeadlines.admit`): every ``seconds`` one of them tries the server again, and an
answer in time ends the silence, rather than every request waiting out a deadline (or a
``connect_timeout``) of its own while the requests behind it queue.

A statement the server had already received when its connection was cut still runs if the
server resumes, and a single statement commits: a grant refused that way may find its single-use
token already taken when it is sent again (it fails closed; docs/configuration.md says so).

The thread wakes every ``tick`` seconds; each watch costs a lock and a dictionary entry.  It
starts with the first watch in each process (a forked worker has its own) and ends after
``linger`` seconds with nothing to watch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class DeadlinePassed(Exception):
    """A statement got no answer from PostgreSQL within its deadline; it was cancelled, or its
    connection cut.  One of :attr:`RawStatement.failures
    <sts.adapters.sql.statements.RawStatement.failures>`, so that every caller refuses as for a
    driver error; not one of the errors a statement is tried again after."""


class _Watched:
    __slots__ = ("connection", "cut", "deadline", "fired", "settling")

    def __init__(self, connection: Any, deadline: float) -> None:
        self.connection = connection
        self.deadline = deadline
        #: The deadline passed: the statement is cancelled (and cut, after the grace).
        self.fired = False
        #: A cancellation is being sent: the statement's thread waits for it before it goes on,
        #: so that it cannot reach a statement the connection runs next.
        self.settling = False
        self.cut = False


#: Seconds a statement let through to try a silent server (:meth:`StatementDeadlines.admit`) holds
#: the others off at most, should it never report (its connection and deadline end it far sooner).
PROBE_LIMIT = 60.0
#: Seconds a statement waits for the outcome of another one trying a silent server before it fails:
#: a server back since answers that one in milliseconds, and the statements of a burst go on.
TRIAL_WAIT = 0.25


class _Watch:
    """The block of :meth:`StatementDeadlines.watch` (a class: a generator's context costs more)."""

    __slots__ = ("deadlines", "entry")

    def __init__(self, deadlines: StatementDeadlines, entry: _Watched) -> None:
        self.deadlines = deadlines
        self.entry = entry

    def __enter__(self) -> None:
        self.deadlines._enter(self.entry)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _tb: object) -> None:
        self.deadlines._leave(self.entry)
        if exc is not None and self.entry.fired:
            seconds = self.deadlines.seconds
            raise DeadlinePassed(f"no answer from PostgreSQL within {seconds:g} s") from exc


class StatementDeadlines:
    """The deadline of each watched statement of one engine's request pool (see the module)."""

    def __init__(
        self,
        seconds: float,
        *,
        grace: float = 1.0,
        tick: float = 0.1,
        linger: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.seconds = seconds
        self.grace = grace
        self.tick = tick
        #: Seconds the thread stays with nothing to watch before it ends (the next watch starts another).
        self.linger = linger
        self._clock = clock
        self._changed = threading.Condition()
        self._watched: dict[int, _Watched] = {}
        #: The process whose thread is running (0: none).
        self._running = 0
        #: Until when statements fail at once: the server answered nothing (see :meth:`admit`).
        self._silent_until = 0.0
        #: A statement let through by :meth:`admit` is trying the silent server.
        self._trying = False
        _INSTANCES.add(self)

    def admit(self) -> None:
        """Before a statement of the request pool takes a connection: while the server is silent
        (a statement went unanswered past its deadline, or a new connection timed out),
        raise :class:`DeadlinePassed` at once, instead of letting each statement wait out a
        deadline of its own (or a new connection its ``connect_timeout``).  Once every
        ``seconds``, one statement is let through to try the server; its outcome ends the silence
        (:meth:`answered`) or renews it (:meth:`heard_nothing`).  Statements arriving meanwhile
        wait for that outcome up to :data:`TRIAL_WAIT` seconds: after an outage the first burst
        of requests went on, but for the one trying, refused, though the server had long been
        back (and ``/readyz``, on another worker, said so).  One that never reports stops
        holding the others off after :data:`PROBE_LIMIT` seconds."""
        if not self._silent_until:
            return
        with self._changed:
            now = self._clock()
            if not self._silent_until:
                return
            if now >= self._silent_until:
                self._silent_until = now + PROBE_LIMIT  # this one tries; the others wait for its outcome
                self._trying = True
                return
            if self._trying:
                end = time.monotonic() + TRIAL_WAIT
                while self._silent_until and self._trying and (left := end - time.monotonic()) > 0:
                    self._changed.wait(left)
                if not self._silent_until:
                    return
            raise DeadlinePassed("PostgreSQL answered nothing a moment ago: not tried again yet")

    def heard_nothing(self) -> None:
        """The server answered nothing: statements fail at once for the next ``seconds``."""
        if self.seconds > 0:
            with self._changed:
                self._silent_until = self._clock() + self.seconds
                self._trying = False
                self._changed.notify_all()

    def answered(self) -> None:
        """The server answered in time (a result, or an error of its own): it is not silent."""
        if self._silent_until:
            with self._changed:
                self._silent_until = 0.0
                self._trying = False
                self._changed.notify_all()

    def watch(self, connection: Any) -> contextlib.AbstractContextManager[None]:
        """Watch what runs on psycopg connection ``connection`` inside the block; raises
        :class:`DeadlinePassed` for an error the deadline caused.  A statement that answers
        after all, even as its connection is cut, has succeeded."""
        if self.seconds <= 0:
            return contextlib.nullcontext()
        return _Watch(self, _Watched(connection, self._clock() + self.seconds))

    def _enter(self, entry: _Watched) -> None:
        with self._changed:
            pid = os.getpid()
            if self._running != pid:
                self._running = pid
                threading.Thread(target=self._run, name="sts-statement-deadlines", daemon=True).start()
            self._watched[id(entry)] = entry

    def _leave(self, entry: _Watched) -> None:
        with self._changed:
            del self._watched[id(entry)]
            while entry.settling:
                self._changed.wait()
        if not entry.fired:
            self.answered()

    def _run(self) -> None:
        idle = 0.0
        while True:
            with self._changed:
                self._changed.wait(self.tick)
                if not self._watched:
                    idle += self.tick
                    if idle >= self.linger:
                        self._running = 0
                        return
                    continue
                idle = 0.0
                now = self._clock()
                due = [e for e in self._watched.values() if not e.fired and e.deadline <= now]
                for entry in due:
                    entry.fired = entry.settling = True
                if due:
                    # Answering late is answering too late: the statements after it would wait as
                    # long (a LOCK TABLE held for a minute filled every request thread, and the
                    # requests queued behind them ran after their clients had gone).
                    self.heard_nothing()
                for entry in self._watched.values():
                    if entry.fired and not entry.cut and entry.deadline + self.grace <= now:
                        # Under the lock: the statement's thread cannot leave its watch, and the
                        # connection cannot close (and its descriptor be reused), meanwhile.
                        entry.cut = True
                        _shut_down(entry.connection)
                        self.heard_nothing()
            for entry in due:
                threading.Thread(target=self._cancel, args=(entry,), daemon=True).start()

    def _cancel(self, entry: _Watched) -> None:
        log.warning("a PostgreSQL statement got no answer within %g s: cancelled", self.seconds)
        try:
            entry.connection.cancel_safe(timeout=self.grace)
        except Exception as exc:  # noqa: BLE001 - the cut after the grace ends the wait anyway
            log.debug("cancelling a statement past its deadline: %s", type(exc).__name__)
        with self._changed:
            entry.settling = False
            self._changed.notify_all()

    def _forked(self) -> None:
        """In a forked child: the parent's thread, lock holder and statements are not this process's."""
        self._changed = threading.Condition()
        self._trying = False
        self._watched.clear()
        self._running = 0


#: Every instance, for :func:`_after_fork`.
_INSTANCES: weakref.WeakSet[StatementDeadlines] = weakref.WeakSet()


def _after_fork() -> None:
    for instance in list(_INSTANCES):
        instance._forked()


os.register_at_fork(after_in_child=_after_fork)


def _shut_down(connection: Any) -> None:
    """Shut down the socket of psycopg connection ``connection``: libpq, waiting on it, sees the
    connection end.  The descriptor stays the connection's (a duplicate is shut down and closed)."""
    try:
        fd = connection.pgconn.socket
        with socket.socket(fileno=os.dup(fd)) as duplicate:
            duplicate.shutdown(socket.SHUT_RDWR)
        log.warning("a PostgreSQL statement got no answer to its cancellation: connection cut")
    except Exception as exc:  # noqa: BLE001 - a connection already gone needs no cut
        log.debug("cutting a connection past its deadline: %s", type(exc).__name__)
